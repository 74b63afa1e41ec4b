"""A register-level fake I2C bus: chip models sit at addresses and see raw I2C transfers.

Each transfer is what goes over the wire: an optional write (the register pointer, then data)
followed by an optional repeated-start read. Chip models implement `write(data)` and `read(n)`
the way their datasheet describes, so the drivers' real register code runs unchanged.

Buses live in a process-wide registry by name, so the daemon's `BusManager` (spec
`sim:NAME`), a test and the bench all reach the same emulated hardware.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from typing import ClassVar


def _nack(addr: int) -> OSError:
    return OSError(errno.EREMOTEIO, f"{os.strerror(errno.EREMOTEIO)} (no ACK from {addr:#04x})")


class SimChip:
    """Base of every chip model: the fault switches and the raw transfer entry points.

    Fault switches, settable from any thread:
      - `nack`: the chip is present but answers nothing (every transfer fails with EREMOTEIO);
      - `present`: False makes the chip vanish from the bus (address NACK, invisible to scans).
    """

    model: ClassVar[str] = ""

    def __init__(self) -> None:
        self.nack = False
        self.present = True
        self.transfers = 0

    def vanish(self) -> None:
        self.present = False

    def come_back(self) -> None:
        self.present = True

    def write(self, data: bytes) -> None:
        """An I2C write of `data` (first byte is usually a register pointer or command)."""

    def read(self, n: int) -> bytes:
        """An I2C read of `n` bytes."""
        return bytes(n)


class RegisterChip(SimChip):
    """A chip with an 8-bit register pointer that auto-increments on reads and writes."""

    def __init__(self, size: int = 256) -> None:
        super().__init__()
        self.regs = bytearray(size)
        self.pointer = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0]
        for b in data[1:]:
            self.write_register(self.pointer, b)
            self.pointer = self.next_pointer(self.pointer)

    def read(self, n: int) -> bytes:
        out = bytearray()
        for _ in range(n):
            out.append(self.read_register(self.pointer))
            self.pointer = self.next_pointer(self.pointer)
        return bytes(out)

    def next_pointer(self, reg: int) -> int:
        return (reg + 1) % len(self.regs)

    def read_register(self, reg: int) -> int:
        return self.regs[reg]

    def write_register(self, reg: int, value: int) -> None:
        self.regs[reg] = value & 0xFF


class SimI2CBus:
    """An emulated I2C adapter. Thread-safe: the BusManager calls it from its worker thread.

    `unplug()` makes the adapter itself disappear (like a USB-I2C dongle pulled out): transfers
    fail with ENODEV and `connect()` fails with ENOENT until `replug()`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.chips: dict[int, SimChip] = {}
        self.plugged = True
        self.model_cpu_s = 0.0  # CPU time spent inside chip models (benchmarks subtract it)
        self._lock = threading.Lock()

    # -- configuration -------------------------------------------------------------------------

    def attach(self, addr: int, chip: SimChip) -> SimChip:
        """Put `chip` at `addr`, replacing whatever was there."""
        with self._lock:
            self.chips[addr] = chip
        return chip

    def ensure(self, addr: int, model: str) -> SimChip:
        """The chip at `addr`, creating a `model` chip there if the address was never populated."""
        from gatewayd_sim.hw.chips import CHIP_MODELS  # late: chips import this module

        with self._lock:
            chip = self.chips.get(addr)
            if chip is None:
                chip = self.chips[addr] = CHIP_MODELS[model](animate=True)
            return chip

    def chip(self, addr: int) -> SimChip:
        return self.chips[addr]

    def unplug(self) -> None:
        self.plugged = False

    def replug(self) -> None:
        self.plugged = True

    # -- the adapter side ------------------------------------------------------------------------

    def connect(self) -> SimI2CBus:
        """Open the adapter (what `SMBus(n)` is for hardware). Fails while unplugged."""
        if not self.plugged:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), f"sim:{self.name}")
        return self

    def close(self) -> None:
        """Nothing to release; present for the RawI2C contract."""

    def transfer(self, addr: int, write: bytes, read_len: int) -> bytes:
        """Write `write` (if any), then read `read_len` bytes after a repeated start (if any)."""
        with self._lock:
            if not self.plugged:
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
            chip = self.chips.get(addr)
            if chip is None or not chip.present or chip.nack:
                raise _nack(addr)
            chip.transfers += 1
            t0 = time.thread_time()
            try:
                if write:
                    chip.write(bytes(write))
                return chip.read(read_len) if read_len else b""
            finally:
                self.model_cpu_s += time.thread_time() - t0

    def probe(self, addr: int) -> bool:
        """True if a device ACKs its address (what i2cdetect shows)."""
        with self._lock:
            chip = self.chips.get(addr)
            return self.plugged and chip is not None and chip.present and not chip.nack

    # -- the smbus2 subset (`drivers.base.I2CBus`), for code written against smbus2 ----------------

    def read_byte_data(self, addr: int, reg: int) -> int:
        return self.transfer(addr, bytes([reg]), 1)[0]

    def write_byte_data(self, addr: int, reg: int, value: int) -> None:
        self.transfer(addr, bytes([reg, value]), 0)

    def read_i2c_block_data(self, addr: int, reg: int, length: int) -> list[int]:
        return list(self.transfer(addr, bytes([reg]), length))

    def write_i2c_block_data(self, addr: int, reg: int, data: list[int]) -> None:
        self.transfer(addr, bytes([reg, *data]), 0)


_REGISTRY: dict[str, SimI2CBus] = {}
_REGISTRY_LOCK = threading.Lock()


BENCH_I2C_BUS = "bench"
# the chips the bench config (`BenchEmulation.toml()`) puts on its bus: address -> chip model
BENCH_I2C_CHIPS: dict[int, str] = {0x76: "bme280", 0x44: "sht3x", 0x48: "ads1115", 0x20: "pcf8574"}


def sim_bus(name: str) -> SimI2CBus:
    """The process-wide emulated bus called `name`, created on first use.

    Every bus starts empty except `sim:bench`, which starts with the bench's chips: so the
    daemon and `gatewayd probe i2c --bus sim:bench` run from a shell see the same bench.
    """
    with _REGISTRY_LOCK:
        bus = _REGISTRY.get(name)
        if bus is None:
            bus = _REGISTRY[name] = SimI2CBus(name)
            if name == BENCH_I2C_BUS:
                for addr, model in BENCH_I2C_CHIPS.items():
                    bus.ensure(addr, model)
        return bus


def drop_sim_bus(name: str) -> None:
    """Forget the emulated bus `name` (tests use fresh names or drop them afterwards)."""
    with _REGISTRY_LOCK:
        _REGISTRY.pop(name, None)


ChipFactory = Callable[..., SimChip]
