"""A strict simulator of the SAP HCP IoT MMS v1 (Neo) device API, for tests, benches and `make run`.

It follows `shared/protocols/mms.md` §A.11:
- routes under `/com.sap.iotservices.mms/v1/api/`: `POST/GET http/data/{dev}`, the URL-parameter
  variant `POST http/data/{dev}/{type}/{mode}[/{seq}]`, `POST http/ack/{dev}[/{seq}]`,
  `POST http/push/{dev}` (Basic user or bearer app token), `GET/PUT http/config` and the
  WebSocket `ws/data/{dev}` with the device's Bearer token on the upgrade;
- a registry of message types (id, direction, ordered typed fields), device types and devices,
  seeded with the cockpit defaults (`m0t0y0p0e1`, `m0t0y0p0e3`, device
  `d000-e000-v000-i000-c000-e001`) plus two gatewayd types for command results and commands;
- strict validation with the real error bodies, typed storage (`G_DEVICE`, `G_CREATED`, `C_*`);
- a push queue per device: `method:"http"` is stored and drained newest first by a GET,
  `method:"ws"` goes to the live socket, or is dropped (or stored, `ws_push_offline="store"`);
- fault injection switchable at run time (`inject()`, or the control route `/sim/faults`).

Control and read-back routes (no auth; a bench tool bound to localhost):
- `GET /sim/rows/{messageType}?device=&limit=` → `{"table", "count", "rows"}`;
- `GET /sim/tables` → row counts per message type;
- `GET|POST|DELETE /sim/faults` → current faults / set `{"name": spec}` / clear all;
- `POST /sim/message-types`, `POST /sim/devices` → extend the registry at run time;
- `GET /sim/stats` → answers per route and status.

Behaviours the protocol leaves open are marked [open] and chosen here; see the report.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import math
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from gatewayd_sim.kit import (
    EXIT_USAGE,
    Changes,
    Fault,
    Faults,
    PortHold,
    add_fault_routes,
    serve,
)

log = structlog.get_logger("gatewayd_sim.mms")

API_BASE = "/com.sap.iotservices.mms/v1/api"

# Cockpit defaults, so SAP's sample programs work unchanged.
DEFAULT_DEVICE_ID = "d000-e000-v000-i000-c000-e001"
DEFAULT_DEVICE_TYPE = "d000-e000-v000-i000-c000-e000"
DEFAULT_TOKEN = "e7a3c1f0b5d94e2a8c6f1b3d5a7e9c02"  # [open] the cockpit shows it once; ours is fixed
DEFAULT_FROM_TYPE = "m0t0y0p0e1"
DEFAULT_TO_TYPE = "m0t0y0p0e3"
# gatewayd's own types: results of commands (fromDevice) and addressed commands (toDevice).
RESULT_TYPE = "g0a0t0e0w0a0y0r0e0s1"
COMMAND_TYPE = "g0a0t0e0w0a0y0c0m0d1"
# [open] the real server's answer texts for async sends and most refusals. "other" wording
# answers with these instead of the texts the protocol notes quote, so a client that reads
# meaning into our own wording fails the tests.
OTHER_WORDING = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request: invalid payload",
    500: "Internal Server Error",
}
WORDINGS = ("notes", "other")

FIELD_TYPES = ("string", "integer", "long", "float", "double", "boolean", "date", "binary")
_INT_RANGES = {"integer": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_INT_RE = re.compile(r"^\s*[+-]?\d+\s*$")

MSG_PARSE_TYPE = "Parse error. Expected [messageType] of type [string]"
MSG_NOT_CONFORM = "The message doesn't conform to the given message type"
MSG_UNAUTHORIZED = "Access to the requested resource is not authorized (HTTP 401)"
HTML_LOGIN = (
    "<!DOCTYPE html><html><head><title>Logon</title></head><body>"
    '<form method="post" action="/saml2/sp/acs"><input name="j_username">'
    '<input name="j_password" type="password"><button>Log On</button></form></body></html>'
)

ROUTES = ("post_data", "post_params", "get_data", "post_ack", "post_push", "ws_data", "ws_frame")
FAULTS = {
    "sync_202": "a sync send answers 202 with an ack URL and retryAfterHeaderValue (opt: stored)",
    "error_500": "a send answers 500 'Processing ... failed', nothing stored (opt: match, a text"
    " the request must contain, for a payload that fails every time)",
    "html_200": "any device or push HTTP route answers 200 with an HTML login page",
    "slow": "store, then answer only after delay_s (opt: delay_s, default 5)",
    "ws_close": "close the WebSocket on the next frame (opt: stored, default true)",
    "refuse_upgrade": "refuse the WebSocket upgrade with 401 (opt: status)",
    "no_pong": "the next WebSocket connection never answers pings (a half-open link)",
    "drop_get": "drain the push queue on GET, then drop the connection without answering",
}


class Rejected(Exception):
    """A request the server refuses: HTTP status and the `msg` text."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


