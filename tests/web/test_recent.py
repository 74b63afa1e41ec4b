"""Recent values: bounded per point, bucketed for sparklines, changes tracked by seq."""

from __future__ import annotations

import math
from itertools import pairwise

from drivers.base import Quality, Reading
from gatewayd.web.recent import BUCKET_S, SLOTS, Recent, unit_of


def test_units_from_point_names() -> None:
    assert unit_of("temperature_c") == "°C"
    assert unit_of("energy_kwh") == "kWh"
    assert unit_of("humidity_pct") == "%"
    assert unit_of("fix_quality") == ""
    assert unit_of("lat") == ""


def test_history_is_bounded_and_windowed() -> None:
    r = Recent()
    t0 = 1_800_000_000_000
    for i in range(5000):  # 5000 readings 1 s apart: far more than the window
        r.record([Reading("d", "v_v", float(i), t0 + i * 1000)])
    p = r.points[("d", "v_v")]
    assert len(p.buckets) == SLOTS and len(p.values) == SLOTS
    now = t0 + 4999 * 1000
    series = r.snapshot(now_ms=now)["d"]["v_v"]["series"]
    values = series["v"].split(",")
    assert len(values) == SLOTS and series["step"] == BUCKET_S
    assert float(values[-1]) == 4999.0  # the last value of the newest bucket
    assert all(float(b) - float(a) == BUCKET_S for a, b in pairwise(values))
    assert series["t0"] == (now // 1000 // BUCKET_S - SLOTS + 1) * BUCKET_S
    # much later, nothing of it is within the window, but the last value is kept
    later = r.snapshot(now_ms=now + 3600_000)["d"]["v_v"]
    assert later["series"]["v"] == "" and later["value"] == 4999.0 and later["unit"] == "V"


def test_bad_values_and_changes_since() -> None:
    r = Recent()
    r.record([Reading("d", "a", None, 1000, Quality.BAD), Reading("d", "b", math.inf, 1000)])
    seq = r.seq
    assert r.changed_since(seq) == {}
    snap = r.snapshot(now_ms=2000)["d"]
    assert snap["a"]["series"] == {"t0": 0, "step": BUCKET_S, "v": ""} and snap["a"]["quality"] == 2
    assert snap["b"]["value"] == "inf"  # JSON has no infinity
    r.record([Reading("d", "b", True, 3000)])
    assert list(r.changed_since(seq)["d"]) == ["b"]
    assert r.changed_since(seq)["d"]["b"]["value"] is True
    r.record([Reading("d", "a", 5, 11_000)])  # two buckets on: the one between has no value
    assert r.snapshot(now_ms=12_000)["d"]["a"]["series"] == {"t0": 0, "step": BUCKET_S, "v": ",,5"}


class _Reference:
    """What the ring must hold: every reading written to its bucket's slot at once."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, float]] = {}  # slot -> (bucket, value)

    def add(self, value: object, ts_ms: int) -> None:
        b = ts_ms // (BUCKET_S * 1000)
        v = float(value) if isinstance(value, int | float) and math.isfinite(float(value)) else math.nan
        self.slots[b % SLOTS] = (b, v)

    def series(self, now_ms: int) -> str:
        first = now_ms // (BUCKET_S * 1000) - SLOTS + 1
        held = {b: v for b, v in self.slots.values() if b >= first}
        if not held:
            return ""
        return ",".join("" if math.isnan(held.get(b, math.nan)) else format(held[b], ".7g")
                        for b in range(min(held), max(held) + 1))


def test_open_bucket_matches_writing_every_reading() -> None:
    """Only a reading that leaves its bucket writes the ring; the series is still exactly what
    writing every reading would give: out of order, a ring's lap apart either way, ahead of the
    clock, and for batches that mix devices or bring a new one in their middle."""
    import random

    rnd = random.Random(7)
    r = Recent()
    refs: dict[tuple[str, str], _Reference] = {}
    t0 = 1_800_000_000_000
    ts = t0
    total = 0
    for k in range(4000):
        step = rnd.choice([700, 700, 700, -4000, 9000, SLOTS * BUCKET_S * 1000,
                           -SLOTS * BUCKET_S * 1000])
        ts = max(t0, ts + step)
        batch = []
        for _ in range(rnd.choice([1, 1, 2, 3])):
            key = (rnd.choice(["d", "d", "e", f"new{k}"]), rnd.choice(["p", "q"]))
            value = rnd.choice([1.5, None, math.nan, 3, True, -2.25])
            batch.append(Reading(key[0], key[1], value, ts))
            refs.setdefault(key, _Reference()).add(value, ts)
            ts += rnd.choice([0, 0, BUCKET_S * 1000])  # a batch may span buckets
        r.record(batch)
        total += len(batch)
        if k % 13 == 0:
            now = ts + rnd.choice([0, -20_000, 3_000, 400_000])  # also a clock behind the data
            snap = r.snapshot(now_ms=now)
            for (dev, pt), ref in refs.items():
                assert snap[dev][pt]["series"]["v"] == ref.series(now), (k, dev, pt)
    assert r.seq == total  # one seq per reading recorded
