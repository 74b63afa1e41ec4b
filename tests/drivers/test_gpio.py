"""Relay boards: set, pulse, read-back verification and initial state on the emulated latches."""

from __future__ import annotations

import asyncio
import threading

import pytest

from drivers.base import ActionError
from drivers.bus import BusManager
from drivers.gpio import MCP23017, MCP_OLATA, PCF8574, MCP23017Config, PCF8574Config
from gatewayd_sim.hw.chips import MCP23017Chip, PCF8574Chip
from gatewayd_sim.hw.i2c import SimI2CBus


async def test_pcf8574_active_low_set_and_initial_state(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x20, PCF8574Chip())
    cfg = PCF8574Config(bus=f"sim:{sim.name}", outputs=[0, 1, 2, 3], active_low=True, initial_on=[2])
    relay = PCF8574("relays", cfg, buses)
    await relay.open()
    # channel 2 on (low), other outputs off (high), inputs 4-7 kept high to stay readable
    assert chip.latch == 0b1111_1011  # type: ignore[attr-defined]
    assert relay.state()["outputs"] == {"0": False, "1": False, "2": True, "3": False}
    assert await relay.apply("set", {"channel": 0, "on": True}) == {"channel": 0, "on": True}
    assert chip.latch == 0b1111_1010  # type: ignore[attr-defined]
    await relay.apply("set", {"channel": 2, "on": False})
    assert chip.latch == 0b1111_1110  # type: ignore[attr-defined]


async def test_pcf8574_pulse_restores_the_output(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x21, PCF8574Chip())
    relay = PCF8574("r", PCF8574Config(bus=f"sim:{sim.name}", address=0x21), buses)
    await relay.open()
    result = await relay.apply("pulse", {"channel": 5, "ms": 20})
    assert result == {"channel": 5, "pulsed_ms": 20, "on": False}
    assert chip.writes[-2:] == [0b0010_0000, 0]  # type: ignore[attr-defined]


async def test_pulse_cancelled_still_switches_off(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x20, MCP23017Chip())
    relay = MCP23017("r", MCP23017Config(bus=f"sim:{sim.name}"), buses)
    await relay.open()
    task = asyncio.create_task(relay.apply("pulse", {"channel": 9, "ms": 60_000}), name="pulse")
    while not relay.on.get(9):  # set once the switch-on is done: the task is in its sleep now
        await asyncio.sleep(0.001)
    assert chip.olat == 1 << 9  # type: ignore[attr-defined]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert chip.olat == 0  # type: ignore[attr-defined]
    assert relay.on[9] is False