# -- registry -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldDef:
    position: int
    name: str
    type: str
    max_length: int = 255  # strings only; the cockpit's default

    @property
    def column(self) -> str:
        return "C_" + self.name.upper()


@dataclass(frozen=True, slots=True)
class MessageType:
    id: str
    direction: str  # "fromDevice", "toDevice" or "bidirectional"
    fields: tuple[FieldDef, ...]

    def by_name(self) -> dict[str, FieldDef]:
        return {f.name: f for f in self.fields}

    def allows(self, direction: str) -> bool:
        return self.direction in (direction, "bidirectional")

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MessageType:
        """Build from the RDMS-like shape `{id, direction, fields:[{position,name,type}]}`."""
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise ValueError("a message type needs a string 'id'")
        direction = obj.get("direction", "fromDevice")
        if direction not in ("fromDevice", "toDevice", "bidirectional"):
            raise ValueError(f"direction must be fromDevice, toDevice or bidirectional, got {direction!r}")
        fields = []
        for i, f in enumerate(obj.get("fields") or [], start=1):
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise ValueError("each field needs a string 'name'")
            ftype = f.get("type", "string")
            if ftype not in FIELD_TYPES:
                raise ValueError(f"field {f['name']}: unknown type {ftype!r}")
            fields.append(FieldDef(int(f.get("position", i)), f["name"], ftype, int(f.get("maxLength", 255))))
        fields.sort(key=lambda f: f.position)
        return cls(obj["id"], direction, tuple(fields))


def _fields(*spec: tuple[str, str]) -> tuple[FieldDef, ...]:
    return tuple(FieldDef(i, name, ftype) for i, (name, ftype) in enumerate(spec, start=1))


def default_message_types() -> list[MessageType]:
    """The cockpit's built-in types plus gatewayd's result and command types."""
    return [
        MessageType(
            DEFAULT_FROM_TYPE,
            "fromDevice",
            _fields(("sensor", "string"), ("value", "string"), ("timestamp", "long")),
        ),
        MessageType(DEFAULT_TO_TYPE, "toDevice", _fields(("opcode", "string"), ("operand", "string"))),
        MessageType(
            RESULT_TYPE,
            "fromDevice",
            _fields(
                ("cmd_id", "string"),
                ("ok", "boolean"),
                ("code", "integer"),
                ("message", "string"),
                ("timestamp", "long"),
            ),
        ),
        MessageType(
            COMMAND_TYPE,
            "toDevice",
            _fields(
                ("cmd_id", "string"),
                ("device", "string"),
                ("action", "string"),
                ("value", "string"),
            ),
        ),
    ]


# -- typing ---------------------------------------------------------------------------------------


def coerce(fdef: FieldDef, value: Any) -> Any:
    """Convert one JSON value to the field's type, as MMS does; raises ValueError if it can't.

    Numeric strings are accepted for numeric fields (clients often send them); `date` accepts
    epoch seconds (number or numeric string) or ISO 8601 and is stored as epoch ms; null is kept.
    """
    if value is None:
        return None
    t = fdef.type
    if isinstance(value, dict | list):
        raise ValueError("structured value")
    if t == "string":
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > fdef.max_length:
            raise ValueError("string too long")
        return text
    if t in ("integer", "long"):
        if isinstance(value, bool):
            raise ValueError("bool")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError("fraction")
            value = int(value)
        elif isinstance(value, str):
            if not _INT_RE.match(value):
                raise ValueError("not an integer")
            value = int(value)
        lo, hi = _INT_RANGES[t]
        if not lo <= value <= hi:
            raise ValueError("out of range")
        return value
    if t in ("float", "double"):
        if isinstance(value, bool):
            raise ValueError("bool")
        out = float(value)  # ValueError for non-numeric strings
        if not math.isfinite(out):
            raise ValueError("not finite")
        return out
    if t == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError("not a boolean")
    if t == "date":
        if isinstance(value, bool):
            raise ValueError("bool")
        if isinstance(value, int | float):
            return int(value * 1000)
        if _INT_RE.match(value) or re.match(r"^\s*\d+\.\d+\s*$", value):
            return int(float(value) * 1000)
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if ts.tzinfo is None:
            raise ValueError("ISO 8601 date without a zone")
        return int(ts.timestamp() * 1000)
    if t == "binary":
        if not isinstance(value, str):
            raise ValueError("binary must be base64 text")
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError("bad base64") from exc
        return value
    raise ValueError(f"unknown field type {t}")


