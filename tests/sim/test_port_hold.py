"""A simulator (or test broker) that goes offline keeps its port, so it can always come back.

A client retrying a down port on this host can be handed that very port as its local port and
connect to itself (TCP simultaneous open); the server then cannot listen again. CI saw it twice
in one run: an MMS outage test and the EnOS offline test failed with EADDRINUSE on coming back,
the EnOS uplink having read its own CONNECT ("Unrecognised command 16"). The kernel's choice of
a local port cannot be steered from a test, so each test here takes the port the way such a
client would end up with it, by binding it, and checks the outage refuses that.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gatewayd_sim.kit import PortHold


def _self_connect(port: int) -> socket.socket | None:
    """What an unlucky client does: local port == remote port. Returns the connected socket if
    the port was free to take, None if it was refused."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        s.close()
        assert e.errno == errno.EADDRINUSE, e
        return None
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    return s


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_free_port_can_be_taken_by_a_client_connecting_to_it() -> None:
    """The failure itself, so the tests below are known to test something."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = _self_connect(port)
    assert s is not None, "a self-connect on a free port should succeed on Linux"
    try:
        assert s.getsockname() == s.getpeername()
        with pytest.raises(OSError) as e, socket.create_server(("127.0.0.1", port)):
            pass
        assert e.value.errno == errno.EADDRINUSE
    finally:
        s.close()


def test_a_hold_refuses_connections_and_lets_a_listener_in() -> None:
    hold, port = PortHold.any_port()
    assert hold.held == [port]
    assert _refused(port)
    assert _self_connect(port) is None
    with socket.create_server(("127.0.0.1", port)):  # while still held: no gap
        hold.release()
        assert hold.held == []
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert not hold.hold(port)  # a listener has it: nothing to hold
    assert hold.hold(port) and _refused(port)
    assert _self_connect(port) is None
    hold.release()


async def _enos() -> tuple[Any, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    from gatewayd_sim.enos import EnosSimulator
    from tests.enos.conftest import make_registry
    sim = EnosSimulator(make_registry())
    await sim.start()
    return sim, sim.go_offline, sim.go_online


async def _mms() -> tuple[Any, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    from gatewayd_sim.mms import MmsSimulator
    sim = MmsSimulator(port=0)
    await sim.start()
    return sim, sim.go_offline, sim.go_online


async def _opshub() -> tuple[Any, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    from gatewayd_sim.opshub import OpsHubSimulator
    sim = OpsHubSimulator({"acct": "pw"})
    await sim.start()
    return sim, sim.go_offline, sim.go_online


@asynccontextmanager
async def _started(make: Callable[[], Awaitable[Any]]) -> AsyncIterator[Any]:
    sim, off, on = await make()
    try:
        yield sim, off, on
    finally:
        await sim.stop()


@pytest.mark.parametrize("make", [_enos, _mms, _opshub], ids=["enos", "mms", "opshub"])
async def test_a_simulator_offline_keeps_its_port_and_comes_back_on_it(make: Any) -> None:
    async with _started(make) as (sim, off, on):
        port = sim.port
        for _ in range(3):  # more than once: the hold is taken and given back each time
            await off()
            assert await asyncio.to_thread(_refused, port)
            assert _self_connect(port) is None, "the outage left the port free to take"
            await on()
            assert sim.port == port
            await asyncio.to_thread(lambda: socket.create_connection(
                ("127.0.0.1", port), timeout=2).close())
    assert _refused(port)  # stop() is for good: nothing listening, nothing held
    assert sim._hold.held == []


async def test_the_opshub_restart_keeps_its_port() -> None:
    from gatewayd_sim.opshub import OpsHubSimulator
    sim = OpsHubSimulator({"acct": "pw"})
    await sim.start()
    try:
        port = sim.port
        taken: list[socket.socket | None] = []
        real_start = sim.start

        async def start_after_a_try() -> None:  # the unlucky client, between stop and start
            taken.append(_self_connect(port))
            await real_start()
        sim.start = start_after_a_try  # type: ignore[method-assign]
        await sim.restart()
        assert taken == [None]
        assert sim._hold.held == []
        assert sim.port == port
    finally:
        await sim.stop()


def test_the_test_broker_keeps_its_port_while_down(tmp_path: Path) -> None:
    from tests.mqtt.conftest import Mosquitto
    broker = Mosquitto(tmp_path)
    assert _self_connect(broker.port) is None, "the port is free before the broker starts"
    broker.start()
    try:
        broker.stop()
        assert _refused(broker.port)
        assert _self_connect(broker.port) is None
        broker.start()
        socket.create_connection(("127.0.0.1", broker.port), timeout=2).close()
    finally:
        broker.stop()
