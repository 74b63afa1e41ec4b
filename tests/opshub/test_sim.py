"""The simulator over real sockets: the vendor page's messages, strictness, commands, faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gatewayd_sim.opshub import OpsHubSimulator

ACCOUNT, PASSWORD = "REST_DEMO", "pw"
GW = f"{ACCOUNT}/01-23-45-67-89-ab"
PAGE_TOKEN = "00000000-00000000-00409DFF-FF521DB2"


class Client:
    """A bare HTTP client: posts raw text, returns (status, text)."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url

    async def post(self, path: str, body: str | dict[str, Any]) -> tuple[int, str]:
        data = body if isinstance(body, str) else json.dumps(body)
        async with asyncio.timeout(5), self.http.post(self.url + path, data=data) as resp:
            return resp.status, await resp.text()

    async def stage(self, stage: str, body: str | dict[str, Any]) -> tuple[int, Any]:
        status, text = await self.post(f"/app/iqp/rest/{stage}", body)
        return status, json.loads(text)

    async def login(self, user: str = ACCOUNT, password: str = PASSWORD) -> str:
        _, answer = await self.stage("login", {"handshake": {"stage": "login"},
                                               "login": {"username": user, "password": password}})
        return answer["token"]

    async def publish(self, token: str, messages: list[dict[str, Any]]) -> tuple[int, Any]:
        return await self.stage("publish", {"handshake": {"stage": "publish"}, "token": token,
                                            "messages": messages})

    async def subscribe(self, token: str, dc: str) -> tuple[int, Any]:
        return await self.stage("subscribe", {"handshake": {"stage": "subscribe"}, "token": token,
                                              "payload": {"dc": dc, "request_type": "subscribe"}})


@pytest.fixture
async def sim() -> AsyncIterator[OpsHubSimulator]:
    async with OpsHubSimulator({ACCOUNT: PASSWORD, "Operations Hub_Testing": "x"},
                               tokens={PAGE_TOKEN: "Operations Hub_Testing"}) as s:
        yield s


@pytest.fixture
async def client(sim: OpsHubSimulator) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as http:
        yield Client(http, sim.url)


def fill(template: str, token: str) -> str:
    """The page's placeholders replaced by real values."""
    return template.replace("<token>", token).replace("<channel>", GW)


def message(dc: str = f"{GW}/boiler", **entry: Any) -> dict[str, Any]:
    data = {"time": "2026-11-22T10:00:00.000+00:00",
            "mets": [{"met": "temperature", "val": "71.5"}], **entry}
    return {"dc": dc, "data": [data]}


# -- login ---------------------------------------------------------------------------------------


async def test_page_login_examples_exactly(client: Client, sim: OpsHubSimulator) -> None:
    sim.users["user name of the user"] = "password of the user"
    sim.token_factory = lambda: "token number"
    request = ('{"handshake":{"stage":"login"},"login":{"username":"user name of the user",'
               '"password":"password of the user"}}')  # verbatim from the page
    assert await client.post("/app/iqp/rest/login", request) == (
        200, '{"handshake":{"stage":"login","code":"1"},"token":"token number"}')
    assert await client.post("/app/iqp/rest/login", request.replace("password of", "not")) == (
        200, '{"handshake":{"stage":"login","code":"0"}}')
    assert sim.stats["logins"] == 1 and sim.stats["logins_refused"] == 1


@pytest.mark.parametrize("body", ["{not json", "[1]", '{"login":{}}',
                                  '{"handshake":{"stage":"publish"},"login":{}}',
                                  '{"handshake":{"stage":"login"},"login":{"username":1}}'])
async def test_bad_json_gets_error_code_1(client: Client, body: str) -> None:
    assert await client.post("/app/iqp/rest/login", body) == (
        200, '{"handshake":{"stage":"error","code":"1"}}')


# -- tokens --------------------------------------------------------------------------------------


async def test_unknown_token_is_unauthorized_200_then_401(client: Client, sim) -> None:
    status, answer = await client.publish("nope", [message()])
    assert (status, answer) == (200, {"handshake": {"stage": "error", "code": "2"}})
    assert await client.post("/sim/config", {"unauthorized_status": 401}) == (200, json.dumps(
        {"unauthorized_status": 401, "consume_on_read": True, "idle_timeout_s": 1200.0,
         "reject_vals": [], "multi_answer": "array", "multi_stores": "all",
         "login_ends_earlier": False}))
    status, answer = await client.subscribe("nope", GW)
    assert (status, answer) == (401, {"handshake": {"stage": "error", "code": "2"}})


