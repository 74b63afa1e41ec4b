"""Open protocol points (mms.md marks them [open]): the uplink delivers everything, with
bounded duplicates, whatever form the simulator's switches give the server's answers."""

from __future__ import annotations

import pytest

from drivers.base import Reading
from gatewayd.uplinks.mms import MessageMap
from gatewayd_sim.mms import MmsSimulator
from tests.mms.conftest import WIDE_TYPE, base_config, readings, wide_type

N = 300
BATCH = 50
POISON = 137


def _wide() -> MessageMap:
    return MessageMap(WIDE_TYPE, fields={"device": "device"}, point_fields={"temp_c": "temperature"})


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("wording", ["notes", "other"])
@pytest.mark.parametrize("code", [True, False], ids=["with-code", "without-code"])
async def test_ws_answer_frames_in_every_form(make_harness, code: bool, wording: str, mode: str) -> None:
    async with MmsSimulator(port=0, ws_answer_code=code, wording=wording) as sim:
        sim.add_message_type(wide_type())
        cfg = base_config(sim, transport="ws", mode=mode, batch_size=BATCH, messages=[_wide()])
        h = await make_harness(sim, cfg)
        batch = readings(N)
        batch[POISON] = Reading("boiler", "temp_c", "very hot", batch[POISON].ts_ms)  # not a double
        await h.put(batch)
        await h.wait_acked(N, timeout_s=20)
        stored = [(r["C_TEMPERATURE"], r["C_TIMESTAMP"]) for r in sim.rows(WIDE_TYPE)]
        want = {(r.value, r.ts_ms) for i, r in enumerate(batch) if i != POISON}
        assert set(stored) == want  # everything but the poison arrived
        assert h.queue.outbox("mms").quarantined == {"rejected": 1}  # and only the poison is dropped
        duplicates = len(stored) - len(want)
        readable = code or wording == "notes"
        if readable:
            assert duplicates == 0 and h.uplink.status()["data_over"] == "ws"
        else:
            # Unreadable answers: the first envelope is confirmed over HTTP (it may be stored
            # twice), and data goes over HTTP from then on.
            assert duplicates <= BATCH
            assert h.uplink.status()["data_over"] == "http"
            assert h.uplink.unknown_answers == 1


@pytest.mark.parametrize("wording", ["notes", "other"])
async def test_http_answers_are_read_by_status_not_wording(make_harness, wording: str) -> None:
    async with MmsSimulator(port=0, wording=wording) as sim:
        sim.add_message_type(wide_type())
        h = await make_harness(sim, base_config(sim, transport="http", batch_size=BATCH, messages=[_wide()]))
        batch = readings(120)
        batch[7] = Reading("boiler", "temp_c", "very hot", batch[7].ts_ms)
        await h.put(batch)
        await h.wait_acked(120, timeout_s=20)
        stored = [r["C_TEMPERATURE"] for r in sim.rows(WIDE_TYPE)]
        assert stored == [r.value for i, r in enumerate(batch) if i != 7]  # in order, no duplicates
        assert h.queue.outbox("mms").quarantined == {"rejected": 1}
