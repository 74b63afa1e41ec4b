"""A daemon on a bench-like config: the bench's emulated hardware, a fast simulated device, a
device that always fails, a jsonl uplink that works and an Operations Hub uplink whose
server is down."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatewayd_sim.hw.bench import BenchEmulation
from tests.conftest import Daemon, free_port


@dataclass
class Bench:
    daemon: Daemon
    url: str
    config: Path
    devices: list[str]
    uplinks: list[str]


def bench_config(tmp_path: Path, emu: BenchEmulation, port: int, health_extra: str = "") -> Path:
    dead = free_port()  # nothing listens here: the opshub uplink keeps failing to connect
    text = textwrap.dedent(f"""
        [gateway]
        id = "site-17"
        state_dir = "{tmp_path / 'state'}"
        stop_timeout = "2s"

        [queue]
        commit_window = "50ms"

        [health]
        listen = "127.0.0.1:{port}"
        allow_commands = true
        {health_extra}

        [log]
        level = "debug"
        format = "json"

        [[devices]]
        name = "boiler"
        driver = "sim"
        interval = "200ms"
        points.temperature_c = {{ shape = "ramp", min = 20, max = 90, period = "20s" }}

        [[devices]]
        name = "broken-meter"
        driver = "sim"
        interval = "500ms"
        backoff_max = "1s"
        points.x = {{ fail_every = 1 }}

        [uplinks.archive]
        type = "jsonl"
        path = "{tmp_path / 'archive.jsonl'}"

        [uplinks.opshub]
        type = "opshub"
        url = "http://127.0.0.1:{dead}"
        allow_http = true
        username = "BENCH"
        password_env = "OPSHUB_PASSWORD"
        gateway_id = "01-23-45-67-89-ab"
    """) + emu.toml(commands=True)
    path = tmp_path / "gatewayd.toml"
    path.write_text(text)
    return path


@pytest.fixture
def bench(tmp_path: Path, daemons: list[Daemon]) -> Iterator[Bench]:
    with BenchEmulation() as emu:
        port = free_port()
        cfg = bench_config(tmp_path, emu, port)
        d = Daemon(cfg, tmp_path / "daemon.log", env={"OPSHUB_PASSWORD": "pw"}).start()
        daemons.append(d)
        d.event("gateway_ready", timeout=60)
        devices = ["attic-env", "room-climate", "tank", "meter-1", "meter-2", "gps", "boiler",
                   "broken-meter"]
        yield Bench(d, f"http://127.0.0.1:{port}", cfg, devices, ["archive", "opshub"])
        d.stop()
