"""The MMS simulator is strict: every §A.11 route and error, over real sockets."""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gatewayd_sim import mms as simmod
from gatewayd_sim.mms import (
    DEFAULT_DEVICE_ID,
    DEFAULT_TOKEN,
    MSG_NOT_CONFORM,
    MSG_PARSE_TYPE,
    MSG_UNAUTHORIZED,
    FieldDef,
    MessageType,
    MmsSimulator,
)
from tests.mms.conftest import APP_TOKEN as DEFAULT_APP_TOKEN
from tests.mms.conftest import PUSH_USER as DEFAULT_PUSH_USER
from tests.mms.conftest import WIDE_TYPE

DEV = DEFAULT_DEVICE_ID
AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(":".join(DEFAULT_PUSH_USER).encode()).decode()}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
    async with http.request(method, url, data=data, headers=headers or AUTH) as r:
        return r.status, r.content_type, await r.text()


def send(mode: str = "sync", messages: Any = None, mtype: str = "m0t0y0p0e1") -> dict[str, Any]:
    return {
        "mode": mode,
        "messageType": mtype,
        "messages": messages
        if messages is not None
        else [{"sensor": "s1", "value": "20.5", "timestamp": 1718000000}],
    }


async def test_sync_send_is_stored_typed_with_the_exact_answer(sim: MmsSimulator, http) -> None:
    status, ctype, text = await call(
        http,
        "POST",
        f"{sim.api_url}http/data/{DEV}",
        send(
            messages=[
                {"sensor": "s1", "value": 20.5, "timestamp": "1718000000"},
                ["s2", "x", 1718000001],
            ]
        ),
    )
    assert (status, ctype) == (200, "application/json")
    assert json.loads(text) == {"msg": f"2 message(s) received from device [{DEV}]"}
    rows = sim.rows("m0t0y0p0e1")
    assert [(r["G_DEVICE"], r["C_SENSOR"], r["C_VALUE"], r["C_TIMESTAMP"]) for r in rows] == [
        (DEV, "s1", "20.5", 1718000000),
        (DEV, "s2", "x", 1718000001),
    ]
    assert all(isinstance(r["G_CREATED"], int) for r in rows)


async def test_async_send_answers_202(sim: MmsSimulator, http) -> None:
    status, _, text = await call(http, "POST", f"{sim.api_url}http/data/{DEV}", send("async"))
    assert status == 202 and "1 message(s)" in json.loads(text)["msg"]
    assert sim.count("m0t0y0p0e1") == 1


@pytest.mark.parametrize(
    ("headers", "device"),
    [
        ({"Authorization": "Bearer wrong"}, DEV),
        ({}, DEV),
        (AUTH, "some-other-device"),
    ],
)
async def test_wrong_token_is_401_plain_text(sim: MmsSimulator, http, headers, device) -> None:
    status, ctype, text = await call(
        http, "POST", f"{sim.api_url}http/data/{device}", send(), headers=headers or {"X": "y"}
    )
    assert (status, ctype, text) == (401, "text/plain", MSG_UNAUTHORIZED)
    assert sim.count("m0t0y0p0e1") == 0


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "sync", "messages": []},
        {"mode": "sync", "messageType": 7, "messages": []},
        "not json at all",
        "[1, 2]",
    ],
)
async def test_missing_message_type_is_the_parse_error(sim: MmsSimulator, http, body) -> None:
    status, _, text = await call(http, "POST", f"{sim.api_url}http/data/{DEV}", body)
    assert status == 400
    assert json.loads(text) == {"msg": MSG_PARSE_TYPE}


@pytest.mark.parametrize(
    "messages",
    [
        [{"sensor": "s", "value": "1", "timestamp": 1, "_time": 5}],  # unknown field
        [{"sensor": "s", "value": "1", "timestamp": "soon"}],  # not coercible to long
        [{"sensor": "s", "value": "1", "timestamp": 1.5}],  # a fraction for a long
        [{"sensor": "x" * 256, "value": "1"}],  # over the 255 default max length
        [["s", "1", 1, "extra"]],  # more positional values than fields
        ["just a string"],
        [{"sensor": {"nested": 1}}],
    ],
)
async def test_non_conforming_messages_are_400_and_nothing_stored(sim: MmsSimulator, http, messages) -> None:
    good = {"sensor": "ok", "value": "1", "timestamp": 1}
    status, _, text = await call(
        http, "POST", f"{sim.api_url}http/data/{DEV}", send(messages=[good, *messages])
    )
    assert status == 400 and json.loads(text) == {"msg": MSG_NOT_CONFORM}
    assert sim.count("m0t0y0p0e1") == 0  # a request is accepted whole or not at all


