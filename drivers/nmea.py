"""NMEA 0183 GPS receivers on a serial port: GGA and RMC, checksums verified.

Points: `lat`, `long` (decimal degrees, south and west negative), `alt` (m above mean sea level),
`fix_quality` (0 none, 1 GPS, 2 DGPS, ...) and `satellites`. Without a fix the position points
are reported with BAD quality. The parser is pure and raises nothing but `DriverError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from drivers.base import (
    Buses,
    Driver,
    DriverError,
    Duration,
    Quality,
    Reading,
    ReadTimeoutError,
    now_ms,
)
from drivers.serialport import SerialLinkConfig, SerialPort

_PARSE = "nmea"


def _err(message: str) -> DriverError:
    return DriverError(_PARSE, message)


def check_sentence(line: bytes | str) -> list[str]:
    """The comma-separated fields of one sentence (the first is the address, e.g. "GPGGA"),
    after verifying framing and checksum. Leading garbage before '$' is ignored."""
    if isinstance(line, bytes):
        line = line.decode("ascii", "replace")
    start = line.rfind("$")
    if start < 0:
        raise _err("no '$' in line")
    body_end = line.find("*", start)
    if body_end < 0:
        raise _err("missing checksum")
    body = line[start + 1:body_end]
    given = line[body_end + 1:body_end + 3]
    if len(given) != 2 or any(c not in "0123456789abcdefABCDEF" for c in given):
        raise _err(f"malformed checksum {given!r}")
    x = 0
    for ch in body:
        x ^= ord(ch) & 0xFF
    if x != int(given, 16):
        raise _err(f"checksum mismatch: computed {x:02X}, sentence says {given.upper()}")
    fields = body.split(",")
    if len(fields[0]) < 5 or not fields[0].isalnum():
        raise _err(f"bad address field {fields[0]!r}")
    return fields


def _coord(value: str, hemi: str, lat: bool) -> float | None:
    """Decimal degrees from ddmm.mmmm / dddmm.mmmm and N/S/E/W; None when empty."""
    if not value and not hemi:
        return None
    deg_len = 2 if lat else 3
    ok_hemi = ("N", "S") if lat else ("E", "W")
    if hemi not in ok_hemi or len(value) < deg_len + 2 or not value[:deg_len].isdigit():
        raise _err(f"bad coordinate {value!r} {hemi!r}")
    minutes = _float(value[deg_len:], "minutes")
    deg = int(value[:deg_len])
    limit = 90 if lat else 180
    if not 0 <= minutes < 60 or deg + minutes / 60 > limit:
        raise _err(f"coordinate out of range: {value!r}")
    out = deg + minutes / 60
    return round(-out if hemi in ("S", "W") else out, 7)


def _float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise _err(f"bad {what} {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise _err(f"bad {what} {text!r}")
    return v


def _int(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 4:
        raise _err(f"bad {what} {text!r}")
    return int(text)


def parse_gga(fields: list[str]) -> dict[str, Any]:
    """lat, long, alt, fix_quality, satellites from GGA fields (alt None without a fix)."""
    if len(fields) < 10:
        raise _err(f"GGA has {len(fields)} fields, expected at least 10")
    fix = _int(fields[6], "fix quality") if fields[6] else 0
    out: dict[str, Any] = {
        "fix_quality": fix,
        "satellites": _int(fields[7], "satellite count") if fields[7] else 0,
        "lat": _coord(fields[2], fields[3], True),
        "long": _coord(fields[4], fields[5], False),
        "alt": _float(fields[9], "altitude") if fields[9] else None,
    }
    return out


def parse_rmc(fields: list[str]) -> dict[str, Any]:
    """lat, long, valid (status A) from RMC fields."""
    if len(fields) < 7:
        raise _err(f"RMC has {len(fields)} fields, expected at least 7")
    if fields[2] not in ("A", "V"):
        raise _err(f"bad RMC status {fields[2]!r}")
    return {"valid": fields[2] == "A", "lat": _coord(fields[3], fields[4], True),
            "long": _coord(fields[5], fields[6], False)}


def parse_sentence(line: bytes | str) -> tuple[str, dict[str, Any]]:
    """("GGA" | "RMC" | other type, values). Raises DriverError on any malformed input."""
    try:
        fields = check_sentence(line)
        kind = fields[0][2:] if fields[0][0] in "GB" else fields[0][-3:]
        if kind == "GGA":
            return kind, parse_gga(fields)
        if kind == "RMC":
            return kind, parse_rmc(fields)
        return kind, {}
    except DriverError:
        raise
    except Exception as exc:
        raise _err(f"unparsable sentence: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class NMEAConfig(SerialLinkConfig):
    baudrate: int = 9600
    fix_timeout: Duration = 2.5  # how long a read waits for a valid GGA sentence


class NMEADriver(Driver):
    """Each read waits for the next valid GGA sentence (RMC is used for its validity flag)."""

    Config = NMEAConfig

    def __init__(self, name: str, config: NMEAConfig, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self.checksum_errors = 0
        self.sentences = 0

    def _port(self) -> SerialPort:
        return self.config.shared_port(self.buses)

    async def open(self) -> None:
        await self._port().ensure_open(self.name)

    async def read(self) -> list[Reading]:
        port = self._port()
        deadline = time.monotonic() + self.config.fix_timeout
        rmc_valid: bool | None = None
        last_error = "no sentences"
        async with port.lock:
            await port.ensure_open(self.name)
            port.discard_input()  # only sentences that arrive from now on are fresh
            while True:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise ReadTimeoutError(self.name, "deadline passed")
                    line = await port.read_until(b"\n", left, self.name, max_len=1024)
                except ReadTimeoutError as exc:
                    raise ReadTimeoutError(self.name, f"no valid GGA sentence within "
                                                      f"{self.config.fix_timeout:g}s "
                                                      f"({last_error})") from exc
                except DriverError as exc:
                    if port.is_open and "terminator" in exc.message:
                        last_error = exc.message
                        continue
                    raise
                if not line.strip():
                    continue
                try:
                    kind, values = parse_sentence(line)
                except DriverError as exc:
                    self.checksum_errors += "checksum" in exc.message
                    last_error = exc.message
                    continue
                self.sentences += 1
                if kind == "RMC":
                    rmc_valid = values["valid"]
                elif kind == "GGA":
                    return self._readings(values, rmc_valid)

    def _readings(self, v: dict[str, Any], rmc_valid: bool | None) -> list[Reading]:
        ts = now_ms()
        fixed = v["fix_quality"] > 0 and rmc_valid is not False
        out = [Reading(self.name, "fix_quality", v["fix_quality"], ts),
               Reading(self.name, "satellites", v["satellites"], ts)]
        for point in ("lat", "long", "alt"):
            value = v[point]
            if fixed and value is not None:
                out.append(Reading(self.name, point, value, ts))
            else:
                out.append(Reading(self.name, point, None, ts, Quality.BAD))
        return out

    def stats(self) -> dict[str, int]:
        return {"checksum_errors": self.checksum_errors, "sentences": self.sentences}
