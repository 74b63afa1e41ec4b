"""SAP HCP IoT MMS v1 (Neo) uplink: WebSocket (default) or HTTP, pushed commands, result messages.

Wire facts (`shared/protocols/mms.md`):
- every request carries `Authorization: Bearer <device token>`, the WebSocket upgrade included;
- upstream is `{mode, messageType, messages:[...]}`, one message type per request or frame, so a
  lease is split into one frame per message type, each answered before the cursor moves;
- answers are JSON `{"msg": ...}`: 200 sync ok, 202 async ok (or, on a sync send, "not
  confirmed" with an ack URL and `retryAfterHeaderValue`), 400 bad payload, 401 bad token
  (plain text), 5xx processing failed. A 200 whose body is not JSON (a login page) is an error;
- pushes are `{messageType, sender, messages}` with no id: over WebSocket they arrive one per
  frame; over HTTP a GET drains them newest first, so the array is reversed;
- MMS has no reply channel: each command result goes upstream as a message of a result type.

Delivery is at-least-once: a lost answer means a resend and possibly duplicate rows (MMS has no
idempotency key). Readings the server rejects (400) are isolated by splitting the batch and
quarantined one by one, so one poison reading never wedges the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import ssl
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import aiohttp

from drivers.base import Command, CommandResult, Duration, Range, Reading, now_ms
from gatewayd.backoff import Backoff
from gatewayd.errors import UplinkAuthError, UplinkUnavailableError
from gatewayd.schema import Secret
from gatewayd.uplinks.base import Item, Lease, Uplink, UplinkContext, UplinkState

API_PATH = "/com.sap.iotservices.mms/v1/api/"
SOURCES = ("device", "point", "sensor", "value", "quality")
_RESULTS_MAX = 1000  # results kept while the cloud is unreachable; the oldest go first
_RESULTS_PER_MESSAGE = 100
_SUCCESS_RE = re.compile(r"^\d+ message\(s\) (received|accepted)", re.IGNORECASE)


# -- config ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageMap:
    """Which readings go to one fromDevice message type, and how their fields are filled.

    Two layouts:
    - one message per reading (default): `fields` maps MMS field -> reading attribute, one of
      device, point, sensor ("device.point"), value, quality;
    - wide (`point_fields` set): local point -> MMS field; readings of one device sampled at the
      same time share one message; `fields` may add e.g. `{ device = "device" }`.
    """

    message_type: str
    devices: list[str] = field(default_factory=list)  # local devices; empty: any
    points: list[str] = field(default_factory=list)  # local points; empty: any
    fields: dict[str, str] | None = None
    point_fields: dict[str, str] = field(default_factory=dict)
    timestamp_field: str = "timestamp"  # "" to send no timestamp
    timestamp_format: Literal["s", "ms", "iso"] = "s"

    def __post_init__(self) -> None:
        if not self.message_type:
            raise ValueError("message_type must not be empty")
        for name, source in self.field_sources().items():
            if source not in SOURCES:
                raise ValueError(f"fields.{name}: expected one of {', '.join(SOURCES)}, got {source!r}")

    def field_sources(self) -> dict[str, str]:
        if self.fields is not None:
            return self.fields
        return {} if self.point_fields else {"sensor": "sensor", "value": "value"}

    def matches(self, reading: Reading) -> bool:
        if self.devices and reading.device not in self.devices:
            return False
        if self.point_fields and reading.point not in self.point_fields:
            return False
        return not self.points or reading.point in self.points


def _default_maps() -> list[MessageMap]:
    return [MessageMap("m0t0y0p0e1")]


@dataclass(frozen=True, slots=True)
class MmsConfig:
    """`[uplinks.<name>] type = "mms"` keys."""

    device_id: str
    token: Secret
    host: str = ""  # "iotmms<account>.<landscape>", or a full "https://..." base URL
    account: str = ""  # with `landscape`, instead of `host`
    landscape: str = "hana.ondemand.com"
    transport: Literal["ws", "http"] = "ws"
    mode: Literal["sync", "async"] = "sync"
    messages: list[MessageMap] = field(default_factory=_default_maps)
    command_types: list[str] = field(default_factory=lambda: ["m0t0y0p0e3"])
    action_field: str = "opcode"
    device_field: str = ""  # command field naming the local device, if the type has one
    command_device: str = ""  # local device for commands without `device_field`
    id_field: str = "cmd_id"
    result_message_type: str = ""  # fromDevice type for results; "" logs them only
    result_timestamp_format: Literal["s", "ms", "iso"] = "s"
    dedupe_window: Duration = 10.0
    poll_interval: Annotated[Duration, Range(0.05, 3600)] = 5.0  # http transport
    ws_poll_interval: Duration = 60.0  # ws transport: GET for method-"http" pushes; 0: only
    # once after each (re)connect
    batch_size: Annotated[int, Range(1, 100_000)] = 1000
    request_timeout: Annotated[Duration, Range(0.05, 600)] = 10.0
    ping_interval: Annotated[Duration, Range(0.1, 3600)] = 30.0  # no pong in half of it: reconnect
    treat_sync_202_as_delivered: bool = False
    check_ack_url: bool = True
    sync_202_max_wait: Duration = 60.0
    max_5xx_retries: Annotated[int, Range(0, 1_000_000)] = 10  # then quarantine; 0: never
    max_rate: Annotated[float, Range(0, None)] = 0.0  # readings/s sent at most; 0: no limit
    ws_async_answers: bool = True  # the server answers async frames; false: confirm on write
    backoff_base: Duration = 1.0
    backoff_cap: Duration = 60.0
    verify_tls: bool = True
    ca_file: str = ""

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        if not self.host and not self.account:
            raise ValueError("set host (iotmms<account>.<landscape> or a URL), or account and landscape")
        if self.host and self.account:
            raise ValueError("give either host or account/landscape, not both")
        if not self.messages:
            raise ValueError("messages: at least one message type mapping is needed")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError("backoff_base must be > 0 and backoff_cap >= backoff_base")
        parts = urlsplit(self.api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"host: not a usable URL: {self.host!r}")

    @property
    def api_url(self) -> str:
        """The API base, ending in `/com.sap.iotservices.mms/v1/api/`."""
        if self.host:
            base = self.host if "://" in self.host else f"https://{self.host}"
        else:
            base = f"https://iotmms{self.account}.{self.landscape}"
        base = base.rstrip("/")
        if not base.endswith(API_PATH.rstrip("/")):
            base += API_PATH.rstrip("/")
        return base + "/"

    @property
    def ws_url(self) -> str:
        api = self.api_url
        scheme = "wss" if api.startswith("https:") else "ws"
        return f"{scheme}:{api.split(':', 1)[1]}ws/data/{self.device_id}"


# -- mapping readings to messages ---------------------------------------------------------------


@dataclass(slots=True)
class Message:
    """One MMS message and what it carries: queue items (readings) or a result's command id."""

    body: dict[str, Any]
    items: list[Item] = field(default_factory=list)
    result_of: str = ""


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


