"""Prometheus metrics, in a registry per gateway so tests can run several side by side.

Conventions (https://prometheus.io/docs/practices/naming/): counters end in `_total` and are
exported as counters, never as gauges; no `_created` series; units in the name (`_seconds`,
`_bytes`); `process_*` from the standard collector; `gatewayd_build_info{version,commit}` = 1.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gatewayd import __version__

# `_created` doubles every counter's series and means nothing to a gateway's dashboards.
disable_created_metrics()

_STATES = ("starting", "connecting", "authenticating", "connected", "backing_off", "auth_failed",
           "stopped")

DriverEvents = Iterable[tuple[str, str, int]]  # (device, event, cumulative count)


@functools.cache
def build_commit() -> str:
    """The git commit this code was built from: $GATEWAYD_COMMIT, a checkout's HEAD, or ''."""
    import os

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


class _DriverEventsCollector(Collector):
    """Drivers keep their own cumulative counters (CRC errors, Modbus exceptions, ...): exported
    as one counter family, read at scrape time."""

    def __init__(self, source: Callable[[], DriverEvents]) -> None:
        self.source = source

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily("gatewayd_driver_events",
                                  "A driver's own cumulative counters (crc_errors, timeouts, ...)",
                                  labels=["device", "event"])
        for device, event, value in self.source():
            fam.add_metric([device, event], value)
        yield fam

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("gatewayd_driver_events", "", labels=["device", "event"])


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
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
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.driver_events: Callable[[], DriverEvents] = lambda: ()
        r.register(_DriverEventsCollector(lambda: self.driver_events()))

    def uplink_state(self, uplink: str, state: str) -> None:
        for s in _STATES:
            self.uplink_connected.labels(uplink, s).set(1 if s == state else 0)