async def test_type_direction_and_assignment_are_checked(sim: MmsSimulator, http) -> None:
    url = f"{sim.api_url}http/data/{DEV}"
    status, _, text = await call(http, "POST", url, send(mtype="m0t0y0p0e3", messages=[{"opcode": "x"}]))
    assert status == 400 and "direction [toDevice]" in json.loads(text)["msg"]
    status, _, text = await call(http, "POST", url, send(mtype="ffffffffffffffffffff"))
    assert status == 400 and "not assigned" in json.loads(text)["msg"]


async def test_numeric_strings_iso_dates_and_booleans_are_coerced(sim: MmsSimulator, http) -> None:
    url = f"{sim.api_url}http/data/{DEV}"
    status, _, _ = await call(
        http,
        "POST",
        url,
        send(
            mtype=WIDE_TYPE,
            messages=[
                {
                    "device": "d",
                    "temperature": "21.25",
                    "humidity": 40,
                    "timestamp": "2024-06-10T06:13:20.5Z",
                },
                {"device": "d", "temperature": 1, "timestamp": 1718000000},
            ],
        ),
    )
    assert status == 200
    rows = sim.rows(WIDE_TYPE)
    assert rows[0]["C_TEMPERATURE"] == 21.25 and rows[0]["C_HUMIDITY"] == 40.0
    assert rows[0]["C_TIMESTAMP"] == 1718000000500  # dates are kept as epoch ms
    assert rows[1]["C_TIMESTAMP"] == 1718000000000
    status, _, _ = await call(http, "POST", url, send(mtype=WIDE_TYPE, messages=[{"temperature": "warm"}]))
    assert status == 400


async def test_url_parameter_variant(sim: MmsSimulator, http) -> None:
    url = f"{sim.api_url}http/data/{DEV}/m0t0y0p0e1/sync/seq-1?sensor=s9&value=IA==&timestamp=17"
    status, _, text = await call(http, "POST", url, " ")
    assert status == 200, text
    assert sim.rows("m0t0y0p0e1")[-1]["C_VALUE"] == "IA=="
    status, _, _ = await call(http, "POST", f"{sim.api_url}http/data/{DEV}/m0t0y0p0e1/sync?bogus=1", "")
    assert status == 400
    sim.add_message_type(
        MessageType(
            "b1b1b1b1b1b1b1b1b1b1",
            "fromDevice",
            (FieldDef(1, "button", "binary"), FieldDef(2, "label", "string")),
        )
    )
    url = f"{sim.api_url}http/data/{DEV}/b1b1b1b1b1b1b1b1b1b1/sync?button=a+b/IA==&label=hi+there"
    status, _, text = await call(http, "POST", url, "")
    assert status == 200, text  # an unencoded '+' in base64 survives; in a string it is a space
    assert sim.rows("b1b1b1b1b1b1b1b1b1b1")[0] | {"G_CREATED": 0} == {
        "G_DEVICE": DEV,
        "G_CREATED": 0,
        "C_BUTTON": "a+b/IA==",
        "C_LABEL": "hi there",
    }


async def test_http_push_is_stored_and_drained_newest_first(sim: MmsSimulator, http) -> None:
    push_url = f"{sim.api_url}http/push/{DEV}"
    for operand in ("first", "second", "third"):
        status, _, text = await call(
            http,
            "POST",
            push_url,
            {
                "method": "http",
                "sender": "ops",
                "messageType": "m0t0y0p0e3",
                "messages": [{"opcode": "switch", "operand": operand}],
            },
            headers=BASIC,
        )
        assert status == 200, text
    status, _, text = await call(http, "GET", f"{sim.api_url}http/data/{DEV}")
    assert status == 200
    got = json.loads(text)
    assert [e["messages"][0]["operand"] for e in got] == ["third", "second", "first"]
    assert got[0]["sender"] == "ops" and got[0]["messageType"] == "m0t0y0p0e3"
    status, _, text = await call(http, "GET", f"{sim.api_url}http/data/{DEV}")
    assert (status, json.loads(text)) == (200, [])  # drained


