"""The systemd unit: it verifies, and its hardening rates 2.0 or better while keeping what the
gateway needs (serial, I2C and GPIO devices, the network, the notify socket)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

UNIT = ROOT / "systemd" / "gatewayd.service"
analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with /usr/bin/gatewayd pointed at this checkout's interpreter."""
    text = UNIT.read_text().replace("/usr/bin/gatewayd", f"{sys.executable} -m gatewayd")
    path = tmp_path / "gatewayd.service"
    path.write_text(text)
    return path


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_keeps_what_the_gateway_needs() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["78"]
    assert d["StateDirectory"] == ["gatewayd"] and d["ConfigurationDirectory"] == ["gatewayd"]
    assert set(d["SupplementaryGroups"][0].split()) == {"dialout", "i2c", "gpio"}
    allowed = {v.split()[0] for v in d["DeviceAllow"]}
    assert {"char-ttyUSB", "char-ttyAMA", "char-i2c"} <= allowed
    families = d["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)  # notify socket and clouds
    assert "PrivateNetwork" not in d
    assert d["User"] == ["gatewayd"]


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    proc = subprocess.run([analyze, "verify", str(unit_for_this_machine(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "gatewayd.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


@needs_analyze
def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    proc = subprocess.run([analyze, "security", "--offline=true", str(unit_for_this_machine(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for gatewayd\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout[-3000:]
