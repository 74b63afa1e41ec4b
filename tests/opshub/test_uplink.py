"""The uplink end to end: the real SQLite queue, the real dispatcher, the simulator over sockets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from drivers.base import Reading
from gatewayd.uplinks.base import UplinkState
from gatewayd_sim.opshub import OpsHubSimulator

from .conftest import (
    ACCOUNT,
    GATEWAY,
    PASSWORD,
    T0_MS,
    Rig,
    base_table,
    build_config,
    error_count,
    readings,
    wait_until,
)

DC = f"{ACCOUNT}/{GATEWAY}"


def stored_keys(sim: OpsHubSimulator) -> set[tuple[str, str, str, str]]:
    """(dc, metric, data, timestamp) of every stored row: duplicates collapse, losses show."""
    return {(r["dc"], r["metric"], r["data"], r["timestamp"]) for r in sim.rows()}


def publishes(sim: OpsHubSimulator) -> list[dict]:
    return [json.loads(raw) for stage, raw in sim.requests if stage == "publish"]


# -- session -------------------------------------------------------------------------------------


async def test_login_ok_publishes_and_keeps_password_out_of_logs(sim, rig: Rig) -> None:
    with capture_logs() as logs:
        rig.start(build_config(base_table(sim)))
        await rig.wait_state(UplinkState.CONNECTED)
        await rig.put(readings("boiler", "temperature_c", [71.5, 72.0]))
        await rig.wait_acked()
    assert sim.stats["logins"] == 1
    assert [(r["dc"], r["metric"], r["data"], r["data_type"]) for r in sim.rows()] == [
        (f"{DC}/boiler", "temperature_c", "71.5", "Number"),
        (f"{DC}/boiler", "temperature_c", "72", "Number"),
    ]
    assert PASSWORD not in repr(logs)


async def test_login_refused_shows_auth_failed_and_waits(sim, rig: Rig) -> None:
    sim.users[ACCOUNT] = "another-password"
    with capture_logs() as logs:
        uplink = rig.start(build_config(base_table(sim, backoff_cap="30s")))
        await rig.wait_state(UplinkState.AUTH_FAILED)
    assert "login refused" in uplink.last_error
    assert sim.stats["logins_refused"] == 1
    assert error_count(rig.metrics) == 1
    assert PASSWORD not in repr(logs)
    # the full cap (30 s, jittered by at most 10%) is waited: no second attempt right away
    retry = [e for e in logs if e["event"] == "uplink_retry"]
    assert retry and retry[0]["delay_s"] >= 27


async def test_token_expired_between_publishes_relogs_in_silently(rig: Rig) -> None:
    clock = [0.0]
    async with OpsHubSimulator({ACCOUNT: PASSWORD}, idle_timeout_s=5,
                               clock=lambda: clock[0]) as sim:
        uplink = rig.start(build_config(base_table(sim, poll_interval=0)))
        await rig.put(readings("boiler", "t", [1, 2, 3]))
        await rig.wait_acked()
        clock[0] += 6  # idle past the timeout
        await rig.put(readings("boiler", "t", [4, 5, 6], t0=T0_MS + 10_000))
        await rig.wait_acked()
        assert sim.stats["tokens_expired"] == 1 and sim.stats["unauthorized"] == 1
        assert sim.stats["logins"] == 2
        assert len(stored_keys(sim)) == 6
        assert uplink.state == UplinkState.CONNECTED and uplink.last_error == ""
        assert uplink.status()["relogins"] == 1
        assert error_count(rig.metrics) == 0


@pytest.mark.parametrize("sign", ["401", "html", "code2_number"])
async def test_other_token_invalid_signs_relogin_once(sim, rig: Rig, sign: str) -> None:
    uplink = rig.start(build_config(base_table(sim, poll_interval=0)))
    await rig.put(readings("boiler", "t", [1]))
    await rig.wait_acked()
    if sign == "401":
        sim.unauthorized_status = 401
        sim.expire_tokens()
    elif sign == "html":
        sim.inject("html", "publish")
    else:
        sim.inject("raw", "publish", body='{"handshake":{"stage":"error","code":2}}')
    await rig.put(readings("boiler", "t", [2], t0=T0_MS + 5000))
    await rig.wait_acked()
    assert sim.stats["logins"] == 2
    assert len(stored_keys(sim)) == 2
    assert uplink.status()["relogins"] == 1 and error_count(rig.metrics) == 0


async def test_token_refused_again_after_relogin_is_an_error_not_a_loop(sim, rig: Rig) -> None:
    uplink = rig.start(build_config(base_table(sim, poll_interval=0)))
    await rig.wait_state(UplinkState.CONNECTED)
    sim.inject("unauthorized", "publish", count=5)  # refused after every re-login of one call
    await rig.put(readings("boiler", "t", [1]))
    await rig.wait_state(UplinkState.BACKING_OFF)
    assert "token refused right after each new login" in uplink.last_error
    await rig.wait_acked()  # the next session delivers it
    assert len(stored_keys(sim)) == 1


# -- publish -------------------------------------------------------------------------------------

PAGE_EXAMPLE = """{"handshake":{"stage":"publish"},"token":"00000000-00000000-00409DFF-FF521DB2", "messages":[ {"dc":"Operations Hub_Testing/REST_Device/Vehicle2","cloud":"2015-03-26T18:46:38.237+09:00","data":[ {"alt":"1234","lat":"35.587562","long":"139.668916","time":"2015-03-26T18:44:38.195+09:00","mets":[ {"met":"Speed","val":"100","type":"double","desc":"kmh"}, {"met":"Heading","val":"180","type":"double","desc":"degrees"}, {"met":"Temperature","val":"98","type":"double","desc":"degrees"} ] }, {"alt":"1240","lat":"35.587565","long":"139.668920","time":"2015-03-26T18:45:38.195+09:00","mets":[ {"met":"Speed","val":"75","type":"double","desc":"kmh"}, {"met":"Heading","val":"237","type":"double","desc":"degrees"}, {"met":"Temperature","val":"96","type":"double","desc":"degrees"} ] } ] }]}"""


async def test_vendor_multi_metric_example_reproduced_byte_for_byte(rig: Rig) -> None:
    account = "Operations Hub_Testing"
    t1 = 1427363078195  # 2015-03-26T09:44:38.195Z = 18:44:38.195+09:00
    t2 = t1 + 60_000
    async with OpsHubSimulator({account: PASSWORD},
                               token_factory=lambda: "00000000-00000000-00409DFF-FF521DB2") as sim:
        points = {"speed": {"met": "Speed", "type": "double", "desc": "kmh"},
                  "heading": {"met": "Heading", "type": "double", "desc": "degrees"},
                  "temp": {"met": "Temperature", "type": "double", "desc": "degrees"}}
        cfg = build_config(base_table(
            sim, username=account, gateway_id="REST_Device", utc_offset="+09:00", poll_interval=0,
            devices={"car": {"sensor": "Vehicle2", "points": points}},
            gps={"device": "gps", "lat": "latitude", "long": "longitude", "alt": "altitude"}))
        batch = []
        for t, (lat, lon, alt), (speed, heading, temp) in (
                (t1, (35.587562, 139.668916, 1234), (100, 180, 98.0)),
                (t2, (35.587565, 139.66892, 1240), (75, 237, 96))):
            batch += [Reading("gps", "latitude", lat, t), Reading("gps", "longitude", lon, t),
                      Reading("gps", "altitude", alt, t), Reading("car", "speed", speed, t),
                      Reading("car", "heading", heading, t), Reading("car", "temp", temp, t)]
        await rig.put(batch)
        uplink = rig.start(cfg)
        uplink.clock_ms = lambda: 1427363198237  # 2015-03-26T18:46:38.237+09:00
        await rig.wait_acked()
        sent = [raw for stage, raw in sim.requests if stage == "publish"]
        assert len(sent) == 1
        assert json.loads(sent[0]) == json.loads(PAGE_EXAMPLE)
        compact = json.dumps(json.loads(PAGE_EXAMPLE), separators=(",", ":"), ensure_ascii=False)
        assert sent[0].decode() == compact  # same keys, same order, same text
        assert len(sim.rows()) == 6
        assert sim.rows()[0] | {"id": 0, "received_ms": 0} == {
            "id": 0, "dc": "Operations Hub_Testing/REST_Device/Vehicle2", "metric": "Speed",
            "data": "100", "latitude": "35.587562", "longitude": "139.668916",
            "altitude": "1234", "timestamp": "2015-03-26T18:44:38.195+09:00",
            "description": "kmh", "data_type": "double", "generic_1": None, "generic_2": None,
            "cloud": "2015-03-26T18:46:38.237+09:00", "received_ms": 0}


async def test_batching_across_channels_in_one_publish(sim, rig: Rig) -> None:
    batch = []
    for i in range(4):  # 4 sampling times x 3 devices x 2 points
        t = T0_MS + i * 1000
        for dev in ("boiler", "meter", "pump"):
            batch += [Reading(dev, "a", i, t), Reading(dev, "b", f"s{i}", t)]
    await rig.put(batch)
    rig.start(build_config(base_table(sim, poll_interval=0, devices={"pump": {"sensor": "pump7"}})))
    await rig.wait_acked()
    (body,) = publishes(sim)
    assert [m["dc"] for m in body["messages"]] == [f"{DC}/boiler", f"{DC}/meter", f"{DC}/pump7"]
    for message in body["messages"]:
        assert [len(d["mets"]) for d in message["data"]] == [2, 2, 2, 2]
        assert [d["time"] for d in message["data"]] == [
            f"2026-11-18T{h}.000+00:00" for h in ("11:06:40", "11:06:41", "11:06:42", "11:06:43")]
    assert len(sim.rows()) == 24
    assert {r["data_type"] for r in sim.rows() if r["metric"] == "b"} == {"String"}


async def test_poison_items_quarantined_the_rest_delivered(sim, rig: Rig) -> None:
    sim.reject_vals = {"poison"}
    good = readings("boiler", "t", list(range(40)))
    batch = [*good[:17], Reading("boiler", "t", "poison", T0_MS + 17_500), *good[17:],
             Reading("meter", "e", 1.5, T0_MS * 1000)]  # microseconds by mistake: year 58000
    await rig.put(batch)
    uplink = rig.start(build_config(base_table(sim, poll_interval=0)))
    await rig.wait_acked()
    assert {r["data"] for r in sim.rows()} == {str(i) for i in range(40)}
    assert rig.outbox.quarantined == {"refused": 1, "bad_timestamp": 1}
    assert uplink.quarantined == {"refused": 1, "bad_timestamp": 1}
    assert rig.outbox.pending() == 0


async def test_error_code_1_splits_and_loses_nothing(sim, rig: Rig) -> None:
    sim.inject("error", "publish", code=1)
    await rig.put(readings("boiler", "t", list(range(10))))
    rig.start(build_config(base_table(sim, poll_interval=0)))
    await rig.wait_acked()
    assert len(stored_keys(sim)) == 10
    assert rig.outbox.quarantined == {}


async def test_every_channel_refused_before_any_success_is_not_poison(rig: Rig) -> None:
    async with OpsHubSimulator({ACCOUNT: PASSWORD}) as sim:
        await rig.put(readings("boiler", "t", [1, 2]))
        uplink = rig.start(build_config(base_table(sim, poll_interval=0, account="WRONG")))
        await rig.wait_state(UplinkState.BACKING_OFF)
        assert "check account and gateway_id" in uplink.last_error
        assert rig.outbox.quarantined == {} and rig.outbox.pending() == 2


@pytest.mark.parametrize("fault", ["status", "drop", "slow"])
async def test_transient_faults_lose_nothing(sim, rig: Rig, fault: str) -> None:
    sim.inject(fault, "publish", count=2, delay_s=0.5)
    rig.start(build_config(base_table(sim, poll_interval=0, request_timeout="200ms",
                                      max_batch=5)))
    await rig.put(readings("boiler", "t", list(range(20))))
    await rig.wait_acked()
    assert {r["data"] for r in sim.rows()} == {str(i) for i in range(20)}
    assert len(stored_keys(sim)) == 20
    assert sim.stats[f"fault_{fault}"] == 2
    assert rig.outbox.quarantined == {}


async def test_simulator_restart_mid_stream_loses_nothing(sim, rig: Rig) -> None:
    rig.start(build_config(base_table(sim, max_batch=50)))
    await rig.put(readings("boiler", "t", list(range(1000)), step_ms=10))
    await sim.wait_for(lambda: sim.rows_total >= 200)
    await sim.restart()
    await rig.put(readings("meter", "e", list(range(500)), step_ms=10))
    await rig.wait_acked(timeout_s=20)
    keys = stored_keys(sim)
    assert len(keys) == 1500
    assert sim.stats["logins"] >= 2


# -- commands ------------------------------------------------------------------------------------

COMMANDS = [
    {"pattern": r"relay(?P<channel>\d)=(?P<state>on|off)", "action": "relay", "device": "relays"},
    {"pattern": r"SET (?P<channel>\d+) (?P<value>[-+\d.]+)", "action": "set", "channel": "pump",
     "types": {"channel": "int", "value": "float"}},
]


async def test_commands_for_gateway_and_sensor_reach_actuators_with_results(sim, rig: Rig) -> None:
    sim.queue_command(DC, "relay1=on")
    sim.queue_command(f"{DC}/pump", "SET 2 45.5")
    sim.queue_command(DC, "relay2=off")
    sim.queue_command(f"{DC}/pump", "SET 3 7")
    rig.start(build_config(base_table(sim, commands=COMMANDS,
                                      devices={"pump": {"sensor": "pump"}})))
    await sim.wait_for(lambda: len(sim.rows(metric="cmd_result")) == 4)
    assert rig.actuators["relays"].actions == [("relay", {"channel": 1, "state": True}),
                                               ("relay", {"channel": 2, "state": False})]
    assert rig.actuators["pump"].actions == [("set", {"channel": 2, "value": 45.5}),
                                             ("set", {"channel": 3, "value": 7.0})]
    results = {(r["dc"], r["generic_2"]): r for r in sim.rows(metric="cmd_result")}
    assert set(results) == {(f"{DC}/gateway", "relay1=on"), (f"{DC}/gateway", "relay2=off"),
                            (f"{DC}/pump", "SET 2 45.5"), (f"{DC}/pump", "SET 3 7")}
    assert {r["data"] for r in results.values()} == {"200"}
    assert all(r["generic_1"].startswith("oh-") for r in results.values())


async def test_bad_commands_get_error_results_and_no_crash(sim, rig: Rig) -> None:
    uplink = rig.start(build_config(base_table(sim, commands=COMMANDS)))
    await rig.wait_state(UplinkState.CONNECTED)
    sim.inject("raw", "subscribe", body=json.dumps(
        {"handshake": {"stage": "subscribe"},
         "payload": {"request_type": "command_list", "commands": [{"dc": 5}, "junk"]}}))
    sim.inject("raw", "subscribe", body='{"handshake":{"stage":"subscribe"},"payload":7}')
    sim.queue_command(DC, "FORMAT C:")  # matches no pattern
    sim.queue_command(f"{DC}/pump", "SET 2 4x5")  # the pattern matches, "4x5" is no float
    sim.queue_command(DC, "relay9=on")  # parsed; the dispatcher refuses channel 9 (max 8)
    await sim.wait_for(lambda: len(sim.rows(metric="cmd_result")) == 6)
    codes = sorted((r["data"], r["generic_2"] or "") for r in sim.rows(metric="cmd_result"))
    assert codes == [("400", ""), ("400", ""), ("400", ""), ("400", "FORMAT C:"),
                     ("400", "SET 2 4x5"), ("400", "relay9=on")]
    assert rig.actuators["relays"].actions == [] and rig.actuators["pump"].actions == []
    # still alive: a good command goes through afterwards
    sim.queue_command(DC, "relay3=on")
    await wait_until(lambda: rig.actuators["relays"].actions == [
        ("relay", {"channel": 3, "state": True})], what="relay3 switched")
    assert uplink.state == UplinkState.CONNECTED


async def test_vendor_page_command_list_spelling_is_accepted(sim, rig: Rig) -> None:
    rig.start(build_config(base_table(sim, commands=COMMANDS)))
    await rig.wait_state(UplinkState.CONNECTED)
    # verbatim shape from the page, with its missing quote and unquoted key
    sim.inject("raw", "subscribe", body='{"handshake":{"stage":"subscribe"},"payload":'
               '{"request_type":command_list", commands: [{"dc":"' + DC + '",'
               '"command":"relay4=on"}]}}')
    await wait_until(lambda: rig.actuators["relays"].actions == [
        ("relay", {"channel": 4, "state": True})], what="relay4 switched")


async def test_redelivered_commands_run_once(rig: Rig) -> None:
    async with OpsHubSimulator({ACCOUNT: PASSWORD}, consume_on_read=False) as sim:
        sim.queue_command(DC, "relay1=on")
        sim.queue_command(DC, "relay1=on")  # issued twice on purpose: ordinal 0 and 1
        uplink = rig.start(build_config(base_table(sim, commands=COMMANDS)))
        await sim.wait_for(lambda: sim.stats["subscribe_requests"] >= 5)
        await sim.wait_for(lambda: len(sim.rows(metric="cmd_result")) == 2)
        assert rig.actuators["relays"].actions == [("relay", {"channel": 1, "state": True})] * 2
        assert uplink.commands_received == 2


# -- TLS -----------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.mark.parametrize("trusted", [True, False])
async def test_tls_is_verified_with_the_configured_ca(tmp_path: Path, rig: Rig,
                                                      trusted: bool) -> None:
    import ssl
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    async with OpsHubSimulator({ACCOUNT: PASSWORD}, ssl_context=ctx) as sim:
        assert sim.url.startswith("https://")
        table = base_table(sim, allow_http=False, poll_interval=0)
        if trusted:
            table["ca_bundle"] = str(cert)
        uplink = rig.start(build_config(table))
        if trusted:
            await rig.put(readings("boiler", "t", [1]))
            await rig.wait_acked()
            assert len(sim.rows()) == 1
        else:
            await rig.wait_state(UplinkState.BACKING_OFF)
            assert "certificate" in uplink.last_error.lower()
            assert sim.stats["login_requests"] == 0


async def test_broken_subscribe_does_not_stop_publishing(sim, rig: Rig) -> None:
    sim.inject("status", "subscribe", count=-1, status=500)
    uplink = rig.start(build_config(base_table(sim, poll_interval="10ms", commands=COMMANDS)))
    await sim.wait_for(lambda: sim.stats["fault_status"] >= 2)
    await rig.put(readings("boiler", "t", [1, 2, 3]))
    await rig.wait_acked()
    assert len(stored_keys(sim)) == 3
    assert uplink.state == UplinkState.CONNECTED and sim.stats["logins"] == 1
    assert error_count(rig.metrics) >= 2  # each failed poll is counted


async def test_a_repeated_malformed_answer_gets_one_error_result(sim, rig: Rig) -> None:
    sim.inject("raw", "subscribe", count=5, body='{"handshake":{"stage":"subscribe"}}')
    rig.start(build_config(base_table(sim, poll_interval="10ms", commands=COMMANDS)))
    await sim.wait_for(lambda: sim.stats["fault_raw"] == 5)
    sim.queue_command(DC, "relay5=off")  # a later good command, to know results were flushed
    await sim.wait_for(lambda: any(r["generic_2"] == "relay5=off"
                                   for r in sim.rows(metric="cmd_result")))
    assert [(r["data"], r["description"]) for r in sim.rows(metric="cmd_result")] == [
        ("400", "malformed command: subscribe answer has no payload object"), ("200", "ok")]


async def test_http_401_on_login_is_an_auth_failure(sim, rig: Rig) -> None:
    sim.unauthorized_status = 401
    sim.inject("unauthorized", "login", count=-1)
    uplink = rig.start(build_config(base_table(sim, backoff_cap="30s")))
    await rig.wait_state(UplinkState.AUTH_FAILED)
    assert "HTTP 401" in uplink.last_error and sim.stats["login_requests"] == 1


async def test_a_resent_lease_keeps_the_positions_of_the_first_attempt(sim, rig: Rig) -> None:
    sim.inject("status", "publish", status=503)
    await rig.put([Reading("boiler", "t", 1, T0_MS), Reading("gps", "lat", 35.5, T0_MS + 1),
                   Reading("gps", "long", 139.25, T0_MS + 1), Reading("boiler", "t", 2, T0_MS + 2)])
    rig.start(build_config(base_table(sim, poll_interval=0, gps={"device": "gps"})))
    await rig.wait_acked()
    assert sim.stats["fault_status"] == 1
    assert [(r["data"], r["latitude"], r["longitude"]) for r in sim.rows()] == [
        ("1", None, None), ("2", "35.500000", "139.250000")]
