"""The EnOS wire format as the simulated hub sees it: topics, envelopes, codes, signs.

Written from the protocol notes (`shared/protocols/enos.md`) alone, independently of the
gateway's client code (`gatewayd/uplinks/enos/`): a mistake in the client must show up as a
refusal here, not be mirrored. `tests/sim/test_independence.py` keeps it that way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# -- limits and topic shapes (notes §2.1, §4.3) -----------------------------------------------
MAX_PAYLOAD_BYTES = 512 * 1024
REPLY_SUFFIX = "_reply"
KEEPALIVE_RANGE_S = (60, 300)  # "allowed heartbeat range" of the newer docs

# -- codes the hub answers with (notes §4.1) --------------------------------------------------
OK = 200
NOT_GATEWAY = 1200
MODEL_MISMATCH = 1204
MEASUREPOINT_FORMAT = 1206
ATTR_UPDATE_FORMAT = 1207
ATTR_QUERY_FORMAT = 1208
ATTR_DELETE_FORMAT = 1209
SUB_DEVICE_NO_PERMISSION = 1212
PAYLOAD_FORMAT_ERROR = 1220
EMPTY_PAYLOAD = 1251
TOPO_ADD_FAILED = 1255
TOPO_DELETE_FAILED = 1256
METHOD_MISMATCH = 1260
TOO_LARGE = 1008
NO_PERMISSION = 1009
DEVICE_KEY_EXISTS = 702
NO_SUCH_DEVICE = 705
DEVICE_DISABLED = 723
NOT_THIS_GATEWAY = 740
SIGN_CHECK_FAILED = 742
MUST_USE_SSL = 746
ACTIVATION_NOT_ALLOWED = 770
SUB_CANNOT_CONNECT = 771


def sys_topic(pk: str, dk: str, rest: str) -> str:
    return "/sys/" + pk + "/" + dk + "/" + rest


def session_topic(pk: str, dk: str, rest: str) -> str:
    return "/ext/session/" + pk + "/" + dk + "/" + rest


@dataclass(frozen=True, slots=True)
class Topic:
    """`/sys/{pk}/{dk}/{path}` (root "sys") or `/ext/session/{pk}/{dk}/{path}` (root
    "session"); `reply` tells a `_reply` topic, whose suffix is not part of `path`."""

    root: str
    pk: str
    dk: str
    path: str
    reply: bool

    @classmethod
    def parse(cls, name: str) -> Topic | None:
        is_reply = name.endswith(REPLY_SUFFIX)
        base = name[:len(name) - len(REPLY_SUFFIX)] if is_reply else name
        if base.startswith("/sys/"):
            root, segments = "sys", base[len("/sys/"):].split("/")
        elif base.startswith("/ext/session/"):
            root, segments = "session", base[len("/ext/session/"):].split("/")
        else:
            return None
        if len(segments) < 3 or any(s == "" for s in segments):
            return None
        return cls(root, segments[0], segments[1], "/".join(segments[2:]), is_reply)

    @property
    def method(self) -> str:
        """The method a request on this topic names: its path with dots (notes §2.2)."""
        return ".".join(self.path.split("/"))


# -- envelopes (notes §3.1) ------------------------------------------------------------------


class EnvelopeError(ValueError):
    """A payload the hub cannot read as an envelope; `code` is the hub's answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def request(msg_id: str, method: str, params: Any) -> bytes:
    """A command the hub pushes: `{id, version, method, params}`."""
    return _json({"id": msg_id, "version": "1.0", "method": method, "params": params})


def reply(msg_id: str, code: int, data: Any = None, message: str = "") -> bytes:
    """The hub's answer: the request's id as the same string, an int code."""
    return _json({"id": msg_id, "code": code, "data": {} if data is None else data,
                  "message": message})