async def test_idle_expiry_is_reset_by_activity() -> None:
    clock = [100.0]
    async with OpsHubSimulator({ACCOUNT: PASSWORD}, idle_timeout_s=10,
                               clock=lambda: clock[0]) as sim, aiohttp.ClientSession() as http:
        c = Client(http, sim.url)
        token = await c.login()
        for _ in range(3):  # activity every 9 s keeps it alive well past 10 s
            clock[0] += 9
            assert (await c.subscribe(token, GW))[1]["payload"]["request_type"] == "no_commands"
        clock[0] += 10
        assert (await c.publish(token, [message()]))[1] == {
            "handshake": {"stage": "error", "code": "2"}}
        assert sim.stats["tokens_expired"] == 1
        other = await c.login()  # a second login leaves the first token valid (default)
        token2 = await c.login()
        assert (await c.subscribe(other, GW))[0] == 200
        assert (await c.subscribe(token2, GW))[1]["payload"]["request_type"] == "no_commands"


# -- publish -------------------------------------------------------------------------------------

PAGE_EXAMPLE = """{"handshake":{"stage":"publish"},"token":"00000000-00000000-00409DFF-FF521DB2", "messages":[ {"dc":"Operations Hub_Testing/REST_Device/Vehicle2","cloud":"2015-03-26T18:46:38.237+09:00","data":[ {"alt":"1234","lat":"35.587562","long":"139.668916","time":"2015-03-26T18:44:38.195+09:00","mets":[ {"met":"Speed","val":"100","type":"double","desc":"kmh"}, {"met":"Heading","val":"180","type":"double","desc":"degrees"}, {"met":"Temperature","val":"98","type":"double","desc":"degrees"} ] }, {"alt":"1240","lat":"35.587565","long":"139.668920","time":"2015-03-26T18:45:38.195+09:00","mets":[ {"met":"Speed","val":"75","type":"double","desc":"kmh"}, {"met":"Heading","val":"237","type":"double","desc":"degrees"}, {"met":"Temperature","val":"96","type":"double","desc":"degrees"} ] } ] }]}"""

PAGE_TEMPLATE = """{"handshake":{"stage":"publish"},"token":"token number","messages":[ {"dc":"data channel","cloud":"cloud server timestamp","data":[ {"alt":"value","lat":"value","long":"value","time":"timestamp recorded in the device","mets":[ {"met":"value","val":"value","type":"value","desc":"value","gen1":"value","gen2":"value",} ] } }]}"""


async def test_page_multi_metric_example_is_stored_as_m2m_rows(client: Client, sim) -> None:
    assert await client.post("/app/iqp/rest/publish", PAGE_EXAMPLE) == (
        200, '{"handshake":{"stage":"publish","code":"1",'
             '"dc":"Operations Hub_Testing/REST_Device/Vehicle2"}}')
    async with client.http.get(sim.url + "/sim/data?metric=Heading") as resp:
        rows = (await resp.json())["rows"]
    assert [{k: r[k] for k in ("dc", "metric", "data", "latitude", "longitude", "altitude",
                                "timestamp", "description", "data_type", "cloud")}
            for r in rows] == [
        {"dc": "Operations Hub_Testing/REST_Device/Vehicle2", "metric": "Heading", "data": "180",
         "latitude": "35.587562", "longitude": "139.668916", "altitude": "1234",
         "timestamp": "2015-03-26T18:44:38.195+09:00", "description": "degrees",
         "data_type": "double", "cloud": "2015-03-26T18:46:38.237+09:00"},
        {"dc": "Operations Hub_Testing/REST_Device/Vehicle2", "metric": "Heading", "data": "237",
         "latitude": "35.587565", "longitude": "139.668920", "altitude": "1240",
         "timestamp": "2015-03-26T18:45:38.195+09:00", "description": "degrees",
         "data_type": "double", "cloud": "2015-03-26T18:46:38.237+09:00"}]
    assert sim.rows_total == 6


async def test_page_template_is_not_json_and_gets_code_1(client: Client) -> None:
    # The page's generic template has a trailing comma and "] } }]": not JSON as written.
    assert await client.post("/app/iqp/rest/publish", PAGE_TEMPLATE) == (
        200, '{"handshake":{"stage":"error","code":"1"}}')


