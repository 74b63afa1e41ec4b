"""Shared bus objects: one per physical I2C adapter or serial port."""

from __future__ import annotations

from typing import Any


class BusManager:
    """Opens each physical bus once and hands the same object to every device on it."""

    def __init__(self) -> None:
        self._i2c: dict[str, Any] = {}
        self._serial: dict[str, Any] = {}

    def i2c(self, spec: str) -> Any:
        raise NotImplementedError(f"i2c bus {spec!r}: no I2C support yet")

    def serial(self, spec: str, **settings: Any) -> Any:
        raise NotImplementedError(f"serial port {spec!r}: no serial support yet")

    async def close(self) -> None:
        self._i2c.clear()
        self._serial.clear()
