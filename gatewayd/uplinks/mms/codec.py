"""MMS wire codec: readings to messages, envelopes, and what an answer means.

Pure functions and small types, no I/O: the uplink and the transports share them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from drivers.base import Reading
from gatewayd.uplinks.base import Item
from gatewayd.uplinks.mms.config import MessageMap

# The answer texts the protocol notes quote (mms.md, A.2), as the server words them.
_SUCCESS_RE = re.compile(r"^\d+ message\(s\) (received|accepted)", re.IGNORECASE)
_REFUSED_RE = re.compile(r"^Parse error\. Expected|doesn't conform to the given message type")
_FAILED_RE = re.compile(r"^Processing \d+ message\(s\) .*failed$")


def encode_ts(ts_ms: int, fmt: str) -> int | str:
    """A sampling time as epoch seconds (default), epoch ms, or ISO 8601 UTC with ms."""
    if fmt == "ms":
        return ts_ms
    if fmt == "iso":
        dt = datetime.fromtimestamp(ts_ms / 1000, UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"
    return ts_ms // 1000


def encode_value(value: Any) -> Any:
    """Numbers, bools and strings go as they are; a struct becomes its JSON text."""
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return value


def _sensor(r: Reading) -> str:
    return f"{r.device}.{r.point}"


_SOURCES: dict[str, Callable[[Reading], Any]] = {
    "value": lambda r: encode_value(r.value),
    "sensor": _sensor,
    "quality": lambda r: int(r.quality),
    "device": lambda r: r.device,
    "point": lambda r: r.point,
}


class Mapper:
    """Turns leased items into messages grouped by message type, per the configured maps."""

    def __init__(self, maps: Iterable[MessageMap]) -> None:
        self.maps = list(maps)
        self._routes: dict[tuple[str, str], MessageMap | None] = {}
        self._plans = {id(m): (tuple((n, _SOURCES[s]) for n, s in m.field_sources().items()),
                               m.timestamp_field, m.timestamp_format) for m in self.maps}

    def route(self, reading: Reading) -> MessageMap | None:
        """The first map that takes this reading, or None (cached per device and point)."""
        key = (reading.device, reading.point)
        try:
            return self._routes[key]
        except KeyError:
            m = self._routes[key] = next((m for m in self.maps if m.matches(reading)), None)
            return m

    def runs(self, items: Iterable[Item]) -> list[tuple[str | None, list[Item], list[dict[str, Any]]]]:
        """(message type or None if no map takes them, items, message bodies) for each run of
        consecutive items of one message type, in seq order."""
        out: list[tuple[str | None, list[Item], list[dict[str, Any]]]] = []
        current: str | bool | None = False  # no run yet
        run_items: list[Item] = []
        bodies: list[dict[str, Any]] = []
        wide: dict[tuple[int, str, int], dict[str, Any]] = {}
        routes = self._routes
        for it in items:
            r = it.reading
            m = routes.get((r.device, r.point)) or self.route(r)
            mtype = m.message_type if m is not None else None
            if mtype != current:
                run_items, bodies, wide = [], [], {}
                out.append((mtype, run_items, bodies))
                current = mtype
            run_items.append(it)
            if m is None:
                continue
            if m.point_fields:
                key = (id(m), r.device, r.ts_ms)
                target = m.point_fields[r.point]
                body = wide.get(key)
                if body is None or target in body:
                    body = wide[key] = self._base(m, r)
                    bodies.append(body)
                body[target] = encode_value(r.value)
            else:
                bodies.append(self._base(m, r))
        return out

    def _base(self, m: MessageMap, r: Reading) -> dict[str, Any]:
        sources, ts_field, ts_format = self._plans[id(m)]
        body = {name: get(r) for name, get in sources}
        if ts_field:
            body[ts_field] = r.ts_ms // 1000 if ts_format == "s" else encode_ts(r.ts_ms, ts_format)
        return body


# -- answers --------------------------------------------------------------------------------------


class Kind(Enum):
    OK = "ok"
    PENDING = "pending"  # 202 on a sync send: not confirmed
    REJECTED = "rejected"  # 400 with a JSON `msg`: the documented refusal of a payload
    AUTH = "auth"  # 401/403
    TRANSIENT = "transient"  # 5xx, timeouts, pages that are not JSON, other statuses: retry
    UNKNOWN = "unknown"  # a WebSocket answer frame whose meaning is not recognised


@dataclass(frozen=True, slots=True)
class Answer:
    kind: Kind
    status: int
    msg: str
    ack_url: str = ""
    retry_after_s: float = 0.0


def parse_json(text: str | bytes) -> Any:
    """The JSON value of `text`, or None if it is not JSON (or nests too deep to decode)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def classify(status: int, text: str, mode: str) -> Answer:
    """One HTTP answer as an `Answer`; only a documented refusal (400 with a JSON `msg`) rejects."""
    body = parse_json(text) if text else None
    msg = body.get("msg") if isinstance(body, dict) else None
    msg = msg if isinstance(msg, str) else text[:200]
    if status in (401, 403):
        return Answer(Kind.AUTH, status, msg or f"HTTP {status}")
    if not isinstance(body, dict):
        return Answer(Kind.TRANSIENT, status, f"HTTP {status} with a non-JSON body (a login page?)")
    if status == 200 or (status == 202 and mode == "async"):
        return Answer(Kind.OK, status, msg)
    if status == 202:
        retry = body.get("retryAfterHeaderValue")
        try:
            retry_s = min(max(float(retry), 0.0), 3600.0) if retry is not None else 0.0
        except (TypeError, ValueError, OverflowError):
            retry_s = 0.0
        retry_s = 0.0 if retry_s != retry_s else retry_s  # NaN
        url = msg if msg.startswith(("http://", "https://")) else ""
        return Answer(Kind.PENDING, status, msg, url, retry_s)
    if status == 400 and isinstance(body.get("msg"), str):
        return Answer(Kind.REJECTED, status, msg)
    return Answer(Kind.TRANSIENT, status, msg or f"HTTP {status}")


