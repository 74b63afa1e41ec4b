"""EnOS test rig: the simulator on free ports, the real SQLite queue, the real dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Reading
from drivers.logact import LogActuator, LogActuatorConfig
from gatewayd.config import CommandMap, DispatchSection, ParamSpec
from gatewayd.dispatch import Dispatcher
from gatewayd.queue import Queue, QueueConfig
from gatewayd.schema import Secret
from gatewayd.uplinks.base import DeviceInfo, UplinkContext, UplinkState
from gatewayd.uplinks.enos import DeviceMapping, EnosConfig, EnosUplink
from gatewayd_sim.enos import Device, EnosSimulator, HubOptions, Product, Registry, TlsFiles

GW = ("GWPK01", "gw-001")
SUBS = {"meter1": ("SUBPK01", "meter-001"), "meter2": ("SUBPK01", "meter-002"),
        "relay": ("RELAYPK", "relay-001")}
SECRETS = {"gw-001": "gwSecret001", "meter-001": "subSecret001", "meter-002": "subSecret002",
           "relay-001": "relaySecret1"}


def make_registry(*, in_topology: tuple[str, ...] = ("meter1",), model: bool = True) -> Registry:
    """A gateway allowed three sub-devices; `meter1` already in its topology."""
    reg = Registry()
    reg.add_product(Product("GWPK01", "gwProductSecret"))
    reg.add_product(Product("SUBPK01", "subProductSecret",
                            model={"temp": "float", "count": "int", "status": "string"}
                            if model else None))
    reg.add_product(Product("RELAYPK", "relayProductSecret", model={"on": "bool"}))
    reg.add_product(Product("DYNPK", "dynProductSecret", dynamic_activation=True))
    reg.add_device(Device(*GW, SECRETS["gw-001"], "gateway", sub_devices=set(SUBS.values()),
                          topology={SUBS[n] for n in in_topology}))
    for key in SUBS.values():
        reg.add_device(Device(*key, SECRETS[key[1]], "sub"))
    reg.add_device(Device("DYNPK", "dyn-gw", None, "gateway"))
    return reg


def make_config(sim: EnosSimulator, subs: tuple[str, ...] = ("meter1", "meter2", "relay"),
                **overrides: Any) -> EnosConfig:
    devices = {name: DeviceMapping(*SUBS[name], Secret(SECRETS[SUBS[name][1]]),
                                   quality_points=["temp"] if name == "meter2" else [])
               for name in subs}
    devices["cpu"] = DeviceMapping(gateway=True, points={"load": "cpuLoad"})
    base: dict[str, Any] = dict(
        host="127.0.0.1", port=sim.port, product_key=GW[0], device_key=GW[1],
        device_secret=Secret(SECRETS["gw-001"]), request_timeout=2.0, connect_timeout=5.0,
        backoff_base=0.05, backoff_cap=1.0, login_retry=0.2, devices=devices)
    base.update(overrides)
    return EnosConfig(**base)


class WatchedOutbox:
    """The real queue's outbox, plus a condition tests can wait on for acks and quarantines."""

    def __init__(self, outbox: Any) -> None:
        self._outbox = outbox
        self._changed = asyncio.Event()
        outbox.watchers.append(self._changed.set)  # every confirmation, from any lane
        self.quarantined: list[tuple[int, str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outbox, name)

    def quarantine(self, item: Any, reason: str, detail: str = "") -> None:
        self._outbox.quarantine(item, reason, detail)
        self.quarantined.append((item.seq, reason, detail))

    async def wait_acked(self, seq: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while self._outbox.acked < seq:
                self._changed.clear()
                await self._changed.wait()


class Rig:
    """One gateway's worth of parts: queue, dispatcher with a relay, EnOS uplink."""

    def __init__(self, sim: EnosSimulator, tmp_path: Path) -> None:
        self.sim = sim
        self.tmp_path = tmp_path
        # Test timestamps are in 2023: keep the queue from dropping them as too old.
        qcfg = QueueConfig(commit_window=0.01, max_age=20 * 365 * 86400.0)
        self.queue = Queue(tmp_path / "queue.db", qcfg, ["enos"])
        self.relay = LogActuator("relay", LogActuatorConfig(), buses=None)  # type: ignore[arg-type]
        self.dispatcher = Dispatcher(
            [CommandMap("switch", "relay", uplink="enos", device="relay",
                        params={"on": ParamSpec("bool")}),
             CommandMap("measurepoint.set", "relay", uplink="enos", device="relay",
                        actuator_action="set", params={"on": ParamSpec("bool")})],
            {"relay": self.relay}, DispatchSection(default_timeout=2.0))
        self.uplink: EnosUplink | None = None
        self.outbox: WatchedOutbox | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.seq = 0

    async def __aenter__(self) -> Rig:
        await self.queue.open()
        self._tasks.append(asyncio.create_task(self.queue.run(), name="test-queue"))
        self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="test-dispatch"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop_uplink()
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.queue.close()

    def start_uplink(self, config: EnosConfig | None = None, *, backlog_rate: float = 0.0,
                     live_first: bool = True, **overrides: Any) -> EnosUplink:
        cfg = config or make_config(self.sim, **overrides)
        self.outbox = WatchedOutbox(self.queue.outbox("enos"))
        ctx = UplinkContext("gw-test", self.tmp_path, self.outbox,  # type: ignore[arg-type]
                            self.dispatcher.submit,
                            {"relay": DeviceInfo("relay", "log", "actuator")},
                            live_first=live_first, backlog_rate=backlog_rate)
        self.uplink = EnosUplink("enos", cfg, ctx)
        self.dispatcher.repliers["enos"] = self.uplink.reply
        self._uplink_task = asyncio.create_task(self.uplink.run(), name="test-enos-uplink")
        return self.uplink

    async def stop_uplink(self) -> None:
        if self.uplink is not None:
            if self._uplink_task.done():  # run() must never end on its own: surface the bug
                self._uplink_task.result()
            self._uplink_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._uplink_task
            self.uplink = None

    async def wait_state(self, state: str, timeout_s: float = 10.0) -> None:
        assert self.uplink is not None
        await self.uplink.wait_for_state(UplinkState(state), timeout_s=timeout_s)

    async def acked(self, seq: int, timeout_s: float = 10.0) -> None:
        assert self.outbox is not None
        await self.outbox.wait_acked(seq, timeout_s)

    async def put(self, device: str, point: str, n: int, ts0: int = 1_700_000_000_000,
                  quality: int = 0) -> list[int]:
        """Queue `n` readings whose values are increasing sequence numbers; returns them."""
        vals = list(range(self.seq, self.seq + n))
        self.seq += n
        ok = await self.queue.put([Reading(device, point, float(v), ts0 + v, quality)
                                   for v in vals])
        assert ok
        return vals


@pytest.fixture(autouse=True)
async def _own_executor() -> AsyncIterator[None]:
    """aiomqtt connects in the loop's default executor: give each test one it can end."""
    executor = ThreadPoolExecutor(2, thread_name_prefix="enos-test-executor")
    asyncio.get_running_loop().set_default_executor(executor)
    yield
    executor.shutdown(wait=False)  # its idle threads exit at once


@pytest.fixture
async def sim() -> AsyncIterator[EnosSimulator]:
    async with EnosSimulator(make_registry(), http_port=0) as s:
        yield s


@pytest.fixture
async def rig(sim: EnosSimulator, tmp_path: Path) -> AsyncIterator[Rig]:
    async with Rig(sim, tmp_path) as r:
        yield r


@dataclasses.dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server cert for 127.0.0.1/localhost, a client cert (CN = device key)
    and an unrelated CA, all generated per run with the openssl CLI."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                 f"/CN=test {ca} CA", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn, ext in (("server", "localhost", ["-extfile", "san.ext"]),
                          ("client", GW[1], [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
               d / "client.key", d / "other.pem")


__all__ = ["GW", "SECRETS", "SUBS", "HubOptions", "Pki", "Rig", "TlsFiles", "make_config",
           "make_registry"]