def _source(reading: Reading, source: str) -> Any:
    if source == "value":
        return encode_value(reading.value)
    if source == "sensor":
        return f"{reading.device}.{reading.point}"
    if source == "quality":
        return int(reading.quality)
    return getattr(reading, source)


class Mapper:
    """Turns leased items into messages grouped by message type, per the configured maps."""

    def __init__(self, maps: Iterable[MessageMap]) -> None:
        self.maps = list(maps)
        self._routes: dict[tuple[str, str], MessageMap | None] = {}

    def route(self, reading: Reading) -> MessageMap | None:
        """The first map that takes this reading, or None (cached per device and point)."""
        key = (reading.device, reading.point)
        if key not in self._routes:
            self._routes[key] = next((m for m in self.maps if m.matches(reading)), None)
        return self._routes[key]

    def build(self, items: Iterable[Item]) -> tuple[dict[str, list[Message]], list[Item]]:
        """Messages per message type in seq order, and the items no map takes."""
        out: dict[str, list[Message]] = {}
        unmapped: list[Item] = []
        wide: dict[tuple[int, str, int], Message] = {}
        for it in items:
            r = it.reading
            m = self.route(r)
            if m is None:
                unmapped.append(it)
                continue
            messages = out.setdefault(m.message_type, [])
            if m.point_fields:
                key = (id(m), r.device, r.ts_ms)
                target = m.point_fields[r.point]
                msg = wide.get(key)
                if msg is None or target in msg.body:
                    msg = wide[key] = Message(self._base(m, r))
                    messages.append(msg)
                msg.body[target] = encode_value(r.value)
                msg.items.append(it)
            else:
                body = self._base(m, r)
                messages.append(Message(body, [it]))
        return out, unmapped

    @staticmethod
    def _base(m: MessageMap, r: Reading) -> dict[str, Any]:
        body = {name: _source(r, src) for name, src in m.field_sources().items()}
        if m.timestamp_field:
            body[m.timestamp_field] = encode_ts(r.ts_ms, m.timestamp_format)
        return body


