"""The EnOS simulator as the official SDKs and a restarting hub see it: numeric timestamps,
state across restarts, command ids, the SDK topics, and the smaller protocol gaps (issue 12)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from gatewayd.uplinks.enos.sign import device_sign
from gatewayd_sim.enos import EnosSimulator, HubOptions
from tests.enos.conftest import GW, SECRETS, SUBS, make_registry
from tests.enos.test_sim import connect, request

SUB = SUBS["meter2"]  # allowed under the gateway, not in its topology at start
SUB_SECRET = SECRETS["meter-002"]


@pytest.fixture
async def hub() -> AsyncIterator[EnosSimulator]:
    async with EnosSimulator(make_registry(), http_port=0,
                             options=HubOptions(throttle=None)) as sim:
        yield sim


def _gw(suffix: str) -> str:
    return f"/sys/{GW[0]}/{GW[1]}/{suffix}"


def _session(suffix: str) -> str:
    return f"/ext/session/{GW[0]}/{GW[1]}/{suffix}"


def _topo_add(ts: Any, sign_ts: str, sub: tuple[str, str] = SUB, secret: str = SUB_SECRET,
              msg_id: str = "1") -> dict[str, Any]:
    cid = f"{sub[0]}.{sub[1]}.{sign_ts}"
    return {"id": msg_id, "version": "1.0", "method": "thing.topo.add", "params": [{
        "productKey": sub[0], "deviceKey": sub[1], "clientId": cid, "timestamp": ts,
        "signMethod": "sha256", "sign": device_sign(*sub, secret, cid, sign_ts)}]}


def _login(ts: Any, sign_ts: str, sub: tuple[str, str] = SUB, secret: str = SUB_SECRET,
           msg_id: str = "2") -> dict[str, Any]:
    return {"id": msg_id, "version": "1.0", "method": "combine.login", "params": {
        "productKey": sub[0], "deviceKey": sub[1], "clientId": sub[1], "timestamp": ts,
        "signMethod": "sha256", "sign": device_sign(*sub, secret, sub[1], sign_ts)}}


# -- 1: the Node.js SDK's numeric timestamp -----------------------------------------------------


async def test_numeric_timestamp_in_topo_add_and_login(hub: EnosSimulator) -> None:
    # the Node.js SDK sends `timestamp` as a JSON number and signs its decimal text
    async with connect(hub) as c:
        added = await request(c, _gw("thing/topo/add"), _topo_add(1700000002000, "1700000002000"))
        assert added is not None and added["code"] == 200, added
        login = await request(c, _session("combine/login"), _login(1700000002001, "1700000002001"))
        assert login is not None and login["code"] == 200, login
        assert login["data"]["deviceKey"] == SUB[1]
        # the number is signed as its decimal text: a sign over other text still fails
        wrong = await request(c, _session("combine/login"), _login(1700000002001, "1700000002001.0",
                                                                     msg_id="3"))
        assert wrong is not None and wrong["code"] == 742
        # booleans and objects are not timestamps
        bad = await request(c, _session("combine/login"), _login(True, "True", msg_id="4"))
        assert bad is not None and bad["code"] == 742


async def test_numeric_timestamp_in_batch_login(hub: EnosSimulator) -> None:
    sub = SUBS["meter1"]
    body = {"id": "5", "method": "combine.login.batch", "params": {
        "clientId": "login.batch", "timestamp": 1700000003000, "signMethod": "sha256",
        "subDevices": [{"productKey": sub[0], "deviceKey": sub[1], "sign": device_sign(
            *sub, SECRETS["meter-001"], "login.batch", "1700000003000")}]}}
    async with connect(hub) as c:
        reply = await request(c, _session("combine/login/batch"), body)
        assert reply is not None and reply["code"] == 200, reply


# -- 2: state across /sim/restart and across a process restart ----------------------------------


async def _runtime_changes(c: aiomqtt.Client) -> str:
    """Topology added and a device registered at run time; returns the new device's secret."""
    added = await request(c, _gw("thing/topo/add"), _topo_add("1700000002000", "1700000002000"))
    assert added is not None and added["code"] == 200
    reg = await request(c, _gw("thing/device/register"), {
        "id": "7", "method": "thing.device.register",
        "params": [{"productKey": "SUBPK01", "deviceKey": "meter-new", "deviceName": "new"}]})
    assert reg is not None and reg["code"] == 200
    return str(reg["data"][0]["deviceSecret"])


