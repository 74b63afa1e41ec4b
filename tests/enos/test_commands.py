"""Commands from the simulated hub through the uplink and the real dispatcher to a relay."""

from __future__ import annotations

from drivers.base import Reading
from gatewayd_sim.enos import EnosSimulator
from tests.enos.conftest import GW, SUBS, Rig


async def test_service_to_a_sub_device_switches_the_relay_and_replies(
        rig: Rig, sim: EnosSimulator) -> None:
    rig.start_uplink()
    await rig.wait_state("connected")
    rec = sim.invoke_service(SUBS["relay"], "switch", {"on": True})
    reply = await sim.wait_reply(rec)
    assert reply["id"] == rec.msg_id and reply["code"] == 200
    assert reply["data"]["applied"] == "switch"
    assert rig.relay.actions == [("switch", {"on": True})]
    # measurepoint.set maps to the relay's "set" action.
    rec = sim.set_measurepoints(SUBS["relay"], {"on": False})
    assert (await sim.wait_reply(rec))["code"] == 200
    assert rig.relay.actions[-1] == ("set", {"on": False})


async def test_unmapped_service_and_bad_params_get_error_replies(
        rig: Rig, sim: EnosSimulator) -> None:
    rig.start_uplink()
    await rig.wait_state("connected")
    unmapped = await sim.wait_reply(sim.invoke_service(SUBS["meter1"], "reboot", {}))
    assert unmapped["code"] == 2404 and "no command mapping" in unmapped["message"]
    bad = await sim.wait_reply(sim.invoke_service(SUBS["relay"], "switch", {"on": "maybe"}))
    assert bad["code"] == 2400 and "'on'" in bad["message"]
    not_object = await sim.wait_reply(sim.invoke_service(SUBS["relay"], "switch", [1, 2]))
    assert not_object["code"] == 2400
    assert rig.relay.actions == []


async def test_malformed_payload_gets_an_error_reply_and_no_crash(
        rig: Rig, sim: EnosSimulator) -> None:
    uplink = rig.start_uplink()
    await rig.wait_state("connected")
    garbage = sim.send_raw(SUBS["relay"], "thing/service/switch", b"{not json")
    await sim.wait_until(lambda: sim.hub.counts["unmatched_device_replies"] == 1)
    assert garbage.reply is None  # no id to echo: answered with id "" (counted as unmatched)
    no_id = sim.send_raw(SUBS["relay"], "thing/service/switch",
                         b'{"method":"thing.service.switch","params":{"on":true}}')
    await sim.wait_until(lambda: sim.hub.counts["unmatched_device_replies"] == 2)
    assert no_id.reply is None and rig.relay.actions == []
    # Still alive: the next good command works.
    ok = await sim.wait_reply(sim.invoke_service(SUBS["relay"], "switch", {"on": True}))
    assert ok["code"] == 200
    assert str(uplink.state) == "connected"


async def test_commands_for_the_gateway_and_measurepoint_get(rig: Rig, sim: EnosSimulator) -> None:
    rig.start_uplink()
    await rig.wait_state("connected")
    gw = await sim.wait_reply(sim.invoke_service(GW, "switch", {"on": True}))
    assert gw["code"] == 2404 and "no command mapping" in gw["message"]  # relay only
    await rig.queue.put([Reading("meter1", "temp", 22.5, 1_700_000_000_000)])
    await rig.acked(1)
    got = await sim.wait_reply(sim.get_measurepoints(SUBS["meter1"], ["temp", "nope"]))
    assert got["code"] == 200 and got["data"] == {"temp": 22.5}


async def test_combine_disable_stops_posting_and_enable_logs_in_again(
        rig: Rig, sim: EnosSimulator) -> None:
    uplink = rig.start_uplink()
    await rig.wait_state("connected")
    rec = sim.combine(GW, "disable", [SUBS["meter1"]])
    assert (await sim.wait_reply(rec))["code"] == 200
    assert uplink.status()["sub_devices"]["meter1"]["state"] == "disabled"
    await rig.put("meter1", "temp", 2)
    await rig.acked(2)
    assert sim.points() == []
    assert rig.outbox is not None
    assert {r for _, r, _ in rig.outbox.quarantined} == {"sub_device_disabled"}
    rec = sim.combine(GW, "enable", [SUBS["meter1"]])
    assert (await sim.wait_reply(rec))["code"] == 200
    await sim.wait_until(lambda: SUBS["meter1"] in sim.logged_in(GW))
    await rig.put("meter1", "temp", 1)
    await sim.wait_until(lambda: len(sim.points()) == 1)


async def test_command_queued_while_offline_is_delivered_after_login(
        rig: Rig, sim: EnosSimulator) -> None:
    rec = sim.invoke_service(SUBS["relay"], "switch", {"on": True})  # nobody online yet
    rig.start_uplink()
    reply = await sim.wait_reply(rec)
    assert reply["code"] == 200 and rig.relay.actions == [("switch", {"on": True})]


async def test_hostile_pushes_never_take_the_uplink_down(rig: Rig, sim: EnosSimulator) -> None:
    uplink = rig.start_uplink()
    await rig.wait_state("connected")
    session = f"/ext/session/{GW[0]}/{GW[1]}"
    nasty = [
        (SUBS["relay"], "thing/service/switch", b'{"id":5,"params":null}'),
        (SUBS["relay"], "thing/service/switch", b"[]"),
        (SUBS["relay"], "thing/service/switch", b"\xff\xfe"),
        (SUBS["meter1"], "thing/service/measurepoint/get", b'{"id":"g","params":{"a":1}}'),
        (SUBS["meter1"], "thing/service/a/b/c", b'{"id":"deep","params":{}}'),
        (SUBS["meter1"], "thing/model/down_raw", b"\x00\x01"),
    ]
    sent = [sim.send_raw(key, suffix, payload) for key, suffix, payload in nasty]
    for path, payload in (("combine/disable", b'{"id":"c1","params":"x"}'),
                          ("combine/disable", b'{"id":"c2","params":[1,{"productKey":7}]}'),
                          ("thing/activate/info", b'{"id":"a1","params":{}}')):
        sim.hub.send_command(GW, f"{session}/{path}", "", None, payload=payload)
    # Every push but the activation info gets an answer (ids the hub never issued, so the
    # hub counts them as unmatched; the down_raw answer carries no id and is matched by its
    # topic, as raw replies are); nothing is executed, and the uplink stays up.
    await sim.wait_until(lambda: sim.hub.counts["unmatched_device_replies"] == 7
                         and sent[5].raw_reply is not None)
    ok = await sim.wait_reply(sim.invoke_service(SUBS["relay"], "switch", {"on": True}))
    assert ok["code"] == 200 and str(uplink.state) == "connected"
    assert rig.relay.actions == [("switch", {"on": True})]
    assert uplink.status()["sub_devices"]["meter1"]["state"] == "logged_in"
