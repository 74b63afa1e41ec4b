"""Modbus RTU: a shared line (several unit ids on one RS-485 port), a register-map driver and a
writer actuator.

Layers, as in pymodbus: our `SerialPort` is the transport; pymodbus supplies the RTU framer
(CRC-16) and the PDU classes. We frame responses ourselves so that CRC errors, exception
responses and timeouts are counted per unit, and so that the port shares its unplug/reopen logic
with every other serial driver. Register maps are data (`ModbusPoint`); value decoding and
request planning are pure functions.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from pymodbus.framer.rtu import FramerRTU
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from drivers.base import (
    ActionError,
    Actuator,
    Buses,
    Driver,
    DriverError,
    Duration,
    Quality,
    Reading,
    ReadTimeoutError,
    now_ms,
)
from drivers.scaling import tidy
from drivers.serialport import SerialLinkConfig, SerialPort

log = structlog.get_logger(__name__)

Function = Literal["coil", "discrete", "holding", "input"]
DataType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32",
                   "int64", "uint64", "float64", "string"]

_FC_READ = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
_READ_PDU = {1: ReadCoilsRequest, 2: ReadDiscreteInputsRequest, 3: ReadHoldingRegistersRequest,
             4: ReadInputRegistersRequest}
_MAX_COUNT = {1: 2000, 2: 2000, 3: 125, 4: 125}  # Modbus spec limits per request
_STRUCT = {"int16": ("h", 1), "uint16": ("H", 1), "int32": ("i", 2), "uint32": ("I", 2),
           "float32": ("f", 2), "int64": ("q", 4), "uint64": ("Q", 4), "float64": ("d", 4)}
EXCEPTION_NAMES = {1: "illegal function", 2: "illegal data address", 3: "illegal data value",
                   4: "server device failure", 5: "acknowledge", 6: "server device busy",
                   8: "memory parity error", 10: "gateway path unavailable",
                   11: "gateway target device failed to respond"}


class ModbusExceptionError(DriverError):
    """The unit answered with a Modbus exception response."""

    def __init__(self, device: str, function: int, code: int) -> None:
        name = EXCEPTION_NAMES.get(code, "unknown exception")
        super().__init__(device, f"modbus exception {code} ({name}) to function {function}")
        self.function = function
        self.code = code


# --- register map -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModbusPoint:
    address: int  # protocol address (0-based), not the 40001-style reference number
    function: Function = "holding"
    type: DataType = "uint16"  # coils and discrete inputs are always "bool"
    byte_order: Literal["big", "little"] = "big"  # bytes inside each register
    word_order: Literal["big", "little"] = "big"  # big: the first register is most significant
    scale: float = 1.0  # value = raw * scale + offset
    offset: float = 0.0
    count: int = 0  # registers; only for "string" (other types imply their width)
    decimals: int | None = None  # round the scaled value

    def __post_init__(self) -> None:
        if not 0 <= self.address <= 0xFFFF:
            raise ValueError(f"address must be 0..65535, got {self.address}")
        bit = self.function in ("coil", "discrete")
        if bit and self.type not in ("bool", "uint16"):
            raise ValueError(f"a {self.function} is a single bit: type must be bool")
        if not bit and self.type == "bool":
            raise ValueError(f"type bool needs function coil or discrete, not {self.function}")
        if self.type == "string" and self.count <= 0:
            raise ValueError("type string needs count (number of registers)")
        if self.type != "string" and self.count and self.count != self.width:
            raise ValueError(f"count {self.count} does not match type {self.type} "
                             f"({self.width} registers)")
        if self.scale == 0:
            raise ValueError("scale must not be 0")

    @property
    def is_bit(self) -> bool:
        return self.function in ("coil", "discrete")

    @property
    def width(self) -> int:
        """Registers (or bits) the point occupies."""
        if self.is_bit:
            return 1
        if self.type == "string":
            return self.count
        return _STRUCT[self.type][1]


def _raw_bytes(regs: Sequence[int], p: ModbusPoint) -> bytes:
    words = list(regs) if p.word_order == "big" else list(reversed(regs))
    return b"".join(w.to_bytes(2, p.byte_order) for w in words)


def decode_value(raw: Sequence[int] | Sequence[bool], p: ModbusPoint) -> float | int | bool | str | None:
    """The engineering value of a point from its registers (or bit). None for NaN/inf floats.

    Raises DriverError-free ValueError only on a wrong register count (a caller bug).
    """
    if len(raw) != p.width:
        raise ValueError(f"point needs {p.width} registers, got {len(raw)}")
    if p.is_bit:
        return bool(raw[0])
    value: float | int
    if p.width == 1 and p.byte_order == "big" and p.type in ("uint16", "int16"):
        value = int(raw[0]) & 0xFFFF  # the common case, without building bytes
        if p.type == "int16" and value & 0x8000:
            value -= 0x10000
    else:
        data = _raw_bytes([int(r) & 0xFFFF for r in raw], p)
        if p.type == "string":
            return data.split(b"\0", 1)[0].decode("latin-1").strip()
        value = struct.unpack(">" + _STRUCT[p.type][0], data)[0]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if p.scale != 1.0 or p.offset != 0.0:
        value = tidy(value * p.scale + p.offset)
    if p.decimals is not None:
        value = round(value, p.decimals)
    return value


def encode_value(value: object, p: ModbusPoint) -> list[int] | list[bool]:
    """Registers (or a bit) for an engineering value; ValueError if it does not fit the type."""
    if p.is_bit:
        if not isinstance(value, bool | int) or value not in (0, 1):
            raise ValueError(f"expected true or false, got {value!r}")
        return [bool(value)]
    if p.type == "string":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        data = value.encode("latin-1", "replace")
        if len(data) > 2 * p.count:
            raise ValueError(f"string longer than {2 * p.count} bytes")
        data = data.ljust(2 * p.count, b"\0")
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        raw: float = (value - p.offset) / p.scale
        code, _ = _STRUCT[p.type]
        if code in "fd":
            packed_value: float | int = raw
        else:
            packed_value = round(raw)
            lo, hi = _int_range(code)
            if not lo <= packed_value <= hi:
                raise ValueError(f"{value!r} is out of range for {p.type} after scaling "
                                 f"({packed_value} not in {lo}..{hi})")
        try:
            data = struct.pack(">" + code, packed_value)
        except (struct.error, OverflowError) as exc:
            raise ValueError(f"{value!r} does not fit {p.type}: {exc}") from exc
    words = [int.from_bytes(data[i:i + 2], p.byte_order) for i in range(0, len(data), 2)]
    return words if p.word_order == "big" else list(reversed(words))


def _int_range(code: str) -> tuple[int, int]:
    bits = struct.calcsize(code) * 8
    return (0, 2**bits - 1) if code.isupper() else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@dataclass(frozen=True, slots=True)
class Block:
    """One read request covering several points."""

    fc: int
    address: int
    count: int
    points: tuple[tuple[str, ModbusPoint], ...]


def plan_reads(points: Mapping[str, ModbusPoint], max_gap: int = 0,
               max_registers: int = 125) -> list[Block]:
    """Coalesce points into as few read requests as possible.

    Points of one function whose registers are contiguous (or separated by at most `max_gap`
    unused registers) share a request, up to the protocol limit per request.
    """
    blocks: list[Block] = []
    by_fc: dict[int, list[tuple[str, ModbusPoint]]] = {}
    for name, p in points.items():
        by_fc.setdefault(_FC_READ[p.function], []).append((name, p))
    for fc in sorted(by_fc):
        limit = _MAX_COUNT[fc] if fc <= 2 else min(max_registers, _MAX_COUNT[fc])
        items = sorted(by_fc[fc], key=lambda kv: (kv[1].address, kv[1].width))
        start = end = -1
        members: list[tuple[str, ModbusPoint]] = []
        for name, p in items:
            p_end = p.address + p.width
            if members and p.address - end <= max_gap and max(end, p_end) - start <= limit:
                end = max(end, p_end)
                members.append((name, p))
                continue
            if members:
                blocks.append(Block(fc, start, end - start, tuple(members)))
            start, end, members = p.address, p_end, [(name, p)]
        if members:
            blocks.append(Block(fc, start, end - start, tuple(members)))
    return blocks


# --- the line -----------------------------------------------------------------------------------


@dataclass
class UnitStats:
    requests: int = 0
    responses: int = 0
    exceptions: int = 0
    crc_errors: int = 0
    timeouts: int = 0


class ModbusLine:
    """A Modbus RTU line on one serial port, shared by all its units; one request at a time.

    Waiting on the line costs more than the work: a transaction is the request, the unit's
    answer, and the silence the spec puts between frames (t3.5). The silence is measured from
    the last byte seen and only its remainder is waited, precisely (`SerialPort.quiet`); the
    answer's end is known from its length (function code and byte count), never waited out.
    """

    def __init__(self, port: SerialPort) -> None:
        self.port = port
        self.stats: dict[int, UnitStats] = {}
        self._framer = FramerRTU(DecodePDU(is_server=False))
        self._decoder = DecodePDU(is_server=False)
        self._frames: dict[tuple[int, int, int, int], bytes] = {}  # read requests, built once
        self._ends: dict[tuple[int, int], Callable[[bytearray], int]] = {}  # frame-end tests

    def unit_stats(self, unit: int) -> UnitStats:
        stats = self.stats.get(unit)
        if stats is None:
            stats = self.stats[unit] = UnitStats()
        return stats

    def silence_s(self) -> float:
        """t3.5: 3.5 character times between frames; the spec fixes 1.75 ms above 19200 baud."""
        s = self.port.settings
        return 0.00175 if s.baudrate > 19200 else 3.5 * s.char_time_s()

    async def request(self, unit: int, pdu: ModbusPDU, *, device: str, timeout_s: float = 0.5,
                      retries: int = 1) -> ModbusPDU:
        """Send `pdu` to `unit` and return its response PDU.

        Timeouts and CRC errors are retried `retries` times. Raises ModbusExceptionError for an
        exception response, ReadTimeoutError when the unit stays silent, DriverError otherwise.
        """
        async with self.port.lock:
            return await self.transact(unit, pdu, device=device, timeout_s=timeout_s,
                                       retries=retries)

    async def transact(self, unit: int, pdu: ModbusPDU, *, device: str, timeout_s: float = 0.5,
                       retries: int = 1) -> ModbusPDU:
        """`request` for a caller that already holds `port.lock` (several requests in a row)."""
        pdu.dev_id = unit
        frame = await self._exchange(unit, pdu.function_code, self._framer.buildFrame(pdu),
                                     device, timeout_s, retries)
        return self._decode(unit, frame, device)

    async def read(self, unit: int, fc: int, address: int, count: int, *, device: str,
                   timeout_s: float = 0.5, retries: int = 1) -> list[int] | list[bool]:
        """Read `count` registers (fc 3, 4) or bits (fc 1, 2) from `address`; the caller holds
        `port.lock`. The hot path of polling: a cached request frame, the answer parsed here."""
        key = (unit, fc, address, count)
        frame = self._frames.get(key)
        if frame is None:
            body = struct.pack(">BBHH", unit, fc, address, count)
            frame = self._frames[key] = body + crc16(body).to_bytes(2, "little")
        answer = await self._exchange(unit, fc, frame, device, timeout_s, retries)
        data = answer[3:-2]
        if fc >= 3:
            if len(data) != 2 * count:
                raise DriverError(device, f"modbus unit {unit}: {len(data) // 2} registers in the "
                                          f"answer, expected {count}")
            return list(struct.unpack(f">{count}H", data))
        if len(data) != (count + 7) // 8:
            raise DriverError(device, f"modbus unit {unit}: {len(data)} bytes of bits in the "
                                      f"answer, expected {(count + 7) // 8}")
        return [bool(data[i >> 3] >> (i & 7) & 1) for i in range(count)]

    async def _exchange(self, unit: int, fc: int, frame: bytes, device: str, timeout_s: float,
                        retries: int) -> bytes:
        """One request frame out, its answer frame back (CRC checked), with retries."""
        stats = self.unit_stats(unit)
        port = self.port
        silence = self.silence_s()
        for attempt in range(retries + 1):
            stats.requests += 1
            await port.ensure_open(device)
            await port.quiet(silence, timeout_s)
            port.discard_input()
            await port.write(frame, device)
            try:
                answer = await self._receive_frame(unit, fc, timeout_s, device)
            except ReadTimeoutError:
                stats.timeouts += 1
                if attempt == retries:
                    raise
                continue
            except _CrcError as exc:
                stats.crc_errors += 1
                log.warning("modbus_crc_error", device=device, unit=unit, frame=exc.frame.hex())
                if attempt == retries:
                    raise DriverError(device, f"modbus unit {unit}: CRC error in response "
                                              f"{exc.frame.hex()}") from None
                continue  # the retry waits for the line to fall silent first (quiet above)
            stats.responses += 1
            if answer[1] & 0x80:
                stats.exceptions += 1
                raise ModbusExceptionError(device, fc, answer[2])
            return answer
        raise AssertionError("unreachable")

    async def _receive_frame(self, unit: int, fc: int, timeout_s: float, device: str) -> bytes:
        """One answer frame for (unit, fc), leading garbage skipped, its CRC checked."""
        end = self._ends.get((unit, fc))
        if end is None:
            end = self._ends[(unit, fc)] = _frame_end(unit, fc)
        frame = await self.port.read_frame(end, timeout_s, device, f"response from unit {unit}")
        if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
            raise _CrcError(frame)
        return frame

    async def _receive(self, unit: int, fc: int, timeout_s: float, device: str) -> ModbusPDU:
        """Read one response frame for (unit, fc) and decode it to a PDU."""
        return self._decode(unit, await self._receive_frame(unit, fc, timeout_s, device), device)

    def _decode(self, unit: int, frame: bytes, device: str) -> ModbusPDU:
        try:
            pdu = self._decoder.decode(frame[1:-2])
        except Exception as exc:
            raise DriverError(device, f"modbus unit {unit}: undecodable response "
                                      f"{frame.hex()}: {exc}") from exc
        if pdu is None:
            raise DriverError(device, f"modbus unit {unit}: undecodable response {frame.hex()}")
        return pdu


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (init 0xFFFF, reflected polynomial 0xA001); sent low byte first."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


def _frame_end(unit: int, fc: int) -> Callable[[bytearray], int]:
    """The length of the response frame at the start of the buffer once it is all there, else 0.

    Bytes before the first (unit, fc or fc|0x80) pair are garbage and are dropped. The length
    follows from the function code: exception 5 bytes; reads (1-4) 5 + byte count; writes 8.
    """
    err = fc | 0x80

    def ready(buf: bytearray) -> int:
        n = len(buf)
        i = 0
        while i + 1 < n and (buf[i] != unit or (buf[i + 1] != fc and buf[i + 1] != err)):
            i += 1
        if i:
            del buf[:i]
            n -= i
        if n < 2:
            return 0
        if buf[1] == err:
            size = 5
        elif fc <= 4:
            if n < 3:
                return 0
            size = 5 + buf[2]
        else:
            size = 8
        return size if n >= size else 0

    return ready


class _CrcError(DriverError):
    """A response frame whose CRC does not match (retried, then reported)."""

    def __init__(self, frame: bytes) -> None:
        super().__init__("modbus", f"CRC error in {frame.hex()}")
        self.frame = frame


def decode_response(block: Block, response: ModbusPDU) -> dict[str, Any]:
    """Point values from a block's response; ValueError if the response is short."""
    if block.fc <= 2:
        data: Sequence[Any] = list(response.bits)[:block.count]
    else:
        data = list(response.registers)
    return decode_block(block, data)


