"""The simulator is as strict as the hub: driven by a plain MQTT client over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import aiomqtt
import pytest

from gatewayd.uplinks.enos.sign import device_sign, mqtt_credentials
from gatewayd_sim.enos import EnosSimulator, HubOptions
from tests.enos.conftest import GW, SECRETS, SUBS, make_registry

GW_SECRET = SECRETS["gw-001"]


@asynccontextmanager
async def connect(sim: EnosSimulator, pk: str = GW[0], dk: str = GW[1],
                  secret: str = GW_SECRET, *, mode: int = 2, ts: str = "1700000000000",
                  method: str = "sha256", upper: bool = False,
                  password: str | None = None) -> AsyncIterator[aiomqtt.Client]:
    cid, user, pw = mqtt_credentials(pk, dk, secret, mode, ts, method=method)
    client = aiomqtt.Client("127.0.0.1", sim.port, username=user,
                            password=password or (pw.upper() if upper else pw), identifier=cid,
                            protocol=aiomqtt.ProtocolVersion.V311, timeout=5)
    async with client:
        yield client


async def connack(sim: EnosSimulator, **kw: Any) -> int:
    """0 if the CONNECT was accepted, else the refusal code (MQTT 5 reason code from paho)."""
    try:
        async with connect(sim, **kw):
            return 0
    except aiomqtt.MqttCodeError as exc:
        return int(getattr(exc.rc, "value", exc.rc))


async def request(client: aiomqtt.Client, topic: str, body: Any, *, subscribe: bool = True,
                  raw: bytes | None = None) -> dict[str, Any] | None:
    """Publish a request; the reply envelope, or None if none came within 0.5 s."""
    if subscribe:
        await client.subscribe(topic + "_reply", qos=1)
    await client.publish(topic, raw if raw is not None else json.dumps(body), qos=1)
    try:
        async with asyncio.timeout(0.5):
            async for msg in client.messages:
                if str(msg.topic) == topic + "_reply":
                    return json.loads(msg.payload)  # type: ignore[arg-type]
    except TimeoutError:
        return None
    return None


@pytest.fixture
async def strict_sim() -> AsyncIterator[EnosSimulator]:
    # Without the reconnect throttle: these tests connect more often than a device should.
    async with EnosSimulator(make_registry(in_topology=("meter1", "meter2")), http_port=0,
                             options=HubOptions(throttle=None)) as sim:
        yield sim


def _post(topic_dev: tuple[str, str], suffix: str = "thing/measurepoint/post/batch") -> str:
    return f"/sys/{topic_dev[0]}/{topic_dev[1]}/{suffix}"


async def test_connect_accepts_every_sign_variant_the_sdks_send(strict_sim: EnosSimulator) -> None:
    assert await connack(strict_sim) == 0
    assert await connack(strict_sim, upper=True) == 0  # docs/Node/C style
    assert await connack(strict_sim, method="hmacsha256", ts="1700000000000.123") == 0
    assert await connack(strict_sim, method="sha1") == 0
    assert await connack(strict_sim, ts="2524608000000") == 0  # C SDK's fixed year-2050 stamp


async def test_connect_refusals(strict_sim: EnosSimulator) -> None:
    assert await connack(strict_sim, secret="wrong") in (4, 134)
    assert await connack(strict_sim, dk="nobody") in (5, 135)
    assert await connack(strict_sim, pk=SUBS["meter1"][0], dk=SUBS["meter1"][1],
                         secret=SECRETS["meter-001"]) in (5, 135)  # sub-devices cannot connect
    strict_sim.registry.devices[GW].enabled = False
    assert await connack(strict_sim) in (5, 135)
    assert [c.code for c in strict_sim.hub.connects] == [4, 5, 5, 5]


async def test_connect_throttle_blocks_a_reconnect_storm() -> None:
    async with EnosSimulator(make_registry()) as sim:  # the hub's default: 4 tries in 2 min
        codes = [await connack(sim) for _ in range(6)]
    assert codes[:4] == [0, 0, 0, 0] and all(c in (5, 135) for c in codes[4:])


async def test_replies_only_reach_subscribers(strict_sim: EnosSimulator) -> None:
    body = {"id": "1", "version": "1.0", "method": "thing.measurepoint.post.batch",
            "params": [{"measurepoints": {"x": 1}, "time": 5}]}
    async with connect(strict_sim) as c:
        assert await request(c, _post(GW), body, subscribe=False) is None
        assert strict_sim.hub.counts["replies_undelivered"] == 1
        reply = await request(c, _post(GW), {**body, "id": "2"})
    assert reply == {"id": "2", "code": 200, "data": {}, "message": ""}
    assert len(strict_sim.points()) == 2  # the first was accepted, only its reply was withheld


async def test_error_codes_for_bad_payloads(strict_sim: EnosSimulator) -> None:
    async with connect(strict_sim) as c:
        assert (await request(c, _post(GW), None, raw=b"{nope"))["code"] == 1220
        assert (await request(c, _post(GW), None, raw=b""))["code"] == 1251
        huge = json.dumps({"id": "3", "params": [{"measurepoints": {"s": "x" * 600_000}}]})
        assert (await request(c, _post(GW), None, raw=huge.encode()))["code"] == 1008
        sub_topic = _post(SUBS["meter1"], "thing/measurepoint/post")
        single = {"id": "4", "params": {"measurepoints": {"temp": 1.0}, "time": 1}}
        assert (await request(c, sub_topic, single))["code"] == 1009  # not logged in
        wrong_type = {"id": "5", "params": [{"productKey": "SUBPK01", "deviceKey": "meter-001",
                                             "measurepoints": {"temp": "hot"}}],
                      "allowOfflineSubDevice": True}
        assert (await request(c, _post(GW), wrong_type))["code"] == 1204
        skipped = {**wrong_type, "id": "6", "skipInvalidMeasurepoints": "true"}
        assert (await request(c, _post(GW), skipped))["code"] == 200
    assert strict_sim.points() == []


async def test_batch_rules_offline_sub_devices_and_first_error_wins(
        strict_sim: EnosSimulator) -> None:
    item = {"productKey": "SUBPK01", "deviceKey": "meter-001", "measurepoints": {"temp": 1.0},
            "time": 7}
    not_mine = {"productKey": "RELAYPK", "deviceKey": "relay-001", "measurepoints": {"on": 1}}
    async with connect(strict_sim) as c:
        offline = await request(c, _post(GW), {"id": "1", "params": [item],
                                               "allowOfflineSubDevice": ""})
        assert offline is not None and offline["code"] == 1212
        allowed = await request(c, _post(GW), {"id": "2", "params": [item],
                                               "allowOfflineSubDevice": True})
        assert allowed is not None and allowed["code"] == 200
        mixed = await request(c, _post(GW, "thing/measurepoint/resume/batch"),
                              {"id": "3", "allowOfflineSubDevice": True,
                               "params": [item, not_mine, {**item, "measurepoints": 5}]})
        assert mixed is not None and mixed["code"] == 1212  # not in topology: the first error
    assert [(p.value, p.how) for p in strict_sim.points()] == [(1.0, "post")]


async def test_login_logout_topology_and_drop_on_disconnect(strict_sim: EnosSimulator) -> None:
    ts = "1700000003000"
    sub = SUBS["meter1"]
    login = {"id": "1", "method": "combine.login.batch", "params": {
        "clientId": "login.batch", "timestamp": ts, "signMethod": "sha256",
        "subDevices": [{"productKey": sub[0], "deviceKey": sub[1],
                        "sign": device_sign(*sub, SECRETS["meter-001"], "login.batch", ts)},
                       {"productKey": sub[0], "deviceKey": "meter-002", "sign": "bad"}]}}
    session = f"/ext/session/{GW[0]}/{GW[1]}/combine/login/batch"
    async with connect(strict_sim) as c:
        reply = await request(c, session, login)
        assert reply is not None and reply["code"] == 742
        assert reply["data"]["loginedSubDevices"][0]["deviceKey"] == "meter-001"
        assert reply["data"]["failedSubDevices"] == [{"productKey": "SUBPK01",
                                                      "deviceKey": "meter-002"}]
        assert strict_sim.logged_in(GW) == {sub}
        topo = await request(c, _post(GW, "thing/topo/get"), {"id": "2", "params": {}})
        assert topo is not None
        assert {(d["deviceKey"], d["status"]) for d in topo["data"]} == {
            ("meter-001", "online"), ("meter-002", "offline")}
        busy = await request(c, _post(GW, "thing/topo/delete"),
                             {"id": "3", "params": [{"productKey": sub[0], "deviceKey": sub[1]}]})
        assert busy is not None and busy["code"] == 1256  # online sub-devices stay
        # Newest wins: a second connection of the gateway kicks the first.
        async with connect(strict_sim):
            await strict_sim.wait_until(lambda: strict_sim.logged_in(GW) == set())
    assert strict_sim.hub.sub_owner == {}


async def test_control_api_queues_commands_and_shows_points(strict_sim: EnosSimulator) -> None:
    base = f"http://127.0.0.1:{strict_sim.http_port}"
    async with connect(strict_sim) as c, aiohttp.ClientSession() as http:
        async with http.post(f"{base}/commands", json={
                "productKey": GW[0], "deviceKey": GW[1], "service": "reset",
                "params": {"hard": True}}) as resp:
            cmd = await resp.json()
        async with asyncio.timeout(5):  # pushed without any subscription
            msg = await anext(aiter(c.messages))
        assert str(msg.topic) == f"/sys/{GW[0]}/{GW[1]}/thing/service/reset"
        env = json.loads(msg.payload)  # type: ignore[arg-type]
        assert env == {"id": cmd["id"], "version": "1.0", "method": "thing.service.reset",
                       "params": {"hard": True}}
        await c.publish(str(msg.topic) + "_reply",
                        json.dumps({"id": env["id"], "code": "200", "data": {"ok": 1}}), qos=1)
        await strict_sim.wait_until(lambda: strict_sim.hub.commands[env["id"]].reply is not None)
        async with http.get(f"{base}/commands/{env['id']}") as resp:
            assert (await resp.json())["reply"]["data"] == {"ok": 1}
        await request(c, _post(GW), {"id": "9", "params": [{"measurepoints": {"v": 3},
                                                            "time": 11}]})
        async with http.get(f"{base}/points?how=post") as resp:
            assert await resp.json() == [{"productKey": GW[0], "deviceKey": GW[1], "point": "v",
                                          "value": 3, "quality": None, "time": 11,
                                          "how": "post"}]
        async with http.post(f"{base}/commands", json={"nonsense": 1}) as resp:
            assert resp.status == 400


async def test_register_single_login_logout_attributes_and_tags(strict_sim: EnosSimulator) -> None:
    sys_t = f"/sys/{GW[0]}/{GW[1]}"
    session = f"/ext/session/{GW[0]}/{GW[1]}"
    async with connect(strict_sim) as c:
        reg = await request(c, f"{sys_t}/thing/device/register", {"id": "1", "params": [
            {"productKey": "SUBPK01", "deviceKey": "meter-new",
             "deviceName": {"defaultValue": "New meter"}, "timezone": "+01:00"}]})
        assert reg is not None and reg["code"] == 200
        secret = reg["data"][0]["deviceSecret"]
        again = await request(c, f"{sys_t}/thing/device/register", {"id": "2", "params": [
            {"productKey": "SUBPK01", "deviceKey": "meter-new"}]})
        assert again is not None and again["code"] == 702
        sub, ts = ("SUBPK01", "meter-new"), "1700000002000"
        cred = {"productKey": sub[0], "deviceKey": sub[1], "clientId": f"{sub[0]}.{sub[1]}.{ts}",
                "timestamp": ts, "signMethod": "sha256", "secureMode": "2"}
        cred["sign"] = device_sign(*sub, secret, cred["clientId"], ts)
        early = await request(c, f"{session}/combine/login", {"id": "3", "params": cred})
        assert early is not None and early["code"] == 740  # not in the topology yet
        added = await request(c, f"{sys_t}/thing/topo/add", {"id": "4", "params": [cred]})
        assert added is not None and added["code"] == 200
        login = await request(c, f"{session}/combine/login", {"id": "5", "params": cred})
        assert login is not None and login["code"] == 200
        assert {k: login["data"][k] for k in ("productKey", "deviceKey")} == {
            "productKey": "SUBPK01", "deviceKey": "meter-new"}
        sub_t = f"/sys/{sub[0]}/{sub[1]}"
        upd = await request(c, f"{sub_t}/thing/attribute/update",
                            {"id": "6", "params": {"attributes": {"rated": 5000, "site": "roof"}}})
        assert upd is not None and upd["code"] == 200
        q = await request(c, f"{sub_t}/thing/attribute/query",
                          {"id": "7", "params": {"attributes": ["rated"]}})
        assert q is not None and q["data"] == {"rated": 5000}
        bad = await request(c, f"{sub_t}/thing/attribute/update", {"id": "8", "params": {}})
        assert bad is not None and bad["code"] == 1207
        tags = await request(c, f"{sub_t}/thing/tag/update",
                             {"id": "9", "params": [{"tagKey": "floor", "tagValue": "2"}]})
        assert tags is not None and tags["code"] == 200
        tq = await request(c, f"{sub_t}/thing/tag/query", {"id": "10", "params": {"tags": []}})
        assert tq is not None and tq["data"] == {"floor": "2"}
        out = await request(c, f"{session}/combine/logout",
                            {"id": "11", "params": {"productKey": sub[0], "deviceKey": sub[1]}})
        assert out is not None and out["data"] == {"productKey": sub[0], "deviceKey": sub[1]}
        after = await request(c, f"{sub_t}/thing/tag/query", {"id": "12", "params": {"tags": []}})
        assert after is not None and after["code"] == 1009  # logged out: no permission
