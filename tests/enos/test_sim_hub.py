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
        proc.wait(timeout=30)


def test_a_broken_state_file_is_one_clear_error(tmp_path: Path) -> None:
    registry, state = tmp_path / "registry.toml", tmp_path / "state.json"
    registry.write_text(REGISTRY_TOML)
    state.write_text("{not json")
    out = subprocess.run([sys.executable, "-m", "gatewayd_sim.enos", "--registry", str(registry),
                          "--state", str(state), "--port", "0", "--http-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
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
