"""EnOS wire format shared by the uplink and the simulator: topics, envelopes, codes, limits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_PAYLOAD_BYTES = 512 * 1024  # hub limit; larger messages are discarded with code 1008
REPLY_SUFFIX = "_reply"

# Codes the hub sends (protocol notes §4.1).
OK = 200
PAYLOAD_FORMAT_ERROR = 1220
EMPTY_PAYLOAD = 1251
METHOD_MISMATCH = 1260
TOO_LARGE = 1008
NO_PERMISSION = 1009
MODEL_MISMATCH = 1204
MEASUREPOINT_FORMAT = 1206
ATTR_UPDATE_FORMAT = 1207
ATTR_QUERY_FORMAT = 1208
ATTR_DELETE_FORMAT = 1209
SUB_DEVICE_NO_PERMISSION = 1212
NOT_GATEWAY = 1200
TOPO_ADD_FAILED = 1255
TOPO_DELETE_FAILED = 1256
DEVICE_KEY_EXISTS = 702
NO_SUCH_DEVICE = 705
DEVICE_DISABLED = 723
NOT_THIS_GATEWAY = 740
SIGN_CHECK_FAILED = 742
MUST_USE_SSL = 746
ACTIVATION_NOT_ALLOWED = 770
SUB_CANNOT_CONNECT = 771

# Codes that name a problem with what was sent: resending the same item can never succeed.
PERMANENT_DATA_CODES = frozenset({MODEL_MISMATCH, MEASUREPOINT_FORMAT, PAYLOAD_FORMAT_ERROR,
                                  TOO_LARGE})
# Login failures that will not heal by themselves (retrying later is still allowed).
PERMANENT_LOGIN_CODES = frozenset({NO_SUCH_DEVICE, DEVICE_DISABLED, NOT_THIS_GATEWAY,
                                   SIGN_CHECK_FAILED, MUST_USE_SSL, ACTIVATION_NOT_ALLOWED})

# Device-defined command reply codes must be >= 2000 (SDKs warn below that).
DEVICE_CODE_BASE = 2000


def sys_topic(pk: str, dk: str, suffix: str) -> str:
    """`/sys/{pk}/{dk}/{suffix}`: thing data and commands of one device."""
    return f"/sys/{pk}/{dk}/{suffix}"


def session_topic(pk: str, dk: str, suffix: str) -> str:
    """`/ext/session/{pk}/{dk}/{suffix}`: gateway sessions (`combine.*`) and activation."""
    return f"/ext/session/{pk}/{dk}/{suffix}"


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed EnOS topic: root ("sys" or "session"), device and the rest of the path."""

    root: str
    pk: str
    dk: str
    path: str  # e.g. "thing/measurepoint/post/batch", without a "_reply" suffix
    reply: bool

    @classmethod
    def parse(cls, topic: str) -> Topic | None:
        """None if `topic` is not under `/sys/{pk}/{dk}/` or `/ext/session/{pk}/{dk}/`."""
        reply = topic.endswith(REPLY_SUFFIX)
        if reply:
            topic = topic[: -len(REPLY_SUFFIX)]
        parts = topic.split("/")
        if len(parts) >= 5 and parts[0] == "" and parts[1] == "sys":
            root, pk, dk, rest = "sys", parts[2], parts[3], parts[4:]
        elif len(parts) >= 6 and parts[0] == "" and parts[1:3] == ["ext", "session"]:
            root, pk, dk, rest = "session", parts[3], parts[4], parts[5:]
        else:
            return None
        if not pk or not dk or not all(rest):
            return None
        return cls(root, pk, dk, "/".join(rest), reply)

    @property
    def method(self) -> str:
        """The method this path implies, e.g. `thing.measurepoint.post.batch`."""
        return self.path.replace("/", ".")


class EnvelopeError(ValueError):
    """A payload is not a usable EnOS envelope; `code` is the hub code that names why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8 (non-ASCII kept as is: smaller than \\u escapes)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def request(msg_id: str, method: str, params: Any, version: str = "1.0",
            **top_level: Any) -> bytes:
    """A request or command envelope `{id, version, method, params, **top_level}`."""
    return dumps({"id": msg_id, "version": version, "method": method, **top_level,
                  "params": params})


def reply(msg_id: str, code: int, data: Any = None, message: str = "") -> bytes:
    """A reply envelope `{id, code, data, message}`; `id` is echoed as the same string."""
    return dumps({"id": msg_id, "code": code, "data": {} if data is None else data,
                  "message": message})


def parse_envelope(payload: bytes) -> dict[str, Any]:
    """Decode a JSON object payload. Raises EnvelopeError with 1251 (empty) or 1220 (not JSON)."""
    if not payload:
        raise EnvelopeError(EMPTY_PAYLOAD, "empty payload")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(PAYLOAD_FORMAT_ERROR, f"payload format error: {exc}") from None
    except RecursionError:  # deeply nested JSON: an error reply, never a traceback
        raise EnvelopeError(PAYLOAD_FORMAT_ERROR, "payload format error: nested too deeply") \
            from None
    if not isinstance(obj, dict):
        raise EnvelopeError(PAYLOAD_FORMAT_ERROR, "payload format error: not a JSON object")
    return obj


def envelope_id(obj: dict[str, Any]) -> str:
    """The envelope's id as a string ("" if missing); SDKs send strings, tolerate numbers."""
    raw = obj.get("id")
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return str(raw)
    return ""


def reply_code(obj: dict[str, Any]) -> int | None:
    """The int `code` of a reply; numeric strings are accepted (the Python SDK sends them)."""
    code = obj.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.strip().lstrip("-").isdigit():
        return int(code)
    return None