# -- answers --------------------------------------------------------------------------------------


class Kind(Enum):
    OK = "ok"
    PENDING = "pending"  # 202 on a sync send: not confirmed
    REJECTED = "rejected"  # 400 and other permanent 4xx
    AUTH = "auth"  # 401/403
    TRANSIENT = "transient"  # 5xx, timeouts, non-JSON 200, lost connections


@dataclass(frozen=True, slots=True)
class Answer:
    kind: Kind
    status: int
    msg: str
    ack_url: str = ""
    retry_after_s: float = 0.0


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def classify(status: int, text: str, mode: str) -> Answer:
    """One HTTP answer (or WebSocket answer frame, with `code` as status) as an `Answer`."""
    body = _parse_json(text) if text else None
    msg = body.get("msg") if isinstance(body, dict) else None
    msg = msg if isinstance(msg, str) else text[:200]
    if status in (401, 403):
        return Answer(Kind.AUTH, status, msg or f"HTTP {status}")
    if status in (200, 202) and not isinstance(body, dict):
        return Answer(Kind.TRANSIENT, status, f"HTTP {status} with a non-JSON body (a login page?)")
    if status == 200 or (status == 202 and mode == "async"):
        return Answer(Kind.OK, status, msg)
    if status == 202:
        retry = body.get("retryAfterHeaderValue") if isinstance(body, dict) else None
        try:
            retry_s = float(retry) if retry is not None else 0.0
        except (TypeError, ValueError):
            retry_s = 0.0
        url = msg if msg.startswith(("http://", "https://")) else ""
        return Answer(Kind.PENDING, status, msg, url, retry_s)
    if status in (408, 429) or status >= 500:
        return Answer(Kind.TRANSIENT, status, msg or f"HTTP {status}")
    return Answer(Kind.REJECTED, status, msg or f"HTTP {status}")


def classify_frame(obj: dict[str, Any], mode: str) -> Answer:
    """A WebSocket answer frame. [open] its shape: the simulator adds `code`; without one, the
    `msg` text decides (success wording -> 200, "Processing ... failed" -> 500, else 400)."""
    code = obj.get("code")
    raw = obj.get("msg")
    msg = raw if isinstance(raw, str) else ""
    if not isinstance(code, int) or isinstance(code, bool):
        if _SUCCESS_RE.match(msg):
            code = 200
        elif msg.startswith("Processing") and msg.endswith("failed"):
            code = 500
        elif "retryAfterHeaderValue" in obj:
            code = 202
        else:
            code = 400
    return classify(code, json.dumps(obj), mode)


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


def _envelope(mode: str, message_type: str, messages: list[dict[str, Any]]) -> str:
    return json.dumps(
        {"mode": mode, "messageType": message_type, "messages": messages}, separators=(",", ":")
    )


# -- transports -----------------------------------------------------------------------------------


class Channel(ABC):
    """A transport: sends envelopes and returns one `Answer` per envelope, in order."""

    @abstractmethod
    async def send_many(self, frames: list[tuple[str, list[dict[str, Any]]]]) -> list[Answer]:
        """Send `(message type, messages)` envelopes; raises UplinkUnavailableError if the
        transport fails (timeouts included)."""


