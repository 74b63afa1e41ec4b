"""Recent values per point, in memory, for the status page and `gatewayd status`.

Bounded by points x slots: each point keeps its last reading exactly, and a ring of SLOTS
buckets of BUCKET_S seconds (the last value seen in each bucket) for its sparkline. A
sparkline is about 120 pixels wide, so finer history would be drawn over itself anyway.
The page never reads the queue: everything it shows of values comes from here.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Iterable
from typing import Any

from drivers.base import Reading

BUCKET_S = 5
_BUCKET_MS = BUCKET_S * 1000
SLOTS = 120  # 10 minutes of 5 s buckets
MAX_POINTS = 20_000  # a config with more points than this is not a gateway; stop recording new ones

# Unit from the point name's suffix (the naming convention of every driver: "temperature_c").
_UNITS = {
    "c": "°C", "f": "°F", "k": "K", "pct": "%", "rh": "%RH", "hpa": "hPa", "pa": "Pa", "kpa": "kPa",
    "bar": "bar", "mbar": "mbar", "psi": "psi", "v": "V", "mv": "mV", "a": "A", "ma": "mA", "w": "W",
    "kw": "kW", "wh": "Wh", "kwh": "kWh", "mwh": "MWh", "var": "var", "kvar": "kvar", "va": "VA",
    "kva": "kVA", "hz": "Hz", "m": "m", "mm": "mm", "cm": "cm", "km": "km", "s": "s", "ms": "ms",
    "deg": "°", "rpm": "rpm", "lux": "lx", "ppm": "ppm", "kmh": "km/h", "mps": "m/s", "l": "L",
    "m3": "m³", "lpm": "L/min", "db": "dB", "dbm": "dBm", "pf": "",
}


def unit_of(point: str) -> str:
    """`temperature_c` -> `°C`; no known suffix -> ``."""
    _, sep, suffix = point.rpartition("_")
    return _UNITS.get(suffix.lower(), "") if sep else ""


class PointHistory:
    """One point: its last reading and a ring of bucketed values.

    The bucket the last reading fell in is open: its value is the last reading's, written to
    the ring only when a reading lands in another bucket. A point read every second writes its
    ring once per bucket (every 5 s), not at every reading; the series is the same."""

    __slots__ = ("bucket", "buckets", "quality", "seq", "ts_ms", "unit", "value", "values")

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.value: Any = None
        self.ts_ms = 0
        self.quality = 0
        self.seq = 0  # Recent.seq when last updated: what changed since a client's last update
        self.bucket = -1  # the open bucket's number (the last reading's), -1 before any
        self.buckets = array("i", [-1]) * SLOTS  # closed bucket number held in each slot (-1: none)
        self.values = array("d", [math.nan]) * SLOTS

    def _close(self) -> None:
        """Write the open bucket's last value to the ring (`Recent.record` moves it on)."""
        b = self.bucket
        if b >= 0:
            slot = b % SLOTS
            self.buckets[slot] = b
            self.values[slot] = numeric(self.value)

    def series(self, now_ms: int) -> dict[str, Any]:
        """The window ending now, compact: {"t0": first bucket's start (s), "step": BUCKET_S,
        "v": "v0,v1,,v3"} with one value per bucket from t0 on ("" where there is none).

        A string, not a list of floats: a snapshot of 1000 points x 120 buckets then costs the
        daemon about its own size in memory while it is sent, not a Python object per sample."""
        last = now_ms // _BUCKET_MS
        first = last - SLOTS + 1
        held = {b: v for b, v in zip(self.buckets, self.values, strict=True) if b >= 0 and b >= first}
        if self.bucket >= 0:  # the open bucket owns its slot: what the ring holds there is gone
            held.pop(self.buckets[self.bucket % SLOTS], None)
            if self.bucket >= first:
                held[self.bucket] = numeric(self.value)
        if not held:
            return {"t0": last * BUCKET_S, "step": BUCKET_S, "v": ""}
        start = min(held)
        vals = []
        for b in range(start, max(held) + 1):
            v = held.get(b, math.nan)
            vals.append("" if math.isnan(v) else format(v, ".7g"))
        return {"t0": start * BUCKET_S, "step": BUCKET_S, "v": ",".join(vals)}

    def last(self) -> dict[str, Any]:
        return {"value": jsonable(self.value), "ts_ms": self.ts_ms, "quality": self.quality,
                "unit": self.unit}


def numeric(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        f = float(value)
        return f if math.isfinite(f) else math.nan
    return math.nan


def jsonable(value: Any) -> Any:
    """Readings may hold NaN or inf (JSON has neither) or a small dict (a GPS fix)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Recent:
    """Every point's recent values; `record` is the sampler-side observer (cheap, never raises)."""

    def __init__(self) -> None:
        self.points: dict[tuple[str, str], PointHistory] = {}
        self._devices: dict[str, dict[str, PointHistory]] = {}  # the same, by device then point
        self.seq = 0
        self.dropped_points = 0  # points not recorded because MAX_POINTS was reached

    def record(self, readings: Iterable[Reading]) -> None:
        # A point's update is inlined (no method call): this runs for every reading made.
        devices = self._devices
        seq = self.seq
        name: str | None = None
        dev: dict[str, PointHistory] | None = None
        try:
            for r in readings:
                if r.device != name:  # a batch is one device's, as a rule
                    name = r.device
                    dev = devices.get(name)
                p = dev.get(r.point) if dev is not None else None
                if p is None:
                    p = self._new_point(r.device, r.point)
                    if p is None:
                        continue
                    dev = devices[name]
                seq += 1
                ts = r.ts_ms
                b = ts // _BUCKET_MS
                if b != p.bucket:
                    p._close()
                    p.bucket = b
                q = r.quality
                p.value, p.ts_ms, p.seq = r.value, ts, seq
                p.quality = q if q.__class__ is int else int(q)
        finally:  # every point updated so far is newer than the seq clients last saw
            self.seq = seq

    def _new_point(self, device: str, point: str) -> PointHistory | None:
        if len(self.points) >= MAX_POINTS:
            self.dropped_points += 1
            return None
        p = self.points[(device, point)] = PointHistory(unit_of(point))
        self._devices.setdefault(device, {})[point] = p
        return p

    def snapshot(self, history: bool = True, now_ms: int | None = None) -> dict[str, dict[str, Any]]:
        """{device: {point: {value, ts_ms, quality, unit, series?}}} for every point."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        out: dict[str, dict[str, Any]] = {}
        for (dev, pt), p in self.points.items():
            entry = p.last()
            if history:
                entry["series"] = p.series(now)
            out.setdefault(dev, {})[pt] = entry
        return out

    def changed_since(self, seq: int) -> dict[str, dict[str, Any]]:
        """Last values of the points updated after `seq` (the client extends its own series)."""
        out: dict[str, dict[str, Any]] = {}
        if seq >= self.seq:
            return out
        for (dev, pt), p in self.points.items():
            if p.seq > seq:
                out.setdefault(dev, {})[pt] = p.last()
        return out