def decode_block(block: Block, data: Sequence[Any]) -> dict[str, Any]:
    """Point values from a block's registers (or bits); ValueError if there are too few."""
    if len(data) < block.count:
        raise ValueError(f"response has {len(data)} values, expected {block.count}")
    out = {}
    base = block.address
    for name, p in block.points:
        i = p.address - base
        out[name] = decode_value(data[i:i + p.width], p)
    return out


_PLAIN, _SIGNED, _GENERAL = 0, 1, 2


def _block_decoder(block: Block) -> tuple[tuple[str, int, int, ModbusPoint], ...]:
    """(name, index, kind, point) per point of `block`: the common points (a 16-bit register
    in big-endian byte order, unscaled; a bit) are decoded inline, the rest by `decode_value`.
    The values are the same as `decode_block`'s."""
    out = []
    for name, p in block.points:
        kind = _GENERAL
        if p.is_bit:
            kind = _PLAIN  # ModbusLine.read gives bools already
        elif (p.width == 1 and p.byte_order == "big" and p.type in ("uint16", "int16")
              and p.scale == 1.0 and p.offset == 0.0 and p.decimals is None):
            kind = _PLAIN if p.type == "uint16" else _SIGNED
        out.append((name, p.address - block.address, kind, p))
    return tuple(out)