async def _relogin_ok(c: aiomqtt.Client, new_secret: str) -> None:
    login = await request(c, _session("combine/login"), _login("1700000009000", "1700000009000"))
    assert login is not None and login["code"] == 200, login  # not 740: the topology survived
    added = await request(c, _gw("thing/topo/add"), _topo_add(
        "1700000009001", "1700000009001", ("SUBPK01", "meter-new"), new_secret, msg_id="8"))
    assert added is not None and added["code"] == 200, added  # the registered secret survived


async def test_state_survives_sim_restart(hub: EnosSimulator) -> None:
    base = f"http://127.0.0.1:{hub.http_port}"
    async with connect(hub) as c:
        secret = await _runtime_changes(c)
        async with aiohttp.ClientSession() as http, http.post(f"{base}/sim/restart") as resp:
            assert resp.status == 200
        # every connection was dropped
        with pytest.raises(aiomqtt.MqttError):
            await c.publish(_gw("thing/topo/get"), b"{}", qos=1, timeout=5)
            async with asyncio.timeout(5):
                await anext(aiter(c.messages))
    assert not hub.online(GW)
    async with connect(hub) as c:
        await _relogin_ok(c, secret)


async def test_offline_for_n_seconds_then_back(hub: EnosSimulator) -> None:
    base = f"http://127.0.0.1:{hub.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/sim/offline?seconds=bad") as resp:
            assert resp.status == 400
        async with http.post(f"{base}/sim/offline?seconds=30") as resp:
            assert resp.status == 200 and (await resp.json())["seconds"] == 30
        with pytest.raises(aiomqtt.MqttError):
            async with connect(hub):
                pass
        async with http.post(f"{base}/sim/offline?seconds=0.2") as resp:  # re-arm: shorter
            assert resp.status == 200
    async with asyncio.timeout(20):  # failure bound; it comes back by itself
        while True:
            try:
                async with connect(hub):
                    break
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)