class _HeldMCP23017(MCP23017Chip):
    """Holds the worker thread inside the write that switches channel 9 on, until released."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()
        self.release = threading.Event()
        self.latches: list[int] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        if data[0] == MCP_OLATA and len(data) > 1:  # a latch write, not a register pointer
            self.latches.append(self.olat)
            if self.olat & (1 << 9) and not self.release.is_set():
                self.written.set()
                assert self.release.wait(10), "never released"


async def test_pulse_cancelled_while_switching_on_still_switches_off(
        buses: BusManager, sim: SimI2CBus) -> None:
    # a command timeout that lands while the switch-on is still on the bus: the job completes
    # in the worker thread regardless, so the output must be switched off behind it
    chip = sim.attach(0x20, _HeldMCP23017())
    relay = MCP23017("r", MCP23017Config(bus=f"sim:{sim.name}"), buses)
    await relay.open()
    task = asyncio.create_task(relay.apply("pulse", {"channel": 9, "ms": 60_000}), name="pulse")
    assert await asyncio.to_thread(chip.written.wait, 10)
    task.cancel()
    chip.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert chip.olat == 0
    assert chip.latches[-2:] == [1 << 9, 0]
    assert relay.state()["outputs"]["9"] is False


async def test_set_cancelled_mid_write_records_what_the_chip_holds(
        buses: BusManager, sim: SimI2CBus) -> None:
    # the write completes in the worker thread after the caller gave up: `get` and the status
    # must show the output as on, not the state from before the command
    chip = sim.attach(0x20, _HeldMCP23017())
    relay = MCP23017("r", MCP23017Config(bus=f"sim:{sim.name}"), buses)
    await relay.open()
    task = asyncio.create_task(relay.apply("set", {"channel": 9, "on": True}), name="set")
    assert await asyncio.to_thread(chip.written.wait, 10)
    task.cancel()
    chip.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert chip.olat == 1 << 9
    assert await relay.apply("get", {}) == {"outputs": {str(c): c == 9 for c in range(16)}}


async def test_mcp23017_directions_set_and_readback(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x20, MCP23017Chip())
    relay = MCP23017("io", MCP23017Config(bus=f"sim:{sim.name}", outputs=[0, 8, 15], initial_on=[15]), buses)
    await relay.open()
    iodir = chip.regs[0] | chip.regs[1] << 8  # type: ignore[attr-defined]
    assert iodir == 0xFFFF & ~(1 << 0 | 1 << 8 | 1 << 15)
    assert chip.olat == 1 << 15  # type: ignore[attr-defined]
    await relay.apply("set", {"channel": 8, "on": True})
    assert chip.olat == (1 << 15 | 1 << 8)  # type: ignore[attr-defined]
    assert (await relay.apply("get", {}))["outputs"] == {"0": False, "8": True, "15": True}


async def test_stuck_output_fails_verification(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x20, MCP23017Chip())
    relay = MCP23017("io", MCP23017Config(bus=f"sim:{sim.name}"), buses)
    await relay.open()
    chip.stuck = 1 << 3  # type: ignore[attr-defined]
    with pytest.raises(ActionError, match=r"read-back mismatch on channel\(s\) \[3\]"):
        await relay.apply("set", {"channel": 3, "on": True})


async def test_keep_state_leaves_outputs_alone(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x20, MCP23017Chip())
    chip.regs[0x14] = 0b0000_0110  # type: ignore[attr-defined]  # OLATA from before a restart
    relay = MCP23017("io", MCP23017Config(bus=f"sim:{sim.name}", keep_state=True, outputs=[1, 2, 3]), buses)
    await relay.open()
    assert chip.olat == 0b0110  # type: ignore[attr-defined]
    assert relay.state()["outputs"] == {"1": True, "2": True, "3": False}


@pytest.mark.parametrize("action,params,match", [
    ("set", {"channel": 9, "on": True}, "channel must be one of"),
    ("set", {"channel": 1, "on": "yes"}, "'on' must be true or false"),
    ("set", {"channel": True, "on": True}, "channel must be one of"),
    ("pulse", {"channel": 1, "ms": 0}, "'ms' must be"),
    ("explode", {}, "unknown action"),
])
async def test_bad_params_are_refused(buses: BusManager, sim: SimI2CBus, action: str,
                                      params: dict[str, object], match: str) -> None:
    sim.attach(0x20, PCF8574Chip())
    relay = PCF8574("r", PCF8574Config(bus=f"sim:{sim.name}"), buses)
    await relay.open()
    with pytest.raises(ActionError, match=match):
        await relay.apply(action, params)


def test_unknown_channel_in_config_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"channels \[8\] do not exist"):
        PCF8574("r", PCF8574Config(outputs=[8]), BusManager())


def test_mcp23017_pullups_and_input_polarity(sim: SimI2CBus) -> None:
    chip = sim.attach(0x20, MCP23017Chip())

    def gpio_word() -> int:
        data = sim.transfer(0x20, b"\x12", 2)
        return data[0] | data[1] << 8

    assert gpio_word() == 0x0000  # all inputs, nothing connected, no pull-ups
    sim.transfer(0x20, bytes([0x0C, 0xFF, 0x0F]), 0)  # GPPUA = 0xFF, GPPUB = 0x0F
    assert gpio_word() == 0x0FFF  # an input with its pull-up on reads high
    chip.drive(3, False)  # type: ignore[attr-defined]  # a switch pulls A3 to ground
    assert gpio_word() == 0x0FF7
    sim.transfer(0x20, bytes([0x02, 0x0F, 0x00]), 0)  # IPOLA = 0x0F: A0-A3 reported inverted
    assert gpio_word() == 0x0FF8
    # IPOL does not touch outputs: A0 as an output driven high reads high
    sim.transfer(0x20, bytes([0x00, 0xFE]), 0)  # IODIRA: A0 an output
    sim.transfer(0x20, bytes([0x14, 0x01]), 0)  # OLATA = 1
    assert gpio_word() & 1 == 1
    chip.drive(3, None)  # type: ignore[attr-defined]  # released: the pull-up wins again
    assert gpio_word() & 0x08 == 0  # (inverted by IPOL: the pin is high)
    assert chip.pin_levels() & 0x08  # type: ignore[attr-defined]
