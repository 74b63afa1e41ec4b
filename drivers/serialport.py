"""A shared, self-healing serial port on asyncio (pyserial, read through the event loop).

One `SerialPort` per device path or pyserial URL (`/dev/ttyUSB0`, `socket://host:port`,
`rfc2217://host:port` for ser2net, `loop://`). It opens lazily, notices when the port goes away
(a USB adapter pulled out, a ser2net connection dropped), and reopens it with capped
exponential backoff on a later call, so the daemon never needs a restart.

Users hold `port.lock` around a request and its response, so devices sharing an RS-485 line
never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import serial
import structlog

from drivers.base import DriverError, Duration, ReadTimeoutError

log = structlog.get_logger(__name__)

_MAX_LINE = 4096
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """Port settings; every device sharing a port must use the same ones."""

    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    rs485: bool = False
    rs485_rts_tx_high: bool = True
    rs485_delay_before_tx: float = 0.0
    rs485_delay_after_tx: float = 0.0

    def char_time_s(self) -> float:
        """Time on the wire for one character (start, data, parity and stop bits)."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate


@dataclass(frozen=True, slots=True, kw_only=True)
class SerialLinkConfig:
    """Config keys shared by every serial driver: the port and its line settings."""

    port: str  # "/dev/ttyUSB0", "/dev/serial/by-id/...", "socket://host:4001", "rfc2217://..."
    baudrate: int = 9600
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    rs485: bool = False  # kernel RS-485 mode (RTS drives the transceiver); needs driver support
    rs485_rts_tx_high: bool = True
    rs485_delay_before_tx: Duration = 0.0
    rs485_delay_after_tx: Duration = 0.0

    def __post_init__(self) -> None:
        if not self.port:
            raise ValueError("port must not be empty")
        if self.baudrate <= 0:
            raise ValueError(f"baudrate must be positive, got {self.baudrate}")

    def serial_settings(self) -> dict[str, Any]:
        """The keyword arguments for `Buses.serial` / `Buses.modbus`."""
        names = {f.name for f in dataclasses.fields(SerialSettings)}
        return {k: getattr(self, k) for k in names}

    def shared_port(self, buses: Any) -> SerialPort:
        """The shared `SerialPort` for this config's port and settings."""
        port: SerialPort = buses.serial(self.port, **self.serial_settings())
        return port


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bool | None] | None = None  # the reader waiting (one)
        self.lost = False
        self.error: BaseException | None = None
        self.rx_at = 0.0  # time.monotonic() when the last byte was seen

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.rx_at = time.monotonic()
        self.buffer += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._wake()


def _expire(fut: asyncio.Future[bool | None]) -> None:
    if not fut.done():
        fut.set_result(True)


class _FdTransport:
    """Reads and writes a pyserial port's file descriptor on the event loop.

    pyserial opens and configures the port (termios, RS-485); the loop watches the descriptor.
    A read error or end of file means the port went away (USB adapter pulled, pty closed).
    """

    def __init__(self, ser: serial.Serial, protocol: _Protocol, loop: asyncio.AbstractEventLoop) -> None:
        self.serial = ser
        self._fd = ser.fileno()
        os.set_blocking(self._fd, False)
        self._protocol = protocol
        self._loop = loop
        self._out = bytearray()
        self._closed = False
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:
            self._lost(None)
            return
        self._protocol.data_received(data)

    def _writable(self) -> None:
        try:
            n = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._fd)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "port is closed")
        if self._out:
            self._out += data
            return
        try:
            n = os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            self._out += data[n:]
            self._loop.add_writer(self._fd, self._writable)

    def _lost(self, exc: Exception | None) -> None:
        self.close()
        self._protocol.connection_lost(exc or OSError(errno.EIO, "end of file on port"))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        with contextlib.suppress(OSError, serial.SerialException):
            self.serial.close()


class _ThreadTransport:
    """For pyserial URLs (socket://, rfc2217://, loop://, ...): a reader thread feeds the
    protocol; writes go straight to pyserial."""

    def __init__(self, ser: serial.SerialBase, protocol: _Protocol, loop: asyncio.AbstractEventLoop) -> None:
        self.serial = ser
        self._protocol = protocol
        self._loop = loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reader, name=f"serial[{ser.portstr}]", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.serial.read(max(1, self.serial.in_waiting))
            except Exception as exc:
                if not self._stop.is_set():
                    self._loop.call_soon_threadsafe(self._protocol.connection_lost, exc)
                return
            if data:
                self._loop.call_soon_threadsafe(self._protocol.data_received, data)

    def write(self, data: bytes) -> None:
        self.serial.write(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError, serial.SerialException):
            self.serial.close()


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd (Linux) watched by the event loop, for sub-millisecond waits.

    asyncio's selector rounds every timeout up to the next millisecond, so `asyncio.sleep(0.0012)`
    waits 2 ms or more; the Modbus silence between frames (1.75 ms) would cost 2-3 ms per
    transaction. A timerfd armed at an absolute time wakes the loop within microseconds of it.
    `time.monotonic()` is CLOCK_MONOTONIC on Linux, so deadlines are in its terms.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # 1: CLOCK_MONOTONIC
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._fd = fd
        self._settime = libc.timerfd_settime
        self._spec = (ctypes.c_long * 4)()  # struct itimerspec: interval (s, ns), value (s, ns)
        self._ref = ctypes.byref(self._spec)
        self.loop = loop
        self._waiter: asyncio.Future[None] | None = None
        loop.add_reader(fd, self._fired)

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except OSError:
            return
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def sleep_until(self, when: float) -> None:
        sec, nsec = divmod(int(when * 1e9), 1_000_000_000)
        self._spec[2], self._spec[3] = sec, nsec
        if self._settime(self._fd, 1, self._ref, None) != 0:  # 1: TFD_TIMER_ABSTIME
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            return
        self._waiter = fut = self.loop.create_future()
        try:
            await fut
        finally:
            self._waiter = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            os.close(self._fd)


