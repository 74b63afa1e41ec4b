"""gatewayd's metrics give the same text exposition as prometheus_client, byte for byte, for any
sequence of updates (the family order, label escaping and sorting, Go float formatting, histogram
buckets); the process_* families are the standard collector's."""

from __future__ import annotations

import math
import re
from typing import Any

import prometheus_client as pc
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import CounterMetricFamily

from gatewayd import __version__
from gatewayd import metrics as gm

pc.disable_created_metrics()


class _Events:
    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Any:
        fam = CounterMetricFamily("gatewayd_driver_events",
                                  "A driver's own cumulative counters (crc_errors, timeouts, ...)",
                                  labels=["device", "event"])
        for device, event, value in self.source():
            fam.add_metric([device, event], value)
        yield fam


def twin(m: gm.Metrics) -> tuple[pc.CollectorRegistry, dict[str, Any]]:
    """The same metrics, defined with prometheus_client."""
    r = pc.CollectorRegistry(auto_describe=True)
    out: dict[str, Any] = {}
    for c in m.registry._collectors:
        if isinstance(c, gm.Histogram):
            out[c.name] = pc.Histogram(c.name, c.documentation, c.labelnames, registry=r,
                                       buckets=c._bounds)
        elif isinstance(c, gm.Counter):
            out[c.name] = pc.Counter(c.name, c.documentation, c.labelnames, registry=r)
        elif isinstance(c, gm.Gauge):
            out[c.name] = pc.Gauge(c.name, c.documentation, c.labelnames, registry=r)
        elif isinstance(c, gm._ProcessCollector):
            pc.ProcessCollector(registry=r)
        else:
            r.register(_Events(lambda: m.driver_events()))
    out["gatewayd_build_info"].labels(__version__, gm.build_commit() or "unknown").set(1)
    return r, out


def without_process(text: bytes) -> bytes:
    return re.sub(rb"^(# (HELP|TYPE) )?process_\S+ .*\n", b"", text, flags=re.M)


label = st.text(st.characters(codec="utf-8"), max_size=6) | st.sampled_from(['a"b', "c\\d", "e\nf", "é"])
number = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e22, max_value=1e22) | \
    st.sampled_from([0.0, 1.0, 1e6, 1234567.0, 1e-9, math.inf, -math.inf, math.nan, 0.0005])
op = st.tuples(st.integers(0, 100), st.lists(label, min_size=2, max_size=2), number)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(op, max_size=40), st.lists(st.tuples(label, label, st.integers(0, 10**12)), max_size=3))
def test_exposition_is_prometheus_clients(ops: list[tuple[int, list[str], float]],
                                          events: list[tuple[str, str, int]]) -> None:
    m = gm.Metrics()
    ref, theirs = twin(m)
    ours = {c.name: c for c in m.registry._collectors if isinstance(c, gm._Metric)}
    names = sorted(ours)
    for i, labels, value in ops:
        name = names[i % len(names)]
        targets = [ours[name], theirs[name]]
        n = len(ours[name].labelnames)
        if n:
            values = (labels * 2)[:n]
            targets = [t.labels(*values) for t in targets]
        for t in targets:
            if isinstance(ours[name], gm.Histogram):
                if not math.isnan(value):
                    t.observe(value)
            elif isinstance(ours[name], gm.Counter):
                if value >= 0 and not math.isinf(value):
                    t.inc(value)
            else:
                t.set(value)
    m.driver_events = lambda: events
    ours = gm.generate_latest(m.registry)
    assert without_process(ours) == without_process(pc.generate_latest(ref))
    # and prometheus_client reads our registry as its own (tests elsewhere do)
    assert without_process(pc.generate_latest(m.registry)) == without_process(ours)  # type: ignore[arg-type]


def test_process_families_are_the_standard_collectors() -> None:
    m = gm.Metrics()
    ref, _ = twin(m)

    def process(text: bytes) -> list[bytes]:
        return [re.sub(rb" \S+$", b"", line) for line in text.splitlines() if b"process_" in line]

    ours, theirs = process(gm.generate_latest(m.registry)), process(pc.generate_latest(ref))
    assert ours == theirs and len(ours) == 18, ours
    rss = m.registry.get_sample_value("process_resident_memory_bytes")
    assert rss is not None and rss > 1e6


def test_the_interface_other_code_uses() -> None:
    m = gm.Metrics()
    m.readings_dropped.labels("a", "max_rows").inc(3)
    m.state_lost.inc(2)
    m.queue_storage_ok.set(1)
    assert m.readings_dropped.labels("a", "max_rows")._value.get() == 3
    assert m.state_lost._value.get() == 2 and m.queue_storage_ok._value.get() == 1
    assert m.registry.get_sample_value("gatewayd_readings_dropped_total",
                                       {"uplink": "a", "reason": "max_rows"}) == 3
    fams = {f.name: f for f in m.registry.collect()}
    assert fams["gatewayd_readings_dropped"].type == "counter"
    assert [s.name for s in fams["gatewayd_readings_dropped"].samples] == ["gatewayd_readings_dropped_total"]
    try:
        m.readings_queued.inc(-1)
        raise AssertionError("a counter went down")
    except ValueError:
        pass
