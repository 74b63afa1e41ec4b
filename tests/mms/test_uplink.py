"""MmsUplink end to end: real SQLite queue, real dispatcher, the simulator over real sockets."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from structlog.testing import capture_logs

from drivers.base import Reading
from gatewayd.uplinks.base import UplinkState
from gatewayd.uplinks.mms import MessageMap
from gatewayd_sim.mms import DEFAULT_DEVICE_ID, DEFAULT_TOKEN, RESULT_TYPE
from tests.mms.conftest import WIDE_TYPE, base_config, eventually, readings, stored_values

DEV = DEFAULT_DEVICE_ID
TRANSPORTS = ["ws", "http"]


def _push(operand: str, method: str, opcode: str = "switch") -> dict:
    return {
        "method": method,
        "sender": "ops",
        "messageType": "m0t0y0p0e3",
        "messages": [{"opcode": opcode, "operand": operand}],
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_readings_arrive_with_values_and_sampling_times(sim, make_harness, transport):
    h = await make_harness(sim, base_config(sim, transport=transport, batch_size=7))
    batch = readings(25, t0_ms=1_718_000_000_250)
    await h.put(batch)
    await h.wait_acked(25)
    assert stored_values(sim) == [("boiler.temp_c", str(r.value), r.ts_ms // 1000) for r in batch]
    assert all(row["G_DEVICE"] == DEV for row in sim.rows("m0t0y0p0e1"))
    assert h.uplink.sent == 25 and h.uplink.state == UplinkState.CONNECTED
    status = h.uplink.status()
    assert status["transport"] == transport and status["backlog"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wide_layout_groups_points_sampled_together(sim, make_harness, transport):
    wide = MessageMap(
        WIDE_TYPE,
        devices=["attic"],
        fields={"device": "device"},
        point_fields={"temp_c": "temperature", "rh_pct": "humidity"},
        timestamp_format="iso",
    )
    rest = MessageMap("m0t0y0p0e1", timestamp_format="ms")
    h = await make_harness(sim, base_config(sim, transport=transport, messages=[wide, rest]))
    await h.put(
        [
            Reading("attic", "temp_c", 21.5, 1_718_000_000_123),
            Reading("attic", "rh_pct", 40.25, 1_718_000_000_123),
            Reading("attic", "temp_c", 21.75, 1_718_000_060_000),
            Reading("cellar", "temp_c", 12, 1_718_000_000_999),
        ]
    )
    await h.wait_acked(4)
    assert [
        (r["C_DEVICE"], r.get("C_TEMPERATURE"), r.get("C_HUMIDITY"), r["C_TIMESTAMP"])
        for r in sim.rows(WIDE_TYPE)
    ] == [("attic", 21.5, 40.25, 1_718_000_000_123), ("attic", 21.75, None, 1_718_000_060_000)]
    assert stored_values(sim) == [("cellar.temp_c", "12", 1_718_000_000_999)]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wrong_token_is_auth_failed_without_busy_loop(sim, make_harness, transport):
    cfg = base_config(sim, transport=transport, backoff_base=0.01, backoff_cap=0.25)
    sim.devices[DEV] = ("another-token", sim.devices[DEV][1])
    h = await make_harness(sim, cfg)
    await h.put(readings(3))
    key = "ws_data:401" if transport == "ws" else "get_data:401"
    await sim.wait_for(lambda: sim.stats[key] >= 3, timeout_s=3)
    await eventually(lambda: h.uplink.state == UplinkState.AUTH_FAILED)
    assert "401" in h.uplink.last_error
    times = list(sim.answer_times[key])
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.25 * 0.9 * 0.95  # every retry waits the full cap, never a busy loop
    assert h.acked() == 0 and sim.count("m0t0y0p0e1") == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_poison_reading_is_quarantined_and_the_rest_delivered(sim, make_harness, transport):
    wide = MessageMap(WIDE_TYPE, fields={"device": "device"}, point_fields={"temp_c": "temperature"})
    h = await make_harness(sim, base_config(sim, transport=transport, messages=[wide]))
    batch = readings(20)
    batch[13] = Reading("boiler", "temp_c", "very hot", batch[13].ts_ms)  # not a double
    with capture_logs() as logs:
        await h.put(batch)
        await h.wait_acked(20)
    stored = [r["C_TEMPERATURE"] for r in sim.rows(WIDE_TYPE)]
    assert stored == [r.value for i, r in enumerate(batch) if i != 13]
    assert h.uplink.rejected == 1
    assert h.queue.outbox("mms").quarantined == {"rejected": 1}
    dropped = [e for e in logs if e["event"] == "reading_quarantined"]
    assert len(dropped) == 1 and dropped[0]["seq"] == 14
    assert dropped[0]["detail"] == "The message doesn't conform to the given message type"
    assert not [e for e in logs if e["event"] == "reading_dropped"]  # the outbox logs it, once


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sync_202_is_not_delivery_and_is_resent(sim, make_harness, transport):
    sim.inject("sync_202", count=1)  # not stored; the ack URL reports FAILED
    h = await make_harness(sim, base_config(sim, transport=transport))
    await h.put(readings(5))
    await h.wait_acked(5)
    assert len(stored_values(sim)) == 5  # resent once, stored once
    assert sim.stats["post_ack:200"] == 1  # the ack URL was checked before resending
    assert h.uplink.resent == 5


async def test_sync_202_confirmed_by_the_ack_url_is_not_resent(sim, make_harness):
    sim.inject("sync_202", count=1, stored=True)
    h = await make_harness(sim, base_config(sim))
    await h.put(readings(5))
    await h.wait_acked(5)
    assert len(stored_values(sim)) == 5 and h.uplink.resent == 0


async def test_sync_202_treated_as_delivered_when_switched(sim, make_harness):
    sim.inject("sync_202", count=1)
    h = await make_harness(sim, base_config(sim, treat_sync_202_as_delivered=True))
    await h.put(readings(5))
    await h.wait_acked(5)
    assert stored_values(sim) == []  # the site chose possible loss over duplicates
    assert sim.stats["post_ack:200"] == 0


async def test_ws_dropped_mid_stream_loses_nothing_and_bounds_duplicates(sim, make_harness):
    cfg = base_config(sim, batch_size=50)
    h = await make_harness(sim, cfg)
    await h.put(readings(100, point="a"))
    await h.wait_acked(100)
    sim.inject("ws_close", count=2, stored=True)  # stored, then the socket dies before answering
    await h.put(readings(300, point="b"))
    await h.wait_acked(400, timeout_s=10)
    sent = [
        (f"boiler.{p}", str(r.value), r.ts_ms // 1000)
        for p in "ab"
        for r in readings(100 if p == "a" else 300, point=p)
    ]
    stored = stored_values(sim)
    assert set(stored) == set(sent)  # nothing lost
    duplicates = len(stored) - len(set(stored))
    assert 0 < duplicates <= 2 * cfg.batch_size  # at most one in-doubt batch per drop
    assert h.uplink.resent >= duplicates
    assert sim.ws_connections >= 3


async def test_slow_answer_times_out_and_resends(sim, make_harness):
    sim.inject("slow", count=1, delay_s=0.6)
    h = await make_harness(sim, base_config(sim, transport="http", request_timeout=0.3))
    await h.put(readings(4))
    await h.wait_acked(4)
    stored = stored_values(sim)
    assert len(set(stored)) == 4 and len(stored) == 8  # stored twice: at-least-once
    assert h.uplink.resent == 4


async def test_html_200_on_the_catch_up_poll_is_logged_and_delivery_goes_on(sim, make_harness):
    sim.inject("html_200", count=1)  # the ws transport's one GET after connecting gets a login page
    with capture_logs() as logs:
        h = await make_harness(sim, base_config(sim))
        await h.put(readings(3))
        await h.wait_acked(3)
    failed = [e for e in logs if e["event"] == "catch_up_poll_failed"]
    assert len(failed) == 1 and "JSON array" in failed[0]["error"]
    assert len(stored_values(sim)) == 3


async def test_html_200_on_a_send_never_acks(sim, make_harness):
    h = await make_harness(sim, base_config(sim, transport="http"))
    await h.put(readings(1))
    await h.wait_acked(1)
    sim.inject("html_200")  # until cleared
    await h.put(readings(2, t0_ms=1_800_000_000_000))
    await sim.wait_for(lambda: sim.stats["fault:html_200"] >= 3)
    assert h.acked() == 1  # a login page is no confirmation: retried with backoff, never acked
    sim.clear("html_200")
    await h.wait_acked(3)
    assert len(stored_values(sim)) == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_5xx_retries_the_same_batch(sim, make_harness, transport):
    sim.inject("error_500", count=2)
    h = await make_harness(sim, base_config(sim, transport=transport))
    await h.put(readings(6))
    await h.wait_acked(6)
    assert len(stored_values(sim)) == 6 and sim.stats["fault:error_500"] == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_deterministic_500_is_retried_never_dropped(sim, make_harness, transport):
    sim.inject("error_500", match="boom")  # this one payload fails every time
    h = await make_harness(sim, base_config(sim, transport=transport, batch_size=2))
    batch = [
        Reading("boiler", "status", s, 1_718_000_000_000 + i)
        for i, s in enumerate(["a", "b", "c", "boom", "d", "e", "f"])
    ]
    await h.put(batch)
    await sim.wait_for(lambda: sim.stats["fault:error_500"] >= 4)
    assert h.acked() == 2 and h.queue.outbox("mms").quarantined == {}  # held, not dropped
    sim.clear("error_500")  # the server recovers: everything arrives, in order
    await h.wait_acked(7)
    assert [r["C_VALUE"] for r in sim.rows("m0t0y0p0e1")] == ["a", "b", "c", "boom", "d", "e", "f"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pushes_reach_the_relay_in_issue_order_and_results_land(sim, make_harness, transport):
    method = transport
    h = await make_harness(sim, base_config(sim, transport=transport, poll_interval=0.2))
    await eventually(lambda: h.uplink.state == UplinkState.CONNECTED)
    if method == "ws":
        await sim.wait_for(lambda: sim.connected(DEV))
    for operand in ("one", "two", "three"):
        await sim.push(DEV, _push(operand, method))
    await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 3)
    assert [p["operand"] for _, p in h.relay.actions] == ["one", "two", "three"]
    results = sim.rows(RESULT_TYPE)
    assert [(r["C_OK"], r["C_CODE"], r["C_MESSAGE"]) for r in results] == [(True, 200, "ok")] * 3
    assert len({r["C_CMD_ID"] for r in results}) == 3
    assert all(isinstance(r["C_TIMESTAMP"], int) for r in results)


async def test_http_poll_reverses_the_newest_first_array(sim, make_harness):
    for operand in ("1", "2", "3", "4"):
        await sim.push(DEV, _push(operand, "http", opcode="set"))
    h = await make_harness(sim, base_config(sim, transport="http"))
    await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 4)
    assert [p["operand"] for _, p in h.relay.actions] == [1, 2, 3, 4]


async def test_cmd_id_field_is_used_and_duplicates_are_dropped(sim, make_harness):
    h = await make_harness(
        sim,
        base_config(
            sim,
            command_types=["g0a0t0e0w0a0y0c0m0d1"],
            action_field="action",
            device_field="device",
        ),
    )
    await sim.wait_for(lambda: sim.connected(DEV))
    cmd = {
        "method": "ws",
        "messageType": "g0a0t0e0w0a0y0c0m0d1",
        "messages": [{"cmd_id": "c-42", "device": "pump", "action": "open", "value": "on"}],
    }
    await sim.push(DEV, cmd)
    await sim.push(DEV, cmd)  # redelivered (same id, same content): the first result again
    await sim.push(DEV, {**cmd, "messages": [{**cmd["messages"][0], "cmd_id": "c-43"}]})
    await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 3)
    results = sim.rows(RESULT_TYPE)
    assert [r["C_CMD_ID"] for r in results] == ["c-42", "c-42", "c-43"]
    # No mapping for action "open": the dispatcher answers 404 and the relay is untouched.
    assert [r["C_CODE"] for r in results] == [404, 404, 404] and h.relay.actions == []


async def test_malformed_pushes_are_answered_with_error_results(sim, make_harness):
    h = await make_harness(sim, base_config(sim))
    await sim.wait_for(lambda: sim.connected(DEV))
    with capture_logs() as logs:
        assert await sim.send_raw(DEV, "this is not json")
        assert await sim.send_raw(DEV, '{"messageType": "m0t0y0p0e3", "messages": "nope"}')
        await sim.push(
            DEV,
            {
                "method": "ws",
                "messageType": "g0a0t0e0w0a0y0c0m0d1",
                "messages": [{"action": "switch"}],
            },
        )  # not a command type here
        await sim.push(
            DEV, {"method": "ws", "messageType": "m0t0y0p0e3", "messages": [{"operand": "on"}]}
        )  # no opcode
        await sim.push(DEV, _push("on", "ws"))  # a good one still works afterwards
        await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 5)
    results = {r["C_CODE"]: [] for r in sim.rows(RESULT_TYPE)}
    for r in sim.rows(RESULT_TYPE):
        results[r["C_CODE"]].append(r["C_MESSAGE"])
    assert len(results[400]) == 4 and results[200] == ["ok"]
    assert all(m.startswith("malformed command") for m in results[400])
    assert any("missing action field 'opcode'" in m for m in results[400])
    assert any("not a command type" in m for m in results[400])
    assert sum("not a push envelope" in m for m in results[400]) == 2
    assert "push_malformed" in {e["event"] for e in logs}
    assert h.uplink.state == UplinkState.CONNECTED and h.relay.actions == [("switch", {"operand": "on"})]


async def test_ws_pushes_stored_while_away_are_collected_after_reconnect(sim, make_harness):
    sim.ws_push_offline = "store"
    h = await make_harness(sim, base_config(sim))
    await sim.wait_for(lambda: sim.connected(DEV))
    sim.inject("ws_close", count=1, stored=False)
    sim.inject("refuse_upgrade", count=1, status=503)  # stay away for one attempt
    await h.put(readings(1))
    await sim.wait_for(lambda: not sim.connected(DEV))
    await sim.push(DEV, _push("while-away", "ws"))  # stored, since no socket is live
    await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 1)
    assert h.relay.actions == [("switch", {"operand": "while-away"})]
    await h.wait_acked(1)


async def test_results_survive_a_disconnect(sim, make_harness):
    h = await make_harness(sim, base_config(sim, transport="http", poll_interval=0.05))
    await eventually(lambda: h.uplink.state == UplinkState.CONNECTED)
    sim.inject("error_500", count=1)  # the first result send fails: it must be kept
    await sim.push(DEV, _push("on", "http"))
    await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 1)
    assert sim.rows(RESULT_TYPE)[0]["C_OK"] is True
    await eventually(lambda: h.uplink.status()["results_buffered"] == 0)
    assert h.uplink.results_sent == 1 and sim.count(RESULT_TYPE) == 1


async def test_status_reports_counters_and_hides_the_token(sim, make_harness):
    h = await make_harness(sim, base_config(sim))
    await h.put(readings(2))
    await h.wait_acked(2)
    st = h.uplink.status()
    assert st["state"] == "connected" and st["sent"] == 2 and st["messages"] >= 1
    assert st["url"] == sim.api_url and st["device_id"] == DEV
    assert DEFAULT_TOKEN not in repr(st) and DEFAULT_TOKEN not in repr(h.uplink.config)


async def test_identical_pushes_all_run_in_one_poll_and_later(sim, make_harness):
    for _ in range(2):  # the operator really pressed twice: both are in the same poll
        await sim.push(DEV, _push("on", "http"))
    h = await make_harness(sim, base_config(sim, transport="http", poll_interval=0.05))
    await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 2)
    assert h.relay.actions == [("switch", {"operand": "on"})] * 2
    await sim.push(DEV, _push("on", "http"))  # and once more, a poll later: MMS never redelivers
    await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 3)
    assert h.relay.actions == [("switch", {"operand": "on"})] * 3
    assert len({r["C_CMD_ID"] for r in sim.rows(RESULT_TYPE)}) == 3


@pytest.mark.parametrize(("transport", "answers"), [("http", True), ("ws", True), ("ws", False)])
async def test_async_mode_counts_202_as_delivery(sim, make_harness, transport, answers):
    sim.ws_async_answer = answers
    cfg = base_config(sim, transport=transport, mode="async", ws_async_answers=answers)
    h = await make_harness(sim, cfg)
    await h.put(readings(30))
    await h.wait_acked(30)
    await sim.wait_for(lambda: sim.count("m0t0y0p0e1") == 30)
    assert len(set(stored_values(sim))) == 30 and h.uplink.resent == 0
    answered = sim.stats["post_data:202"] + sim.stats["ws_frame:202"]
    assert answered > 0 if answers else answered == 0


async def test_a_silent_link_is_detected_by_pings_and_replaced(sim, make_harness):
    sim.inject("no_pong", count=1)  # the first connection is half-open: pings go unanswered
    h = await make_harness(sim, base_config(sim, ping_interval=0.2))
    await sim.wait_for(lambda: sim.ws_connections >= 2, timeout_s=5)
    await h.put(readings(3))
    await h.wait_acked(3)
    assert len(stored_values(sim)) == 3


async def test_ws_transport_also_polls_for_http_pushes(sim, make_harness):
    h = await make_harness(sim, base_config(sim, ws_poll_interval=0.05))
    await sim.wait_for(lambda: sim.connected(DEV))
    await sim.push(DEV, _push("via-http", "http"))  # sent with method http to a ws device
    await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 1)
    assert h.relay.actions == [("switch", {"operand": "via-http"})]
    assert sim.ws_connections == 1


@pytest.mark.parametrize("empty", ["204", "empty", "[]"])
async def test_every_form_of_nothing_pending_is_accepted(sim, make_harness, empty):
    sim.empty_get = empty
    h = await make_harness(sim, base_config(sim, transport="http", poll_interval=0.05))
    polls = sim.stats["get_data:204"] + sim.stats["get_data:200"]
    await sim.wait_for(lambda: sim.stats["get_data:204"] + sim.stats["get_data:200"] >= polls + 3)
    await h.put(readings(2))
    await h.wait_acked(2)
    assert h.uplink.state == UplinkState.CONNECTED and h.uplink.last_error == ""


async def test_max_rate_paces_a_backlog(sim, make_harness):
    h = await make_harness(sim, base_config(sim, batch_size=20, max_rate=400))
    await h.put(readings(200))
    started = asyncio.get_running_loop().time()
    await h.wait_acked(200)
    # 200 readings at 400/s: at least 0.45 s (the first lease goes at once).
    assert asyncio.get_running_loop().time() - started >= 0.44
    assert len(stored_values(sim)) == 200


async def test_unmapped_readings_are_quarantined_once(sim, make_harness):
    only_boiler = MessageMap("m0t0y0p0e1", devices=["boiler"])
    sim.inject("error_500", count=1)  # the first attempt fails: the lease goes twice
    h = await make_harness(sim, base_config(sim, messages=[only_boiler]))
    await h.put([*readings(2), Reading("garage", "door", "open", 1_718_000_000_000)])
    await h.wait_acked(3)
    assert h.queue.outbox("mms").quarantined == {"unmapped": 1}
    assert len(stored_values(sim)) == 2
