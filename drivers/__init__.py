"""Hardware drivers. Registries map a config name to "module:Class", imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

DRIVERS: dict[str, str] = {
    "sim": "drivers.wave:WaveDriver",
    "bme280": "drivers.bme280:BME280",
    "sht": "drivers.sht:SHT",
    "ads1115": "drivers.ads1115:ADS1115",
    "modbus": "drivers.modbus:ModbusDriver",
    "nmea": "drivers.nmea:NMEADriver",
    "line": "drivers.line:LineDriver",
}

ACTUATORS: dict[str, str] = {
    "log": "drivers.logact:LogActuator",
    "pcf8574": "drivers.gpio:PCF8574",
    "mcp23017": "drivers.gpio:MCP23017",
    "modbus": "drivers.modbus:ModbusWriter",
    "serial_command": "drivers.serialcmd:SerialCommand",
}


def load(registry: dict[str, str], name: str) -> type[Any]:
    """Import and return the class registered under `name`. Raises KeyError if unknown."""
    module_name, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