async def _in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking call (opening a port) in a short-lived thread of its own, so that no
    executor thread outlives the port. A result that arrives after cancellation is closed."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(result: T) -> None:
        if fut.done():
            with contextlib.suppress(Exception):
                result.close()  # type: ignore[attr-defined]
        else:
            fut.set_result(result)

    def fail(exc: BaseException) -> None:
        if not fut.done():
            fut.set_exception(exc)

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(fail, exc)
        else:
            loop.call_soon_threadsafe(deliver, result)

    threading.Thread(target=work, name="serial[open]", daemon=True).start()
    return await fut


class SerialPort:
    """One serial port shared by its devices. Every method raises DriverError on failure."""

    def __init__(self, url: str, settings: SerialSettings, *, reopen_base_s: float = 0.2,
                 reopen_cap_s: float = 30.0) -> None:
        self.url = url
        self.settings = settings
        self.lock = asyncio.Lock()
        self.reopen_base_s = reopen_base_s
        self.reopen_cap_s = reopen_cap_s
        self._transport: Any = None
        self._protocol: _Protocol | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._open_lock = asyncio.Lock()
        self.opens = 0
        self.losses = 0
        self._rx_closed = 0.0  # last byte seen on a transport that is gone
        self._timer: _TimerFd | None = None
        self._timer_failed = False

    @property
    def last_rx(self) -> float:
        """time.monotonic() when the last byte was seen (0 if never)."""
        p = self._protocol
        return max(p.rx_at, self._rx_closed) if p is not None else self._rx_closed

    async def sleep_until(self, when: float) -> None:
        """Sleep until `when` (time.monotonic()), precisely (a timerfd) where the OS allows."""
        if self._timer is None and not self._timer_failed:
            try:
                self._timer = _TimerFd(asyncio.get_running_loop())
            except (OSError, AttributeError, ImportError):
                self._timer_failed = True  # not Linux: millisecond rounding, still correct
        if self._timer is not None and self._timer.loop is not asyncio.get_running_loop():
            self._timer.close()
            self._timer = _TimerFd(asyncio.get_running_loop())
        if self._timer is None:
            await asyncio.sleep(max(0.0, when - time.monotonic()))
        else:
            await self._timer.sleep_until(when)

    async def quiet(self, silence_s: float, limit_s: float) -> None:
        """Wait until the line has been silent for `silence_s` since the last byte seen.

        Only the part of the silence that has not passed yet is waited (usually none: handling
        the previous answer took longer). Bytes that arrive meanwhile restart it, for at most
        `limit_s` in all (a babbling line must not block the port forever).
        """
        give_up = time.monotonic() + limit_s
        while True:
            due = self.last_rx + silence_s
            now = time.monotonic()
            if due <= now or now >= give_up:
                return
            await self.sleep_until(min(due, give_up))

    @property
    def is_open(self) -> bool:
        return self._protocol is not None and not self._protocol.lost

    async def ensure_open(self, device: str) -> None:
        """Open the port if it is closed; within the reopen backoff, fail at once."""
        if self.is_open:
            return
        async with self._open_lock:
            if self.is_open:
                return
            await self._drop()
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise DriverError(device, f"serial port {self.url} unavailable; next reopen "
                                          f"attempt in {wait:.1f}s")
            try:
                async with asyncio.timeout(10):
                    await self._open()
            except (OSError, serial.SerialException, ValueError, TimeoutError) as exc:
                self._failures += 1
                delay = min(self.reopen_cap_s, self.reopen_base_s * 2 ** (self._failures - 1))
                self._retry_at = time.monotonic() + delay
                log.warning("serial_open_failed", port=self.url, error=str(exc), retry_in_s=delay)
                raise DriverError(device, describe_serial_error(exc, self.url)) from exc
            self._failures = 0
            self.opens += 1
            log.info("serial_opened", port=self.url, opens=self.opens)

    async def _open(self) -> None:
        s = self.settings
        kwargs: dict[str, Any] = {"baudrate": s.baudrate, "bytesize": s.bytesize,
                                  "parity": s.parity, "stopbits": s.stopbits}
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        ser = await _in_thread(lambda: serial.serial_for_url(self.url, timeout=0.05, **kwargs))
        transport: Any
        if "://" in self.url:
            transport = _ThreadTransport(ser, protocol, loop)
        else:
            transport = _FdTransport(ser, protocol, loop)
        try:
            if s.rs485:
                self._set_rs485(transport)
        except BaseException:
            transport.close()
            raise
        self._transport, self._protocol = transport, protocol

    def _set_rs485(self, transport: Any) -> None:
        import serial.rs485

        s = self.settings
        try:
            transport.serial.rs485_mode = serial.rs485.RS485Settings(
                rts_level_for_tx=s.rs485_rts_tx_high, rts_level_for_rx=not s.rs485_rts_tx_high,
                delay_before_tx=s.rs485_delay_before_tx or None,
                delay_before_rx=s.rs485_delay_after_tx or None)
        except (ValueError, OSError, AttributeError, NotImplementedError, serial.SerialException) as exc:
            raise ValueError(f"RS-485 mode is not supported by {self.url} ({exc}); use an adapter "
                             f"with automatic direction control and set rs485 = false") from exc

    def _lost(self, device: str) -> DriverError:
        """Note that the port went away and build the error for the caller."""
        assert self._protocol is not None
        exc = self._protocol.error
        self.losses += 1
        self._retry_at = time.monotonic() + self.reopen_base_s
        log.warning("serial_port_lost", port=self.url, error=str(exc) if exc else "closed")
        return DriverError(device, f"serial port {self.url} closed (unplugged?): {exc or 'EOF'}")

    async def write(self, data: bytes, device: str) -> None:
        await self.ensure_open(device)
        try:
            self._transport.write(data)
        except (OSError, serial.SerialException) as exc:
            await self._drop()
            raise DriverError(device, f"serial port {self.url}: write failed: {exc}") from exc

    def discard_input(self) -> None:
        """Drop whatever was received and not consumed yet (stale or garbage bytes)."""
        if self._protocol is not None:
            self._protocol.buffer.clear()

    async def _wait(self, device: str, ready: Any, timeout_s: float, what: str) -> bytes:
        """Wait until `ready(buffer)` returns the number of bytes to take (or raises)."""
        await self.ensure_open(device)
        p = self._protocol
        assert p is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        expired = False
        while True:
            n = ready(p.buffer)
            if n:
                out = bytes(p.buffer[:n])
                del p.buffer[:n]
                return out
            if p.lost:
                raise self._lost(device)
            if expired:
                raise ReadTimeoutError(device, f"serial port {self.url}: no {what} within "
                                               f"{timeout_s:g}s")
            # One future per wait for bytes (the port's lock admits one reader), resolved by
            # data_received (None) or at the deadline by the timer (True): no Timeout object
            # per read.
            fut: asyncio.Future[bool | None] = loop.create_future()
            p.waiter = fut
            timer = loop.call_at(deadline, _expire, fut)
            try:
                expired = bool(await fut)
            finally:
                timer.cancel()
                p.waiter = None

    async def read_frame(self, ready: Callable[[bytearray], int], timeout_s: float, device: str,
                         what: str = "response") -> bytes:
        """The first `ready(buffer)` bytes, once it returns non-zero. `ready` may drop leading
        garbage from the buffer itself, and may raise DriverError for a broken frame."""
        return await self._wait(device, ready, timeout_s, what)

    async def read_exactly(self, n: int, timeout_s: float, device: str) -> bytes:
        return await self._wait(device, lambda b: n if len(b) >= n else 0, timeout_s, f"{n} bytes")

    async def read_until(self, sep: bytes, timeout_s: float, device: str,
                         max_len: int = _MAX_LINE) -> bytes:
        """Bytes up to and including `sep`. A run longer than `max_len` is dropped as garbage."""

        def ready(buf: bytearray) -> int:
            i = buf.find(sep)
            if i >= 0:
                return i + len(sep)
            if len(buf) > max_len:
                buf.clear()
                raise DriverError(device, f"serial port {self.url}: more than {max_len} bytes "
                                          f"without a {sep!r} terminator")
            return 0

        return await self._wait(device, ready, timeout_s, "line")

    async def _drop(self) -> None:
        if self._protocol is not None:
            self._rx_closed = max(self._rx_closed, self._protocol.rx_at)
        transport, self._transport, self._protocol = self._transport, None, None
        if transport is not None:
            transport.close()

    async def close(self) -> None:
        """Close the port; never raises."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        try:
            await self._drop()
        except (OSError, serial.SerialException):
            pass


def describe_serial_error(exc: BaseException, url: str) -> str:
    """A readable reason for a failed open, with the usual fix."""
    err = getattr(exc, "errno", None)
    text = str(exc)
    if err == errno.EACCES or "Permission denied" in text:
        return (f"permission denied on {url}: add the user to the 'dialout' group "
                f"(sudo usermod -aG dialout $USER, then log in again)")
    if err == errno.ENOENT or "No such file" in text or ("could not open port" in text and "2]" in text):
        return f"serial port {url} does not exist (unplugged? check /dev/serial/by-id/)"
    if err == errno.EBUSY or "busy" in text.lower():
        return f"serial port {url} is busy: another program (ModemManager, a console?) holds it"
    return f"serial port {url}: {text}"