def frame_code(obj: dict[str, Any]) -> int | None:
    """The HTTP-like status an answer frame states in `code` ([open]), if it states one."""
    code = obj.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.strip().isdigit() and len(code.strip()) == 3:
        return int(code)
    return None


def classify_frame(obj: dict[str, Any], mode: str) -> Answer:
    """A WebSocket answer frame. [open]: its shape. With a `code`, that status decides; without
    one, only the documented texts do (success, "Parse error" / "doesn't conform" refusals,
    "Processing ... failed", the 202 ack URL). Anything else is UNKNOWN, never a refusal."""
    raw = obj.get("msg")
    msg = raw if isinstance(raw, str) else ""
    code = frame_code(obj)
    if code is None:
        if _SUCCESS_RE.match(msg):
            code = 200
        elif _REFUSED_RE.search(msg):
            code = 400
        elif _FAILED_RE.match(msg):
            code = 500
        elif "retryAfterHeaderValue" in obj:
            code = 202
        else:
            return Answer(Kind.UNKNOWN, 0, msg[:200] or json.dumps(obj)[:200])
    answer = classify(code, json.dumps(obj), mode)
    if answer.kind is Kind.TRANSIENT and code < 500 and code not in (408, 429):
        return Answer(Kind.UNKNOWN, code, answer.msg)
    return answer


def ack_confirms(body: Any, sequence: str) -> bool:
    """Whether an ack answer reports success for `sequence` ([open]: accepts several shapes)."""
    entries = body if isinstance(body, list) else [body]
    for e in entries:
        if not isinstance(e, dict):
            continue
        if e.get("sequence") not in (None, sequence):
            continue
        status = e.get("status")
        if status in (200, "200") or str(status).upper() in (
            "SUCCESS",
            "OK",
            "PROCESSED",
            "DELIVERED",
        ):
            return True
    return False


def envelope(mode: str, message_type: str, messages: list[dict[str, Any]]) -> str:
    return json.dumps(
        {"mode": mode, "messageType": message_type, "messages": messages}, separators=(",", ":")
    )


# -- pushes ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandFields:
    """Which fields of a toDevice message name the action, the local device and the cloud's id."""

    command_types: tuple[str, ...]
    action_field: str
    device_field: str
    id_field: str
    command_device: str


@dataclass(frozen=True, slots=True)
class PushCommand:
    """A pushed message read as a command (`problem` empty), or why it is none."""

    id: str
    device: str = ""
    action: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    problem: str = ""


def read_pushes(envelopes: list[Any], f: CommandFields, arrival: str) -> list[PushCommand]:
    """Pushed envelopes (in issue order) as commands. Never raises.

    Pushes carry no id (mms.md A.4), and MMS delivers each once (a GET drains, a socket push is
    sent once), so a message without the `id_field` gets an id unique to its arrival
    (`arrival` plus its ordinal): a deliberate repeat runs again. A message that names an id
    keeps it, and the dispatcher then runs a redelivery of the same id and content once.
    """
    out: list[PushCommand] = []
    ordinal = 0
    for env in envelopes:
        if not isinstance(env, dict) or not isinstance(env.get("messages"), list):
            out.append(PushCommand(_content_id(env, arrival, ordinal), problem="not a push envelope"))
            ordinal += 1
            continue
        mtype = env.get("messageType")
        for message in env["messages"]:
            out.append(_read_one(mtype, env.get("sender"), message, f, _content_id(
                [mtype, message], arrival, ordinal)))
            ordinal += 1
    return out


def _read_one(mtype: Any, sender: Any, message: Any, f: CommandFields, synthetic: str) -> PushCommand:
    cmd_id = synthetic
    if isinstance(message, dict):
        own = message.get(f.id_field)
        if isinstance(own, str | int) and not isinstance(own, bool) and str(own):
            cmd_id = str(own)[:200]
    if mtype not in f.command_types:
        return PushCommand(cmd_id, problem=f"message type {str(mtype)[:60]!r} is not a command type")
    if not isinstance(message, dict):
        return PushCommand(cmd_id, problem="a command message must be an object")
    action = message.get(f.action_field)
    if not isinstance(action, str) or not action:
        return PushCommand(cmd_id, problem=f"missing action field {f.action_field!r}")
    device = f.command_device
    if f.device_field and isinstance(message.get(f.device_field), str):
        device = message[f.device_field]
    reserved = {f.action_field, f.id_field, f.device_field}
    params = {k: v for k, v in message.items() if k not in reserved and v is not None}
    return PushCommand(cmd_id, device, action, params)


def _content_id(content: Any, arrival: str, ordinal: int) -> str:
    try:
        text = json.dumps(content, sort_keys=True, default=str)
    except (ValueError, RecursionError):
        text = repr(type(content))
    return f"mms-{hashlib.sha256(text.encode()).hexdigest()[:12]}-{arrival}-{ordinal}"
