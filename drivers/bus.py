"""Shared bus objects: one per physical I2C adapter, serial port or Modbus line.

`BusManager` implements the `drivers.base.Buses` protocol. Every device on the same adapter or
port gets the same object, so calls are serialized per bus:

- I2C (`I2CBus`): one worker thread per adapter runs every blocking smbus2 call, one at a time;
  transient errors are retried a bounded number of times (the delay is awaited on the event
  loop, so a NACKing chip never holds the bus); when the adapter disappears the bus is closed and
  reopened on the next call. Spec: "1", "/dev/i2c-1", or "sim:NAME" for an emulated bus.
- Serial (`drivers.serialport.SerialPort`) and Modbus RTU lines (`drivers.modbus.ModbusLine`).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from drivers.base import Buses, DeviceNotFoundError, DriverError, ReadTimeoutError

if TYPE_CHECKING:
    from drivers.modbus import ModbusLine
    from drivers.serialport import SerialPort, SerialSettings

log = structlog.get_logger(__name__)
T = TypeVar("T")

# errno values a retry can cure: NACK while busy, arbitration lost, bus timeout
_TRANSIENT = {errno.EIO, errno.EREMOTEIO, errno.ETIMEDOUT, errno.EAGAIN, errno.ENXIO}
# errno values meaning the adapter itself is gone (USB-I2C bridge unplugged, driver unloaded)
_GONE = {errno.ENODEV, errno.ENOENT, errno.EBADF, errno.ESHUTDOWN}


class RawI2C(Protocol):
    """What the bus worker thread talks to: a real smbus2 adapter or a `SimI2CBus`."""

    def transfer(self, addr: int, write: bytes, read_len: int) -> bytes: ...
    def probe(self, addr: int) -> bool: ...
    def close(self) -> None: ...


class EmulatedI2C(Protocol):
    """An emulated adapter behind a "sim:NAME" spec (registered by the gatewayd-sim package)."""

    def connect(self) -> RawI2C: ...
    def ensure(self, addr: int, model: str) -> object: ...


# Emulated buses register themselves: the gatewayd-sim distribution names its factory under this
# entry-point group (scheme "sim"), or a program calls `register_i2c_emulator`. The shipped bus
# manager imports no emulator.
I2C_EMULATOR_GROUP = "gatewayd.i2c_emulators"
_i2c_emulators: dict[str, Callable[[str], EmulatedI2C]] = {}


def register_i2c_emulator(scheme: str, factory: Callable[[str], EmulatedI2C]) -> None:
    """Make "SCHEME:NAME" bus specs open `factory(NAME)`."""
    _i2c_emulators[scheme] = factory


def _i2c_emulator(scheme: str) -> Callable[[str], EmulatedI2C]:
    factory = _i2c_emulators.get(scheme)
    if factory is None:
        from importlib.metadata import entry_points

        for ep in entry_points(group=I2C_EMULATOR_GROUP, name=scheme):
            factory = _i2c_emulators[scheme] = ep.load()
            break
    if factory is None:
        raise ValueError(f"emulated bus {scheme}:NAME needs the simulators, which are not installed "
                         "(pip install gatewayd-sim, or pip install ./sim from a gatewayd checkout)")
    return factory


class Smbus2Adapter:
    """RawI2C over a Linux /dev/i2c-N through smbus2 (combined transfers via I2C_RDWR)."""

    def __init__(self, path: str) -> None:
        from smbus2 import SMBus

        self.path = path
        self._bus = SMBus(path)
        self._rdwr = True  # combined I2C_RDWR transfers until the adapter refuses them

    def transfer(self, addr: int, write: bytes, read_len: int) -> bytes:
        from smbus2 import i2c_msg

        if not self._rdwr:
            return self._smbus_transfer(addr, write, read_len)
        msgs = []
        if write:
            msgs.append(i2c_msg.write(addr, write))
        if read_len:
            rd = i2c_msg.read(addr, read_len)
            msgs.append(rd)
        try:
            self._bus.i2c_rdwr(*msgs)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise
            # an SMBus-only adapter (many x86 boards): fall back to SMBus block transfers
            self._rdwr = False
            return self._smbus_transfer(addr, write, read_len)
        return bytes(rd) if read_len else b""

    def _smbus_transfer(self, addr: int, write: bytes, read_len: int) -> bytes:
        """The same transfers in SMBus terms: register + up to 32 bytes either way."""
        if write and read_len and len(write) == 1 and read_len <= 32:
            return bytes(self._bus.read_i2c_block_data(addr, write[0], read_len))
        if write and not read_len and len(write) <= 33:
            if len(write) == 1:
                self._bus.write_byte(addr, write[0])
            else:
                self._bus.write_i2c_block_data(addr, write[0], list(write[1:]))
            return b""
        if not write and read_len == 1:
            return bytes([self._bus.read_byte(addr)])
        raise OSError(errno.EOPNOTSUPP, "this adapter supports only SMBus transfers, and this "
                                        f"one (write {len(write)}, read {read_len}) is not one")

    def probe(self, addr: int) -> bool:
        # as i2cdetect does: a read for EEPROM-like ranges (a quick write could corrupt them),
        # a quick write elsewhere
        try:
            if 0x30 <= addr <= 0x37 or 0x50 <= addr <= 0x5F:
                self._bus.read_byte(addr)
            else:
                self._bus.write_quick(addr)
        except OSError as exc:
            if exc.errno in _GONE or exc.errno == errno.EACCES:
                raise
            return False
        return True

    def close(self) -> None:
        self._bus.close()


def i2c_path(spec: str) -> str:
    """ "1" -> "/dev/i2c-1"; a path stays as it is."""
    return f"/dev/i2c-{spec}" if spec.isdigit() else spec


def describe_os_error(exc: OSError, target: str) -> str:
    """A human-readable reason for an OSError on opening `target`, with the usual fix."""
    if exc.errno == errno.EACCES:
        group = "i2c" if "i2c" in target else "dialout"
        return (f"permission denied on {target}: add the user to the '{group}' group "
                f"(sudo usermod -aG {group} $USER, then log in again)")
    if exc.errno == errno.ENOENT:
        hint = " (enable I2C with raspi-config or dtparam=i2c_arm=on)" if "i2c" in target else ""
        return f"{target} does not exist{hint}"
    if exc.errno == errno.EBUSY:
        return f"{target} is busy: another program holds it"
    return f"{target}: {exc.strerror or exc}"


class I2CBus:
    """One I2C adapter shared by all its devices. All calls run in its single worker thread."""

    def __init__(self, spec: str, opener: Callable[[], RawI2C], *, sim: EmulatedI2C | None = None,
                 retries: int = 2, retry_delay_s: float = 0.005, op_timeout_s: float = 1.0) -> None:
        self.spec = spec
        self.sim = sim  # the emulated adapter behind a "sim:" spec, else None
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.op_timeout_s = op_timeout_s
        self._opener = opener
        self._raw: RawI2C | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"i2c[{spec}]")
        self.errors = 0
        self.reopens = 0

    def _ensure_open(self) -> RawI2C:
        """Runs in the worker thread."""
        if self._raw is None:
            self._raw = self._opener()
            self.reopens += 1
        return self._raw

    def _job(self, fn: Callable[[RawI2C], T]) -> T:
        """Runs in the worker thread: one exclusive call on the adapter."""
        raw = self._ensure_open()
        try:
            return fn(raw)
        except OSError as exc:
            if exc.errno in _GONE:
                self._drop()
            raise

    def _drop(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.close()
            except OSError:
                pass

    async def run(self, fn: Callable[[RawI2C], T], *, device: str, what: str) -> T:
        """Run `fn(raw)` alone on the bus, retrying transient errors; raises DriverError.

        `fn` may do several transfers (a read-modify-write): nothing else runs on the bus
        meanwhile. `what` describes the operation for the error ("read 0xF7 at 0x76").
        """
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    return await loop.run_in_executor(self._executor, self._job, fn)
            except TimeoutError as exc:
                self.errors += 1
                raise ReadTimeoutError(device, f"i2c bus {self.spec}: {what}: no completion in "
                                               f"{self.op_timeout_s:g}s (bus stuck?)") from exc
            except OSError as exc:
                self.errors += 1
                if exc.errno in _TRANSIENT and attempt < self.retries:
                    attempt += 1
                    await asyncio.sleep(self.retry_delay_s * attempt)
                    continue
                raise self._wrap(exc, device, what) from exc

    def _wrap(self, exc: OSError, device: str, what: str) -> DriverError:
        path = self.spec if self.sim is not None else i2c_path(self.spec)
        if exc.errno in (errno.EREMOTEIO, errno.ENXIO):
            return DeviceNotFoundError(device, f"i2c bus {self.spec}: {what}: no acknowledge "
                                               f"(device absent, unpowered or wrong address)")
        if exc.errno in _GONE or exc.errno in (errno.EACCES, errno.EBUSY):
            return DriverError(device, describe_os_error(exc, path))
        return DriverError(device, f"i2c bus {self.spec}: {what}: {exc.strerror or exc}")

    async def probe(self, addr: int) -> bool:
        """True if something ACKs `addr`. Raises DriverError if the adapter cannot be used."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.op_timeout_s):
                return await loop.run_in_executor(self._executor, self._job,
                                                  lambda raw: raw.probe(addr))
        except OSError as exc:
            raise self._wrap(exc, "probe", f"probe {addr:#04x}") from exc

    def device(self, addr: int, name: str) -> I2CDevice:
        return I2CDevice(self, addr, name)

    async def close(self) -> None:
        """Close the adapter and stop the worker thread; never raises, never hangs on a stuck
        bus (the worker is then left to finish on its own)."""
        loop = asyncio.get_running_loop()
        stuck = False
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await loop.run_in_executor(self._executor, self._drop)
        except TimeoutError:
            stuck = True
            log.warning("i2c_close_timeout", bus=self.spec, timeout_s=self.op_timeout_s)
        except RuntimeError:
            pass  # already closed
        self._executor.shutdown(wait=not stuck)


