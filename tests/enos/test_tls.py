"""TLS to the simulator's second port with a per-run test CA and client-certificate auth."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gatewayd_sim.enos import EnosSimulator, TlsFiles
from tests.enos.conftest import GW, Pki, Rig, make_config, make_registry


@pytest.fixture
async def tls_rig(pki: Pki, tmp_path: Path) -> AsyncIterator[Rig]:
    tls = TlsFiles(pki.server_cert, pki.server_key, pki.ca, require_client_cert=True)
    async with EnosSimulator(make_registry(), tls=tls) as sim, Rig(sim, tmp_path) as rig:
        yield rig


async def test_tls_with_the_test_ca_and_a_client_certificate(tls_rig: Rig, pki: Pki) -> None:
    sim = tls_rig.sim
    assert sim.tls_port is not None
    cfg = make_config(sim, port=sim.tls_port, tls=True, ca_file=str(pki.ca),
                      cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    tls_rig.start_uplink(cfg)
    await tls_rig.wait_state("connected")
    assert [(c.code, c.tls) for c in sim.hub.connects] == [(0, True)]
    await tls_rig.put("meter1", "temp", 3)
    await tls_rig.acked(3)
    assert len(sim.points()) == 3


async def test_tls_refused_with_a_wrong_ca(tls_rig: Rig, pki: Pki) -> None:
    sim = tls_rig.sim
    assert sim.tls_port is not None
    cfg = make_config(sim, port=sim.tls_port, tls=True, ca_file=str(pki.other_ca),
                      cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    uplink = tls_rig.start_uplink(cfg)
    await tls_rig.wait_state("backing_off")
    assert "certificate verify failed" in uplink.last_error
    assert sim.hub.connects == []  # never got as far as CONNECT
    assert not sim.online(GW)


async def test_tls_refused_without_a_client_certificate(tls_rig: Rig, pki: Pki) -> None:
    sim = tls_rig.sim
    assert sim.tls_port is not None
    uplink = tls_rig.start_uplink(make_config(sim, port=sim.tls_port, tls=True,
                                              ca_file=str(pki.ca)))
    await tls_rig.wait_state("backing_off")
    assert uplink.last_error
    assert sim.hub.connects == []


async def test_client_certificate_must_name_the_device(tls_rig: Rig, pki: Pki) -> None:
    from gatewayd.schema import Secret
    sim = tls_rig.sim
    assert sim.tls_port is not None
    # The certificate's CN is gw-001; logging in as another device with it is refused.
    cfg = make_config(sim, port=sim.tls_port, tls=True, ca_file=str(pki.ca),
                      cert_file=str(pki.client_cert), key_file=str(pki.client_key),
                      product_key="DYNPK", device_key="dyn-gw", device_secret=None,
                      product_secret=Secret("dynProductSecret"), subs=())
    uplink = tls_rig.start_uplink(cfg)
    await tls_rig.wait_state("auth_failed")
    assert [(c.device_key, c.code) for c in sim.hub.connects] == [("dyn-gw", 5)]
    assert "refused the login" in uplink.last_error