def coerce_message(mtype: MessageType, message: Any) -> dict[str, Any]:
    """One message (object or positional array) as `{field: typed value}`; ValueError if not."""
    fields = mtype.fields
    if isinstance(message, list):
        if len(message) > len(fields):
            raise ValueError("too many positional values")
        pairs = zip(fields, message, strict=False)
        return {f.name: coerce(f, v) for f, v in pairs}
    if isinstance(message, dict):
        by_name = mtype.by_name()
        out = {}
        for key, v in message.items():
            fdef = by_name.get(key)
            if fdef is None:
                raise ValueError(f"unknown field {key!r}")
            out[key] = coerce(fdef, v)
        return out
    raise ValueError("a message must be an object or an array")


# -- faults ---------------------------------------------------------------------------------------


# -- storage --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Table:
    """Stored rows of one message type (`T_IOT_<ID>`); keeps the newest `max_rows`, counts all."""

    max_rows: int
    count: int = 0
    rows: deque[dict[str, Any]] = field(default_factory=deque)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) > self.max_rows:
            self.rows.popleft()


@dataclass(slots=True)
class AckEntry:
    sequence: str
    status: str  # "SUCCESS" or "FAILED" [open]: the real ack body is unknown


class MmsSimulator:
    """The MMS simulator as an aiohttp app: `async with MmsSimulator() as sim: sim.api_url ...`.

    Args:
        host, port: where to listen (port 0 picks a free one; read `sim.port`).
        max_rows: rows kept per message type for read-back (all are counted).
        ws_push_offline: "drop" (default) or "store" a `method:"ws"` push with no live socket.
        empty_get: what a GET with nothing pending answers: "[]" (default), "empty" or "204".
        ws_async_answer: answer async WebSocket frames with a `msg` frame (default) or not.
        max_messages: messages per request before a 400.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_rows: int = 100_000,
        ws_push_offline: str = "drop",
        empty_get: str = "[]",
        ws_async_answer: bool = True,
        max_messages: int = 100_000,
        seed_defaults: bool = True,
        ws_answer_code: bool = True,
        wording: str = "notes",
        push_users: dict[str, str] | None = None,
        app_tokens: Iterable[str] = (),
    ) -> None:
        if ws_push_offline not in ("drop", "store"):
            raise ValueError("ws_push_offline must be 'drop' or 'store'")
        if empty_get not in ("[]", "empty", "204"):
            raise ValueError("empty_get must be '[]', 'empty' or '204'")
        if wording not in WORDINGS:
            raise ValueError(f"wording must be one of {', '.join(WORDINGS)}")
        self.host = host
        self.port = port
        self.max_rows = max_rows
        self.ws_push_offline = ws_push_offline
        self.empty_get = empty_get
        self.ws_async_answer = ws_async_answer
        self.max_messages = max_messages
        self.message_types: dict[str, MessageType] = {}
        self.device_types: dict[str, set[str]] = {}
        self.devices: dict[str, tuple[str, str]] = {}  # id -> (token, device type)
        self.ws_answer_code = ws_answer_code
        self.wording = wording
        # Platform users (Basic auth) and application tokens (Bearer) allowed to push; none
        # by default: the registry file or the flags name them.
        self.push_users: dict[str, str] = dict(push_users or {})
        self.app_tokens: set[str] = set(app_tokens)
        self.tables: dict[str, Table] = {}
        self.push_queues: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.pushes_dropped = 0
        self.acks: dict[str, dict[str, AckEntry]] = defaultdict(dict)
        self.config: list[dict[str, Any]] = []
        self.faults = Faults(FAULTS, ROUTES)
        self.stats: Counter[str] = Counter()  # "route:status" -> answers
        self.answer_times: dict[str, deque[float]] = {}  # "route:status" -> monotonic times
        self.ws_connections = 0
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self.changes = Changes()
        self._runner: web.AppRunner | None = None
        self._hold = PortHold(host)  # the port stays ours while offline (see PortHold)
        self._ack_counter = 0
        if seed_defaults:
            for mt in default_message_types():
                self.add_message_type(mt)
            self.add_device(DEFAULT_DEVICE_ID, DEFAULT_TOKEN)

    # -- registry API ----------------------------------------------------------------------------

    def add_message_type(
        self, mtype: MessageType, device_types: Iterable[str] = (DEFAULT_DEVICE_TYPE,)
    ) -> None:
        """Register (or replace) a message type and assign it to the given device types."""
        self.message_types[mtype.id] = mtype
        for dt in device_types:
            self.device_types.setdefault(dt, set()).add(mtype.id)

    def add_device(self, device_id: str, token: str, device_type: str = DEFAULT_DEVICE_TYPE) -> None:
        self.device_types.setdefault(device_type, set())
        self.devices[device_id] = (token, device_type)

    # -- fault API -------------------------------------------------------------------------------

    def inject(self, name: str, stage: str = "*", count: int | None = None, **options: Any) -> None:
        """Switch fault `name` on for `count` uses (None: until `clear`) on a route ("*": any)."""
        self.faults.inject(name, stage, count, **options)

    def clear(self, name: str | None = None) -> None:
        """Switch one fault, or all, off."""
        self.faults.clear(name)

    def _take(self, name: str, subject: Any = None, route: str = "*") -> Fault | None:
        """The fault if active (see `kit.Faults.take`), counted in the stats."""
        fault = self.faults.take(name, route, subject)
        if fault is not None:
            self.stats[f"fault:{name}"] += 1
        return fault

    # -- read-back API ---------------------------------------------------------------------------

    def rows(self, message_type: str, device: str | None = None) -> list[dict[str, Any]]:
        """Stored rows (the newest `max_rows`) of a message type, oldest first."""
        table = self.tables.get(message_type)
        if table is None:
            return []
        return [r for r in table.rows if device is None or r["G_DEVICE"] == device]

    def count(self, message_type: str) -> int:
        """Rows ever stored for a message type."""
        table = self.tables.get(message_type)
        return table.count if table else 0

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until `predicate()` holds, re-checking after every state change."""
        await self.changes.wait_for(predicate, timeout_s)

    def _touch(self) -> None:
        self.changes.touch()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}{API_BASE}/"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        b = API_BASE
        app.add_routes(
            [
                web.post(b + "/http/data/{device}", self._post_data),
                web.get(b + "/http/data/{device}", self._get_data),
                web.post(b + "/http/data/{device}/{mtype}/{mode}", self._post_params),
                web.post(b + "/http/data/{device}/{mtype}/{mode}/{seq}", self._post_params),
                web.post(b + "/http/ack/{device}", self._post_ack),
                web.post(b + "/http/ack/{device}/{seq}", self._post_ack),
                web.post(b + "/http/push/{device}", self._post_push),
                web.get(b + "/http/config", self._get_config),
                web.put(b + "/http/config", self._put_config),
                web.get(b + "/ws/data/{device}", self._ws_data),
                web.get("/sim/rows/{mtype}", self._sim_rows),
                web.get("/sim/tables", self._sim_tables),
                web.post("/sim/message-types", self._sim_add_type),
                web.post("/sim/devices", self._sim_add_device),
                web.get("/sim/stats", self._sim_stats),
            ]
        )
        add_fault_routes(app, self.faults, self.changes)
        app.on_shutdown.append(self._close_sockets)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the real port when 0 was asked
        self._hold.release()
        log.info("mms_sim_started", url=self.api_url)

    async def stop(self) -> None:
        self._hold.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def go_offline(self) -> None:
        """Stop listening and close every socket, as an outage would; stored rows are kept and
        the port stays reserved for `go_online`."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            if not await self._hold.hold_soon(self.port):
                log.warning("mms_sim_port_not_held", port=self.port)
        log.info("mms_sim_offline", port=self.port)

    async def go_online(self) -> None:
        """Listen again on the same port."""
        if self._runner is None:
            await self.start()

    async def __aenter__(self) -> MmsSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _close_sockets(self, _app: web.Application) -> None:
        for ws in list(self._sockets.values()):
            await ws.close(code=1001, message=b"server shutdown")

    # -- helpers ---------------------------------------------------------------------------------

    def _count(self, route: str, status: int) -> None:
        key = f"{route}:{status}"
        self.stats[key] += 1
        times = self.answer_times.get(key)
        if times is None:
            times = self.answer_times[key] = deque(maxlen=1000)
        times.append(time.monotonic())
        self._touch()

    def _answer(self, route: str, status: int, msg: str, **extra: Any) -> web.Response:
        self._count(route, status)
        return web.json_response({"msg": msg, **extra}, status=status)

    def _unauthorized(self, route: str) -> web.Response:
        self._count(route, 401)
        return web.Response(status=401, text=MSG_UNAUTHORIZED, content_type="text/plain")

    def _html(self, route: str) -> web.Response:
        self._count(route, 200)
        return web.Response(status=200, text=HTML_LOGIN, content_type="text/html")

    def _device_ok(self, request: web.Request) -> bool:
        """Whether the Bearer token matches the device in the path (unknown devices fail too)."""
        entry = self.devices.get(request.match_info["device"])
        header = request.headers.get("Authorization", "")
        return entry is not None and header == f"Bearer {entry[0]}"

    def _type_for(self, device: str, type_id: Any, direction: str) -> MessageType:
        if not isinstance(type_id, str):
            raise Rejected(400, MSG_PARSE_TYPE)
        mtype = self.message_types.get(type_id)
        device_type = self.devices[device][1]
        if mtype is None or type_id not in self.device_types.get(device_type, ()):
            raise Rejected(
                400,
                f"Message type [{type_id}] is not assigned to the device type "
                f"[{device_type}] of device [{device}]",
            )
        if not mtype.allows(direction):
            raise Rejected(
                400,
                f"Message type [{type_id}] has direction [{mtype.direction}], expected [{direction}]",
            )
        return mtype

    def _coerce_all(self, mtype: MessageType, messages: Any) -> list[dict[str, Any]]:
        if not isinstance(messages, list):
            raise Rejected(400, "Parse error. Expected [messages] of type [array]")
        if len(messages) > self.max_messages:
            raise Rejected(400, f"Too many messages in one request: {len(messages)} > {self.max_messages}")
        try:
            return [coerce_message(mtype, m) for m in messages]
        except (ValueError, TypeError, OverflowError) as exc:
            raise Rejected(400, MSG_NOT_CONFORM) from exc

    def _ingest(self, device: str, envelope: Any) -> tuple[int, dict[str, Any], Fault | None]:
        """Validate and store one upstream envelope; returns (status, body, slow fault or None).

        Raises Rejected for 400 (nothing stored: a request is accepted whole or not at all).
        """
        if not isinstance(envelope, dict):
            raise Rejected(400, MSG_PARSE_TYPE)
        mtype = self._type_for(device, envelope.get("messageType"), "fromDevice")
        mode = envelope.get("mode", "async")  # the protobuf schema says async is the default
        if mode not in ("sync", "async"):
            raise Rejected(400, "Parse error. Expected [mode] to be one of [sync, async]")
        rows = self._coerce_all(mtype, envelope.get("messages"))
        n = len(rows)
        if self._take("error_500", envelope):
            return (
                500,
                {"msg": f"Processing {n} message(s) received from device [{device}] failed"},
                None,
            )
        fault_202 = self._take("sync_202") if mode == "sync" else None
        stored = fault_202 is None or bool(fault_202.options.get("stored", False))
        if stored:
            self._store(device, mtype, rows)
        if fault_202 is not None:
            seq = self._new_ack(device, "SUCCESS" if stored else "FAILED")
            url = f"{self.api_url}http/ack/{device}/{seq}"
            return (
                202,
                {
                    "msg": url,
                    "retryAfterHeaderValue": str(fault_202.options.get("retry_after", 60)),
                },
                None,
            )
        sequence = envelope.get("sequence")
        if mode == "async" and isinstance(sequence, str):
            self.acks[device][sequence] = AckEntry(sequence, "SUCCESS")
        slow = self._take("slow")
        if mode == "sync":
            return 200, {"msg": f"{n} message(s) received from device [{device}]"}, slow
        return 202, {"msg": f"{n} message(s) accepted for processing from device [{device}]"}, slow

    def _store(self, device: str, mtype: MessageType, rows: list[dict[str, Any]]) -> None:
        table = self.tables.get(mtype.id)
        if table is None:
            table = self.tables[mtype.id] = Table(self.max_rows)
        created = time.time_ns() // 1_000_000
        for values in rows:
            row: dict[str, Any] = {"G_DEVICE": device, "G_CREATED": created}
            for name, v in values.items():
                row["C_" + name.upper()] = v
            table.add(row)
        self._touch()

    def _new_ack(self, device: str, status: str) -> str:
        self._ack_counter += 1
        seq = f"{self._ack_counter:08x}-5eed-4a11-8c0c-{int(time.time()):012x}"
        self.acks[device][seq] = AckEntry(seq, status)
        return seq

    @staticmethod
    async def _json_body(request: web.Request) -> Any:
        """The body as JSON whatever the Content-Type says (MMS is lenient); Rejected if not."""
        raw = await request.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise Rejected(400, MSG_PARSE_TYPE) from exc

    async def _send_answer(
        self, route: str, status: int, body: dict[str, Any], slow: Fault | None
    ) -> web.Response:
        if slow is not None:
            await asyncio.sleep(float(slow.options.get("delay_s", 5.0)))
        return self._answer(route, status, **self._worded(status, body))

    def _worded(self, status: int, body: dict[str, Any]) -> dict[str, Any]:
        """An answer body of a data route in the configured wording (the 202 ack URL stays)."""
        if self.wording == "notes" or "retryAfterHeaderValue" in body:
            return body
        return {**body, "msg": OTHER_WORDING.get(status, body["msg"])}

    # -- device routes ---------------------------------------------------------------------------

    async def _post_data(self, request: web.Request) -> web.StreamResponse:
        route = "post_data"
        if self._take("html_200"):
            return self._html(route)
        if not self._device_ok(request):
            return self._unauthorized(route)
        if request.content_type == "application/x-protobuf":
            return self._answer(route, 415, "Protobuf is not supported by this simulator")
        try:
            envelope = await self._json_body(request)
            status, body, slow = self._ingest(request.match_info["device"], envelope)
        except Rejected as exc:
            return self._answer(route, exc.status, **self._worded(exc.status, {"msg": exc.msg}))
        return await self._send_answer(route, status, body, slow)

    async def _post_params(self, request: web.Request) -> web.StreamResponse:
        """The URL-parameter variant: one message whose fields are the query parameters."""
        route = "post_params"
        if self._take("html_200"):
            return self._html(route)
        if not self._device_ok(request):
            return self._unauthorized(route)
        # Some firmware sends base64 with '+' unencoded; the query parser makes it a space.
        mtype = self.message_types.get(request.match_info["mtype"])
        binary = {f.name for f in mtype.fields if f.type == "binary"} if mtype else set()
        message = {k: v.replace(" ", "+") if k in binary else v for k, v in request.query.items()}
        envelope = {
            "messageType": request.match_info["mtype"],
            "mode": request.match_info["mode"],
            "messages": [message],
        }
        if "seq" in request.match_info:
            envelope["sequence"] = request.match_info["seq"]
        try:
            status, body, slow = self._ingest(request.match_info["device"], envelope)
        except Rejected as exc:
            return self._answer(route, exc.status, exc.msg)
        return await self._send_answer(route, status, body, slow)

    async def _get_data(self, request: web.Request) -> web.StreamResponse:
        """Drain the device's push queue, newest first (LIFO, as the device samples expect)."""
        route = "get_data"
        if self._take("html_200"):
            return self._html(route)
        if not self._device_ok(request):
            return self._unauthorized(route)
        device = request.match_info["device"]
        pending = self.push_queues.pop(device, [])
        self._touch()
        if self._take("drop_get"):
            if request.transport is not None:
                request.transport.abort()
            self._count(route, 0)
            return web.Response(status=200)  # never reaches the client: the socket is gone
        if not pending:
            self._count(route, 204 if self.empty_get == "204" else 200)
            if self.empty_get == "204":
                return web.Response(status=204)
            if self.empty_get == "empty":
                return web.Response(status=200, body=b"", content_type="application/json")
            return web.json_response([])
        self._count(route, 200)
        return web.json_response(list(reversed(pending)))

    async def _post_ack(self, request: web.Request) -> web.StreamResponse:
        """Acks for non-sync sends: `[{"sequence", "status"}]` ([open]: invented shape)."""
        route = "post_ack"
        if self._take("html_200"):
            return self._html(route)
        if not self._device_ok(request):
            return self._unauthorized(route)
        acks = self.acks.get(request.match_info["device"], {})
        seq = request.match_info.get("seq")
        chosen = [acks[seq]] if seq is not None and seq in acks else [] if seq else list(acks.values())
        self._count(route, 200)
        return web.json_response([{"sequence": a.sequence, "status": a.status} for a in chosen])

    async def _post_push(self, request: web.Request) -> web.StreamResponse:
        route = "post_push"
        if self._take("html_200"):
            return self._html(route)
        if not self._push_auth_ok(request.headers.get("Authorization", "")):
            return self._unauthorized(route)
        device = request.match_info["device"]
        if device not in self.devices:
            return self._answer(route, 404, f"Device [{device}] not found")
        try:
            envelope = await self._json_body(request)
            status, msg = await self.push(device, envelope)
        except Rejected as exc:
            return self._answer(route, exc.status, exc.msg)
        return self._answer(route, status, msg)

    def _push_auth_ok(self, header: str) -> bool:
        scheme, _, cred = header.partition(" ")
        if scheme == "Bearer":
            return cred in self.app_tokens
        if scheme == "Basic":
            try:
                user, _, password = base64.b64decode(cred, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return self.push_users.get(user) == password
        return False

    async def push(self, device: str, envelope: Any) -> tuple[int, str]:
        """Push `{method, sender, messageType, messages}` to a device; returns (status, msg).

        Raises Rejected for an invalid envelope. Usable directly from tests and the bench.
        """
        if device not in self.devices:
            raise Rejected(404, f"Device [{device}] not found")
        if not isinstance(envelope, dict):
            raise Rejected(400, MSG_PARSE_TYPE)
        mtype = self._type_for(device, envelope.get("messageType"), "toDevice")
        method = envelope.get("method", "http")
        if method not in ("http", "ws"):
            raise Rejected(400, f"Push method [{method}] is not supported (use http or ws)")
        messages = self._coerce_all(mtype, envelope.get("messages"))
        out = {
            "messageType": mtype.id,
            "sender": str(envelope.get("sender", "")),
            "messages": messages,
        }
        if method == "ws":
            ws = self._sockets.get(device)
            if ws is not None and not ws.closed:
                try:
                    await ws.send_str(json.dumps(out))
                except ConnectionError:
                    ws = None  # closing under our feet: the device is offline
                else:
                    self.stats["push_ws_sent"] += 1
                    return 200, f"{len(messages)} message(s) pushed to device [{device}] via [ws]"
            if self.ws_push_offline == "drop":
                self.pushes_dropped += 1
                self._touch()
                return (
                    200,
                    f"Device [{device}] is not connected; {len(messages)} message(s) dropped",
                )
        self.push_queues[device].append(out)
        self._touch()
        return 200, f"{len(messages)} message(s) stored for device [{device}]"

    async def send_raw(self, device: str, text: str) -> bool:
        """Send a raw text frame to the device's live socket (tests of malformed pushes)."""
        ws = self._sockets.get(device)
        if ws is None or ws.closed:
            return False
        await ws.send_str(text)
        return True

    def connected(self, device: str) -> bool:
        """Whether the device has a live WebSocket."""
        ws = self._sockets.get(device)
        return ws is not None and not ws.closed

    async def _get_config(self, request: web.Request) -> web.StreamResponse:
        if not self._push_auth_ok(request.headers.get("Authorization", "")):
            return self._unauthorized("get_config")
        return web.json_response({"config": self.config})

    async def _put_config(self, request: web.Request) -> web.StreamResponse:
        if not self._push_auth_ok(request.headers.get("Authorization", "")):
            return self._unauthorized("put_config")
        try:
            body = await self._json_body(request)
        except Rejected as exc:
            return self._answer("put_config", exc.status, exc.msg)
        items = body.get("config") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) and "key" in i for i in items):
            return self._answer("put_config", 400, 'Expected {"config": [{"key", "value"}]}')
        merged = {c["key"]: c for c in self.config}
        merged.update({i["key"]: {"key": i["key"], "value": i.get("value")} for i in items})
        self.config = list(merged.values())
        return self._answer("put_config", 200, "Configuration updated")

    # -- WebSocket -------------------------------------------------------------------------------

    async def _ws_data(self, request: web.Request) -> web.StreamResponse:
        route = "ws_data"
        refuse = self._take("refuse_upgrade")
        if refuse is not None:
            status = int(refuse.options.get("status", 401))
            self._count(route, status)
            return web.Response(
                status=status,
                text=MSG_UNAUTHORIZED if status == 401 else "refused",
                content_type="text/plain",
            )
        if not self._device_ok(request):
            return self._unauthorized(route)
        device = request.match_info["device"]
        mute = self._take("no_pong") is not None
        ws = web.WebSocketResponse(autoping=not mute, max_msg_size=64 * 1024 * 1024)
        await ws.prepare(request)
        self._count(route, 101)
        self.ws_connections += 1
        previous = self._sockets.get(device)
        self._sockets[device] = ws
        if previous is not None:
            await previous.close(code=1008, message=b"replaced by a newer connection")
        self._touch()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    if not await self._ws_frame(ws, device, msg.data):
                        break
                elif msg.type == WSMsgType.BINARY:
                    await self._ws_reply(ws, 415, "Binary (protobuf) frames are not supported")
        finally:
            if self._sockets.get(device) is ws:
                del self._sockets[device]
            self._touch()
        return ws

    async def _ws_frame(self, ws: web.WebSocketResponse, device: str, text: str) -> bool:
        """Handle one upstream frame; False if the socket was closed by a fault."""
        close = self._take("ws_close")
        try:
            envelope = json.loads(text)
        except (ValueError, RecursionError):
            envelope = None
        if close is not None:
            if close.options.get("stored", True) and isinstance(envelope, dict):
                with contextlib.suppress(Rejected):
                    self._ingest(device, {**envelope, "mode": "async"})
            await ws.close(code=1011, message=b"closed by fault injection")
            return False
        try:
            status, body, slow = self._ingest(device, envelope)
        except Rejected as exc:
            await self._ws_reply(ws, exc.status, **self._worded(exc.status, {"msg": exc.msg}))
            return True
        if slow is not None:
            await asyncio.sleep(float(slow.options.get("delay_s", 5.0)))
        if status == 202 and "retryAfterHeaderValue" not in body and not self.ws_async_answer:
            return True
        await self._ws_reply(ws, status, **self._worded(status, body))
        return True

    async def _ws_reply(self, ws: web.WebSocketResponse, code: int, msg: str, **extra: Any) -> None:
        """One answer frame: `{"msg"}`, plus `"code": <HTTP-like status>` if `ws_answer_code`
        ([open]: the real frame's shape is unknown; the notes expect `{"msg"}`)."""
        self._count("ws_frame", code)
        frame: dict[str, Any] = {"msg": msg, **extra}
        if self.ws_answer_code:
            frame["code"] = code
        if not ws.closed:
            await ws.send_str(json.dumps(frame))

    # -- control and read-back routes ------------------------------------------------------------

    async def _sim_rows(self, request: web.Request) -> web.StreamResponse:
        mtype = request.match_info["mtype"]
        device = request.query.get("device")
        try:
            limit = int(request.query.get("limit", "1000"))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        rows = self.rows(mtype, device)
        return web.json_response(
            {
                "messageType": mtype,
                "table": f"T_IOT_{mtype.upper()}",
                "count": self.count(mtype),
                "rows": rows[-limit:] if limit else [],
            }
        )

    async def _sim_tables(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response({k: t.count for k, t in self.tables.items()})

    async def _sim_add_type(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            mtype = MessageType.from_json(body)
            types = body.get("deviceTypes", [DEFAULT_DEVICE_TYPE])
        except (Rejected, ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.add_message_type(mtype, types)
        return web.json_response({"id": mtype.id}, status=201)

    async def _sim_add_device(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            device_id, token = body["id"], body["token"]
            if not (isinstance(device_id, str) and isinstance(token, str)):
                raise TypeError("id and token must be strings")
        except (Rejected, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.add_device(device_id, token, body.get("deviceType", DEFAULT_DEVICE_TYPE))
        return web.json_response({"id": device_id}, status=201)

    async def _sim_stats(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "answers": dict(self.stats),
                "ws_connections": self.ws_connections,
                "pushes_pending": {k: len(v) for k, v in self.push_queues.items()},
                "pushes_dropped": self.pushes_dropped,
            }
        )


# -- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `gatewayd sim mms`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8443, help="port (default 8443; 0 = any free)")
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="ID:TOKEN",
        help="add a device of the default device type (repeatable)",
    )
    parser.add_argument(
        "--registry",
        metavar="FILE.json",
        help='extra message types, devices and push credentials: {"messageTypes": [{"id", '
        '"direction", "fields"}], "devices": [{"id", "token"}], "pushUsers": [{"user", '
        '"password"}], "appTokens": ["..."]}',
    )
    parser.add_argument("--max-rows", type=int, default=100_000, help="rows kept per type for read-back")
    parser.add_argument(
        "--ws-push-offline",
        choices=("drop", "store"),
        default="drop",
        help="what a method:ws push does when the device has no socket",
    )
    parser.add_argument(
        "--empty-get",
        choices=("[]", "empty", "204"),
        default="[]",
        help="answer of a GET http/data with nothing pending",
    )
    parser.add_argument(
        "--push-user",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="a platform user allowed to push with Basic auth (repeatable; or pushUsers in --registry)",
    )
    parser.add_argument(
        "--app-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="an application OAuth token allowed to push (repeatable; or appTokens in --registry)",
    )
    parser.add_argument(
        "--ws-answer-code",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add an HTTP-like `code` to WebSocket answer frames ([open]; default on)",
    )
    parser.add_argument(
        "--wording",
        choices=WORDINGS,
        default="notes",
        help="answer texts: the ones the protocol notes quote, or other wording ([open])",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME",
        help=f"start with a fault switched on ({', '.join(FAULTS)})",
    )


def build(args: argparse.Namespace) -> MmsSimulator:
    """A simulator configured from parsed CLI arguments. Raises ValueError for bad arguments."""
    sim = MmsSimulator(
        args.host,
        args.port,
        max_rows=args.max_rows,
        ws_push_offline=args.ws_push_offline,
        empty_get=args.empty_get,
        ws_answer_code=args.ws_answer_code,
        wording=args.wording,
        app_tokens=args.app_token,
    )
    for spec in args.push_user:
        user, sep, password = spec.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--push-user expects USER:PASSWORD, got {spec!r}")
        sim.push_users[user] = password
    for spec in args.device:
        device_id, sep, token = spec.partition(":")
        if not sep or not device_id or not token:
            raise ValueError(f"--device expects ID:TOKEN, got {spec!r}")
        sim.add_device(device_id, token)
    if args.registry:
        with open(args.registry, encoding="utf-8") as fh:
            registry = json.load(fh)
        for obj in registry.get("messageTypes", []):
            types = obj.get("deviceTypes", [DEFAULT_DEVICE_TYPE])
            sim.add_message_type(MessageType.from_json(obj), types)
        for dev in registry.get("devices", []):
            sim.add_device(str(dev["id"]), str(dev["token"]), dev.get("deviceType", DEFAULT_DEVICE_TYPE))
        for user in registry.get("pushUsers", []):
            sim.push_users[str(user["user"])] = str(user["password"])
        sim.app_tokens.update(str(t) for t in registry.get("appTokens", []))
    for name in args.fault:
        sim.inject(name)
    return sim


def run(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT/SIGTERM. Returns the exit status (see `kit`)."""
    try:
        sim = build(args)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        print(f"gatewayd sim mms: {exc!r}")
        return EXIT_USAGE

    def banner() -> None:
        print(f"MMS simulator: {sim.api_url}", flush=True)
        for device_id, (token, _dt) in sim.devices.items():
            print(f"  device {device_id} token {token}", flush=True)
        users = ", ".join(sorted(sim.push_users)) or "none (add --push-user USER:PASSWORD)"
        print(f"  push users: {users}; app tokens: {len(sim.app_tokens)}", flush=True)
        print(f"  read-back: {sim.url}/sim/rows/<messageType>   faults: {sim.url}/sim/faults",
              flush=True)

    return serve("mms", sim.start, sim.stop, banner)