async def test_push_auth_and_validation(sim: MmsSimulator, http) -> None:
    url = f"{sim.api_url}http/push/{DEV}"
    body = {"method": "http", "messageType": "m0t0y0p0e3", "messages": [{"opcode": "x"}]}
    assert (await call(http, "POST", url, body, headers=AUTH))[0] == 401  # a device token is not enough
    bad_basic = {"Authorization": "Basic " + base64.b64encode(b"p1234567:nope").decode()}
    assert (await call(http, "POST", url, body, headers=bad_basic))[0] == 401
    app = {"Authorization": f"Bearer {DEFAULT_APP_TOKEN}", "Content-Type": "text/plain"}
    assert (await call(http, "POST", url, body, headers=app))[0] == 200  # lenient content type
    status, _, text = await call(http, "POST", url, {**body, "messageType": "m0t0y0p0e1"}, BASIC)
    assert status == 400 and "direction" in text
    status, _, text = await call(
        http, "POST", url, {k: v for k, v in body.items() if k != "messageType"}, BASIC
    )
    assert status == 400 and json.loads(text) == {"msg": MSG_PARSE_TYPE}
    status, _, _ = await call(http, "POST", f"{sim.api_url}http/push/nobody", body, BASIC)
    assert status == 404


async def test_ws_push_goes_to_the_live_socket_or_is_dropped(sim: MmsSimulator, http) -> None:
    push = {
        "method": "ws",
        "sender": "ops",
        "messageType": "m0t0y0p0e3",
        "messages": [{"opcode": "switch", "operand": "on"}],
    }
    status, _, text = await call(http, "POST", f"{sim.api_url}http/push/{DEV}", push, BASIC)
    assert status == 200 and "dropped" in text and sim.pushes_dropped == 1
    async with http.ws_connect(f"{sim.api_url}ws/data/{DEV}".replace("http", "ws", 1), headers=AUTH) as ws:
        await call(http, "POST", f"{sim.api_url}http/push/{DEV}", push, BASIC)
        frame = json.loads((await ws.receive(timeout=2)).data)
        assert frame["messages"] == [{"opcode": "switch", "operand": "on"}]
        await ws.send_str(json.dumps(send()))
        answer = json.loads((await ws.receive(timeout=2)).data)
        assert answer == {"msg": f"1 message(s) received from device [{DEV}]", "code": 200}
        await ws.send_str("{broken")
        answer = json.loads((await ws.receive(timeout=2)).data)
        assert answer == {"msg": MSG_PARSE_TYPE, "code": 400}
    sim.ws_push_offline = "store"
    await call(http, "POST", f"{sim.api_url}http/push/{DEV}", push, BASIC)
    assert len(sim.push_queues[DEV]) == 1


async def test_ws_upgrade_needs_the_token(sim: MmsSimulator, http) -> None:
    url = f"{sim.api_url}ws/data/{DEV}".replace("http", "ws", 1)
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await http.ws_connect(url, headers={"Authorization": "Bearer nope"})
    assert err.value.status == 401
    sim.inject("refuse_upgrade", count=1)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(url, headers=AUTH)
    async with http.ws_connect(url, headers=AUTH):
        assert sim.connected(DEV)


async def test_faults_through_the_control_route(sim: MmsSimulator, http) -> None:
    url = f"{sim.api_url}http/data/{DEV}"
    status, _, text = await call(
        http, "POST", f"{sim.url}/sim/faults", {"sync_202": {"times": 1}, "error_500": False}
    )
    assert status == 200 and json.loads(text)["active"] == [
        {"name": "sync_202", "stage": "*", "count": 1}]
    status, _, text = await call(http, "POST", url, send())
    body = json.loads(text)
    assert status == 202 and body["retryAfterHeaderValue"] == "60"
    assert body["msg"].startswith(f"{sim.api_url}http/ack/{DEV}/")
    assert sim.count("m0t0y0p0e1") == 0  # not stored by default
    status, _, text = await call(http, "POST", body["msg"], "")
    assert status == 200 and json.loads(text)[0]["status"] == "FAILED"

    await call(http, "POST", f"{sim.url}/sim/faults", {"error_500": {"times": 1}})
    status, _, text = await call(http, "POST", url, send())
    assert status == 500
    assert json.loads(text) == {"msg": f"Processing 1 message(s) received from device [{DEV}] failed"}

    await call(http, "POST", f"{sim.url}/sim/faults", {"html_200": True})
    status, ctype, text = await call(http, "POST", url, send())
    assert (status, ctype) == (200, "text/html") and "<form" in text
    await call(http, "DELETE", f"{sim.url}/sim/faults")
    assert (await call(http, "POST", url, send()))[0] == 200
    status, _, _ = await call(http, "POST", f"{sim.url}/sim/faults", {"no_such_fault": True})
    assert status == 400


async def test_drop_get_loses_the_drained_pushes(sim: MmsSimulator, http) -> None:
    await sim.push(DEV, {"method": "http", "messageType": "m0t0y0p0e3", "messages": [{"opcode": "a"}]})
    sim.inject("drop_get", count=1)
    try:
        # aiohttp retries an idempotent GET once after a dropped connection: then it sees [].
        status, _, text = await call(http, "GET", f"{sim.api_url}http/data/{DEV}")
        assert (status, json.loads(text)) == (200, [])
    except aiohttp.ClientError:
        pass
    assert sim.stats["get_data:0"] == 1  # the drained answer was dropped
    status, _, text = await call(http, "GET", f"{sim.api_url}http/data/{DEV}")
    assert (status, json.loads(text)) == (200, [])  # at-most-once: gone


