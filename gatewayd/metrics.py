"""Prometheus metrics, in a registry per gateway so tests can run several side by side.

Conventions (https://prometheus.io/docs/practices/naming/): counters end in `_total` and are
exported as counters, never as gauges; no `_created` series; units in the name (`_seconds`,
`_bytes`); `process_*` as the standard collector names them; `gatewayd_build_info{version,commit}`
= 1.

The counters, gauges and histograms here are the small part of prometheus_client the daemon
uses, with the same interface (`labels(...)`, `inc`, `set`, `observe`) and the same text
exposition, byte for byte (tests/test_metrics.py compares the two). prometheus_client cost the
daemon about 2 MB of resident memory for this.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from gatewayd import __version__

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"

_STATES = ("starting", "connecting", "authenticating", "connected", "backing_off", "auth_failed",
           "stopped")
_INF = math.inf

DriverEvents = Iterable[tuple[str, str, int]]  # (device, event, cumulative count)


class Sample(NamedTuple):
    """One sample; `timestamp` and `exemplar` (always None) keep prometheus_client's
    generate_latest able to read a registry of these."""

    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None
    exemplar: None = None


class Family:
    """One metric family as collected: name (without `_total` for counters), type, samples."""

    __slots__ = ("documentation", "name", "samples", "type")

    def __init__(self, name: str, documentation: str, kind: str) -> None:
        self.name = name[:-6] if kind == "counter" and name.endswith("_total") else name
        self.documentation = documentation
        self.type = kind
        self.samples: list[Sample] = []


class Collector(Protocol):
    def collect(self) -> Iterable[Family]: ...


class _Value:
    """One number, changed from the loop and from the queue's threads."""

    __slots__ = ("_lock", "_v")

    def __init__(self) -> None:
        self._v = 0.0
        self._lock = threading.Lock()

    def inc(self, amount: float) -> None:
        with self._lock:
            self._v += amount

    def set(self, value: float) -> None:
        with self._lock:
            self._v = float(value)

    def get(self) -> float:
        with self._lock:
            return self._v


class _CounterChild:
    __slots__ = ("_value", "pending")

    def __init__(self) -> None:
        self._value = _Value()
        # Counted at scrape time on top of the value: what has already happened but is booked
        # later (a device's slots missed while its poll is still under way). It must only grow
        # into what is then booked, so the sum never steps back.
        self.pending: Callable[[], float] | None = None

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self._value.inc(amount)


class _GaugeChild:
    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = _Value()

    def inc(self, amount: float = 1) -> None:
        self._value.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._value.inc(-amount)

    def set(self, value: float) -> None:
        self._value.set(value)


class _HistogramChild:
    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0.0] * len(bounds)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, amount: float) -> None:
        with self._lock:
            self._sum += amount
            for i, bound in enumerate(self._bounds):
                if amount <= bound:
                    self._counts[i] += 1
                    break

    def snapshot(self) -> tuple[list[float], float]:
        with self._lock:
            return list(self._counts), self._sum


class _Metric:
    """A family with fixed label names; unlabelled, it is its own only child."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: Registry) -> None:
        self.name = name[:-6] if self.kind == "counter" and name.endswith("_total") else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._children[()] = self._self = self._child()
        registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: object) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._child()
        return child

    def _samples(self, child: Any, labels: dict[str, str]) -> Iterator[Sample]:
        yield Sample(self.name, labels, child._value.get())

    def collect(self) -> Iterator[Family]:
        fam = Family(self.name, self.documentation, self.kind)
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            fam.samples.extend(self._samples(child, dict(zip(self.labelnames, key, strict=True))))
        yield fam


class Counter(_Metric):
    kind = "counter"

    def _child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1) -> None:
        self._self.inc(amount)

    @property
    def _value(self) -> _Value:
        return self._self._value  # type: ignore[no-any-return]

    def _samples(self, child: Any, labels: dict[str, str]) -> Iterator[Sample]:
        pending = child.pending
        yield Sample(self.name + "_total", labels,
                     child._value.get() + (pending() if pending is not None else 0))


class Gauge(_Metric):
    kind = "gauge"

    def _child(self) -> _GaugeChild:
        return _GaugeChild()

    def inc(self, amount: float = 1) -> None:
        self._self.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._self.dec(amount)

    def set(self, value: float) -> None:
        self._self.set(value)

    @property
    def _value(self) -> _Value:
        return self._self._value  # type: ignore[no-any-return]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: Registry, buckets: Sequence[float]) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != _INF:
            bounds.append(_INF)
        self._bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds)

    def observe(self, amount: float) -> None:
        self._self.observe(amount)

    def _samples(self, child: Any, labels: dict[str, str]) -> Iterator[Sample]:
        counts, total = child.snapshot()
        acc = 0.0
        for bound, n in zip(self._bounds, counts, strict=True):
            acc += n
            yield Sample(self.name + "_bucket", {**labels, "le": _go_float(bound)}, acc)
        yield Sample(self.name + "_count", labels, acc)
        yield Sample(self.name + "_sum", labels, total)


class Registry:
    """The collectors of one gateway, in registration order."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._lock = threading.Lock()

    def register(self, collector: Collector) -> None:
        with self._lock:
            self._collectors.append(collector)

    def collect(self) -> Iterator[Family]:
        with self._lock:
            collectors = list(self._collectors)
        for c in collectors:
            yield from c.collect()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        want = labels or {}
        for fam in self.collect():
            for s in fam.samples:
                if s.name == name and s.labels == want:
                    return s.value
        return None


