"""Serial device simulators on real pseudo-terminals, for the bench and the tests.

Each simulator runs in its own thread with its own event loop, and publishes the terminal at a
stable symlink `path` (like a udev /dev/serial/by-id link), which the gateway opens as a serial
port. `unplug()` closes the terminal and removes the link (the gateway sees the port vanish);
`replug()` creates a new terminal behind the same path.

Fault modes (`sim.fault = ...`): "garbage" (noise bytes before each message), "truncate" (only
the first half of each message), "bad_checksum" (a corrupted checksum or CRC), "silence" (no
answer at all); None for normal operation.

Simulators: `ModbusSlaveSim` (a pymodbus server behind the terminal), `NMEASim` (GGA + RMC at a
rate), `LineInstrumentSim` (answers a poll string with an ASCII line), `EchoActuatorSim` (a relay
box that answers commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import re
import struct
import tempfile
import threading
import time
import tty
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

Fault = Literal["garbage", "truncate", "bad_checksum", "silence"] | None
NOISE = b"\x00\xff\x55\xaa\x7e#@!"
T = TypeVar("T")


class PtyLink:
    """A pseudo-terminal pair; the slave side is published as a symlink at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.master = -1
        self._slave = -1

    def open(self) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo or line editing before the gateway configures it
        os.set_blocking(self.master, False)
        tmp = f"{self.path}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.ttyname(self._slave), tmp)
        os.replace(tmp, self.path)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for fd in (self.master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self._slave = -1

    def write(self, data: bytes) -> None:
        """Write what fits; a reader that does not read loses data, as on a real line."""
        if self.master < 0 or not data:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.master, data)