async def test_empty_get_forms(sim: MmsSimulator, http) -> None:
    sim.empty_get = "204"
    assert (await call(http, "GET", f"{sim.api_url}http/data/{DEV}"))[0] == 204
    sim.empty_get = "empty"
    assert (await call(http, "GET", f"{sim.api_url}http/data/{DEV}"))[:3:2] == (200, "")


async def test_read_back_and_registry_routes(sim: MmsSimulator, http) -> None:
    await call(
        http,
        "POST",
        f"{sim.api_url}http/data/{DEV}",
        send(messages=[{"sensor": str(i), "value": "v", "timestamp": i} for i in range(5)]),
    )
    status, _, text = await call(http, "GET", f"{sim.url}/sim/rows/m0t0y0p0e1?limit=2")
    body = json.loads(text)
    assert status == 200 and body["count"] == 5 and body["table"] == "T_IOT_M0T0Y0P0E1"
    assert [r["C_SENSOR"] for r in body["rows"]] == ["3", "4"]
    status, _, _ = await call(
        http,
        "POST",
        f"{sim.url}/sim/message-types",
        {
            "id": "0123456789abcdef0123",
            "direction": "fromDevice",
            "fields": [{"position": 1, "name": "flag", "type": "boolean"}],
        },
    )
    assert status == 201
    status, _, _ = await call(http, "POST", f"{sim.url}/sim/devices", {"id": "dev2", "token": "t2"})
    assert status == 201
    status, _, _ = await call(
        http,
        "POST",
        f"{sim.api_url}http/data/dev2",
        send(mtype="0123456789abcdef0123", messages=[{"flag": "true"}]),
        headers={"Authorization": "Bearer t2"},
    )
    assert status == 200 and sim.rows("0123456789abcdef0123")[0]["C_FLAG"] is True


async def test_ack_route_and_async_sequence(sim: MmsSimulator, http) -> None:
    await call(http, "POST", f"{sim.api_url}http/data/{DEV}", {**send("async"), "sequence": "s-1"})
    status, _, text = await call(http, "POST", f"{sim.api_url}http/ack/{DEV}/s-1", "")
    assert (status, json.loads(text)) == (200, [{"sequence": "s-1", "status": "SUCCESS"}])
    status, _, text = await call(http, "POST", f"{sim.api_url}http/ack/{DEV}", "")
    assert len(json.loads(text)) == 1
    status, _, text = await call(http, "POST", f"{sim.api_url}http/ack/{DEV}/unknown", "")
    assert json.loads(text) == []


async def test_max_rows_keeps_the_newest_and_counts_all() -> None:
    async with MmsSimulator(max_rows=3) as sim, aiohttp.ClientSession() as http:
        await call(
            http,
            "POST",
            f"{sim.api_url}http/data/{DEV}",
            send(messages=[{"sensor": str(i)} for i in range(10)]),
        )
        assert sim.count("m0t0y0p0e1") == 10
        assert [r["C_SENSOR"] for r in sim.rows("m0t0y0p0e1")] == ["7", "8", "9"]


def test_cli_arguments_build_a_simulator(tmp_path) -> None:
    registry = tmp_path / "types.json"
    registry.write_text(
        json.dumps(
            {
                "messageTypes": [
                    {
                        "id": "feedfeedfeedfeedfeed",
                        "direction": "toDevice",
                        "fields": [{"position": 1, "name": "cmd", "type": "string"}],
                    }
                ],
                "devices": [{"id": "gw2", "token": "tok2"}],
            }
        )
    )
    parser = argparse.ArgumentParser()
    simmod.add_arguments(parser)
    args = parser.parse_args(
        [
            "--port",
            "0",
            "--device",
            "gw1:tok1",
            "--registry",
            str(registry),
            "--fault",
            "slow",
            "--ws-push-offline",
            "store",
        ]
    )
    sim = simmod.build(args)
    assert sim.devices["gw1"][0] == "tok1" and sim.devices["gw2"][0] == "tok2"
    assert sim.message_types["feedfeedfeedfeedfeed"].direction == "toDevice"
    assert [f.name for f in sim.faults.active] == ["slow"] and sim.ws_push_offline == "store"
    bad = parser.parse_args(["--device", "no-token"])
    assert simmod.run(bad) == 2