def _start_process(registry: Path, state: Path) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, "-m", "gatewayd_sim.enos", "--registry", str(registry),
                             "--state", str(state), "--port", "0", "--http-port", "0",
                             "--no-throttle"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # log lines come first; the banner names the ports
        seen.append(line)
        m = re.search(r"^enos sim: mqtt [\d.]+:(\d+).*control http://[\d.]+:(\d+)", line)
        if m:
            break
    else:
        raise AssertionError(f"no banner from the simulator: {seen}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    return proc, int(m.group(1)), int(m.group(2))


REGISTRY_TOML = f"""
[products.{GW[0]}]
secret = "gwProductSecret"
[products.SUBPK01]
secret = "subProductSecret"

[[devices]]
product_key = "{GW[0]}"
device_key = "{GW[1]}"
secret = "{SECRETS['gw-001']}"
node_type = "gateway"
sub_devices = ["SUBPK01/meter-001", "SUBPK01/meter-002"]

[[devices]]
product_key = "SUBPK01"
device_key = "meter-002"
secret = "{SUB_SECRET}"
node_type = "sub"
"""


class _Port:
    def __init__(self, port: int) -> None:
        self.port = port


async def test_state_survives_a_process_restart_with_state_file(tmp_path: Path) -> None:
    registry, state = tmp_path / "registry.toml", tmp_path / "state.json"
    registry.write_text(REGISTRY_TOML)
    proc, port, _ = _start_process(registry, state)
    try:
        async with connect(_Port(port)) as c:  # type: ignore[arg-type]
            secret = await _runtime_changes(c)
    finally:
        proc.send_signal(signal.SIGKILL)  # no goodbye: the state must already be on disk
        proc.wait(timeout=30)
    saved = json.loads(state.read_text())
    assert any(d["device_key"] == "meter-new" for d in saved["devices"])
    proc, port, _ = _start_process(registry, state)
    try:
        async with connect(_Port(port)) as c:  # type: ignore[arg-type]
            await _relogin_ok(c, secret)
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
    assert rc == 0  # the shared kit's serve loop: SIGTERM is a clean stop


def test_a_broken_state_file_is_one_clear_error(tmp_path: Path) -> None:
    registry, state = tmp_path / "registry.toml", tmp_path / "state.json"
    registry.write_text(REGISTRY_TOML)
    state.write_text("{not json")
    out = subprocess.run([sys.executable, "-m", "gatewayd_sim.enos", "--registry", str(registry),
                          "--state", str(state), "--port", "0", "--http-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2  # the shared kit's EXIT_USAGE
    assert out.stdout.startswith(f"enos sim: state {state}:") and "Traceback" not in out.stderr


# -- 3: command ids unique across restarts -------------------------------------------------------


async def test_command_ids_differ_between_hub_processes() -> None:
    ids = []
    for _ in range(2):  # two hubs stand for two processes (a restart)
        async with EnosSimulator(make_registry()) as sim:
            ids.append(sim.invoke_service(GW, "reset", {}).msg_id)
            ids.append(sim.invoke_service(GW, "reset", {}).msg_id)
    assert len(set(ids)) == 4
    assert all(re.fullmatch(r"cmd-[0-9a-f]{6}-\d+", i) for i in ids), ids
    assert ids[0].rsplit("-", 1)[0] != ids[2].rsplit("-", 1)[0]


# -- 4: the SDK topics that answered 1009 --------------------------------------------------------


async def test_tsl_template_and_ota_topics(hub: EnosSimulator) -> None:
    sub = SUBS["meter1"]
    async with connect(hub) as c:
        login = await request(c, _session("combine/login"), _login(
            "1700000002000", "1700000002000", sub, SECRETS["meter-001"]))
        assert login is not None and login["code"] == 200
        tsl = await request(c, f"/sys/{sub[0]}/{sub[1]}/thing/tsltemplate/get",
                            {"id": "t", "method": "thing.tsltemplate.get", "params": {}})
        assert tsl is not None and tsl["code"] == 200, tsl
        assert tsl["data"]["measurepoints"]["temp"]["dataType"] == {"type": "float"}
        # Java names and Python names both work
        for method in ("ota.device.inform", "ota.inform"):
            inform = await request(c, _gw("ota/device/inform"),
                                   {"id": method, "method": method, "params": {"version": "1.2.0"}})
            assert inform is not None and inform["code"] == 200 and inform["id"] == method
        assert hub.hub.firmware[GW] == "1.2.0"
        bad = await request(c, _gw("ota/device/inform"), {"id": "x", "params": {}})
        assert bad is not None and bad["code"] == 1220
        for step, code in (("35", 200), ("-2", 200), (100, 200), ("101", 1220), ("-6", 1220),
                           ("abc", 1220)):
            got = await request(c, _gw("ota/device/progress"),
                                {"id": str(step), "method": "ota.progress",
                                 "params": {"step": step, "desc": "downloading"}})
            assert got is not None and got["code"] == code, (step, got)
        assert [s for _, s, _ in hub.hub.ota_progress] == ["35", "-2", "100"]
        hub.hub.firmwares[GW[0]] = [{"version": "1.3.0", "signMethod": "md5", "sign": "ab",
                                     "fileUrl": "http://127.0.0.1/fw.bin", "fileSize": 10}]
        versions = await request(c, _gw("ota/device/getversion"),
                                 {"id": "v", "method": "Ota.device.getversion", "params": {}})
        assert versions is not None and versions["code"] == 200
        assert versions["data"][0]["version"] == "1.3.0"


async def test_strict_methods_accept_the_python_ota_names() -> None:
    async with EnosSimulator(make_registry(), options=HubOptions(
            throttle=None, strict_methods=True)) as sim, connect(sim) as c:
        ok = await request(c, _gw("ota/device/progress"),
                           {"id": "1", "method": "ota.progress", "params": {"step": "5"}})
        assert ok is not None and ok["code"] == 200
        wrong = await request(c, _gw("ota/device/progress"),
                              {"id": "2", "method": "ota.inform", "params": {"step": "5"}})
        assert wrong is not None and wrong["code"] == 1260


async def test_up_raw_gets_a_raw_reply(hub: EnosSimulator) -> None:
    raw = bytes([0x01, 0xFF, 0x00, 0x7B])  # not JSON, not UTF-8
    topic = _gw("thing/model/up_raw")
    async with connect(hub) as c:
        await c.subscribe(topic + "_reply", qos=1)
        await c.publish(topic, raw, qos=1)
        async with asyncio.timeout(5):
            msg = await anext(aiter(c.messages))
        assert str(msg.topic) == topic + "_reply" and msg.payload == raw  # raw, no envelope
        hub.hub.raw_reply = lambda key, payload: b"\x02" + payload[:1]
        await c.publish(topic, raw, qos=1)
        async with asyncio.timeout(5):
            msg = await anext(aiter(c.messages))
        assert msg.payload == b"\x02\x01"
    assert hub.hub.raw_up == [(GW, raw), (GW, raw)]


async def test_down_raw_reply_is_taken_raw(hub: EnosSimulator) -> None:
    async with connect(hub) as c:
        rec = hub.send_raw(GW, "thing/model/down_raw", b"\xaa\xbb")
        async with asyncio.timeout(5):
            msg = await anext(aiter(c.messages))
        assert msg.payload == b"\xaa\xbb"
        await c.publish(str(msg.topic) + "_reply", b"\xcc", qos=1)
        async with asyncio.timeout(5):
            await rec.done.wait()
    assert rec.raw_reply == b"\xcc" and hub.hub.counts["bad_device_replies"] == 0


# -- 6: the smaller gaps -------------------------------------------------------------------------


async def test_too_large_reply_carries_the_id(hub: EnosSimulator) -> None:
    big = b'{"id":"big-7","version":"1.0","method":"thing.measurepoint.post","params":{"x":"' + \
        b"a" * (600 * 1024) + b'"}}'
    async with connect(hub) as c:
        reply = await request(c, _gw("thing/measurepoint/post"), None, raw=big)
        assert reply is not None and reply["code"] == 1008 and reply["id"] == "big-7"
        numeric = await request(c, _gw("thing/measurepoint/post"), None,
                                raw=b'{"id": 42, "params":"' + b"a" * (600 * 1024) + b'"}')
        assert numeric is not None and numeric["code"] == 1008 and numeric["id"] == "42"
        hidden = await request(c, _gw("thing/measurepoint/post"), None,
                               raw=b'{"params":"' + b"a" * (600 * 1024) + b'","id":"late"}')
        assert hidden is not None and hidden["code"] == 1008 and hidden["id"] == ""


def test_peek_id_forms() -> None:
    from gatewayd_sim.enos.wire import peek_id

    assert peek_id(b'{"id":"5","x":1}') == "5"
    assert peek_id(b'{ "id" : "a b" }') == "a b"
    assert peek_id(b'{"id":17,') == "17"
    assert peek_id(b'{"id":"esc\\"aped"}') == ""  # escapes: not guessed
    assert peek_id(b'{"idx":"1"}') == ""


async def test_reply_matching_uses_exact_filters_and_wildcards(hub: EnosSimulator) -> None:
    async with connect(hub) as c:
        for i in range(50):
            await c.subscribe(f"/sys/{GW[0]}/{GW[1]}/thing/unused/{i}_reply", qos=1)
        await c.subscribe(f"/sys/{GW[0]}/+/thing/measurepoint/resume/+", qos=1)  # no match
        reply = await request(c, _gw("thing/measurepoint/post"),
                              {"id": "1", "params": {"measurepoints": {"temp": 1.0}}},
                              subscribe=False)
        assert reply is None  # nothing matched the reply topic
        await c.subscribe(f"/sys/{GW[0]}/+/thing/#", qos=1)
        reply = await request(c, _gw("thing/measurepoint/post"),
                              {"id": "2", "params": {"measurepoints": {"temp": 1.0}}},
                              subscribe=False)
        assert reply is not None and reply["id"] == "2"  # via the wildcard
        await c.unsubscribe(f"/sys/{GW[0]}/+/thing/#")
        await c.subscribe(_gw("thing/measurepoint/post_reply"), qos=1)  # exact
        reply = await request(c, _gw("thing/measurepoint/post"),
                              {"id": "3", "params": {"measurepoints": {"temp": 1.0}}},
                              subscribe=False)
        assert reply is not None and reply["id"] == "3"


def _client(sim: EnosSimulator, *, keepalive: int = 60, clean: bool = True) -> aiomqtt.Client:
    from gatewayd.uplinks.enos.sign import mqtt_credentials

    cid, user, pw = mqtt_credentials(*GW, SECRETS["gw-001"], 2, "1700000000000")
    return aiomqtt.Client("127.0.0.1", sim.port, username=user, password=pw, identifier=cid,
                          protocol=aiomqtt.ProtocolVersion.V311, timeout=5, keepalive=keepalive,
                          clean_session=clean)


async def test_keepalive_outside_60_300_is_refused_by_default(hub: EnosSimulator) -> None:
    for keepalive in (30, 301, 0):
        with pytest.raises(aiomqtt.MqttCodeError) as err:
            async with _client(hub, keepalive=keepalive):
                pass
        assert int(getattr(err.value.rc, "value", err.value.rc)) in (5, 135)
    for keepalive in (60, 300):
        async with _client(hub, keepalive=keepalive):
            pass


async def test_keepalive_clamp_drops_a_silent_client_at_the_upper_bound() -> None:
    # clamp reading: keepalive 0 (none) is held to the range's top; a tiny range keeps it fast
    async with EnosSimulator(make_registry(), options=HubOptions(
            throttle=None, keepalive="clamp", keepalive_range=(1, 1))) as sim:
        assert sim._server is not None and sim._server.idle_limit_s(0) == 1.5
        assert sim._server.idle_limit_s(600) == 1.5
        async with _client(sim, keepalive=0):
            await sim.wait_until(lambda: sim.online(GW))
            await sim.wait_until(lambda: not sim.online(GW), timeout_s=30)  # dropped, silent
    async with EnosSimulator(make_registry(), options=HubOptions(keepalive="accept")) as sim:
        assert sim._server is not None and sim._server.idle_limit_s(0) is None
        async with _client(sim, keepalive=5):
            pass


async def test_clean_session_zero_keeps_subscriptions(hub: EnosSimulator) -> None:
    reply_topic = _gw("thing/measurepoint/post_reply")
    async with _client(hub, clean=False) as c:
        await c.subscribe(reply_topic, qos=1)
    await hub.wait_until(lambda: not hub.online(GW))
    async with _client(hub, clean=False) as c:
        assert hub.hub.sessions[GW].session_present
        reply = await request(c, _gw("thing/measurepoint/post"),
                              {"id": "1", "params": {"measurepoints": {"temp": 1.0}}},
                              subscribe=False)
        assert reply is not None and reply["code"] == 200  # the kept subscription delivered it
    async with _client(hub, clean=True) as c:  # a clean session discards what was kept
        assert not hub.hub.sessions[GW].session_present
        reply = await request(c, _gw("thing/measurepoint/post"),
                              {"id": "2", "params": {"measurepoints": {"temp": 1.0}}},
                              subscribe=False)
        assert reply is None


async def test_clean_session_zero_refused_when_asked() -> None:
    async with EnosSimulator(make_registry(), options=HubOptions(
            throttle=None, clean_session_zero="refuse")) as sim:
        with pytest.raises(aiomqtt.MqttCodeError):
            async with _client(sim, clean=False):
                pass
        async with _client(sim, clean=True):
            pass


def test_reply_lookup_does_not_scan_exact_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    # 5,000 exact `_reply` filters and one wildcard: a lookup matches the wildcard list only
    from gatewayd_sim.enos import mqtt

    conn = mqtt.Connection(None, None, 1, False)  # type: ignore[arg-type]
    for i in range(5000):
        conn.subscribe(f"/sys/pk/dk{i}/thing/measurepoint/post_reply", 1)
    conn.subscribe("/sys/pk/+/thing/service/#", 1)
    calls = []
    real = mqtt.topic_matches
    monkeypatch.setattr(mqtt, "topic_matches", lambda f, t: calls.append(f) or real(f, t))
    assert conn.subscribed("/sys/pk/dk4999/thing/measurepoint/post_reply")
    assert calls == []  # found in the exact set
    assert not conn.subscribed("/sys/pk/dk9/thing/measurepoint/resume_reply")
    assert calls == ["/sys/pk/+/thing/service/#"]  # only the wildcard was matched
    assert conn.subscribed("/sys/pk/dk9/thing/service/x_reply")
    conn.unsubscribe("/sys/pk/+/thing/service/#")
    assert not conn.subscribed("/sys/pk/dk9/thing/service/x_reply")


# -- the shared simulator kit ------------------------------------------------------------------


async def test_kit_faults_drop_a_reply_and_refuse_a_connect(hub: EnosSimulator) -> None:
    base = f"http://127.0.0.1:{hub.http_port}"
    post = _gw("thing/measurepoint/post")
    body = {"id": "1", "params": {"measurepoints": {"temp": 1.0}}}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/sim/faults") as resp:
            assert set((await resp.json())["known"]) == {"drop_reply", "refuse_connect"}
        async with http.post(f"{base}/sim/faults", json={"name": "drop_reply", "count": 1,
                                                         "stage": "thing/measurepoint/post"}) as r:
            assert r.status == 200
        async with http.post(f"{base}/sim/faults", json={"name": "nope"}) as r:
            assert r.status == 400
        async with connect(hub) as c:
            assert await request(c, post, body) is None  # handled, reply lost
            again = await request(c, post, {**body, "id": "2"})
            assert again is not None and again["id"] == "2"  # count 1: used up
        assert len(hub.points(point="temp")) == 2
        async with http.post(f"{base}/sim/faults", json={"name": "refuse_connect", "count": 1,
                                                         "stage": "connect"}) as r:
            assert r.status == 200
        with pytest.raises(aiomqtt.MqttCodeError) as err:
            async with connect(hub):
                pass
        assert int(getattr(err.value.rc, "value", err.value.rc)) in (3, 136)
        async with connect(hub):
            pass