class I2CDevice:
    """One chip on a shared bus: register reads and writes that name the chip in errors."""

    def __init__(self, bus: I2CBus, addr: int, name: str) -> None:
        self.bus = bus
        self.addr = addr
        self.name = name

    async def read(self, reg: int, n: int) -> bytes:
        """Set the register pointer to `reg` and read `n` bytes (repeated start)."""
        return await self.bus.run(lambda raw: raw.transfer(self.addr, bytes([reg]), n),
                                  device=self.name, what=f"read {reg:#04x} at {self.addr:#04x}")

    async def write(self, reg: int, data: bytes) -> None:
        """Write `data` starting at register `reg`."""
        await self.bus.run(lambda raw: raw.transfer(self.addr, bytes([reg]) + data, 0),
                           device=self.name, what=f"write {reg:#04x} at {self.addr:#04x}")

    async def send(self, data: bytes) -> None:
        """A plain write: a command word, or the port byte of a register-less expander."""
        await self.bus.run(lambda raw: raw.transfer(self.addr, data, 0),
                           device=self.name, what=f"write {data.hex()} at {self.addr:#04x}")

    async def receive(self, n: int) -> bytes:
        """A plain read of `n` bytes."""
        return await self.bus.run(lambda raw: raw.transfer(self.addr, b"", n),
                                  device=self.name, what=f"read {n} bytes at {self.addr:#04x}")

    async def run(self, fn: Callable[[RawI2C], T], what: str) -> T:
        """Run a multi-transfer operation on this chip alone on the bus (read-modify-write)."""
        return await self.bus.run(fn, device=self.name, what=f"{what} at {self.addr:#04x}")