@pytest.mark.parametrize(("msg", "why"), [
    (message(dc=GW), "two-part dc"),
    (message(dc="OTHER/01-23-45-67-89-ab/boiler"), "another account"),
    (message(dc=f"{GW}//"), "empty sensor"),
    (message(mets=[{"met": "t"}]), "no val"),
    (message(mets=[{"val": "1"}]), "no met"),
    (message(mets=[{"met": "t", "val": None}]), "null val"),
    (message(mets=[]), "no mets"),
    (message(time="2026-11-22T10:00:00+00:00"), "time without milliseconds"),
    (message(time="2026-11-22 10:00:00.000+00:00"), "time without T"),
    (message(time="2026-11-22T10:00:00.000Z"), "Z instead of an offset"),
    (message(time="2026-13-22T10:00:00.000+00:00"), "month 13"),
    ({"dc": f"{GW}/boiler", "data": []}, "no data"),
    ({"dc": f"{GW}/boiler", "cloud": "yesterday", "data": message()["data"]}, "bad cloud"),
    (message(lat={"x": 1}), "lat not a scalar"),
])
async def test_invalid_channel_gets_code_0_and_stores_nothing(client: Client, sim,
                                                              msg: dict, why: str) -> None:
    token = await client.login()
    status, answer = await client.publish(token, [msg])
    assert (status, answer) == (200, {"handshake": {"stage": "publish", "code": "0",
                                                    "dc": msg["dc"]}}), why
    assert sim.rows_total == 0


async def test_several_channels_get_an_array_of_answers_in_order(client: Client, sim) -> None:
    token = await client.login()
    msgs = [message(f"{GW}/a"), message(f"{GW}/b", mets=[{"met": "x"}]),
            message(f"{GW}/c", lat=35.5, mets=[{"met": "n", "val": 7, "gen1": "g1", "gen2": 2}])]
    _, answer = await client.publish(token, msgs)
    assert [(a["handshake"]["dc"], a["handshake"]["code"]) for a in answer] == [
        (f"{GW}/a", "1"), (f"{GW}/b", "0"), (f"{GW}/c", "1")]
    assert [(r["dc"], r["data"], r["latitude"], r["generic_1"], r["generic_2"])
            for r in sim.rows()] == [(f"{GW}/a", "71.5", None, None, None),
                                     (f"{GW}/c", "7", "35.5", "g1", "2")]


@pytest.mark.parametrize("body", ["{}", '{"handshake":{"stage":"publish"},"token":"%s"}',
                                  '{"handshake":{"stage":"publish"},"token":"%s","messages":[{}]}'])
async def test_publish_structure_errors_get_code_1(client: Client, body: str) -> None:
    token = await client.login()
    text = body % token if "%s" in body else body
    assert await client.post("/app/iqp/rest/publish", text) == (
        200, '{"handshake":{"stage":"error","code":"1"}}')


# -- subscribe -----------------------------------------------------------------------------------


async def test_page_subscribe_request_and_no_commands_answer(client: Client) -> None:
    token = await client.login()
    # verbatim from the page, placeholders filled in
    request = ('{"handshake":{"stage": "subscribe"},"token":"<token>", "payload":'
               '{"dc":"<channel>","request_type":"subscribe"}}')
    answer = ('{"handshake":{"stage":"subscribe"},"token":"<token>","payload":'
              '{"request_type":"no_commands","dc":"<channel>"}}')
    assert await client.post("/app/iqp/rest/subscribe", fill(request, token)) == (
        200, fill(answer, token))


async def test_commands_per_channel_collected_upwards_and_consumed(client: Client, sim) -> None:
    token = await client.login()
    for dc, cmd in ((f"{GW}/pump", "on"), (GW, "reboot"), (f"{ACCOUNT}/other-gw/x", "off")):
        assert (await client.post("/sim/commands", {"dc": dc, "command": cmd}))[0] == 200
    _, text = await client.post("/app/iqp/rest/subscribe", json.dumps(
        {"handshake": {"stage": "subscribe"}, "token": token,
         "payload": {"dc": GW, "request_type": "subscribe"}}))
    assert text == fill('{"handshake":{"stage":"subscribe"},"payload":{"request_type":'
                        '"command_list","commands":[{"dc":"<channel>/pump","command":"on"},'
                        '{"dc":"<channel>","command":"reboot"}]}}', token)
    assert (await client.subscribe(token, GW))[1]["payload"]["request_type"] == "no_commands"
    # the account channel collects what is left, with each command's own channel
    _, answer = await client.subscribe(token, ACCOUNT)
    assert answer["payload"]["commands"] == [{"dc": f"{ACCOUNT}/other-gw/x", "command": "off"}]
    assert sim.pending_commands() == []


async def test_commands_kept_when_not_consuming(client: Client, sim) -> None:
    sim.consume_on_read = False
    token = await client.login()
    sim.queue_command(f"{GW}/pump", "on")
    for _ in range(2):
        _, answer = await client.subscribe(token, f"{GW}/pump")
        assert answer["payload"]["commands"] == [{"dc": f"{GW}/pump", "command": "on"}]
    assert (await client.subscribe(token, f"{GW}/fan"))[1]["payload"]["request_type"] == \
        "no_commands"
    assert (await client.post("/sim/commands", {"bad": 1}))[0] == 400
    async with client.http.delete(sim.url + "/sim/commands") as resp:
        assert resp.status == 200
    assert sim.pending_commands() == []