def parse_envelope(payload: bytes) -> dict[str, Any]:
    if len(payload) == 0:
        raise EnvelopeError(EMPTY_PAYLOAD, "empty payload")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EnvelopeError(PAYLOAD_FORMAT_ERROR, "Payload format error") from None
    if not isinstance(obj, dict):
        raise EnvelopeError(PAYLOAD_FORMAT_ERROR, "Payload format error: not an object")
    return obj


def envelope_id(obj: Mapping[str, Any]) -> str:
    """The id to echo: SDKs send strings; a number is echoed as its decimal text."""
    value = obj.get("id")
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return ""


def peek_id(payload: bytes) -> str:
    """The id of a payload too large to be parsed as a whole, if it can be found cheaply:
    SDK envelopes start `{"id":"…"` (notes §3.1), so the first bytes are enough."""
    head = payload[:256]
    key = head.find(b'"id"')
    if key < 0:
        return ""
    rest = head[key + 4:].lstrip()
    if not rest.startswith(b":"):
        return ""
    rest = rest[1:].lstrip()
    if rest.startswith(b'"'):
        end = rest.find(b'"', 1)
        if end > 0 and b"\\" not in rest[1:end]:
            return rest[1:end].decode("utf-8", "replace")
        return ""
    digits = bytearray()
    for b in rest:
        if chr(b).isdigit():
            digits.append(b)
        else:
            break
    return digits.decode() if digits else ""


def reply_code(obj: Mapping[str, Any]) -> int | None:
    """A device reply's code: an int, or a numeric string (the Python SDK, notes §3.6)."""
    code = obj.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str):
        text = code.strip()
        if text[:1] == "-":
            text = text[1:]
        if text.isdigit():
            return int(code.strip())
    return None


def sign_text(value: Any) -> str | None:
    """A sign input (clientId, timestamp) as the string that was signed, or None if unusable.

    The Node SDK sends `timestamp` as a JSON number and signs its decimal text; the others send
    a string (issue 12). An integral float is written without a fraction, as JavaScript does.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


# -- signs (notes §1.2-§1.6) -----------------------------------------------------------------

_HASHES = {"sha256": "sha256", "hmacsha256": "sha256", "sha1": "sha1", "hmacsha1": "sha1",
           "md5": "md5", "hmacmd5": "md5"}


def expected_sign(fields: Mapping[str, str], secret: str, method: str) -> str | None:
    """The plain (not HMAC) hash of the sorted key+value text with the secret appended, hex;
    None for an unknown sign method."""
    algorithm = _HASHES.get(method.strip().lower())
    if algorithm is None:
        return None
    text = "".join(k + fields[k] for k in sorted(fields)) + secret
    return hashlib.new(algorithm, text.encode("utf-8")).hexdigest()


def sign_ok(pk: str, dk: str, client_id: str, timestamp: str, secret: str, method: str,
            given: str) -> bool:
    """Check a device sign: productKey, deviceKey, clientId and timestamp, nothing else
    (notes §1.4; for sub-devices §3.5), compared without regard to hex case."""
    want = expected_sign({"productKey": pk, "deviceKey": dk, "clientId": client_id,
                          "timestamp": timestamp}, secret, method)
    return want is not None and hmac.compare_digest(want, given.strip().lower())


def split_client_id(raw: str) -> tuple[str, dict[str, str]]:
    """`<signClientId>|k=v,k=v|` -> (signClientId, {k: v}). The sign clientId runs to the
    first `|` (it may hold braces and commas, Java 2.3); the attributes sit before the last
    `|`, in any order, with spaces tolerated. ValueError if the shape is wrong."""
    first, last = raw.find("|"), raw.rfind("|")
    if first <= 0 or last == first or last != len(raw) - 1:
        raise ValueError(f"client id {raw!r} is not <id>|attributes|")
    attributes: dict[str, str] = {}
    for item in raw[first + 1:last].split(","):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"client id attribute {item!r} has no value")
        attributes[name.strip().lower()] = value.strip()
    return raw[:first], attributes