def _go_float(v: float) -> str:
    """A float as Go's strconv writes it, as the Prometheus text format (and its client) do."""
    if v == _INF:
        return "+Inf"
    if v == -_INF:
        return "-Inf"
    if math.isnan(v):
        return "NaN"
    s = repr(float(v))
    dot = s.find(".")
    if v > 0 and dot > 6:  # Go turns to an exponent sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_label(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def generate_latest(registry: Registry) -> bytes:
    """The Prometheus text exposition (version 0.0.4) of everything in `registry`."""
    out: list[str] = []
    for fam in registry.collect():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        doc = fam.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {fam.type}\n")
        for s in fam.samples:
            if s.labels:
                labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(s.labels.items()))
                out.append(f"{s.name}{{{labels}}} {_go_float(s.value)}\n")
            else:
                out.append(f"{s.name} {_go_float(s.value)}\n")
    return "".join(out).encode()


class _ProcessCollector:
    """process_* as Prometheus's standard process collector exports them, from /proc."""

    def __init__(self) -> None:
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._btime = 0.0
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"btime "):
                        self._btime = float(line.split()[1])
        except OSError:
            pass

    @staticmethod
    def _gauge(name: str, doc: str, value: float, kind: str = "gauge") -> Family:
        fam = Family(name, doc, kind)
        fam.samples.append(Sample(name, {}, float(value)))
        return fam

    def collect(self) -> Iterator[Family]:
        if not self._btime:
            return
        try:
            with open("/proc/self/stat", "rb") as f:
                parts = f.read().split(b")")[-1].split()
        except OSError:
            pass
        else:
            yield self._gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                              float(parts[20]))
            yield self._gauge("process_resident_memory_bytes", "Resident memory size in bytes.",
                              float(parts[21]) * self._page)
            yield self._gauge("process_start_time_seconds",
                              "Start time of the process since unix epoch in seconds.",
                              float(parts[19]) / self._ticks + self._btime)
            yield self._gauge("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                              (float(parts[11]) + float(parts[12])) / self._ticks, "counter")
        try:
            max_fds = None
            with open("/proc/self/limits", "rb") as f:
                for line in f:
                    if line.startswith(b"Max open file"):
                        max_fds = float(line.split()[3])
                        break
            open_fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            return
        yield self._gauge("process_open_fds", "Number of open file descriptors.", open_fds)
        if max_fds is not None:
            yield self._gauge("process_max_fds", "Maximum number of open file descriptors.", max_fds)


@functools.cache
def build_commit() -> str:
    """The git commit this code was built from: $GATEWAYD_COMMIT, a checkout's HEAD, or ''."""
    if os.environ.get("GATEWAYD_COMMIT"):
        return os.environ["GATEWAYD_COMMIT"]
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


class _DriverEventsCollector:
    """Drivers keep their own cumulative counters (CRC errors, Modbus exceptions, ...): exported
    as one counter family, read at scrape time."""

    def __init__(self, source: Callable[[], DriverEvents]) -> None:
        self.source = source

    def collect(self) -> Iterator[Family]:
        fam = Family("gatewayd_driver_events",
                     "A driver's own cumulative counters (crc_errors, timeouts, ...)", "counter")
        for device, event, value in self.source():
            fam.samples.append(Sample("gatewayd_driver_events_total",
                                      {"device": device, "event": event}, float(value)))
        yield fam


class Metrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.readings_sampled = Counter("gatewayd_readings_sampled", "Readings read from devices",
                                        ["device"], registry=r)
        self.readings_queued = Counter("gatewayd_readings_queued", "Readings committed to the queue",
                                       registry=r)
        self.readings_sent = Counter("gatewayd_readings_sent", "Readings confirmed by an uplink's cloud",
                                     ["uplink"], registry=r)
        self.readings_acked = Counter("gatewayd_readings_acked", "Readings past an uplink's cursor",
                                      ["uplink"], registry=r)
        self.readings_dropped = Counter("gatewayd_readings_dropped", "Readings dropped, by reason",
                                        ["uplink", "reason"], registry=r)
        self.store_failures = Counter("gatewayd_queue_store_failures",
                                      "Readings that could not be stored (disk full, read-only)",
                                      ["reason"], registry=r)
        self.queue_storage_ok = Gauge("gatewayd_queue_storage_ok",
                                      "1 while the queue's disk takes writes, 0 while degraded",
                                      registry=r)
        self.queue_storage_state = Gauge("gatewayd_queue_storage_state",
                                         "1 for the queue's storage condition (ok, disk_full, "
                                         "read_only, io_error, locked)", ["state"], registry=r)
        self.queue_held = Gauge("gatewayd_queue_held_readings",
                                "Readings held in memory while the disk refuses writes", registry=r)
        self.state_lost = Counter("gatewayd_queue_state_lost_readings",
                                  "Committed readings found missing from the queue database at start",
                                  registry=r)
        self.device_failures = Counter("gatewayd_device_read_failures", "Failed device reads",
                                       ["device"], registry=r)
        self.device_missed_polls = Counter(
            "gatewayd_device_missed_polls",
            "Poll slots that passed without a poll (the device or its shared port was busy)",
            ["device"], registry=r)
        self.commands = Counter("gatewayd_commands", "Commands by outcome",
                                ["uplink", "outcome"], registry=r)
        self.command_latency = Histogram("gatewayd_command_latency_seconds",
                                         "Command execution time", ["uplink"], registry=r,
                                         buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5, 30))
        self.commit_latency = Histogram("gatewayd_queue_commit_seconds", "Queue commit time",
                                        registry=r,
                                        buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1))
        self.backlog_rows = Gauge("gatewayd_backlog_rows", "Rows past an uplink's cursor",
                                  ["uplink"], registry=r)
        self.backlog_bytes = Gauge("gatewayd_backlog_bytes", "Bytes past an uplink's cursor (approx.)",
                                   ["uplink"], registry=r)
        self.backlog_age = Gauge("gatewayd_backlog_oldest_age_seconds",
                                 "Age of the oldest reading past an uplink's cursor",
                                 ["uplink"], registry=r)
        self.backlog_drain_rate = Gauge("gatewayd_backlog_drain_rate",
                                        "Backlog readings an uplink confirmed per second (last 30 s)",
                                        ["uplink"], registry=r)
        self.backlog_eta = Gauge("gatewayd_backlog_eta_seconds",
                                 "Time until an uplink's backlog is drained at the current rate "
                                 "(-1: not draining)", ["uplink"], registry=r)
        self.backlog_ranges = Gauge("gatewayd_backlog_ranges",
                                    "Unconfirmed seq ranges of an uplink (outages not yet drained)",
                                    ["uplink"], registry=r)
        self.queue_rows = Gauge("gatewayd_queue_rows", "Rows in the queue", registry=r)
        self.uplink_connected = Gauge("gatewayd_uplink_state", "1 for the uplink's current state",
                                      ["uplink", "state"], registry=r)
        self.uplink_errors = Counter("gatewayd_uplink_errors", "Uplink errors by kind",
                                     ["uplink", "kind"], registry=r)
        self.device_ok = Gauge("gatewayd_device_ok", "1 if the device's last read succeeded",
                               ["device"], registry=r)
        self.build_info = Gauge("gatewayd_build_info", "Always 1: the running version and commit",
                                ["version", "commit"], registry=r)
        self.build_info.labels(__version__, build_commit() or "unknown").set(1)
        r.register(_ProcessCollector())  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.driver_events: Callable[[], DriverEvents] = lambda: ()
        r.register(_DriverEventsCollector(lambda: self.driver_events()))

    def uplink_state(self, uplink: str, state: str) -> None:
        for s in _STATES:
            self.uplink_connected.labels(uplink, s).set(1 if s == state else 0)