class SerialSim:
    """Base of the simulators: thread, event loop, terminal, faults, unplug and replug."""

    def __init__(self, path: str | None = None) -> None:
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="gatewayd-sim-")
            path = str(Path(self._tmpdir.name) / f"tty{type(self).__name__}")
        self.path = path
        self.link = PtyLink(path)
        self.fault: Fault = None
        self.received = bytearray()  # everything the gateway sent, for assertions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._buffer = bytearray()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> SerialSim:
        """Start the simulator thread; returns once `path` can be opened."""
        self._thread = threading.Thread(target=self._run, name=f"sim[{Path(self.path).name}]", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        if self._error is not None:
            raise RuntimeError(f"{type(self).__name__} failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        """Stop the thread and remove the terminal. Idempotent."""
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._thread = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> SerialSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.setup()
            self._plug()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        worker = asyncio.create_task(self.serve(), name=f"sim-serve[{self.path}]")
        try:
            await self._stop.wait()
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            self._unplug()
            await self.teardown()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the simulator's loop and return its result (from any thread)."""
        assert self._loop is not None

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    def run_coro(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def unplug(self) -> None:
        """The device disappears: the terminal closes and `path` vanishes."""
        self.call(self._unplug)

    def replug(self) -> None:
        """The device comes back at the same `path` (on a new terminal)."""
        self.call(self._plug)

    def _plug(self) -> None:
        assert self._loop is not None
        if self.link.master >= 0:
            return
        self.link.open()
        self._loop.add_reader(self.link.master, self._on_readable)

    def _unplug(self) -> None:
        if self.link.master >= 0 and self._loop is not None:
            self._loop.remove_reader(self.link.master)
        self.link.close()
        self._buffer.clear()

    def _on_readable(self) -> None:
        try:
            data = os.read(self.link.master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # EIO: nobody has the terminal open right now
        if data:
            self.received += data
            self.on_data(data)

    # -- for subclasses --------------------------------------------------------------------------

    async def setup(self) -> None:
        """Prepare before the terminal appears (runs on the simulator loop)."""

    async def teardown(self) -> None:
        """Release what setup() made."""

    async def serve(self) -> None:
        """A background loop (emitters); request/response devices use `on_data` instead."""
        await asyncio.Event().wait()

    def on_data(self, data: bytes) -> None:
        """Bytes from the gateway. Line devices get whole lines through `on_line`."""
        self._buffer += data
        while True:
            m = re.search(rb"\r\n|\r|\n", self._buffer)
            if m is None:
                if len(self._buffer) > 4096:
                    self._buffer.clear()
                return
            line = bytes(self._buffer[:m.start()])
            del self._buffer[:m.end()]
            if line:
                self.on_line(line.decode("ascii", "replace"))

    def on_line(self, line: str) -> None:
        """One line from the gateway."""

    def corrupt(self, message: bytes) -> bytes:
        """The "bad_checksum" version of a message."""
        return message

    def send(self, message: bytes) -> None:
        """Send one message, applying the current fault mode."""
        self.link.write(self.apply_fault(message))

    def apply_fault(self, message: bytes) -> bytes:
        if self.fault == "silence":
            return b""
        if self.fault == "garbage":
            return NOISE + message
        if self.fault == "truncate":
            return message[: max(1, len(message) // 2)]
        if self.fault == "bad_checksum":
            return self.corrupt(message)
        return message


# --- Modbus RTU slave ---------------------------------------------------------------------------

# The register map an animated ModbusSlaveSim unit serves (holding registers), as driver points.
METER_MAP = {
    "power_w": {"address": 0, "type": "float32"},
    "energy_kwh": {"address": 2, "type": "uint32", "scale": 0.0001},
    "voltage_v": {"address": 4, "type": "uint16", "scale": 0.1},
}


class ModbusSlaveSim(SerialSim):
    """A pymodbus RTU server (one or more unit ids) behind the terminal.

    pymodbus opens a second, internal terminal; the simulator relays bytes between the two, and
    applies faults to the server's responses through pymodbus' packet trace hook.
    `exception_code`: when set, every request is answered with this Modbus exception.
    Units not in `units` get no answer at all (a real line is silent for them).
    """

    def __init__(self, units: tuple[int, ...] = (1,), size: int = 256, path: str | None = None,
                 baudrate: int = 19200, animate: bool = False) -> None:
        super().__init__(path)
        self.units = units
        self.animate = animate
        self.size = size
        self.baudrate = baudrate
        self.exception_code: int | None = None
        self.requests = 0
        self._inner: PtyLink | None = None
        self._server: Any = None

    async def setup(self) -> None:
        from pymodbus.framer import FramerType
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        self._inner = PtyLink(self.path + ".inner")
        self._inner.open()

        def block(bits: bool) -> list[SimData]:
            dtype = DataType.BITS if bits else DataType.REGISTERS
            return [SimData(0, count=self.size, values=False if bits else 0, datatype=dtype)]

        # id 0 is pymodbus' catch-all for ids it does not serve: without it an unknown id gets
        # exception 4; with it the request is served and `_trace` drops the answer, as a real
        # RS-485 line stays silent for a unit that is not on it
        devices = [SimDevice(id=u, simdata=(block(True), block(True), block(False), block(False)))
                   for u in (0, *self.units)]
        self._server = ModbusSerialServer(devices, framer=FramerType.RTU, port=self._inner.path,
                                          baudrate=self.baudrate, trace_packet=self._trace,
                                          trace_pdu=self._trace_pdu)
        await self._server.serve_forever(background=True)
        assert self._loop is not None
        self._loop.add_reader(self._inner.master, self._from_server)

    async def teardown(self) -> None:
        if self._inner is not None and self._loop is not None:
            self._loop.remove_reader(self._inner.master)
        if self._server is not None:
            await self._server.shutdown()
        if self._inner is not None:
            self._inner.close()

    def on_data(self, data: bytes) -> None:
        assert self._inner is not None
        self._inner.write(data)

    def _from_server(self) -> None:
        assert self._inner is not None
        with contextlib.suppress(BlockingIOError, OSError):
            self.link.write(os.read(self._inner.master, 4096))

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        if not data or data[0] not in self.units:
            return b""  # not on this line (or a broadcast): nobody answers
        self.requests += 1
        return self.apply_fault(data)

    def _trace_pdu(self, sending: bool, pdu: Any) -> Any:
        if sending and self.exception_code is not None:
            from pymodbus.pdu import ExceptionResponse

            return ExceptionResponse(pdu.function_code & 0x7F, self.exception_code,
                                     device_id=pdu.dev_id)
        return pdu

    def corrupt(self, message: bytes) -> bytes:
        return message[:-1] + bytes([message[-1] ^ 0xFF]) if message else message

    async def serve(self) -> None:
        """With `animate`, every unit behaves as an energy meter (see `METER_MAP`)."""
        if not self.animate:
            await asyncio.Event().wait()
        energy_wh = 0.0
        while True:
            now = time.time()
            for unit in self.units:
                power_w = 1500.0 + 500.0 * math.sin(now / 30 + unit)
                energy_wh += power_w / 3600
                regs = [*struct.unpack(">HH", struct.pack(">f", power_w)),
                        *divmod(int(energy_wh * 10) & 0xFFFFFFFF, 0x10000),
                        int(230.0 * 10 + 20 * math.sin(now / 7))]
                await self._server.context.async_setValues(unit, 16, 0, regs)
            await asyncio.sleep(1.0)

    def set_values(self, unit: int, table: Literal["coil", "discrete", "holding", "input"],
                   address: int, values: list[int] | list[bool]) -> None:
        """Put values into a unit's table (registers are 16-bit words)."""
        fc = {"coil": 5, "discrete": 2, "holding": 6, "input": 4}[table]
        fc = 15 if table == "coil" else 16 if table == "holding" else fc
        self.run_coro(self._server.context.async_setValues(unit, fc, address, list(values)))

    def get_values(self, unit: int, table: Literal["coil", "discrete", "holding", "input"],
                   address: int, count: int) -> list[int] | list[bool]:
        fc = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}[table]
        return self.run_coro(self._server.context.async_getValues(unit, fc, address, count))  # type: ignore[no-any-return]


# --- NMEA 0183 GPS ------------------------------------------------------------------------------


def nmea_checksum(body: str) -> str:
    """XOR of every character between '$' and '*', as two hex digits."""
    x = 0
    for ch in body.encode("ascii"):
        x ^= ch
    return f"{x:02X}"


def nmea_sentence(body: str) -> bytes:
    return f"${body}*{nmea_checksum(body)}\r\n".encode("ascii")


def _ddmm(value: float, lat: bool) -> tuple[str, str]:
    hemi = ("N" if value >= 0 else "S") if lat else ("E" if value >= 0 else "W")
    # round to the 4 decimals sent first, then carry into the degrees: 52.99999999 is
    # "5300.0000", never "5260.0000" (minutes stay below 60)
    deg, ten_thousandths = divmod(round(abs(value) * 60 * 10_000), 60 * 10_000)
    minutes = ten_thousandths / 10_000
    return (f"{deg:02d}{minutes:07.4f}" if lat else f"{deg:03d}{minutes:07.4f}"), hemi


class NMEASim(SerialSim):
    """A GPS receiver: a GGA and an RMC sentence `rate_hz` times a second."""

    def __init__(self, path: str | None = None, rate_hz: float = 5.0) -> None:
        super().__init__(path)
        self.rate_hz = rate_hz
        self.lat = 52.520008
        self.lon = 13.404954
        self.alt_m = 34.5
        self.fix_quality = 1
        self.satellites = 9
        self.sent = 0

    def sentences(self) -> list[bytes]:
        now = dt.datetime.now(dt.UTC)
        hhmmss = now.strftime("%H%M%S.") + f"{now.microsecond // 10000:02d}"
        lat, ns = _ddmm(self.lat, True)
        lon, ew = _ddmm(self.lon, False)
        gga = (f"GPGGA,{hhmmss},{lat},{ns},{lon},{ew},{self.fix_quality},{self.satellites:02d},"
               f"0.9,{self.alt_m:.1f},M,47.0,M,,")
        status = "A" if self.fix_quality else "V"
        rmc = f"GPRMC,{hhmmss},{status},{lat},{ns},{lon},{ew},0.02,31.66,{now:%d%m%y},,,A"
        return [nmea_sentence(gga), nmea_sentence(rmc)]

    def corrupt(self, message: bytes) -> bytes:
        star = message.rfind(b"*")
        if star < 0:
            return message
        wrong = int(message[star + 1:star + 3], 16) ^ 0x55
        return message[:star + 1] + f"{wrong:02X}".encode() + message[star + 3:]

    async def serve(self) -> None:
        while True:
            for s in self.sentences():
                self.send(s)
            self.sent += 1
            await asyncio.sleep(1 / self.rate_hz)


# --- ASCII line instrument ----------------------------------------------------------------------


class LineInstrumentSim(SerialSim):
    """An ASCII instrument: answers `poll` with a line built from `template` and `values`;
    with `poll=None` it streams a line `rate_hz` times a second instead."""

    def __init__(self, path: str | None = None, poll: str | None = "READ",
                 template: str = "T={temperature:.2f} H={humidity:.1f} ST={status}",
                 rate_hz: float = 5.0) -> None:
        super().__init__(path)
        self.poll = poll
        self.template = template
        self.rate_hz = rate_hz
        self.values: dict[str, Any] = {"temperature": 21.5, "humidity": 40.0, "status": "OK"}
        self.polls = 0

    def line(self) -> bytes:
        return (self.template.format(**self.values) + "\r\n").encode("ascii")

    def corrupt(self, message: bytes) -> bytes:
        return re.sub(rb"\d", b"?", message, count=1)

    def on_line(self, line: str) -> None:
        if self.poll is not None and line.strip() == self.poll:
            self.polls += 1
            self.send(self.line())

    async def serve(self) -> None:
        if self.poll is not None:
            await asyncio.Event().wait()
        while True:
            self.send(self.line())
            await asyncio.sleep(1 / self.rate_hz)


# --- command-echo actuator ----------------------------------------------------------------------

_RELAY_RE = re.compile(r"^RELAY (\d+) (ON|OFF)$")


class EchoActuatorSim(SerialSim):
    """A relay box with an ASCII protocol: `RELAY <n> ON|OFF` answers `OK RELAY <n> ON|OFF`;
    anything else answers `ERR unknown command`."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(path)
        self.relays: dict[int, bool] = {}
        self.commands: list[str] = []

    def on_line(self, line: str) -> None:
        line = line.strip()
        self.commands.append(line)
        m = _RELAY_RE.match(line)
        if m is None:
            self.send(b"ERR unknown command\r\n")
            return
        self.relays[int(m.group(1))] = m.group(2) == "ON"
        self.send(f"OK {line}\r\n".encode("ascii"))

    def corrupt(self, message: bytes) -> bytes:
        return message.replace(b"OK", b"0K", 1)
