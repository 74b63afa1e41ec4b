"""Harnesses for the contract suite: each uplink against its real simulator or broker.

A harness owns the cloud (simulator, broker or file) and a rig (real SQLite queue, real
dispatcher with a `relay` actuator whose actions can be held at a gate). To add an uplink:
write a Harness subclass, add it to HARNESSES, and list what it supports in `features`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest

from drivers.base import Reading
from drivers.logact import LogActuator, LogActuatorConfig
from gatewayd.config import CommandMap, DispatchSection, ParamSpec
from gatewayd.dispatch import Dispatcher
from gatewayd.metrics import Metrics
from gatewayd.queue import Queue, QueueConfig
from gatewayd.schema import Secret
from gatewayd.uplinks.base import DeviceInfo, UplinkContext, UplinkState
from gatewayd.uplinks.engine import DeliveryUplink

Result = tuple[str, bool, int]  # (command id, ok, code) as the cloud received it


class GateRelay(LogActuator):
    """A relay whose actions wait while `gate` is clear (to hold a command in flight)."""

    def __init__(self) -> None:
        super().__init__("relay", LogActuatorConfig(), buses=None)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        self.entered.set()
        await self.gate.wait()
        return await super().apply(action, params)


class Harness:
    """The shared rig; subclasses add the cloud. See the module docstring."""

    name: ClassVar[str]
    features: ClassVar[frozenset[str]] = frozenset()  # commands, auth, poison, unknown_answer
    device, point = "meter1", "temp"  # a series the cloud accepts (float values)

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.metrics = Metrics()
        qcfg = QueueConfig(commit_window=0.005, max_age=20 * 365 * 86400.0)
        self.queue = Queue(tmp / "queue.db", qcfg, ["up"], self.metrics)
        self.relay = GateRelay()
        self.dispatcher = Dispatcher(
            [CommandMap("switch", "relay", uplink="up", device="relay",
                        params={"on": ParamSpec("bool")})],
            {"relay": self.relay}, DispatchSection(default_timeout=30.0), metrics=self.metrics)
        self.up: DeliveryUplink | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._up_task: asyncio.Task[Any] | None = None
        self.acks: list[int] = []

    # -- what a subclass provides ------------------------------------------------------------

    async def start_cloud(self) -> None: ...
    async def stop_cloud(self) -> None: ...
    async def outage_begin(self) -> None: raise NotImplementedError
    async def outage_end(self) -> None: raise NotImplementedError
    def make(self, ctx: UplinkContext, **kw: Any) -> DeliveryUplink: raise NotImplementedError
    async def delivered(self) -> list[tuple[str, str, Any]]: raise NotImplementedError
    def poison(self) -> Reading: raise NotImplementedError
    def unknown_answers(self, n: int) -> None: raise NotImplementedError
    async def command(self, cmd_id: str, on: bool) -> None: raise NotImplementedError
    async def results(self) -> list[Result]: raise NotImplementedError
    def uplink_doc(self, device: str) -> dict[str, Any]: raise NotImplementedError

    # -- the rig -----------------------------------------------------------------------------

    async def __aenter__(self) -> Harness:
        await self.start_cloud()
        await self.queue.open()
        self._tasks += [asyncio.create_task(self.queue.run(), name="contract-queue"),
                        asyncio.create_task(self.dispatcher.run(), name="contract-dispatch")]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_uplink()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.close()
        await self.stop_cloud()

    def start_uplink(self, **kw: Any) -> DeliveryUplink:
        outbox = self.queue.outbox("up")
        real_confirm = outbox.confirm

        async def confirm(lo: int, hi: int) -> None:  # every lane confirms through here
            self.acks.append(hi)
            await real_confirm(lo, hi)
        outbox.confirm = confirm  # type: ignore[method-assign]
        ctx = UplinkContext("gw-contract", self.tmp, outbox, self.dispatcher.submit,
                            {"relay": DeviceInfo("relay", "log", "actuator")}, self.metrics)
        self.up = self.make(ctx, **kw)
        self.dispatcher.repliers["up"] = self.up.reply
        self._up_task = asyncio.create_task(self.up.run(), name="contract-uplink")
        return self.up

    async def stop_uplink(self) -> None:
        if self._up_task is not None:
            self._up_task.cancel()
            await asyncio.gather(self._up_task, return_exceptions=True)
            self._up_task = None

    async def connected(self, timeout_s: float = 15.0) -> None:
        assert self.up is not None
        await self.up.wait_for_state(UplinkState.CONNECTED, timeout_s=timeout_s)

    async def put(self, values: range, device: str | None = None, ts0: int = 1_700_000_000_000,
                  point: str | None = None) -> None:
        assert await self.queue.put([Reading(device or self.device, point or self.point,
                                             float(v), ts0 + v) for v in values])

    async def acked(self, seq: int, timeout_s: float = 20.0) -> None:
        ob = self.queue.outbox("up")
        async with asyncio.timeout(timeout_s):
            while ob.acked < seq:
                await asyncio.sleep(0.01)  # polling a counter; the condition is the sync point

    async def values(self, device: str | None = None, point: str | None = None,
                     at_least: int = 0, timeout_s: float = 10.0) -> list[float]:
        """What reached the cloud for one series, in arrival order; waits for `at_least`
        (a broker hands messages to its subscribers after the PUBACK)."""
        d, p = device or self.device, point or self.point
        async with asyncio.timeout(timeout_s):
            while True:
                got = [v for dd, pp, v in await self.delivered() if (dd, pp) == (d, p)]
                if len(set(got)) >= at_least:
                    return got
                await asyncio.sleep(0.02)

    async def wait_results(self, n: int, timeout_s: float = 15.0) -> list[Result]:
        async with asyncio.timeout(timeout_s):
            while len(got := await self.results()) < n:
                await asyncio.sleep(0.02)
        return got


# -- jsonl ------------------------------------------------------------------------------------


class JsonlHarness(Harness):
    name = "jsonl"

    def make(self, ctx: UplinkContext, **kw: Any) -> DeliveryUplink:
        from gatewayd.uplinks.jsonl import JsonlConfig, JsonlUplink
        cap = min(kw.pop("backoff_cap", 1.0), 1.0)  # the pause is polled by reconnecting
        return JsonlUplink("up", JsonlConfig(path="out.jsonl", batch=50, linger=0.0,
                                             pause_file=str(self.tmp / "pause"), retry_max=cap,
                                             **kw), ctx)

    async def outage_begin(self) -> None:
        (self.tmp / "pause").touch()

    async def outage_end(self) -> None:
        (self.tmp / "pause").unlink()

    async def delivered(self) -> list[tuple[str, str, Any]]:
        p = self.tmp / "out.jsonl"
        rows = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
        return [(r["device"], r["point"], r["value"]) for r in rows]


# -- mqtt -------------------------------------------------------------------------------------


class MqttHarness(Harness):
    name = "mqtt"
    features = frozenset({"commands", "auth"})

    async def start_cloud(self) -> None:
        from tests.mqtt.conftest import Mosquitto
        self.broker = Mosquitto(self.tmp, users={"gw": "pw"}, persist=True)
        self.broker.start()
        self.msgs: list[tuple[str, bytes]] = []
        await self._watch()

    async def _watch(self) -> None:
        from tests.mqtt.conftest import Watcher
        self.watcher = Watcher(self.broker, "gatewayd/#", client_id="contract-watcher",
                               username="gw", password="pw")
        self.watcher.messages = self.msgs  # one list across reconnects
        await self.watcher.__aenter__()

    async def stop_cloud(self) -> None:
        await self.watcher.__aexit__()
        await asyncio.to_thread(self.broker.stop)

    async def outage_begin(self) -> None:
        await asyncio.to_thread(self.broker.stop)  # persistent: the watcher's session stays
        await self.watcher.__aexit__()

    async def outage_end(self) -> None:
        await asyncio.to_thread(self.broker.start)
        await self._watch()

    def make(self, ctx: UplinkContext, **kw: Any) -> DeliveryUplink:
        from gatewayd.uplinks.mqtt import MqttConfig, MqttUplink
        password = "wrong" if kw.pop("bad_auth", False) else "pw"
        cfg = MqttConfig(host="127.0.0.1", port=self.broker.port, username="gw",
                         password=Secret(password), backoff_base=0.05, batch=100,
                         **{"backoff_cap": 1.0, **kw})
        return MqttUplink("up", cfg, ctx)

    async def delivered(self) -> list[tuple[str, str, Any]]:
        out = []
        for topic, payload in self.msgs:
            parts = topic.split("/")
            if len(parts) == 4 and parts[1] == "gw-contract" and parts[2] != "command":
                out.append((parts[2], parts[3], json.loads(payload)["value"]))
        return out

    async def command(self, cmd_id: str, on: bool) -> None:
        async with self.broker.client(username="gw", password="pw") as c:
            await c.publish("gatewayd/gw-contract/command", json.dumps(
                {"id": cmd_id, "device": "relay", "action": "switch", "params": {"on": on}}),
                qos=1)

    async def results(self) -> list[Result]:
        return [(r["id"], r["ok"], r["code"]) for r in
                (json.loads(p) for t, p in self.msgs if t == "gatewayd/gw-contract/result")]

    def uplink_doc(self, device: str) -> dict[str, Any]:
        return {"type": "mqtt", "host": "127.0.0.1", "devices": [device]}


# -- enos -------------------------------------------------------------------------------------


class EnosHarness(Harness):
    name = "enos"
    features = frozenset({"commands", "auth", "poison", "unknown_answer"})

    async def start_cloud(self) -> None:
        from gatewayd_sim.enos import EnosSimulator, HubOptions
        from tests.enos.conftest import make_registry
        self.sim = EnosSimulator(make_registry(), options=HubOptions(throttle=None))
        await self.sim.start()
        self.replies: list[dict[str, Any]] = []
        hub, record = self.sim.hub, self.sim.hub._device_reply

        def spy(conn: Any, reply_topic: str, payload: bytes) -> None:  # every reply, in order
            with contextlib.suppress(ValueError):
                self.replies.append(json.loads(payload))
            record(conn, reply_topic, payload)
        hub._device_reply = spy  # type: ignore[method-assign]

    async def stop_cloud(self) -> None:
        await self.sim.stop()

    async def outage_begin(self) -> None:
        await self.sim.go_offline()

    async def outage_end(self) -> None:
        await self.sim.go_online()

    def make(self, ctx: UplinkContext, **kw: Any) -> DeliveryUplink:
        from gatewayd.uplinks.enos import EnosUplink
        from tests.enos.conftest import make_config
        if kw.pop("bad_auth", False):
            kw["device_secret"] = Secret("wrong")
        cfg = make_config(self.sim, **{"backoff_cap": 1.0, "max_message_bytes": 4096,
                                       "batch_max_points": 200, **kw})
        return EnosUplink("up", cfg, ctx)

    async def delivered(self) -> list[tuple[str, str, Any]]:
        from tests.enos.conftest import SUBS
        local = {dk: name for name, (_, dk) in SUBS.items()}
        return [(local.get(p.device_key, p.device_key), p.point, p.value)
                for p in self.sim.points()]

    def poison(self) -> Reading:
        return Reading(self.device, self.point, "not a number", 1_700_000_000_000)  # 1204

    def unknown_answers(self, n: int) -> None:
        # No answer at all is not an answer we know either.
        self.sim.hub.options = dataclasses.replace(self.sim.hub.options, drop_replies=n)

    async def command(self, cmd_id: str, on: bool) -> None:
        from gatewayd.uplinks.enos import protocol as P
        from tests.enos.conftest import SUBS
        key = SUBS["relay"]
        self.sim.hub.send_command(key, P.sys_topic(*key, "thing/service/switch"),
                                  "thing.service.switch", {"on": on}, msg_id=cmd_id)

    async def results(self) -> list[Result]:
        out = []
        for reply in self.replies:
            code = int(reply["code"])
            out.append((reply["id"], code == 200, code - 2000 if code >= 2000 else code))
        return out

    def uplink_doc(self, device: str) -> dict[str, Any]:
        return {"type": "enos", "host": "127.0.0.1", "product_key": "P", "device_key": "D",
                "device_secret_env": "GW_SECRET",
                "devices": {device: {"product_key": "S", "device_key": "s1",
                                     "device_secret_env": "SUB_SECRET"}}}


# -- mms --------------------------------------------------------------------------------------

_MMS_DATA = "c0n0t0r0a0c0t0d0a0t1"  # fromDevice: sensor, value (double), timestamp
_MMS_CMDS = "c0n0t0r0a0c0t0c0m0d1"  # toDevice: cmd_id, device, action, on (boolean)


class MmsHarness(Harness):
    name = "mms"
    features = frozenset({"commands", "auth", "poison", "unknown_answer"})

    async def start_cloud(self) -> None:
        from gatewayd_sim.mms import FieldDef, MessageType, MmsSimulator
        self.sim = MmsSimulator(port=0)
        self.sim.add_message_type(MessageType(_MMS_DATA, "fromDevice", (
            FieldDef(1, "sensor", "string"), FieldDef(2, "value", "double"),
            FieldDef(3, "timestamp", "long"))))
        self.sim.add_message_type(MessageType(_MMS_CMDS, "toDevice", (
            FieldDef(1, "cmd_id", "string"), FieldDef(2, "device", "string"),
            FieldDef(3, "action", "string"), FieldDef(4, "on", "boolean"))))
        await self.sim.start()

    async def stop_cloud(self) -> None:
        await self.sim.stop()

    async def outage_begin(self) -> None:
        await self.sim.go_offline()

    async def outage_end(self) -> None:
        await self.sim.go_online()  # the same port; stored rows are kept

    def make(self, ctx: UplinkContext, **kw: Any) -> DeliveryUplink:
        from gatewayd.uplinks.mms import MessageMap, MmsConfig, MmsUplink
        from gatewayd_sim.mms import DEFAULT_DEVICE_ID, DEFAULT_TOKEN, RESULT_TYPE
        token = "wrong" if kw.pop("bad_auth", False) else DEFAULT_TOKEN
        cfg = MmsConfig(device_id=DEFAULT_DEVICE_ID, token=Secret(token), host=self.sim.url,
                        messages=[MessageMap(_MMS_DATA)], command_types=[_MMS_CMDS],
                        action_field="action", device_field="device",
                        result_message_type=RESULT_TYPE, request_timeout=2.0, batch_size=100,
                        backoff_base=0.05, **{"backoff_cap": 1.0, **kw})
        return MmsUplink("up", cfg, ctx)

    async def delivered(self) -> list[tuple[str, str, Any]]:
        out = []
        for r in self.sim.rows(_MMS_DATA):
            device, _, point = r["C_SENSOR"].partition(".")
            out.append((device, point, r["C_VALUE"]))
        return out

    def poison(self) -> Reading:
        return Reading(self.device, self.point, "not a number", 1_700_000_000_000)  # 400

    def unknown_answers(self, n: int) -> None:
        # Answer frames in words the notes do not quote, without a status: never understood.
        self.sim.ws_answer_code, self.sim.wording = False, "other"

    async def command(self, cmd_id: str, on: bool) -> None:
        from gatewayd_sim.mms import DEFAULT_DEVICE_ID
        await self.sim.push(DEFAULT_DEVICE_ID, {"method": "ws", "sender": "contract",
                                                "messageType": _MMS_CMDS, "messages": [
                                                    {"cmd_id": cmd_id, "device": "relay",
                                                     "action": "switch", "on": on}]})

    async def results(self) -> list[Result]:
        from gatewayd_sim.mms import RESULT_TYPE
        return [(r["C_CMD_ID"], r["C_OK"], r["C_CODE"]) for r in self.sim.rows(RESULT_TYPE)]

    def uplink_doc(self, device: str) -> dict[str, Any]:
        return {"type": "mms", "host": "https://iotmmsacme.hana.ondemand.com", "device_id": "d",
                "token_env": "MMS_TOKEN", "messages": [{"message_type": _MMS_DATA,
                                                        "devices": [device]}]}


# -- opshub -----------------------------------------------------------------------------------

_OH_ACCOUNT, _OH_PASSWORD, _OH_GATEWAY = "CONTRACT", "contract-pw", "gw-contract"


class OpsHubHarness(Harness):
    """Operations Hub commands carry no id, so the id-based command tests do not apply; its
    command paths are covered in tests/opshub."""

    name = "opshub"
    features = frozenset({"auth", "poison", "unknown_answer"})

    async def start_cloud(self) -> None:
        from gatewayd_sim.opshub import OpsHubSimulator
        self.sim = OpsHubSimulator({_OH_ACCOUNT: _OH_PASSWORD}, idle_timeout_s=600)
        self.sim.reject_vals = {"not a number"}  # the poison's value: refused with code 0
        await self.sim.start()

    async def stop_cloud(self) -> None:
        await self.sim.stop()

    async def outage_begin(self) -> None:
        await self.sim.go_offline()

    async def outage_end(self) -> None:
        await self.sim.go_online()

    def make(self, ctx: UplinkContext, **kw: Any) -> DeliveryUplink:
        from gatewayd.uplinks.opshub import OpsHubConfig, OpsHubUplink
        password = "wrong" if kw.pop("bad_auth", False) else _OH_PASSWORD
        cfg = OpsHubConfig(url=self.sim.url, allow_http=True, username=_OH_ACCOUNT,
                           password=Secret(password), gateway_id=_OH_GATEWAY, poll_interval=0,
                           request_timeout=2.0, max_batch=100, backoff_base=0.05,
                           min_login_interval=0.05, **{"backoff_cap": 1.0, **kw})
        return OpsHubUplink("up", cfg, ctx)

    async def delivered(self) -> list[tuple[str, str, Any]]:
        prefix = f"{_OH_ACCOUNT}/{_OH_GATEWAY}/"
        return [(r["dc"][len(prefix):], r["metric"], float(r["data"])) for r in self.sim.rows()
                if r["dc"].startswith(prefix) and r["data"] != "not a number"]

    def poison(self) -> Reading:
        return Reading(self.device, self.point, "not a number", 1_700_000_000_000)

    def unknown_answers(self, n: int) -> None:
        for _ in range(n):  # a code that is neither 0 nor 1, nothing stored
            self.sim.inject("raw", "publish", count=1,
                            body='{"handshake":{"stage":"publish","code":"7"}}')

    def uplink_doc(self, device: str) -> dict[str, Any]:
        return {"type": "opshub", "url": "https://opshub.example.com", "username": "u",
                "password_env": "OPSHUB_PW", "devices": {device: {"sensor": "s1"}}}


HARNESSES: dict[str, type[Harness]] = {h.name: h for h in (
    JsonlHarness, MqttHarness, EnosHarness, MmsHarness, OpsHubHarness)}


def with_feature(feature: str) -> list[str]:
    return [name for name, h in HARNESSES.items() if feature in h.features]


@pytest.fixture
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with HARNESSES[request.param](tmp_path) as h:
        yield h


@pytest.fixture(autouse=True)
async def _own_executor() -> AsyncIterator[None]:
    """aiomqtt connects in the loop's default executor: give each test one it can end."""
    executor = ThreadPoolExecutor(2, thread_name_prefix="contract-executor")
    asyncio.get_running_loop().set_default_executor(executor)
    yield
    with contextlib.suppress(Exception):
        executor.shutdown(wait=False)
