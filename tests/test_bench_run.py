"""`make run` output stays readable: static facts once, rounded readings, one timestamp style."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from contextlib import redirect_stdout
from types import ModuleType

import structlog

from gatewayd import logs

from .conftest import ROOT


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


STATUS = {"queue": {"rows": 3},
          "devices": {"meter-1": {"state": "ok"}},
          "uplinks": {"archive": {"state": "connected", "sent": 10, "backlog": {"rows": 0}}}}
ARCHIVE = [json.dumps({"device": "meter-1", "point": "power_w", "value": 1800.4591064453125}),
           json.dumps({"device": "meter-1", "point": "count", "value": 7}),
           json.dumps({"device": "relay", "point": "on", "value": True})]


def test_periodic_summary_rounds_and_leaves_static_lines_out() -> None:
    bench = _bench()
    hw = bench.Part("hardware", banner="emulated serial devices: meter=/dev/pts/3")
    cloud = bench.Part("enos", summary=lambda: f"enos: last meter.power_w={bench.fmt(1800.4591064453125)}")
    lines = bench.summary_lines(STATUS, ARCHIVE, [hw, cloud])
    text = "\n".join(lines)
    assert "emulated serial devices" not in text  # said once at start, not every 5 s
    assert "meter-1.power_w=1800.46" in text and "1800.4591" not in text
    assert "meter-1.count=7" in text and "relay.on=True" in text
    assert "enos: last meter.power_w=1800.46" in text
    assert bench.fmt(2.0) == "2" and bench.fmt(-0.001) == "0" and bench.fmt(0.5) == "0.5"


def test_bench_lines_and_log_lines_share_one_timestamp_style() -> None:
    bench = _bench()
    out = io.StringIO()
    with redirect_stdout(out):
        bench.say("gatewayd is up\n    curl ...")
        logs.setup("info", "console")  # what the daemon and the simulators print on a terminal
        structlog.get_logger("t").info("queue_committed", rows=3)
    structlog.reset_defaults()
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    iso = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z ")
    assert len(lines) == 3
    assert all(iso.match(re.sub(r"\x1b\[[0-9;]*m", "", ln)) for ln in lines), lines
