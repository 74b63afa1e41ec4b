"""Emulated hardware for the bench (`make run`) and for trying gatewayd without hardware.

    from gatewayd_sim.hw.bench import BenchEmulation
    with BenchEmulation() as emu:           # starts the pty simulators in background threads
        config_text = BASE_TOML + emu.toml()  # devices, actuators and commands for them
        ...run gatewayd on it (in-process or as a subprocess)...

The I2C chips need no process of their own: the daemon's BusManager creates them on the
emulated bus `sim:bench` from the config alone. The serial simulators run in the calling
process, on pseudo-terminals the daemon opens by path.

`python -m gatewayd_sim.hw` runs the same emulation in the foreground and prints the TOML snippet.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from gatewayd_sim.hw.i2c import BENCH_I2C_BUS
from gatewayd_sim.hw.serial import METER_MAP, EchoActuatorSim, ModbusSlaveSim, NMEASim, SerialSim


class BenchEmulation:
    """The serial simulators of the bench: a Modbus line with two energy meters (units 1 and 2),
    a GPS receiver and an ASCII relay box."""

    def __init__(self, i2c_bus: str = BENCH_I2C_BUS) -> None:
        self.i2c_bus = i2c_bus
        self.modbus = ModbusSlaveSim(units=(1, 2), animate=True)
        self.gps = NMEASim(rate_hz=1.0)
        self.relay_box = EchoActuatorSim()
        self._sims: list[SerialSim] = [self.modbus, self.gps, self.relay_box]

    def start(self) -> BenchEmulation:
        started = []
        try:
            for sim in self._sims:
                sim.start()
                started.append(sim)
        except BaseException:
            for sim in started:
                sim.stop()
            raise
        return self

    def stop(self) -> None:
        for sim in self._sims:
            with contextlib.suppress(Exception):
                sim.stop()

    def __enter__(self) -> BenchEmulation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def paths(self) -> dict[str, str]:
        return {"modbus": self.modbus.path, "gps": self.gps.path, "relay_box": self.relay_box.path}

    def toml(self, commands: bool = True) -> str:
        """[[devices]] and [[actuators]] for every emulated device, and with `commands` the
        [[commands]] entries (any uplink) for `set_relay`, `pulse_relay` and `set_box_relay`."""
        text = self._devices_toml()
        return text + _COMMANDS if commands else text

    def _devices_toml(self) -> str:
        bus = f"sim:{self.i2c_bus}"
        meter_points = ", ".join(f"{k} = {_inline(v)}" for k, v in METER_MAP.items())
        meters = "".join(f'''
[[devices]]
name = "meter-{unit}"
driver = "modbus"
interval = "2s"
port = "{self.modbus.path}"
baudrate = 19200
unit = {unit}
points = {{ {meter_points} }}
''' for unit in (1, 2))
        return f'''
[[devices]]
name = "attic-env"
driver = "bme280"
interval = "2s"
bus = "{bus}"
address = 0x76

[[devices]]
name = "room-climate"
driver = "sht"
interval = "2s"
bus = "{bus}"
address = 0x44

[[devices]]
name = "tank"
driver = "ads1115"
interval = "2s"
bus = "{bus}"
address = 0x48
points.level_m = {{ channel = "0", gain_v = 4.096, in_min = 0.0, in_max = 3.3, out_min = 0.0, out_max = 2.5 }}

{meters}

[[devices]]
name = "gps"
driver = "nmea"
interval = "5s"
port = "{self.gps.path}"

[[actuators]]
name = "relays"
driver = "pcf8574"
bus = "{bus}"
address = 0x20
active_low = true

[[actuators]]
name = "relay-box"
driver = "serial_command"
port = "{self.relay_box.path}"
commands = {{ set = "RELAY {{channel}} {{on}}\\r" }}
response = "^OK"
error = "^ERR"
'''


_COMMANDS = '''
[[commands]]
uplink = "*"
action = "set_relay"
actuator = "relays"
actuator_action = "set"
params.channel = { type = "int", min = 0, max = 7 }
params.on = { type = "bool" }

[[commands]]
uplink = "*"
action = "pulse_relay"
actuator = "relays"
actuator_action = "pulse"
params.channel = { type = "int", min = 0, max = 7 }
params.ms = { type = "int", min = 10, max = 10000 }

[[commands]]
uplink = "*"
action = "set_box_relay"
actuator = "relay-box"
actuator_action = "set"
params.channel = { type = "int", min = 1, max = 8 }
params.on = { type = "bool" }
'''


def _inline(table: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"


def main() -> int:
    """Run the bench emulation until Ctrl-C, printing the config snippet for it."""
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with BenchEmulation() as emu:
        print("# emulated serial devices are up; add this to a gatewayd config (Ctrl-C stops):")
        print(emu.toml())
        done.wait()
    return 0