def open_i2c_device(buses: Buses, name: str, spec: str, addr: int, sim_model: str) -> I2CDevice:
    """The device `name` at `addr` on bus `spec`; on an emulated bus, a `sim_model` chip is
    created at `addr` if nothing was ever put there, so a config alone can run the emulation."""
    bus = buses.i2c(spec)
    if not isinstance(bus, I2CBus):
        raise DriverError(name, f"bus {spec!r} is not an I2C bus")
    if bus.sim is not None:
        bus.sim.ensure(addr, sim_model)
    return bus.device(addr, name)


class BusManager:
    """Opens each physical bus once and hands the same object to every device on it."""

    def __init__(self, *, i2c_retries: int = 2) -> None:
        self._i2c: dict[str, I2CBus] = {}
        self._serial: dict[str, SerialPort] = {}
        self._modbus: dict[str, ModbusLine] = {}
        self.generation = 0  # bumped by close(): cached buses are stale
        self._i2c_retries = i2c_retries

    def i2c(self, spec: str) -> I2CBus:
        """The shared I2C bus for "1", "/dev/i2c-1" or "sim:NAME". Opening is lazy."""
        key = spec.strip()
        if key.startswith("sim:"):
            name = key[4:]
            if not name:
                raise ValueError("emulated bus needs a name: sim:NAME")
        else:
            key = i2c_path(key)
        bus = self._i2c.get(key)
        if bus is None:
            if key.startswith("sim:"):
                sim = _i2c_emulator("sim")(key[4:])
                bus = I2CBus(key, sim.connect, sim=sim, retries=self._i2c_retries)
            else:
                bus = I2CBus(key, lambda: Smbus2Adapter(key), retries=self._i2c_retries)
            self._i2c[key] = bus
        return bus

    def serial(self, spec: str, **settings: Any) -> SerialPort:
        """The shared serial port for a device path or pyserial URL.

        Every user of one port must ask for the same settings; a mismatch raises ValueError.
        """
        from drivers.serialport import SerialPort, SerialSettings

        wanted = SerialSettings(**settings)
        port = self._serial.get(spec)
        if port is None:
            if spec in self._modbus:
                raise ValueError(f"serial port {spec} is already used as a Modbus line")
            port = self._serial[spec] = SerialPort(spec, wanted)
        elif port.settings != wanted:
            raise ValueError(f"serial port {spec} is shared with different settings: "
                             f"{port.settings} vs {wanted}")
        return port

    def modbus(self, spec: str, **settings: Any) -> ModbusLine:
        """The shared Modbus RTU line on a port; requests from all its units are serialized."""
        from drivers.modbus import ModbusLine

        line = self._modbus.get(spec)
        if line is None:
            if spec in self._serial:
                raise ValueError(f"serial port {spec} is already used by a non-Modbus device")
            port = self.serial(spec, **settings)
            del self._serial[spec]
            line = self._modbus[spec] = ModbusLine(port)
        elif line.port.settings != _settings(settings):
            raise ValueError(f"Modbus line {spec} is shared with different settings")
        return line

    async def close(self) -> None:
        """Close every bus; never raises. Users that cached a bus look it up again."""
        self.generation += 1
        for bus in self._i2c.values():
            await bus.close()
        for port in [*self._serial.values(), *(m.port for m in self._modbus.values())]:
            await port.close()
        self._i2c.clear()
        self._serial.clear()
        self._modbus.clear()


def _settings(settings: dict[str, Any]) -> SerialSettings:
    from drivers.serialport import SerialSettings

    return SerialSettings(**settings)
