"""The compose bench's gateway launcher: the bench config with the ports from the environment
(the smoke test moves every server to a free port) is still a valid config with those ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.config import load
from gatewayd_sim.compose import PORTS, with_ports
from gatewayd_sim.hw.bench import BenchEmulation

from .conftest import ROOT


def test_bench_config_takes_the_ports_from_the_environment(tmp_path: Path) -> None:
    base = (ROOT / "bench" / "bench.toml").read_text()
    for default in PORTS.values():
        assert str(default) in base, f"bench.toml no longer uses port {default}"
    env = {"BENCH_ENOS_PORT": "41001", "BENCH_OPSHUB_PORT": "41002", "BENCH_MMS_PORT": "41003",
           "BENCH_HEALTH_PORT": "41004"}
    path = tmp_path / "bench.toml"
    with BenchEmulation() as emu:  # what the launcher appends: the emulated devices
        path.write_text(with_ports(base, env) + emu.toml(commands=True))
    cfg = load(path, read_secrets=False)
    ups = {u.name: u for u in cfg.uplinks}
    assert ups["enos"].options.port == 41001
    assert ups["opshub"].options.url == "http://127.0.0.1:41002"
    assert ups["mms"].options.host == "http://127.0.0.1:41003"
    assert cfg.health.port == 41004
    assert with_ports(base, {}) == base


@pytest.mark.parametrize("bad", ["0", "65536", "80x", "-1"])
def test_bad_port_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="BENCH_MMS_PORT"):
        with_ports("port = 8443", {"BENCH_MMS_PORT": bad})