# --- driver and actuator ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusConfig(SerialLinkConfig):
    unit: int  # slave address, 1..247
    points: dict[str, ModbusPoint] = field(default_factory=dict)
    request_timeout: Duration = 0.5
    retries: int = 1
    max_gap: int = 0  # unused registers a coalesced request may span
    max_registers: int = 125

    def __post_init__(self) -> None:
        SerialLinkConfig.__post_init__(self)
        if not 1 <= self.unit <= 247:
            raise ValueError(f"unit must be 1..247, got {self.unit}")
        if not 1 <= self.max_registers <= 125:
            raise ValueError("max_registers must be 1..125")
        if self.retries < 0 or self.max_gap < 0:
            raise ValueError("retries and max_gap must not be negative")
        if not self.points:
            raise ValueError("points: configure at least one register")


class _ModbusBase:
    config: ModbusConfig
    buses: Buses
    name: str

    _line_cached: ModbusLine | None = None
    _line_gen: object = None

    def _line(self) -> ModbusLine:
        # Looked up (and its settings checked against the line's) once, not every poll; again
        # after the bus manager closed its lines (`generation` changes).
        gen = getattr(self.buses, "generation", None)
        line = self._line_cached
        if line is None or gen != self._line_gen:
            line = self.buses.modbus(self.config.port, **self.config.serial_settings())
            self._line_cached, self._line_gen = line, gen
        return line

    def stats(self) -> dict[str, int]:
        """Per-unit counters: requests, responses, exceptions, crc_errors, timeouts."""
        return dict(vars(self._line().unit_stats(self.config.unit)))

    async def _call(self, pdu: ModbusPDU) -> ModbusPDU:
        c = self.config
        return await self._line().request(c.unit, pdu, device=self.name, timeout_s=c.request_timeout,
                                          retries=c.retries)


