"""Operations Hub wire codec: metrics to publish messages, what a publish or subscribe answer
means, command strings. Pure functions and small types, no I/O."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.base import Value
from gatewayd.uplinks.base import Item
from gatewayd.uplinks.opshub.config import _OFFSET_RE

_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no"}


def primary_mac() -> str:
    """MAC of the interface holding the default route, as "01-23-45-67-89-ab".

    Falls back to the first non-loopback interface with a MAC, then to `uuid.getnode()`.
    """
    candidates: list[str] = []
    try:
        # /proc/self/net, not /proc/net: the unit's ProcSubset=pid hides the /proc/net link.
        for line in Path("/proc/self/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "00000000":
                candidates.append(fields[0])
    except OSError:
        pass
    net = Path("/sys/class/net")
    try:
        candidates += sorted(p.name for p in net.iterdir() if p.name != "lo")
    except OSError:
        pass
    for name in candidates:
        try:
            mac = (net / name / "address").read_text().strip().lower()
        except OSError:
            continue
        if re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac) and mac != "00:00:00:00:00:00":
            return mac.replace(":", "-")
    node = uuid.getnode()
    return "-".join(f"{(node >> s) & 0xFF:02x}" for s in range(40, -1, -8))


class TimeFormat:
    """Formats epoch milliseconds as the page's `YYYY-MM-DDThh:mm:ss.sss±TZ`."""

    def __init__(self, utc_offset: str = "+00:00") -> None:
        m = _OFFSET_RE.match(utc_offset)
        if m is None:
            raise ValueError(f"bad utc offset {utc_offset!r}")
        sign = -1 if m.group(1) == "-" else 1
        self.offset_ms = sign * (int(m.group(2)) * 3600 + int(m.group(3)) * 60) * 1000
        self.suffix = utc_offset

    def __call__(self, ts_ms: int) -> str:
        """Raises ValueError (or OverflowError) for a time outside years 1..9999."""
        sec, ms = divmod(int(ts_ms) + self.offset_ms, 1000)
        t = time.gmtime(sec)
        if not 1 <= t.tm_year <= 9999:
            raise ValueError(f"timestamp {ts_ms} is outside years 1-9999")
        return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:"
                f"{t.tm_sec:02d}.{ms:03d}{self.suffix}")


def format_value(value: Value) -> tuple[str, str]:
    """(val, default data_type) for a reading value; the page sends every value as a string."""
    if isinstance(value, bool):
        return ("true" if value else "false"), "String"
    if isinstance(value, int):
        return str(value), "Number"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value)), "Number"  # 100.0 -> "100", as the page writes numbers
        return repr(value), "Number"
    if value is None:
        return "", "String"
    if isinstance(value, str):
        return value, "String"
    return json.dumps(value, separators=(",", ":"), sort_keys=True), "String"


def command_key(dc: str, command: str, ordinal: int) -> str:
    """The dedupe key of a polled command, which carries no id of its own: a hash of its
    channel, its string and its ordinal among identical commands in the same poll answer."""
    return hashlib.sha256(f"{dc}\n{command}\n{ordinal}".encode()).hexdigest()[:20]


_UNQUOTED_KEY = re.compile(r'([{,]\s*)([A-Za-z_]\w*)\s*:')
_UNOPENED_VALUE = re.compile(r':\s*([A-Za-z_]\w*)"')


def loads_lenient(text: str) -> Any:
    """json.loads, then a second try that repairs the vendor page's own typos.

    The page writes a command list as `{"request_type":command_list", commands: [...]}` (a
    missing quote and an unquoted key); a server built from that page may do the same.
    Raises ValueError if the text is not JSON even after the repair.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    repaired = _UNOPENED_VALUE.sub(r':"\1"', _UNQUOTED_KEY.sub(r'\1"\2":', text))
    try:
        return json.loads(repaired)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


@dataclass(slots=True)
class Metric:
    """One metric ready to publish: its channel, time, position and `mets` entry."""

    item: Item | None  # None for command results (not from the queue)
    dc: str
    time: str
    position: tuple[tuple[str, str], ...]  # (("alt", ..), ("lat", ..), ("long", ..)) present ones
    met: dict[str, str]


def build_messages(metrics: Sequence[Metric], cloud: str) -> list[dict[str, Any]]:
    """Publish `messages`: one per channel (first-seen order), one `data` entry per time and
    position within it, keys in the page's order."""
    channels: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[dict[str, str]]]] = {}
    for m in metrics:
        channels.setdefault(m.dc, {}).setdefault((m.time, m.position), []).append(m.met)
    return [{"dc": dc, "cloud": cloud,
             "data": [{**dict(pos), "time": t, "mets": mets} for (t, pos), mets in entries.items()]}
            for dc, entries in channels.items()]


def publish_verdicts(answer: Any, channels: Sequence[str]) -> tuple[dict[str, bool], bool]:
    """(channel -> accepted, one object for several channels) from a publish answer.

    [open]: how a publish of several channels is answered. An array names each channel it
    answers. A single object answers one channel for sure: the one it names, or the only one
    published; for a publish of several channels it says nothing sure of the others (the flag
    is then True). Code "1" accepts, "0" refuses; any other code, and a channel not named,
    gets no verdict: the caller sends those again.
    """
    single = not isinstance(answer, list)
    verdicts: dict[str, bool] = {}
    for a in [answer] if single else answer:
        hs = a.get("handshake") if isinstance(a, dict) else None
        if not isinstance(hs, dict) or hs.get("stage") != "publish":
            continue
        code = str(hs.get("code")).strip()
        if code not in ("0", "1"):
            continue
        dc = hs.get("dc")
        if dc is None and single and len(channels) == 1:
            dc = channels[0]
        if isinstance(dc, str) and dc in channels:
            verdicts[dc] = code == "1"
    return verdicts, single and len(channels) > 1


@dataclass(frozen=True, slots=True)
class PolledCommand:
    dc: str
    command: str


def parse_subscribe(answer: Any) -> tuple[list[PolledCommand], list[tuple[str, str]]]:
    """(commands, problems) from a subscribe answer; a problem is (dc or "", reason).

    Accepts `command_list`, `no_commands` (also the page's `" no_commands"`) and `result`.
    """
    payload = answer.get("payload") if isinstance(answer, dict) else None
    if not isinstance(payload, dict):
        return [], [("", "subscribe answer has no payload object")]
    kind = str(payload.get("request_type", "")).strip()
    if kind in ("no_commands", "result"):
        return [], []
    if kind != "command_list":
        return [], [("", f"unknown request_type {payload.get('request_type')!r}")]
    raw = payload.get("commands")
    if not isinstance(raw, list):
        return [], [("", "command_list without a commands array")]
    commands, problems = [], []
    for i, entry in enumerate(raw):
        dc = entry.get("dc") if isinstance(entry, dict) else None
        cmd = entry.get("command") if isinstance(entry, dict) else None
        if isinstance(dc, str) and isinstance(cmd, str):
            commands.append(PolledCommand(dc, cmd))
        else:
            problems.append((dc if isinstance(dc, str) else "",
                             f"commands[{i}] needs string dc and command, got {entry!r:.200}"))
    return commands, problems


def convert(value: str, kind: str) -> Any:
    if kind == "int":
        return int(value, 0)
    if kind == "float":
        return float(value)
    if kind == "bool":
        low = value.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(f"{value!r} is not a boolean")
    return value

