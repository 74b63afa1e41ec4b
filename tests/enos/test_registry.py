"""The simulator's registry file and its command line entry."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gatewayd_sim import enos as sim_enos
from gatewayd_sim.enos import Registry, RegistryError

REGISTRY = """
[products.GWPK]
secret = "gw-ps"
[products.SUBPK]
secret = "sub-ps"
dynamic_activation = true
model = { temp = "float", on = "bool" }

[[devices]]
product_key = "GWPK"
device_key = "gw01"
secret = "gw-secret"
node_type = "gateway"
sub_devices = ["SUBPK/m1", "SUBPK/m2"]
topology = ["SUBPK/m1"]

[[devices]]
product_key = "SUBPK"
device_key = "m1"
secret = "m1-secret"
node_type = "sub"

[[devices]]
product_key = "SUBPK"
device_key = "m2"
node_type = "sub"
enabled = false
"""


def test_registry_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY)
    reg = Registry.load(path)
    gw = reg.devices[("GWPK", "gw01")]
    assert (gw.node_type, gw.topology, gw.sub_devices) == (
        "gateway", {("SUBPK", "m1")}, {("SUBPK", "m1"), ("SUBPK", "m2")})
    assert reg.products["SUBPK"].model == {"temp": "float", "on": "bool"}
    assert reg.devices[("SUBPK", "m2")].secret is None
    assert not reg.devices[("SUBPK", "m2")].enabled
    assert reg.gateway_of(("SUBPK", "m1")) is gw


@pytest.mark.parametrize(("text", "expected"), [
    ('[[devices]]\nproduct_key = "X"\ndevice_key = "d"\n', "unknown product"),
    ('[products.P]\nsecret = "s"\nmodel = { a = "complex" }\n', "unknown model types"),
    ('[products.P]\nsecret = "s"\n[[devices]]\nproduct_key = "P"\ndevice_key = "d"\n'
     'sub_devices = ["nokey"]\n', "productKey/deviceKey"),
    ("[products.P]\n", "missing or malformed"),
    ("not toml [", "registry.toml"),
])
def test_registry_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=expected):
        Registry.load(path)


def test_cli_refuses_a_bad_registry_with_ex_config(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    sim_enos.add_arguments(parser)
    path = tmp_path / "registry.toml"
    path.write_text("[products.P]\n")
    assert sim_enos.run(parser.parse_args(["--registry", str(path)])) == 2  # kit.EXIT_USAGE
    assert "missing or malformed" in capsys.readouterr().out