class HttpChannel(Channel):
    """`POST http/data/{id}` per envelope, and the other device routes."""

    def __init__(self, uplink: MmsUplink, session: aiohttp.ClientSession) -> None:
        self.up = uplink
        self.cfg = uplink.config
        self.session = session
        self.data_url = f"{self.cfg.api_url}http/data/{self.cfg.device_id}"

    async def request(self, method: str, url: str, body: str | None = None) -> tuple[int, str]:
        """One request under the timeout; transport errors become UplinkUnavailableError."""
        headers = {**self.up.auth_header}
        if body is not None:
            headers["Content-Type"] = "application/json;charset=utf-8"
        try:
            async with asyncio.timeout(self.cfg.request_timeout):
                async with self.session.request(
                    method, url, data=body, headers=headers, ssl=self.up.ssl
                ) as resp:
                    return resp.status, await resp.text(errors="replace")
        except TimeoutError as exc:
            raise UplinkUnavailableError(
                f"{method} {_path(url)}: no answer within {self.cfg.request_timeout:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UplinkUnavailableError(f"{method} {_path(url)}: {type(exc).__name__}: {exc}") from exc

    async def send_many(self, frames: list[tuple[str, list[dict[str, Any]]]]) -> list[Answer]:
        out = []
        for message_type, messages in frames:
            status, text = await self.request(
                "POST", self.data_url, _envelope(self.cfg.mode, message_type, messages)
            )
            self.up.messages += 1
            out.append(classify(status, text, self.cfg.mode))
        return out

    async def poll(self) -> list[Any]:
        """GET http/data: the pending pushes, oldest first. Raises on auth, 5xx, non-JSON 200."""
        status, text = await self.request("GET", self.data_url)
        if status == 204 or (status == 200 and not text.strip()):
            return []
        body = _parse_json(text)
        if status == 200 and isinstance(body, list):
            return list(reversed(body))  # the server answers newest first
        answer = classify(status, text, "sync")
        if answer.kind is Kind.AUTH:
            raise UplinkAuthError(f"GET http/data: HTTP {status}: {answer.msg}")
        if status == 200:
            raise UplinkUnavailableError("GET http/data: HTTP 200 without a JSON array (a login page?)")
        raise UplinkUnavailableError(f"GET http/data: HTTP {status}: {answer.msg}")

    async def check_ack(self, ack_url: str) -> bool:
        """POST the ack URL of a sync 202 once; True if it reports success. Never sends the
        token to another host: only the ack path is taken from the server's URL."""
        path = urlsplit(ack_url).path
        marker = "/http/ack/"
        if marker not in path:
            return False
        url = self.cfg.api_url + "http/ack/" + path.split(marker, 1)[1]
        sequence = path.rstrip("/").rsplit("/", 1)[-1]
        try:
            status, text = await self.request("POST", url, "")
        except UplinkUnavailableError as exc:
            self.up.log.info("ack_check_failed", error=str(exc))
            return False
        return status == 200 and ack_confirms(_parse_json(text), sequence)


class WsChannel(Channel):
    """One WebSocket: frames are answered in order, pushes interleave (they carry `messages`)."""

    def __init__(self, uplink: MmsUplink, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.up = uplink
        self.cfg = uplink.config
        self.ws = ws
        self._pending: deque[asyncio.Future[Answer]] = deque()
        self._lock = asyncio.Lock()

    async def send_many(self, frames: list[tuple[str, list[dict[str, Any]]]]) -> list[Answer]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Answer]] = []
        confirm_on_write = self.cfg.mode == "async" and not self.cfg.ws_async_answers
        try:
            async with asyncio.timeout(self.cfg.request_timeout):
                async with self._lock:  # answers are matched by order, so writes must not interleave
                    for message_type, messages in frames:
                        fut: asyncio.Future[Answer] = loop.create_future()
                        if confirm_on_write:
                            fut.set_result(Answer(Kind.OK, 202, "written"))
                        else:
                            self._pending.append(fut)
                        futures.append(fut)
                        await self.ws.send_str(_envelope(self.cfg.mode, message_type, messages))
                        self.up.messages += 1
                return [await f for f in futures]
        except TimeoutError as exc:
            raise UplinkUnavailableError(
                f"websocket: no answer within {self.cfg.request_timeout:g}s"
            ) from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UplinkUnavailableError(f"websocket send failed: {exc}") from exc

    async def reader_loop(self) -> None:
        """Route incoming frames until the socket closes; then raise UplinkUnavailableError."""
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._on_text(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self.up.log.warning("frame_unexpected", kind="binary", size=len(msg.data))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        finally:
            error = UplinkUnavailableError(
                f"websocket closed (code {self.ws.close_code}), {len(self._pending)} frame(s) unanswered"
            )
            while self._pending:
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()  # mark it retrieved: nobody may be awaiting it any more
        raise error

    def _on_text(self, text: str) -> None:
        obj = _parse_json(text)
        if isinstance(obj, dict) and "messages" in obj:
            self.up.handle_pushes([obj], "ws")
        elif isinstance(obj, dict) and "msg" in obj and self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_result(classify_frame(obj, self.cfg.mode))
        elif isinstance(obj, dict) and "msg" in obj:
            self.up.log.info("frame_unsolicited", msg=str(obj.get("msg"))[:200])
        else:
            # Answers are JSON objects with `msg`; anything else must be a push gone wrong.
            self.up.handle_malformed(text, "ws")


def _path(url: str) -> str:
    return urlsplit(url).path.rsplit("/api/", 1)[-1]


# -- the uplink -----------------------------------------------------------------------------------


class MmsUplink(Uplink):
    """HCP IoT MMS device client. See the module docstring for the wire contract."""

    Config = MmsConfig

    def __init__(self, name: str, config: MmsConfig, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        self.config: MmsConfig = config
        self.mapper = Mapper(config.messages)
        self.auth_header = {"Authorization": f"Bearer {config.token.reveal()}"}
        self.ssl: ssl.SSLContext | bool = True
        self.resent = 0  # readings sent again after an unconfirmed send: possible duplicates
        self.rejected = 0  # readings quarantined after a 400
        self.commands_received = 0
        self.commands_rejected = 0
        self.results_sent = 0
        self.results_dropped = 0
        self.pushes_polled = 0
        self._wire_high = 0  # highest seq ever written to the wire
        self._fail_seq = (0, 0)  # (first seq of a batch, consecutive 5xx answers for it)
        self._next_send = 0.0  # monotonic time the rate limit allows the next lease
        self._results: deque[Message] = deque(maxlen=_RESULTS_MAX)
        self._results_ready = asyncio.Event()
        self._seen: dict[str, float] = {}
        self._http: HttpChannel | None = None
        self._channel: Channel | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        if cfg.api_url.startswith("http:"):
            self.log.warning(
                "insecure_transport", url=cfg.api_url, hint="the device token travels in clear text"
            )
        self.ssl = self._ssl_context()
        backoff = Backoff(cfg.backoff_base, cfg.backoff_cap, floor_s=min(0.05, cfg.backoff_base))
        timeout = aiohttp.ClientTimeout(total=None, connect=cfg.request_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._http = HttpChannel(self, session)
            session_fn = self._ws_session if cfg.transport == "ws" else self._http_session
            try:
                await self.connection_loop(lambda: session_fn(session), backoff)
            finally:
                self._channel = None
                self.set_state(UplinkState.STOPPED)

    def _ssl_context(self) -> ssl.SSLContext | bool:
        if not self.config.verify_tls:
            self.log.warning("tls_verification_disabled")
            return False
        if self.config.ca_file:
            return ssl.create_default_context(cafile=self.config.ca_file)
        return True

    async def _ws_session(self, session: aiohttp.ClientSession) -> None:
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.request_timeout):
                ws = await session.ws_connect(
                    cfg.ws_url,
                    headers=self.auth_header,
                    heartbeat=cfg.ping_interval,
                    ssl=self.ssl,
                    max_msg_size=16 * 1024 * 1024,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise UplinkAuthError(f"websocket upgrade refused: HTTP {exc.status}") from exc
            raise UplinkUnavailableError(f"websocket upgrade failed: HTTP {exc.status}") from exc
        except TimeoutError as exc:
            raise UplinkUnavailableError("websocket connect timed out") from exc
        except aiohttp.ClientError as exc:
            raise UplinkUnavailableError(f"websocket connect failed: {exc}") from exc
        try:
            channel = WsChannel(self, ws)
            self._channel = channel
            self.set_state(UplinkState.CONNECTED)
            await self._run_all(
                reader=channel.reader_loop(),
                catch_up=self._catch_up(),
                pump=self.pump(self._send_lease, cfg.batch_size),
                results=self._results_loop(channel),
            )
        finally:
            self._channel = None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await ws.close()

    async def _http_session(self, session: aiohttp.ClientSession) -> None:
        assert self._http is not None
        self.handle_pushes(await self._http.poll(), "http")  # proves the token before CONNECTED
        self._channel = self._http
        self.set_state(UplinkState.CONNECTED)
        try:
            await self._run_all(
                pump=self.pump(self._send_lease, self.config.batch_size),
                poll=self._poll_loop(),
                results=self._results_loop(self._http),
            )
        finally:
            self._channel = None

    async def _run_all(self, **loops: Coroutine[Any, Any, None]) -> None:
        """Run the session's loops together; the first failure ends them all and is re-raised."""
        try:
            async with asyncio.TaskGroup() as tg:
                for name, coro in loops.items():
                    tg.create_task(coro, name=f"mms[{self.name}].{name}")
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None

    async def _catch_up(self) -> None:
        """One GET after each (re)connect, for pushes stored while the socket was down; then
        one every `ws_poll_interval` (if set), for pushes sent with method "http"."""
        assert self._http is not None
        while True:
            try:
                self.handle_pushes(await self._http.poll(), "http")
            except UplinkAuthError:
                raise
            except UplinkUnavailableError as exc:
                # The socket still works; a failed GET only delays stored pushes.
                self.log.warning("catch_up_poll_failed", error=str(exc))
            if not self.config.ws_poll_interval:
                return
            await asyncio.sleep(self.config.ws_poll_interval)

    async def _poll_loop(self) -> None:
        assert self._http is not None
        while True:
            await asyncio.sleep(self.config.poll_interval)
            self.handle_pushes(await self._http.poll(), "http")

    # -- delivery --------------------------------------------------------------------------------

    async def _send_lease(self, lease: Lease) -> None:
        """Deliver one lease: one envelope per message type, each settled before returning."""
        channel = self._channel
        if channel is None:
            raise UplinkUnavailableError("not connected")
        again = sum(1 for it in lease.items if it.seq <= self._wire_high)
        if again:
            self.resent += again
            self.log.info("batch_resent", count=again, first_seq=lease.items[0].seq)
        self._wire_high = max(self._wire_high, lease.last_seq)
        groups, unmapped = self.mapper.build(lease.items)
        frames = list(groups.items())
        answers = await channel.send_many([(t, [m.body for m in msgs]) for t, msgs in frames])
        for (message_type, msgs), answer in zip(frames, answers, strict=True):
            await self._settle(channel, message_type, msgs, answer, self._drop_reading_message)
        self._fail_seq = (0, 0)
        for it in unmapped:  # after the sends, so a retried lease does not count them twice
            r = it.reading
            self._drop_item(it, "unmapped", f"no message type maps {r.device}.{r.point}")
        await self._pace(len(lease))

    async def _pace(self, count: int) -> None:
        """Keep delivery under `max_rate` readings/s (a long backlog must not flood the cloud)."""
        rate = self.config.max_rate
        if not rate:
            return
        now = time.monotonic()
        self._next_send = max(self._next_send, now) + count / rate
        if self._next_send > now:
            await asyncio.sleep(self._next_send - now)

    async def _settle(
        self,
        channel: Channel,
        message_type: str,
        msgs: list[Message],
        answer: Answer,
        drop: Callable[[Message, str], None],
        poisoned: bool = False,
    ) -> None:
        """Act on one envelope's answer until its messages are delivered or dropped.

        Raises UplinkAuthError or UplinkUnavailableError to end the session (the lease is then
        resent after the backoff). `poisoned`: this is part of a batch that kept failing with
        500, so a 500 here marks the offender instead of ending the session.
        """
        while True:
            if answer.kind is Kind.OK:
                return
            if answer.kind is Kind.AUTH:
                raise UplinkAuthError(f"HTTP {answer.status}: {answer.msg}")
            if answer.kind is Kind.TRANSIENT:
                if answer.status == 500 and (poisoned or self._poisoned(msgs, answer)):
                    poisoned = True
                else:
                    raise UplinkUnavailableError(f"HTTP {answer.status}: {answer.msg}")
                answer = Answer(Kind.REJECTED, answer.status, answer.msg)
            if answer.kind is Kind.PENDING:
                if await self._pending_confirmed(answer, msgs):
                    return
            elif answer.kind is Kind.REJECTED:
                if len(msgs) == 1:
                    drop(msgs[0], answer.msg)
                    return
                # Bisect to find the offending message(s); the good halves go through.
                half = len(msgs) // 2
                for part in (msgs[:half], msgs[half:]):
                    (sub,) = await channel.send_many([(message_type, [m.body for m in part])])
                    await self._settle(channel, message_type, part, sub, drop, poisoned)
                return
            (answer,) = await channel.send_many([(message_type, [m.body for m in msgs])])

    def _poisoned(self, msgs: list[Message], answer: Answer) -> bool:
        """Whether a 500 "Processing failed" for the same batch repeated `max_5xx_retries` times."""
        limit = self.config.max_5xx_retries
        if not limit or not msgs or not msgs[0].items:
            return False
        first = msgs[0].items[0].seq
        count = self._fail_seq[1] + 1 if self._fail_seq[0] == first else 1
        self._fail_seq = (first, count)
        if count <= limit:
            return False
        self.log.warning("batch_poisoned_5xx", first_seq=first, attempts=count, msg=answer.msg)
        self._fail_seq = (0, 0)
        return True

    async def _pending_confirmed(self, answer: Answer, msgs: list[Message]) -> bool:
        """A 202 on a sync send: True if it may count as delivered, else the caller resends."""
        cfg = self.config
        count = len(msgs)
        self.count_error("sync_202")
        self.log.debug("sync_202_ack_url", ack_url=answer.ack_url)
        if cfg.treat_sync_202_as_delivered:
            self.log.warning("sync_202_treated_as_delivered", count=count)
            return True
        wait_s = min(answer.retry_after_s or cfg.sync_202_max_wait, cfg.sync_202_max_wait)
        self.log.warning("sync_202_unconfirmed", count=count, wait_s=wait_s)
        await asyncio.sleep(wait_s)
        if cfg.check_ack_url and answer.ack_url and self._http is not None:
            if await self._http.check_ack(answer.ack_url):
                self.log.info("sync_202_confirmed_by_ack", count=count)
                return True
        self.resent += sum(len(m.items) for m in msgs)  # readings only, not results
        self.log.info("sync_202_resend", count=count)
        return False

    def _drop_reading_message(self, msg: Message, reason: str) -> None:
        for it in msg.items:
            self._drop_item(it, "rejected", reason)

    def _drop_item(self, item: Item, reason: str, detail: str) -> None:
        self.rejected += 1
        self.log.warning(
            "reading_dropped",
            reason=reason,
            detail=detail,
            seq=item.seq,
            device=item.reading.device,
            point=item.reading.point,
        )
        self.ctx.outbox.quarantine(item, reason, detail)

    # -- commands and results --------------------------------------------------------------------

    def handle_pushes(self, envelopes: list[Any], source: str) -> None:
        """Turn pushed envelopes (one poll or one frame, in issue order) into Commands.

        A command without an id field gets one from a hash of its content plus its ordinal in
        this poll, so identical commands in one poll all run, while the same content arriving
        again within `dedupe_window` (a redelivery) is dropped.
        """
        self.pushes_polled += len(envelopes)
        now = time.monotonic()
        self._seen = {k: t for k, t in self._seen.items() if now - t < self.config.dedupe_window}
        ordinal = 0
        for env in envelopes:
            if not isinstance(env, dict) or not isinstance(env.get("messages"), list):
                self.handle_malformed(json.dumps(env, default=str), source)
                continue
            for message in env["messages"]:
                self._command_from(env, message, ordinal, source, now)
                ordinal += 1

    def handle_malformed(self, raw: str, source: str) -> None:
        """A push that cannot be read: log it and answer an error result under a content id."""
        cmd_id = "mms-" + hashlib.sha256(raw.encode()).hexdigest()[:16]
        self.commands_rejected += 1
        self.log.warning("push_malformed", source=source, cmd_id=cmd_id, raw=raw[:200])
        self._queue_result(CommandResult(cmd_id, False, 400, "malformed push: not a JSON push envelope"))

    def _command_from(self, env: dict[str, Any], message: Any, ordinal: int, source: str, now: float) -> None:
        cfg = self.config
        mtype = env.get("messageType")
        canonical = json.dumps([mtype, env.get("sender"), message], sort_keys=True, default=str)
        key = f"mms-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}-{ordinal}"
        # The arrival time makes a synthetic id unique once our window has passed, so the
        # dispatcher's own (longer) dedupe does not swallow a command repeated on purpose.
        cmd_id = f"{key}-{now_ms()}"
        if isinstance(message, dict) and isinstance(message.get(cfg.id_field), str | int):
            key = cmd_id = str(message[cfg.id_field]) or cmd_id  # the cloud's own id
        if key in self._seen:
            self.log.info("command_duplicate", cmd_id=key, source=source)
            return
        self._seen[key] = now
        problem = ""
        if mtype not in cfg.command_types:
            problem = f"message type {mtype!r} is not a command type"
        elif not isinstance(message, dict):
            problem = "a command message must be an object"
        elif not isinstance(message.get(cfg.action_field), str) or not message[cfg.action_field]:
            problem = f"missing action field {cfg.action_field!r}"
        if problem:
            self.commands_rejected += 1
            self.log.warning("push_rejected", cmd_id=cmd_id, source=source, problem=problem)
            self._queue_result(CommandResult(cmd_id, False, 400, problem))
            return
        device = cfg.command_device
        if cfg.device_field and isinstance(message.get(cfg.device_field), str):
            device = message[cfg.device_field]
        reserved = {cfg.action_field, cfg.id_field, cfg.device_field}
        params = {k: v for k, v in message.items() if k not in reserved and v is not None}
        cmd = Command(cmd_id, self.name, device, message[cfg.action_field], params, now_ms())
        self.commands_received += 1
        self.log.info("command_received", cmd_id=cmd_id, source=source, device=device, action=cmd.action)
        try:
            self.ctx.submit_command(cmd)
        except Exception as exc:  # the dispatcher must not take the uplink down
            self.log.error("command_submit_failed", cmd_id=cmd_id, error=repr(exc))
            self._queue_result(CommandResult(cmd_id, False, 500, f"cannot dispatch: {exc}"))

    async def reply(self, command: Command, result: CommandResult) -> None:
        """Queue the result as a message of the result type; sent when connected."""
        self._queue_result(result)

    def _queue_result(self, result: CommandResult) -> None:
        cfg = self.config
        self.log.info(
            "command_result",
            cmd_id=result.command_id,
            ok=result.ok,
            code=result.code,
            message=result.message,
        )
        if not cfg.result_message_type:
            return
        if len(self._results) == self._results.maxlen:
            self.results_dropped += 1
            self.log.warning("result_dropped", reason="result buffer full", cmd_id=self._results[0].result_of)
        body = {
            "cmd_id": result.command_id,
            "ok": result.ok,
            "code": result.code,
            "message": result.message[:255],
            "timestamp": encode_ts(now_ms(), cfg.result_timestamp_format),
        }
        self._results.append(Message(body, result_of=result.command_id))
        self._results_ready.set()

    async def _results_loop(self, channel: Channel) -> None:
        """Send queued results; a result stays queued until the server took it or refused it."""
        while True:
            while not self._results:  # results left from a failed session go first
                self._results_ready.clear()
                await self._results_ready.wait()
            batch = list(self._results)[:_RESULTS_PER_MESSAGE]
            dropped_before = self.results_dropped
            (answer,) = await channel.send_many([(self.config.result_message_type, [m.body for m in batch])])
            await self._settle(channel, self.config.result_message_type, batch, answer, self._drop_result)
            sent = {id(m) for m in batch}
            while self._results and id(self._results[0]) in sent:
                self._results.popleft()
            self.results_sent += len(batch) - (self.results_dropped - dropped_before)

    def _drop_result(self, msg: Message, reason: str) -> None:
        self.results_dropped += 1
        self.log.warning("result_dropped", cmd_id=msg.result_of, reason=reason)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(
            {
                "transport": self.config.transport,
                "mode": self.config.mode,
                "url": self.config.api_url,
                "device_id": self.config.device_id,
                "resent": self.resent,
                "rejected": self.rejected,
                "commands_received": self.commands_received,
                "commands_rejected": self.commands_rejected,
                "results_pending": len(self._results),
                "results_sent": self.results_sent,
                "results_dropped": self.results_dropped,
            }
        )
        return out


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first real failure in a TaskGroup's exception group (cancellations last)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
    return (real or leaves)[0]


__all__ = [
    "Answer",
    "Kind",
    "Mapper",
    "MessageMap",
    "MmsConfig",
    "MmsUplink",
    "classify",
    "encode_ts",
]