class ModbusDriver(_ModbusBase, Driver):
    """Reads the register map with coalesced requests. A block answered with an exception gives
    BAD readings for its points; a silent unit, or one that refuses every block, fails the read."""

    Config = ModbusConfig

    def __init__(self, name: str, config: ModbusConfig, buses: Buses) -> None:
        Driver.__init__(self, name, config, buses)
        self.blocks = plan_reads(config.points, config.max_gap, config.max_registers)
        # Per block, per point: (name, index in the answer, how to decode it), worked out once.
        self._decoders = [_block_decoder(b) for b in self.blocks]

    async def read(self) -> list[Reading]:
        # One turn on the line for the whole poll: the port's lock is FIFO, so when a port is
        # over-subscribed its devices take turns poll by poll (fair shares), whatever the
        # number of blocks each has.
        line = self._line()
        async with line.port.lock:
            return await self._read_blocks(line)

    async def _read_blocks(self, line: ModbusLine) -> list[Reading]:
        c = self.config
        out: list[Reading] = []
        refused: ModbusExceptionError | None = None
        for block, decoder in zip(self.blocks, self._decoders, strict=True):
            try:
                data = await line.read(c.unit, block.fc, block.address, block.count,
                                       device=self.name, timeout_s=c.request_timeout,
                                       retries=c.retries)
            except ModbusExceptionError as exc:
                log.warning("modbus_exception", device=self.name, address=block.address,
                            count=block.count, code=exc.code)
                refused = exc
                ts = now_ms()
                out += [Reading(self.name, n, None, ts, Quality.BAD) for n, _ in block.points]
                continue
            ts = now_ms()
            if len(data) < block.count:
                raise DriverError(self.name, f"modbus unit {self.config.unit}: response has "
                                             f"{len(data)} values, expected {block.count}")
            name = self.name
            for n, i, kind, p in decoder:
                v: Any
                if kind == _PLAIN:  # uint16 as read, or a bit
                    v = data[i]
                elif kind == _SIGNED:
                    v = data[i]
                    if v & 0x8000:
                        v -= 0x10000
                else:
                    v = decode_value(data[i:i + p.width], p)
                    if v is None:
                        out.append(Reading(name, n, None, ts, Quality.BAD))
                        continue
                out.append(Reading(name, n, v, ts))
        if refused is not None and all(r.quality == Quality.BAD for r in out):
            raise refused  # nothing readable: the device is failing, not just one register
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusWriterConfig(ModbusConfig):
    verify: bool = True  # read the value back after writing

    def __post_init__(self) -> None:
        ModbusConfig.__post_init__(self)
        bad = [n for n, p in self.points.items() if p.function not in ("coil", "holding")]
        if bad:
            raise ValueError(f"points {bad} are read-only (function must be coil or holding)")