async def test_subscribe_for_another_account_is_unauthorized(client: Client) -> None:
    token = await client.login()
    assert (await client.subscribe(token, "SOMEONE_ELSE"))[1] == {
        "handshake": {"stage": "error", "code": "2"}}


# -- read-back and faults ------------------------------------------------------------------------


async def test_read_back_route_filters_rows(client: Client, sim) -> None:
    token = await client.login()
    await client.publish(token, [message(f"{GW}/a"), message(f"{GW}/b")])
    async with client.http.get(sim.url + f"/sim/data?dc={GW}/b") as resp:
        body = await resp.json()
    assert body["total"] == 2
    assert [(r["id"], r["dc"], r["metric"], r["data"], r["timestamp"]) for r in body["rows"]] == [
        (2, f"{GW}/b", "temperature", "71.5", "2026-11-22T10:00:00.000+00:00")]
    async with client.http.get(sim.url + "/sim/data?after=1&limit=5") as resp:
        assert [r["id"] for r in (await resp.json())["rows"]] == [2]
    async with client.http.get(sim.url + "/sim/stats") as resp:
        stats = await resp.json()
    assert stats["rows_total"] == 2 and stats["channels_accepted"] == 2


async def test_faults_status_html_and_expiry_through_control_routes(client: Client, sim) -> None:
    token = await client.login()
    assert (await client.post("/sim/faults", {"kind": "status", "stage": "publish", "count": 1,
                                              "status": 502}))[0] == 200
    assert (await client.post("/app/iqp/rest/publish", "{}"))[0] == 502
    assert (await client.post("/sim/faults", {"name": "html", "count": 1}))[0] == 200
    status, text = await client.post("/app/iqp/rest/subscribe", "{}")
    assert status == 200 and text.startswith("<!DOCTYPE html>")
    assert (await client.post("/sim/faults", {"kind": "bogus"}))[0] == 400
    assert (await client.subscribe(token, GW))[0] == 200  # faults were used up
    assert (await client.post("/sim/expire", {}))[0] == 200
    assert (await client.subscribe(token, GW))[1]["handshake"]["code"] == "2"


async def test_drop_closes_the_connection_without_an_answer(client: Client, sim) -> None:
    sim.inject("drop", "login")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.login()
    assert sim.stats["logins"] == 0
    assert await client.login()


async def test_slow_answers_after_storing(client: Client, sim) -> None:
    token = await client.login()
    sim.inject("slow", "publish", delay_s=5)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await client.publish(token, [message()])
    await sim.wait_for(lambda: sim.rows_total == 1, timeout_s=2)


# -- CLI -----------------------------------------------------------------------------------------


async def test_cli_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", "sim", "opshub", "--port", "0", "--user", "ops:pw",
        "--idle-timeout", "30", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        url = None
        async with asyncio.timeout(20):
            while url is None:
                line = await proc.stdout.readline()  # type: ignore[union-attr]
                assert line, "simulator exited early"
                if line.startswith(b'{"opshub_sim"'):
                    url = json.loads(line)["opshub_sim"]
        async with aiohttp.ClientSession() as http:
            assert await Client(http, url).login("ops", "pw")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await proc.communicate()
    assert proc.returncode == 0


def test_users_from_arguments_and_file(tmp_path) -> None:
    from gatewayd_sim.opshub import parse_users
    f = tmp_path / "users.toml"
    f.write_text('[users]\nREST_DEMO = "pw1"\n"Operations Hub_Testing" = "pw2"\n')
    assert parse_users(["a:b:c"], str(f)) == {"REST_DEMO": "pw1",
                                              "Operations Hub_Testing": "pw2", "a": "b:c"}
    assert parse_users([]) == {"demo": "demo"}
    with pytest.raises(ValueError, match="NAME:PASSWORD"):
        parse_users(["nocolon"])
    f.write_text("[users]\nx = 1\n")
    with pytest.raises(ValueError, match="expected"):
        parse_users([], str(f))


async def test_login_ends_earlier_tokens_when_switched_on(client: Client, sim) -> None:
    first = await client.login()
    second = await client.login()
    assert (await client.publish(first, [message()]))[1]["handshake"]["code"] == "1"  # default
    assert await client.post("/sim/config", {"login_ends_earlier": True}) == (200, json.dumps(
        {**sim.settings(), "login_ends_earlier": True}))
    third = await client.login()
    for ended in (first, second):
        assert (await client.publish(ended, [message()]))[1] == {"handshake": {"stage": "error",
                                                                              "code": "2"}}
    assert (await client.publish(third, [message()]))[1]["handshake"]["code"] == "1"
