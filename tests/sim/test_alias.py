"""The old import name of the simulators (`gatewayd.sim.X`), which the TB-GW harness's counter
uses, maps onto the gatewayd-sim modules once the alias is installed, and only then."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
try:
    import gatewayd.sim.enos
    print("before: importable")
except ImportError:
    print("before: missing")
import gatewayd_sim._alias
gatewayd_sim._alias.install()
from gatewayd.sim.enos import EnosSimulator, HubOptions, Registry
import gatewayd.sim.enos as old, gatewayd_sim.enos as new
print("same module:", old is new, "spec:", new.__spec__.name)
"""


def test_old_name_maps_onto_the_same_modules() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["before: missing",
                                          "same module: True spec: gatewayd_sim.enos"]