class ModbusWriter(_ModbusBase, Actuator):
    """Writes coils and holding registers by point name, with the point's type and scaling.

    Actions: `write` with params `point` and `value`; or the point's name with param `value`.
    """

    Config = ModbusWriterConfig

    def __init__(self, name: str, config: ModbusWriterConfig, buses: Buses) -> None:
        Actuator.__init__(self, name, config, buses)
        self.last: dict[str, Any] = {}

    config: ModbusWriterConfig

    @classmethod
    def known_actions(cls, config: ModbusWriterConfig) -> frozenset[str]:
        return frozenset({"write", *config.points})

    async def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        point_name = params.get("point") if action == "write" else action
        p = self.config.points.get(point_name) if isinstance(point_name, str) else None
        if p is None or not isinstance(point_name, str):
            raise ActionError(self.name, f"unknown point {point_name!r} (known: "
                                         f"{', '.join(self.config.points)})")
        if "value" not in params:
            raise ActionError(self.name, "missing param 'value'")
        try:
            raw = encode_value(params["value"], p)
        except ValueError as exc:
            raise ActionError(self.name, f"{point_name}: {exc}") from exc
        pdu: ModbusPDU
        if p.function == "coil":
            pdu = WriteSingleCoilRequest(address=p.address, bits=[bool(raw[0])])
        elif len(raw) == 1:
            pdu = WriteSingleRegisterRequest(address=p.address, registers=[int(raw[0])])
        else:
            pdu = WriteMultipleRegistersRequest(address=p.address, registers=[int(r) for r in raw])
        await self._call(pdu)
        result: dict[str, Any] = {"point": point_name, "value": params["value"]}
        if self.config.verify:
            block = plan_reads({point_name: p})[0]
            back = await self._call(_READ_PDU[block.fc](address=block.address, count=block.count))
            got = decode_response(block, back)[point_name]
            expected = decode_value(raw, p)
            if got != expected:
                raise ActionError(self.name, f"{point_name}: read back {got!r} after writing {expected!r}")
            result["readback"] = got
        self.last[point_name] = result.get("readback", params["value"])
        return result

    def state(self) -> dict[str, Any]:
        return {"last_written": dict(self.last)}


