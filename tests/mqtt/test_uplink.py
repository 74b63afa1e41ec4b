"""The mqtt uplink against a real mosquitto: delivery, templates, commands, auth, TLS, outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Reading
from drivers.logact import LogActuator, LogActuatorConfig
from gatewayd.config import CommandMap, DispatchSection, ParamSpec
from gatewayd.dispatch import Dispatcher
from gatewayd.queue import Queue, QueueConfig
from gatewayd.schema import Secret
from gatewayd.uplinks.base import UplinkContext, UplinkState
from gatewayd.uplinks.mqtt import MqttConfig, MqttUplink
from tests.enos.conftest import Pki, pki  # noqa: F401  (session fixture)
from tests.mqtt.conftest import Mosquitto, Watcher


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.queue = Queue(tmp / "q.db", QueueConfig(commit_window=0.005), ["mq"])
        self.relay = LogActuator("relay", LogActuatorConfig(), buses=None)  # type: ignore[arg-type]
        self.dispatcher = Dispatcher(
            [CommandMap("switch", "relay", uplink="mq", device="relay",
                        params={"on": ParamSpec("bool")})],
            {"relay": self.relay}, DispatchSection(default_timeout=2.0))
        self.tasks: list[asyncio.Task[Any]] = []
        self.up: MqttUplink | None = None

    async def __aenter__(self) -> Rig:
        await self.queue.open()
        self.tasks += [asyncio.create_task(self.queue.run()),
                       asyncio.create_task(self.dispatcher.run())]
        return self

    def start(self, broker: Mosquitto, **kw: Any) -> MqttUplink:
        cfg = MqttConfig(**{"host": "127.0.0.1", "port": broker.port, "backoff_base": 0.05,
                            "backoff_cap": 0.5, **kw})
        ctx = UplinkContext("gw1", self.tmp, self.queue.outbox("mq"), self.dispatcher.submit)
        self.up = MqttUplink("mq", cfg, ctx)
        self.dispatcher.repliers["mq"] = self.up.reply
        self.tasks.append(asyncio.create_task(self.up.run(), name="test-mqtt-uplink"))
        return self.up

    async def stop(self) -> None:
        t = self.tasks.pop()
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)

    async def acked(self, seq: int) -> None:
        ob = self.queue.outbox("mq")
        async with asyncio.timeout(15):
            while ob.acked < seq:
                await asyncio.sleep(0.01)

    async def __aexit__(self, *exc: object) -> None:
        for t in reversed(self.tasks):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.queue.close()


@pytest.fixture
async def rig(tmp_path: Path) -> Any:
    async with Rig(tmp_path) as r:
        yield r


async def test_readings_go_to_the_template_topic_in_order(rig: Rig, mosquitto: Mosquitto) -> None:
    async with Watcher(mosquitto, "gatewayd/#") as w:
        up = rig.start(mosquitto)
        await up.wait_for_state(UplinkState.CONNECTED)
        await rig.queue.put([Reading("m1", "temp", float(i), 1000 + i) for i in range(300)]
                            + [Reading("m2", "on", True, 5000, 1)])
        await rig.acked(301)
        await w.wait(lambda m: len(m) >= 301)
    temps = [json.loads(p) for t, p in w.messages if t == "gatewayd/gw1/m1/temp"]
    assert [x["value"] for x in temps] == [float(i) for i in range(300)]
    assert temps[0] == {"value": 0.0, "ts_ms": 1000, "quality": 0, "backlog": False}
    assert ("gatewayd/gw1/m2/on", b'{"value":true,"ts_ms":5000,"quality":1,"backlog":false}') \
        in w.messages
    assert up.status()["sent"] == 301


async def test_batch_format_and_device_filter(rig: Rig, mosquitto: Mosquitto) -> None:
    async with Watcher(mosquitto, "site/#") as w:
        rig.start(mosquitto, topic="site/{device}", format="batch", devices=["m1"])
        await rig.queue.put([Reading("m1", "a", i, 1000 + i) for i in range(10)]
                            + [Reading("other", "a", 1, 1)])
        await rig.acked(11)
        await w.wait(lambda m: sum(len(json.loads(p)) for _, p in m) >= 10)
    assert {t for t, _ in w.messages} == {"site/m1"}
    assert [x["value"] for _, p in w.messages for x in json.loads(p)] == list(range(10))
    assert rig.up is not None and rig.up.status()["skipped_devices"] == 1


async def test_commands_results_redelivery_and_repeat(rig: Rig, mosquitto: Mosquitto) -> None:
    async with Watcher(mosquitto, "gatewayd/gw1/result") as w:
        up = rig.start(mosquitto)
        await up.wait_for_state(UplinkState.CONNECTED)
        async with mosquitto.client() as c:
            cmd = {"id": "a1", "device": "relay", "action": "switch", "params": {"on": True}}
            for body in (cmd, cmd, {**cmd, "id": "a2"}, {**cmd, "id": "a1", "params": {"on": False}}):
                await c.publish("gatewayd/gw1/command", json.dumps(body), qos=1)
            await c.publish("gatewayd/gw1/command", b"{nope", qos=1)
            await c.publish("gatewayd/gw1/command", json.dumps({"id": "x", "device": "relay",
                                                               "action": "reboot"}), qos=1)
            await w.wait(lambda m: len(m) >= 6)
    res = [json.loads(p) for _, p in w.messages]
    by = {(r["id"], r["code"], bool(r["data"].get("duplicate"))) for r in res}
    assert ("a1", 200, False) in by and ("a1", 200, True) in by and ("a2", 200, False) in by
    assert ("", 400, False) in by and ("x", 404, False) in by
    # a1 once, a2 (a deliberate repeat) and a1 with other content (a reused id) run as well
    assert rig.relay.actions == [("switch", {"on": True}), ("switch", {"on": True}),
                                 ("switch", {"on": False})]


async def test_password_auth(rig: Rig, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, users={"gw": "s3cret"})
    broker.start()
    try:
        up = rig.start(broker, username="gw", password=Secret("wrong"), backoff_cap=30)
        await up.wait_for_state(UplinkState.AUTH_FAILED)
        assert "refused the login" in up.last_error
        await rig.stop()
        up = rig.start(broker, username="gw", password=Secret("s3cret"))
        await up.wait_for_state(UplinkState.CONNECTED)
        await rig.queue.put([Reading("m1", "t", 1.0, 1)])
        await rig.acked(1)
    finally:
        broker.stop()


async def test_tls_with_a_private_ca(rig: Rig, tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    broker = Mosquitto(tmp_path, tls=(pki.ca, pki.server_cert, pki.server_key))
    broker.start()
    try:
        up = rig.start(broker, tls=True, ca_file=str(pki.ca))
        await up.wait_for_state(UplinkState.CONNECTED)
        await rig.queue.put([Reading("m1", "t", 1.0, 1)])
        await rig.acked(1)
        await rig.stop()
        bad = rig.start(broker, tls=True, ca_file=str(pki.other_ca))  # wrong CA: never trusted
        await bad.wait_for_state(UplinkState.BACKING_OFF)
        assert "certificate" in bad.last_error.lower()
    finally:
        broker.stop()


async def test_broker_outage_loses_nothing(rig: Rig, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persist=True)
    broker.start()
    try:
        async with Watcher(broker, "gatewayd/#", client_id="watcher"):
            pass  # a persistent subscription: the broker queues for it from now on
        up = rig.start(broker)
        await up.wait_for_state(UplinkState.CONNECTED)
        await rig.queue.put([Reading("m1", "t", float(i), i) for i in range(50)])
        await rig.acked(50)
        await asyncio.to_thread(broker.stop)
        await up.wait_for_state(UplinkState.BACKING_OFF, UplinkState.CONNECTING)
        await rig.queue.put([Reading("m1", "t", float(i), i) for i in range(50, 100)])
        await asyncio.to_thread(broker.start)
        await rig.acked(100)
        async with Watcher(broker, "gatewayd/#", client_id="watcher") as w:
            await w.wait(lambda m: len({json.loads(p)["value"] for _, p in m}) >= 100)
    finally:
        broker.stop()
    values = [json.loads(p)["value"] for _, p in w.messages]
    assert sorted(set(values)) == [float(i) for i in range(100)]
    assert values[-50:] == [float(i) for i in range(50, 100)]  # in order, after the outage
    assert all(json.loads(p)["backlog"] for _, p in w.messages[-50:])


def test_config_templates_and_check() -> None:
    with pytest.raises(ValueError, match="topic"):
        MqttConfig(host="h", topic="x/{nope}")
    cfg = MqttConfig(host="h", devices=["m1", "mtr2"])
    assert cfg.check({"m1", "m2"}) == ["devices[1]: no device or actuator named 'mtr2' in this config"]


async def test_a_refused_subscription_shows_in_the_status(rig: Rig) -> None:
    from tests.mqtt.rawbroker import RawBroker
    async with RawBroker(suback=0x80) as broker:
        up = rig.start(broker)  # type: ignore[arg-type]
        await up.wait_for_state(UplinkState.CONNECTED)
        assert up.status()["subscriptions_refused"] == ["gatewayd/gw1/command"]
        await rig.queue.put([Reading("m1", "t", 1.0, 1)])
        await rig.acked(1)  # delivery goes on
        await rig.stop()
    assert broker.published == [("gatewayd/gw1/m1/t",
                                 b'{"value":1.0,"ts_ms":1,"quality":0,"backlog":false}')]


async def test_a_publish_on_a_wildcard_topic_is_dropped_and_counted(rig: Rig) -> None:
    from tests.mqtt.rawbroker import RawBroker
    async with RawBroker() as broker:
        up = rig.start(broker)  # type: ignore[arg-type]
        await up.wait_for_state(UplinkState.CONNECTED)
        await broker.subscribed.wait()
        for _ in range(100):
            broker.send_publish("gatewayd/gw1/#", b"{}")
        broker.send_publish("gatewayd/gw1/command", b'{"id": "c", "device": "relay", '
                                                     b'"action": "switch", "params": {"on": true}}')
        async with asyncio.timeout(10):
            while not any(t == "gatewayd/gw1/result" for t, _ in broker.published):
                await asyncio.sleep(0.01)
        assert up.status()["dropped_messages"] == {"invalid_topic": 100}
        assert up.state == UplinkState.CONNECTED and rig.relay.actions == [("switch", {"on": True})]
        await rig.stop()
