"""ASCII line instruments on a serial port: a regex with named groups maps a line to points.

Optionally a poll string is sent before each read. Each named group becomes a point, converted
by its field spec (type, scale, offset). The parser is pure and raises nothing but DriverError.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from drivers.base import Buses, Driver, DriverError, Duration, Reading, now_ms
from drivers.scaling import tidy
from drivers.serialport import SerialLinkConfig, SerialPort


@dataclass(frozen=True, slots=True)
class LineField:
    type: Literal["float", "int", "str", "bool"] = "float"
    scale: float = 1.0
    offset: float = 0.0
    point: str = ""  # point name; the group name when empty
    true: list[str] = field(default_factory=lambda: ["1", "ON", "TRUE", "OK", "YES"])  # bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LineConfig(SerialLinkConfig):
    pattern: str  # regex with named groups, e.g. 'T=(?P<temperature_c>-?\d+\.\d+)'
    fields: dict[str, LineField] = field(default_factory=dict)  # per group; default float
    poll: str = ""  # sent before each read when set, e.g. "READ\r"
    terminator: str = "\n"
    encoding: str = "ascii"
    response_timeout: Duration = 1.0
    max_line: int = 1024

    def __post_init__(self) -> None:
        SerialLinkConfig.__post_init__(self)
        try:
            rx = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc
        if not rx.groupindex:
            raise ValueError("pattern has no named groups: use (?P<point>...)")
        unknown = set(self.fields) - set(rx.groupindex)
        if unknown:
            raise ValueError(f"fields {sorted(unknown)} are not groups of the pattern")
        if not self.terminator:
            raise ValueError("terminator must not be empty")
        try:
            "".encode(self.encoding)
        except LookupError as exc:
            raise ValueError(f"unknown encoding {self.encoding!r}") from exc


def parse_line(line: bytes, rx: re.Pattern[str], fields: dict[str, LineField], encoding: str,
               device: str = "line") -> dict[str, Any]:
    """{point: value} from one line. Raises DriverError if it does not match or convert."""
    text = line.decode(encoding, "replace").strip("\r\n")
    m = rx.search(text)
    if m is None:
        raise DriverError(device, f"line does not match the pattern: {text[:80]!r}")
    out: dict[str, Any] = {}
    for group, raw in m.groupdict().items():
        if raw is None:
            continue  # optional group absent from this line
        spec = fields.get(group, LineField())
        out[spec.point or group] = _convert(raw, spec, group, device)
    if not out:
        raise DriverError(device, "line matched but no group captured a value")
    return out


def _convert(raw: str, spec: LineField, group: str, device: str) -> Any:
    raw = raw.strip()
    if spec.type == "str":
        return raw
    if spec.type == "bool":
        return raw.upper() in {t.upper() for t in spec.true}
    try:
        value: float | int = int(raw, 10) if spec.type == "int" else float(raw)
    except ValueError:
        kind = "an int" if spec.type == "int" else "a number"
        raise DriverError(device, f"group {group}: {raw[:40]!r} is not {kind}") from None
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise DriverError(device, f"group {group}: {raw[:40]!r} is not a finite number")
    if spec.scale != 1.0 or spec.offset != 0.0:
        value = tidy(value * spec.scale + spec.offset)
    return value


class LineDriver(Driver):
    """Polls (or waits for) one line per read and maps its groups to points."""

    Config = LineConfig

    def __init__(self, name: str, config: LineConfig, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self.rx = re.compile(config.pattern)
        self.mismatches = 0

    def _port(self) -> SerialPort:
        return self.config.shared_port(self.buses)

    async def open(self) -> None:
        await self._port().ensure_open(self.name)

    async def read(self) -> list[Reading]:
        c = self.config
        port = self._port()
        term = c.terminator.encode(c.encoding)
        async with port.lock:
            await port.ensure_open(self.name)
            port.discard_input()
            if c.poll:
                await port.write(c.poll.encode(c.encoding), self.name)
            deadline = time.monotonic() + c.response_timeout
            while True:
                line = await port.read_until(term, max(0.0, deadline - time.monotonic()),
                                             self.name, c.max_line)
                if not line.strip():
                    continue
                try:
                    values = parse_line(line, self.rx, c.fields, c.encoding, self.name)
                except DriverError:
                    self.mismatches += 1
                    if c.poll:
                        raise  # the answer to our poll was wrong: report it
                    continue  # streaming: wait for the next line
                ts = now_ms()
                return [Reading(self.name, p, v, ts) for p, v in values.items()]

    def stats(self) -> dict[str, int]:
        return {"mismatches": self.mismatches}
