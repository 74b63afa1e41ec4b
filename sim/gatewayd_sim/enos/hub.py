"""The EnOS hub's behaviour on top of the MQTT transport: auth, sessions, requests, commands.

Faithful to the notes in `shared/protocols/enos.md` (§1.6, §2, §3, §7.2, §8). Where the docs
leave a behaviour open, the choice is marked `OPEN:` in a comment and listed in the README.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gatewayd_sim.enos import mqtt
from gatewayd_sim.enos import wire as P
from gatewayd_sim.enos.registry import Device, Key, Product, Registry
from gatewayd_sim.kit import Faults

log = structlog.get_logger("gatewayd_sim.enos")

MAX_ONLINE_SUBS = 200  # per gateway, 2019 docs
SUB_LIMIT_CODE = 1257  # OPEN: the code for "too many online sub-devices" is undocumented
MAX_ATTRIBUTES = 200


@dataclass(frozen=True, slots=True)
class Accepted:
    """One measure point the hub accepted."""

    product_key: str
    device_key: str
    point: str
    value: Any
    quality: int | None
    ts_ms: int
    how: str  # "post" or "resume"
    conn_id: int
    rx: float = field(default_factory=time.monotonic)  # when the hub accepted it (monotonic)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    conn_id: int
    topic: str
    method: str
    msg_id: str
    code: int
    delivered: bool  # the reply went out (the client had subscribed to the reply topic)


@dataclass(frozen=True, slots=True)
class ConnectRecord:
    product_key: str
    device_key: str
    secure_mode: str
    code: int
    tls: bool
    at: float


@dataclass
class CommandRecord:
    """A cloud-to-device command and, once it came, the device's reply."""

    msg_id: str
    key: Key
    topic: str
    method: str
    params: Any
    raw: bytes | None = None  # replaces the JSON envelope (malformed commands in tests)
    sent_at: float = 0.0
    reply: dict[str, Any] | None = None
    raw_reply: bytes | None = None  # the device's answer to a raw (down_raw) command
    replied_at: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def code(self) -> int | None:
        return None if self.reply is None else P.reply_code(self.reply)


@dataclass
class ConnState:
    """What the hub knows about one accepted connection."""

    key: Key
    secure_mode: str
    logged_in: set[Key] = field(default_factory=set)
    activation: CommandRecord | None = None
    persistent_id: str | None = None  # client id of a clean_session=0 session


@dataclass(frozen=True, slots=True)
class HubOptions:
    strict_methods: bool = False  # 1260 on method/topic mismatch (off: Python SDK event bug)
    lenient_replies: bool = False  # push replies even to connections that did not subscribe
    throttle: tuple[int, float, float] | None = (4, 120.0, 300.0)  # attempts, window, block (s)
    record_points: bool = True  # keep every accepted point (benches turn it off, counters stay)
    max_login_batch: int = 0  # OPEN: undocumented cap on combine.login.batch; 0 = none
    command_qos: int = 1  # OPEN: the QoS of pushed commands is undocumented
    drop_replies: int = 0  # test aid: lose the replies to this many data requests
    # OPEN: the docs give a heartbeat range (60-300 s) but not what the hub does outside it:
    # "refuse" (CONNACK 5), "clamp" (drop after 1.5 x the nearest bound of silence) or "accept"
    keepalive: str = "refuse"
    keepalive_range: tuple[int, int] = P.KEEPALIVE_RANGE_S
    # OPEN: every SDK connects with clean_session=1; for 0 the hub either keeps the session
    # (subscriptions survive a reconnect, CONNACK session-present) or refuses (CONNACK 5)
    clean_session_zero: str = "keep"


def _truthy(v: Any) -> bool:
    """Batch flags come as bools, or as strings ("" from the Python SDK means false)."""
    if isinstance(v, str):
        return v.strip().lower() == "true"
    return v is True


class _Refusal(Exception):
    """A request the hub answers with an error code."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


Handler = Callable[[mqtt.Connection, P.Topic, dict[str, Any]], Any]


class Hub:
    """Application logic of the simulated EnOS hub. Driven by `mqtt.MqttServer` callbacks."""

    def __init__(self, registry: Registry, options: HubOptions | None = None) -> None:
        self.registry = registry
        self.options = options or HubOptions()
        self.sessions: dict[Key, mqtt.Connection] = {}  # device -> its connection
        self.sub_owner: dict[Key, mqtt.Connection] = {}  # logged-in sub-device -> gateway conn
        self.points: list[Accepted] = []
        self.counts: Counter[str] = Counter()  # points_post, points_resume, messages, ...
        self.requests: deque[RequestRecord] = deque(maxlen=10_000)
        self.connects: list[ConnectRecord] = []
        self.commands: dict[str, CommandRecord] = {}
        self.events: list[tuple[Key, str, Any, int]] = []
        self._pending: dict[Key, list[CommandRecord]] = {}
        self.kept_sessions: dict[str, dict[str, int]] = {}  # client id -> its subscriptions
        self._attempts: dict[Key, deque[float]] = {}
        self._blocked_until: dict[Key, float] = {}
        self._cmd_ids = itertools.count(1)
        # command ids must not repeat across hub restarts: a device may still hold a reply to
        # an old "cmd-1"; every process (and every Hub) gets its own prefix
        self.id_prefix = secrets.token_hex(3)
        self.on_state_change: Callable[[], None] | None = None  # --state: save the registry
        self.drop_replies = self.options.drop_replies
        # the shared simulator kit's faults; stage = a request's topic path, or "connect"
        self.faults = Faults(FAULTS, stages={"connect", *_REQUEST_PATHS})
        self._changed = asyncio.Condition()
        self._handlers: dict[str, Handler] = {
            "thing/measurepoint/post": self._mp_single,
            "thing/measurepoint/resume": self._mp_single,
            "thing/measurepoint/post/batch": self._mp_batch,
            "thing/measurepoint/resume/batch": self._mp_batch,
            "thing/attribute/update": self._attr_update,
            "thing/attribute/query": self._attr_query,
            "thing/attribute/delete": self._attr_delete,
            "thing/tag/update": self._tag_update,
            "thing/tag/query": self._tag_query,
            "thing/tag/delete": self._tag_delete,
            "thing/device/register": self._register,
            "thing/topo/add": self._topo_add,
            "thing/topo/get": self._topo_get,
            "thing/topo/delete": self._topo_delete,
            "combine/login": self._login,
            "combine/login/batch": self._login_batch,
            "combine/logout": self._logout,
            "thing/tsltemplate/get": self._tsl_template,
            "ota/device/inform": self._ota_inform,
            "ota/device/progress": self._ota_progress,
            "ota/device/getversion": self._ota_getversion,
        }
        self.firmware: dict[Key, str] = {}  # what each device reported via ota/device/inform
        self.ota_progress: list[tuple[Key, str, str]] = []  # (device, step, desc)
        self.firmwares: dict[str, list[dict[str, Any]]] = {}  # product -> offered firmwares
        self.raw_up: list[tuple[Key, bytes]] = []
        # the answer to a raw upload (a cloud decoding script's output); default: an echo
        self.raw_reply: Callable[[Key, bytes], bytes | None] = lambda key, payload: payload

    def state_changed(self) -> None:
        """The registry changed (topology, secrets, devices...): persist it if asked to."""
        if self.on_state_change is not None:
            self.on_state_change()

    # -- waiting, for tests --------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until `predicate()` holds, re-checked after every change. Raises TimeoutError."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    # -- connection lifecycle ------------------------------------------------------------------

    def _throttled(self, key: Key) -> bool:
        if self.options.throttle is None:
            return False
        count, window, block = self.options.throttle
        now = time.monotonic()
        if self._blocked_until.get(key, 0.0) > now:
            return True
        q = self._attempts.setdefault(key, deque())
        while q and now - q[0] >= window:
            q.popleft()
        q.append(now)
        if len(q) > count:
            self._blocked_until[key] = now + block
            log.warning("sim_device_blocked", device=key, attempts=len(q), block_s=block)
            return True
        return False

    async def authenticate(self, conn: mqtt.Connection, req: mqtt.ConnectRequest) -> int:
        """CONNACK code for an EnOS CONNECT (§1.6): 4 for a bad sign, 5 for the rest."""
        code, key, mode = self._check_connect(conn, req)
        if code == mqtt.ACCEPTED and self.faults.take("refuse_connect", "connect") is not None:
            code = mqtt.SERVER_UNAVAILABLE
        self.connects.append(ConnectRecord(key[0], key[1], mode, code, req.tls, time.time()))
        if code != mqtt.ACCEPTED:
            log.info("sim_connect_refused", device=key, code=code)
            await self._notify()
            return code
        old = self.sessions.get(key)
        if old is not None:  # newest connection wins; the old one is kicked off
            log.info("sim_session_kicked", device=key, old_conn=old.conn_id)
            self._drop(old)
            old.close()
        conn.state = ConnState(key, mode)
        if req.clean_session:
            self.kept_sessions.pop(req.client_id, None)
        else:  # a persistent session: its subscriptions come back, and go away kept
            conn.state.persistent_id = req.client_id
            saved = self.kept_sessions.get(req.client_id)
            if saved is not None:
                for filt, qos in saved.items():
                    conn.subscribe(filt, qos)
                conn.session_present = True
        self.sessions[key] = conn
        return code

    def _check_connect(self, conn: mqtt.Connection,
                       req: mqtt.ConnectRequest) -> tuple[int, Key, str]:
        dk, sep, pk = (req.username or "").partition("&")
        key = (pk, dk)
        if not sep or not pk or not dk or req.password is None:
            return mqtt.BAD_CREDENTIALS, key, ""
        try:
            sign_cid, attrs = P.split_client_id(req.client_id)
        except ValueError:
            return mqtt.BAD_CLIENT_ID, key, ""
        mode, method, ts = (attrs.get("securemode", ""), attrs.get("signmethod", ""),
                            attrs.get("timestamp", ""))
        if self._throttled(key):
            return mqtt.NOT_AUTHORIZED, key, mode
        product, device = self.registry.products.get(pk), self.registry.devices.get(key)
        if product is None or device is None or not device.enabled or device.node_type == "sub":
            return mqtt.NOT_AUTHORIZED, key, mode
        if product.require_ssl and not req.tls:
            return mqtt.NOT_AUTHORIZED, key, mode
        if req.peer_cert_cn is not None and req.peer_cert_cn != dk:
            return mqtt.NOT_AUTHORIZED, key, mode  # certificate CN must be the device key
        if mode == "2":
            secret = device.secret
        elif mode == "3":
            # OPEN: mode 3 for an already activated device is refused (undocumented).
            if not product.dynamic_activation or device.secret is not None:
                return mqtt.NOT_AUTHORIZED, key, mode
            secret = product.secret
        else:  # OPEN: mode 4 (message integration) is not simulated
            return mqtt.NOT_AUTHORIZED, key, mode
        if secret is None:
            return mqtt.NOT_AUTHORIZED, key, mode
        if not P.sign_ok(pk, dk, sign_cid, ts, secret, method, req.password):
            return mqtt.BAD_CREDENTIALS, key, mode
        low, high = self.options.keepalive_range
        if self.options.keepalive == "refuse" and not low <= req.keepalive_s <= high:
            log.info("sim_keepalive_refused", device=key, keepalive_s=req.keepalive_s)
            return mqtt.NOT_AUTHORIZED, key, mode
        if not req.clean_session and self.options.clean_session_zero == "refuse":
            return mqtt.NOT_AUTHORIZED, key, mode
        return mqtt.ACCEPTED, key, mode

    async def on_connected(self, conn: mqtt.Connection) -> None:
        st: ConnState = conn.state
        log.info("sim_connected", device=st.key, conn=conn.conn_id, mode=st.secure_mode,
                 tls=conn.tls)
        if st.secure_mode == "3":
            self._push_activation(conn)
        else:
            self._flush_pending(st.key, conn)
        await conn.drain()
        await self._notify()

    async def on_closed(self, conn: mqtt.Connection) -> None:
        self._drop(conn)
        await self._notify()

    def _drop(self, conn: mqtt.Connection) -> None:
        """A gateway's connection ended: all its sub-devices are logged off (§7.2)."""
        st: ConnState | None = conn.state
        if st is None:
            return
        if st.persistent_id is not None:
            self.kept_sessions[st.persistent_id] = dict(conn.subscriptions)
        for sub in st.logged_in:
            if self.sub_owner.get(sub) is conn:
                del self.sub_owner[sub]
        st.logged_in.clear()
        if self.sessions.get(st.key) is conn:
            del self.sessions[st.key]
            log.info("sim_disconnected", device=st.key, conn=conn.conn_id)

    # -- requests ------------------------------------------------------------------------------

    async def on_publish(self, conn: mqtt.Connection, topic_name: str, payload: bytes,
                         qos: int) -> None:
        st: ConnState = conn.state
        self.counts["messages"] += 1
        topic = P.Topic.parse(topic_name)
        if topic is not None and topic.reply:
            self._device_reply(conn, topic_name, payload)
            await self._notify()
            return
        if topic is not None and topic.root == "sys" and topic.path == "thing/model/up_raw" \
                and self._may_publish(st, topic):
            self._up_raw(conn, topic_name, topic, payload)
            await self._notify()
            return
        msg_id, code, data, message = "", P.OK, None, ""
        try:
            if len(payload) > P.MAX_PAYLOAD_BYTES:
                # OPEN: the real hub discards the message; we still answer 1008, with the id
                # when the envelope's head names it, so the client can tell which request
                msg_id = P.peek_id(payload)
                raise _Refusal(P.TOO_LARGE, f"message of {len(payload)} bytes exceeds 512 KB")
            env = P.parse_envelope(payload)
            msg_id = P.envelope_id(env)
            if topic is None or not self._may_publish(st, topic):
                raise _Refusal(P.NO_PERMISSION, "Publish to topic with no write permission")
            handler = self._handler(topic)
            if handler is None:
                raise _Refusal(P.NO_PERMISSION, f"unsupported topic {topic_name}")
            method = env.get("method")
            if self.options.strict_methods and method != topic.method and \
                    method not in _METHOD_ALIASES.get(topic.path, ()):
                raise _Refusal(P.METHOD_MISMATCH, "Methods not consistent")
            data = handler(conn, topic, env)
            if topic.path in _STATE_PATHS:
                self.state_changed()
        except _Refusal as exc:
            code, data, message = exc.code, exc.data, exc.message
        except P.EnvelopeError as exc:
            code, message = exc.code, str(exc)
        self._answer(conn, topic_name, msg_id, code, data, message)
        await self._notify()

    def _handler(self, topic: P.Topic) -> Handler | None:
        if topic.root == "sys" and topic.path.startswith("thing/event/") and \
                topic.path.endswith("/post") and topic.path.count("/") == 3:
            return self._event
        handler = self._handlers.get(topic.path)
        if handler is None:
            return None
        session_paths = topic.path.startswith("combine/")
        return handler if session_paths == (topic.root == "session") else None

    def _may_publish(self, st: ConnState, topic: P.Topic) -> bool:
        key = (topic.pk, topic.dk)
        if topic.root == "session":
            return key == st.key
        return key == st.key or key in st.logged_in

    def _answer(self, conn: mqtt.Connection, topic: str, msg_id: str, code: int, data: Any,
                message: str) -> None:
        reply_topic = topic + P.REPLY_SUFFIX
        delivered = self.options.lenient_replies or conn.subscribed(reply_topic)
        parsed_topic = P.Topic.parse(topic)
        stage = parsed_topic.path if parsed_topic is not None else "*"
        if delivered and ((self.drop_replies > 0 and "/measurepoint/" in topic)
                          or self.faults.take("drop_reply", stage) is not None):
            if self.drop_replies > 0 and "/measurepoint/" in topic:
                self.drop_replies -= 1
            delivered = False
            self.counts["replies_dropped"] += 1
        if delivered:
            conn.publish(reply_topic, P.reply(msg_id, code, data, message), qos=0)
        else:
            self.counts["replies_undelivered"] += 1
        parsed = P.Topic.parse(topic)
        self.requests.append(RequestRecord(conn.conn_id, topic,
                                           parsed.method if parsed else topic, msg_id, code,
                                           delivered))
        if code != P.OK:
            log.info("sim_request_refused", topic=topic, id=msg_id, code=code, message=message)

    # -- measure points ------------------------------------------------------------------------

    def _product(self, key: Key) -> Product:
        return self.registry.products[key[0]]

    def _check_points(self, key: Key, points: Any, skip_invalid: bool) -> dict[str, Any]:
        """The valid points of `points`; raises _Refusal 1206/1204 unless `skip_invalid`."""
        if not isinstance(points, dict) or not points:
            raise _Refusal(P.MEASUREPOINT_FORMAT, "measurepoints must be a non-empty object")
        model = self._product(key).model
        good: dict[str, Any] = {}
        for name, raw in points.items():
            value, quality = raw, None
            is_struct = model is not None and model.get(name) == "struct"
            if isinstance(raw, dict) and "value" in raw and not is_struct:
                value, quality = raw["value"], raw.get("quality")
                if quality is not None and (not isinstance(quality, int) or
                                            isinstance(quality, bool)):
                    raise _Refusal(P.MEASUREPOINT_FORMAT, f"{name}: quality must be an integer")
            if model is not None and not _fits(model.get(name), value):
                if skip_invalid:
                    continue
                raise _Refusal(P.MODEL_MISMATCH, f"{key[0]}&{key[1]}: point {name!r} value "
                               f"{value!r} does not fit the thing model")
            good[name] = (value, quality)
        return good

    def _item_time(self, item: dict[str, Any]) -> int:
        t = item.get("time")
        if t is None:
            return int(time.time() * 1000)
        if isinstance(t, bool) or not isinstance(t, int):
            raise _Refusal(P.MEASUREPOINT_FORMAT, f"time must be epoch ms, got {t!r}")
        return t

    def _record(self, conn: mqtt.Connection, key: Key, good: dict[str, Any], ts: int,
                how: str) -> None:
        self.counts[f"points_{how}"] += len(good)
        if self.options.record_points:
            for name, (value, quality) in good.items():
                self.points.append(Accepted(key[0], key[1], name, value, quality, ts, how,
                                            conn.conn_id))

    def _mp_single(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        params = env.get("params")
        if not isinstance(params, dict):
            raise _Refusal(P.MEASUREPOINT_FORMAT, "params must be an object")
        key = (topic.pk, topic.dk)
        good = self._check_points(key, params.get("measurepoints"), False)
        self._record(conn, key, good, self._item_time(params),
                     "resume" if topic.path.endswith("resume") else "post")
        return {}

    def _mp_batch(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        st: ConnState = conn.state
        if (topic.pk, topic.dk) != st.key:
            raise _Refusal(P.NO_PERMISSION, "batch topics belong to the connected device")
        items = env.get("params")
        if not isinstance(items, list) or not items:
            raise _Refusal(P.MEASUREPOINT_FORMAT, "params must be a non-empty list")
        allow_offline = _truthy(env.get("allowOfflineSubDevice"))
        skip_invalid = _truthy(env.get("skipInvalidMeasurepoints"))
        gateway = self.registry.devices[st.key]
        accepted: list[tuple[Key, dict[str, Any], int]] = []
        for item in items:  # the whole request fails on the first error (first error wins)
            if not isinstance(item, dict):
                raise _Refusal(P.MEASUREPOINT_FORMAT, "batch items must be objects")
            pk, dk = item.get("productKey") or "", item.get("deviceKey") or ""
            key = st.key if not pk and not dk else (pk, dk)
            if key != st.key:
                dev = self.registry.devices.get(key)
                if key not in gateway.topology or dev is None or not dev.enabled:
                    # OPEN: data for a disabled sub-device is refused like an unknown one.
                    raise _Refusal(P.SUB_DEVICE_NO_PERMISSION,
                                   f"{pk}&{dk} is not an enabled sub-device of this gateway")
                if key not in st.logged_in and not allow_offline:
                    raise _Refusal(P.SUB_DEVICE_NO_PERMISSION, f"{pk}&{dk} is offline")
            good = self._check_points(key, item.get("measurepoints"), skip_invalid)
            accepted.append((key, good, self._item_time(item)))
        how = "resume" if "/resume/" in f"/{topic.path}/" else "post"
        for key, good, ts in accepted:
            self._record(conn, key, good, ts, how)
        return {}

    def _event(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        params = env.get("params")
        if not isinstance(params, dict) or not isinstance(params.get("events"), dict):
            raise _Refusal(P.MEASUREPOINT_FORMAT, "params.events must be an object")
        event_id = topic.path.split("/")[2]  # from the topic: the Python SDK garbles `method`
        self.events.append(((topic.pk, topic.dk), event_id, params["events"],
                            self._item_time(params)))
        return {}

    # -- thing model, OTA and raw data (the SDK topics beyond measure points) -----------------

    def _tsl_template(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        """The thing model of the device's product. OPEN: the real template is a large TSL
        document; its measure points with their data types are what clients read from it."""
        model = self._product((topic.pk, topic.dk)).model or {}
        return {"modelId": topic.pk, "measurepoints": {
            name: {"identifier": name, "dataType": {"type": kind}} for name, kind in model.items()}}

    def _ota_inform(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        params = env.get("params")
        version = params.get("version") if isinstance(params, dict) else None
        if not isinstance(version, str) or not version:
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR, "params.version must be a non-empty string")
        self.firmware[(topic.pk, topic.dk)] = version
        return {}

    def _ota_progress(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        params = env.get("params")
        step = params.get("step") if isinstance(params, dict) else None
        text = str(step) if isinstance(step, str | int) and not isinstance(step, bool) else ""
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        # a percentage, or a failure cause -1 (undefined) .. -5 (device ignored it), notes §3.6
        if value is None or not (0 <= value <= 100 or -5 <= value <= -1):
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR, "params.step must be 0..100 or -1..-5")
        desc = params.get("desc") if isinstance(params, dict) else ""
        self.ota_progress.append(((topic.pk, topic.dk), text.strip(), str(desc or "")))
        return {}

    def _ota_getversion(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        """The firmwares offered to the device's product: {version, signMethod, sign, fileUrl,
        fileSize} each (notes §3.6); none by default."""
        return list(self.firmwares.get(topic.pk, []))

    def _up_raw(self, conn: mqtt.Connection, topic_name: str, topic: P.Topic,
                payload: bytes) -> None:
        """Opaque bytes with no envelope and no id: the answer is raw too, on `_reply`."""
        key = (topic.pk, topic.dk)
        if len(payload) > P.MAX_PAYLOAD_BYTES:
            self.counts["raw_too_large"] += 1  # no id to answer with: discarded, as the hub does
            return
        self.raw_up.append((key, payload))
        self.counts["raw_up"] += 1
        answer = self.raw_reply(key, payload)
        reply_topic = topic_name + P.REPLY_SUFFIX
        delivered = answer is not None and (self.options.lenient_replies
                                            or conn.subscribed(reply_topic))
        if delivered and answer is not None:
            conn.publish(reply_topic, answer, qos=0)
        else:
            self.counts["replies_undelivered"] += 1
        self.requests.append(RequestRecord(conn.conn_id, topic_name, "thing.model.up_raw", "",
                                           P.OK, delivered))

    # -- attributes and tags -------------------------------------------------------------------

    def _device(self, topic: P.Topic) -> Device:
        return self.registry.devices[(topic.pk, topic.dk)]

    def _attr_update(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        params = env.get("params")
        attrs = params.get("attributes") if isinstance(params, dict) else None
        if not isinstance(attrs, dict) or not attrs or len(attrs) > MAX_ATTRIBUTES:
            raise _Refusal(P.ATTR_UPDATE_FORMAT, "attributes must be an object of 1..200 keys")
        self._device(topic).attributes.update(attrs)
        return {}

    def _names(self, env: dict[str, Any], field_name: str, code: int) -> list[str]:
        params = env.get("params")
        names = params.get(field_name) if isinstance(params, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or \
                len(names) > MAX_ATTRIBUTES:
            raise _Refusal(code, f"{field_name} must be a list of names")
        return names

    def _attr_query(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        names = self._names(env, "attributes", P.ATTR_QUERY_FORMAT)
        attrs = self._device(topic).attributes
        return {k: v for k, v in attrs.items() if not names or k in names}

    def _attr_delete(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        for name in self._names(env, "attributes", P.ATTR_DELETE_FORMAT):
            self._device(topic).attributes.pop(name, None)
        return {}

    def _tag_update(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        tags = env.get("params")
        # OPEN: no code is documented for malformed tags; 1220 (payload format) is used.
        if not isinstance(tags, list) or not tags or len(tags) > MAX_ATTRIBUTES or not all(
                isinstance(t, dict) and isinstance(t.get("tagKey"), str) and t["tagKey"]
                and isinstance(t.get("tagValue"), str) for t in tags):
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR, "tags must be [{tagKey, tagValue}]")
        for t in tags:
            self._device(topic).tags[t["tagKey"]] = t["tagValue"]
        return {}

    def _tag_query(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        names = self._names(env, "tags", P.PAYLOAD_FORMAT_ERROR)
        return {k: v for k, v in self._device(topic).tags.items() if not names or k in names}

    def _tag_delete(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        for name in self._names(env, "tags", P.PAYLOAD_FORMAT_ERROR):
            self._device(topic).tags.pop(name, None)
        return {}

    # -- sub-device management -----------------------------------------------------------------

    def _gateway(self, conn: mqtt.Connection, topic: P.Topic) -> Device:
        dev = self.registry.devices[conn.state.key]
        if dev.node_type != "gateway" or (topic.pk, topic.dk) != dev.key:
            raise _Refusal(P.NOT_GATEWAY, "the device is not a gateway")
        return dev

    def _register(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        gw = self._gateway(conn, topic)
        subs = env.get("params")
        if not isinstance(subs, list) or not subs or len(subs) > 1000:
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR, "params must be a list of 1..1000 devices")
        out = []
        for s in subs:
            if not isinstance(s, dict) or s.get("productKey") not in self.registry.products:
                raise _Refusal(P.NO_SUCH_DEVICE, f"unknown product in {s!r}")
            dk = s.get("deviceKey") or secrets.token_hex(5)
            key = (s["productKey"], dk)
            if key in self.registry.devices:
                raise _Refusal(P.DEVICE_KEY_EXISTS, f"device key {dk} exists")
            name = s.get("deviceName")
            dev = self.registry.add_device(Device(
                key[0], dk, secrets.token_urlsafe(12), "sub",
                name=str(name.get("defaultValue", dk)) if isinstance(name, dict)
                else str(name or dk),
                attributes=dict(s.get("deviceAttributes") or {})))
            gw.sub_devices.add(key)
            out.append({"assetId": dev.asset_id, "productKey": key[0], "deviceKey": dk,
                        "deviceSecret": dev.secret})
        return out

    def _sub_entries(self, params: Any, code: int) -> list[dict[str, Any]]:
        if not isinstance(params, list) or not params or not all(
                isinstance(p, dict) and isinstance(p.get("productKey"), str)
                and isinstance(p.get("deviceKey"), str) for p in params):
            raise _Refusal(code, "params must be a list of {productKey, deviceKey, ...}")
        return params

    def _check_sub_sign(self, gw: Device, sub: Key, client_id: Any, timestamp: Any,
                        method: Any, given: Any, secure_mode: str = "2", *,
                        login: bool = True) -> tuple[int, str, Device | None]:
        """(code, message, device) for one sub-device login (`login`) or topo-add credential.

        A login needs the sub-device in this gateway's topology; a topo.add needs it allowed.
        """
        dev = self.registry.devices.get(sub)
        if dev is None:
            return P.NO_SUCH_DEVICE, "Device not exist", None
        if sub not in gw.topology and (login or sub not in gw.sub_devices):
            return P.NOT_THIS_GATEWAY, "not a sub-device of this gateway", dev
        if not dev.enabled:
            return P.DEVICE_DISABLED, "Device is disable", dev
        # the Node.js SDK sends `timestamp` as a JSON number and signs its decimal text
        client_id, timestamp = P.sign_text(client_id), P.sign_text(timestamp)
        if client_id is None or timestamp is None or not isinstance(given, str) or not given:
            return P.SIGN_CHECK_FAILED, "sign check failed: missing clientId/timestamp/sign", dev
        if secure_mode == "3":
            if not self._product(sub).dynamic_activation:
                return P.ACTIVATION_NOT_ALLOWED, "Dynamic activate is not allowed", dev
            secret = self._product(sub).secret
        else:
            secret = dev.secret or ""
        if not secret or not P.sign_ok(sub[0], sub[1], client_id, timestamp, secret,
                                       str(method or "sha256"), given):
            return P.SIGN_CHECK_FAILED, "sign check failed", dev
        return P.OK, "", dev

    def _topo_add(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        gw = self._gateway(conn, topic)
        entries = self._sub_entries(env.get("params"), P.TOPO_ADD_FAILED)
        checked = []
        for e in entries:
            sub = (e["productKey"], e["deviceKey"])
            code, msg, dev = self._check_sub_sign(
                gw, sub, e.get("clientId"), e.get("timestamp"),
                e.get("signMethod") or e.get("signmethod"), e.get("sign"), login=False)
            if code != P.OK:
                raise _Refusal(P.TOPO_ADD_FAILED, f"{sub[0]}&{sub[1]}: {msg}")
            other = self.registry.gateway_of(sub)
            if other is not None and other is not gw:
                raise _Refusal(P.TOPO_ADD_FAILED, f"{sub[0]}&{sub[1]} is under another gateway")
            if dev is not None and dev.node_type == "gateway":
                raise _Refusal(P.TOPO_ADD_FAILED, f"{sub[0]}&{sub[1]} is a gateway")
            checked.append(sub)
        gw.topology.update(checked)
        return {}

    def _topo_get(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        gw = self._gateway(conn, topic)
        out = []
        for key in sorted(gw.topology):
            dev = self.registry.devices[key]
            out.append({"productKey": key[0], "deviceKey": key[1], "deviceName": dev.name,
                        "assetId": dev.asset_id,
                        "status": "online" if key in self.sub_owner else "offline"})
        return out

    def _topo_delete(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        gw = self._gateway(conn, topic)
        subs = [(e["productKey"], e["deviceKey"])
                for e in self._sub_entries(env.get("params"), P.TOPO_DELETE_FAILED)]
        for sub in subs:
            if sub not in gw.topology:
                raise _Refusal(P.TOPO_DELETE_FAILED, f"{sub[0]}&{sub[1]} is not in the topology")
            if sub in self.sub_owner:
                raise _Refusal(P.TOPO_DELETE_FAILED, f"{sub[0]}&{sub[1]} is online")
        gw.topology.difference_update(subs)
        return {}

    def _do_login(self, conn: mqtt.Connection, sub: Key) -> dict[str, Any]:
        st: ConnState = conn.state
        if sub not in st.logged_in and sum(1 for c in self.sub_owner.values() if c is conn) \
                >= MAX_ONLINE_SUBS:
            raise _Refusal(SUB_LIMIT_CODE, f"more than {MAX_ONLINE_SUBS} online sub-devices")
        old = self.sub_owner.get(sub)
        if old is not None and old is not conn:  # kick-off: the newest login wins
            old.state.logged_in.discard(sub)
            log.info("sim_sub_device_kicked", sub=sub, old_conn=old.conn_id)
        self.sub_owner[sub] = conn
        st.logged_in.add(sub)
        self._flush_pending(sub, conn)
        dev = self.registry.devices[sub]
        return {"assetId": dev.asset_id, "productKey": sub[0], "deviceKey": sub[1]}

    def _login(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        gw = self._gateway(conn, topic)
        p = env.get("params")
        if not isinstance(p, dict) or not isinstance(p.get("productKey"), str) or \
                not isinstance(p.get("deviceKey"), str):
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR, "params must name productKey and deviceKey")
        sub = (p["productKey"], p["deviceKey"])
        mode = str(p.get("secureMode") or "2")
        code, msg, dev = self._check_sub_sign(gw, sub, p.get("clientId"), p.get("timestamp"),
                                              p.get("signMethod") or p.get("signmethod"),
                                              p.get("sign"), mode)
        if code != P.OK or dev is None:
            raise _Refusal(code, msg)
        data = self._do_login(conn, sub)
        if mode == "3":
            if dev.secret is None:
                dev.secret = secrets.token_urlsafe(12)
            data["deviceSecret"] = dev.secret
        return data

    def _login_batch(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        gw = self._gateway(conn, topic)
        p = env.get("params")
        empty: dict[str, list[Any]] = {"loginedSubDevices": [], "failedSubDevices": []}
        if not isinstance(p, dict):
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR, "Payload format error", empty)
        subs = p.get("subDevices")
        if not isinstance(subs, list) or not subs or not all(
                isinstance(s, dict) and isinstance(s.get("productKey"), str)
                and isinstance(s.get("deviceKey"), str) for s in subs):
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR, "Payload format error", empty)
        if self.options.max_login_batch and len(subs) > self.options.max_login_batch:
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR,
                           f"more than {self.options.max_login_batch} sub-devices", empty)
        logged, failed, first_code, messages = [], [], P.OK, []
        for s in subs:
            sub = (s["productKey"], s["deviceKey"])
            code, msg, dev = self._check_sub_sign(gw, sub, p.get("clientId"), p.get("timestamp"),
                                                  p.get("signMethod") or p.get("signmethod"),
                                                  s.get("sign"), str(s.get("secureMode") or "2"))
            if code == P.OK and dev is not None:
                try:
                    logged.append(self._do_login(conn, sub))
                    continue
                except _Refusal as exc:
                    code, msg = exc.code, exc.message
            failed.append({"productKey": sub[0], "deviceKey": sub[1]})
            messages.append(f"{sub[0]}&{sub[1]} has error: {msg};")
            if first_code == P.OK:
                first_code = code
        data = {"loginedSubDevices": logged, "failedSubDevices": failed}
        if first_code != P.OK:
            raise _Refusal(first_code, "".join(messages), data)
        return data

    def _logout(self, conn: mqtt.Connection, topic: P.Topic, env: dict[str, Any]) -> Any:
        self._gateway(conn, topic)
        p = env.get("params")
        if not isinstance(p, dict) or not isinstance(p.get("productKey"), str) or \
                not isinstance(p.get("deviceKey"), str):
            raise _Refusal(P.PAYLOAD_FORMAT_ERROR, "params must name productKey and deviceKey")
        sub = (p["productKey"], p["deviceKey"])
        conn.state.logged_in.discard(sub)
        if self.sub_owner.get(sub) is conn:
            del self.sub_owner[sub]
        return {"productKey": sub[0], "deviceKey": sub[1]}

    # -- commands ------------------------------------------------------------------------------

    def owner(self, key: Key) -> mqtt.Connection | None:
        """The connection a command for `key` goes to: its own session or its gateway's."""
        return self.sessions.get(key) or self.sub_owner.get(key)

    def send_command(self, key: Key, topic: str, method: str, params: Any,
                     payload: bytes | None = None, msg_id: str | None = None) -> CommandRecord:
        """Push a command to `key`'s connection now, or when it next comes online.

        `payload` replaces the JSON envelope (to send malformed commands in tests).
        """
        msg_id = msg_id or f"cmd-{self.id_prefix}-{next(self._cmd_ids)}"
        rec = CommandRecord(msg_id, key, topic, method, params, payload)
        self.commands[msg_id] = rec
        conn = self.owner(key)
        if conn is None:
            self._pending.setdefault(key, []).append(rec)
            log.info("sim_command_queued", device=key, id=msg_id, method=method)
        else:
            self._deliver(conn, rec)
        return rec

    def _deliver(self, conn: mqtt.Connection, rec: CommandRecord) -> None:
        payload = rec.raw if rec.raw is not None else P.request(rec.msg_id, rec.method,
                                                                 rec.params)
        rec.sent_at = time.perf_counter()
        # Forced delivery: devices never subscribe to command topics (§2.5).
        conn.publish(rec.topic, payload, qos=self.options.command_qos)

    def _flush_pending(self, key: Key, conn: mqtt.Connection) -> None:
        for rec in self._pending.pop(key, []):
            self._deliver(conn, rec)

    def _device_reply(self, conn: mqtt.Connection, reply_topic: str, payload: bytes) -> None:
        """A device answered a command; record it. Device replies are never forwarded."""
        parsed = P.Topic.parse(reply_topic)
        if parsed is not None and parsed.path == "thing/model/down_raw":
            self._raw_device_reply(reply_topic, payload)
            return
        try:
            env = P.parse_envelope(payload)
        except P.EnvelopeError:
            self.counts["bad_device_replies"] += 1
            return
        rec = self.commands.get(P.envelope_id(env))
        if rec is None or rec.topic + P.REPLY_SUFFIX != reply_topic:
            self.counts["unmatched_device_replies"] += 1
            return
        rec.reply, rec.replied_at = env, time.perf_counter()
        rec.done.set()
        st: ConnState = conn.state
        if rec is st.activation and P.reply_code(env) == P.OK:
            dev = self.registry.devices[st.key]
            dev.secret = rec.params["deviceSecret"]
            log.info("sim_device_activated", device=st.key)
            self.state_changed()
            # OPEN: what the hub does with the mode-3 connection is undocumented; closing it
            # makes the device reconnect with its new secret.
            conn.close()

    def _raw_device_reply(self, reply_topic: str, payload: bytes) -> None:
        """A raw reply has no id: it answers the oldest unanswered raw command on its topic."""
        for rec in self.commands.values():
            if rec.topic + P.REPLY_SUFFIX == reply_topic and rec.raw is not None \
                    and rec.raw_reply is None and rec.sent_at > 0:
                rec.raw_reply, rec.replied_at = payload, time.perf_counter()
                rec.done.set()
                return
        self.counts["unmatched_device_replies"] += 1

    def _push_activation(self, conn: mqtt.Connection) -> None:
        st: ConnState = conn.state
        pk, dk = st.key
        dev = self.registry.devices[st.key]
        params = {"assetId": dev.asset_id, "productKey": pk, "deviceKey": dk,
                  "deviceSecret": secrets.token_urlsafe(12)}
        rec = CommandRecord(f"act-{self.id_prefix}-{next(self._cmd_ids)}", st.key,
                            P.session_topic(pk, dk, "thing/activate/info"), "thing.activate.info",
                            params)
        self.commands[rec.msg_id] = rec
        st.activation = rec
        self._deliver(conn, rec)


FAULTS = {
    "drop_reply": "the hub handles the request but its reply is lost (stage: the topic path, "
                  "e.g. thing/measurepoint/post)",
    "refuse_connect": "a valid CONNECT is refused with CONNACK 3, server unavailable "
                      "(stage: connect)",
}
_REQUEST_PATHS = frozenset({
    "thing/measurepoint/post", "thing/measurepoint/resume", "thing/measurepoint/post/batch",
    "thing/measurepoint/resume/batch", "thing/attribute/update", "thing/attribute/query",
    "thing/attribute/delete", "thing/tag/update", "thing/tag/query", "thing/tag/delete",
    "thing/device/register", "thing/topo/add", "thing/topo/get", "thing/topo/delete",
    "combine/login", "combine/login/batch", "combine/logout", "thing/tsltemplate/get",
    "ota/device/inform", "ota/device/progress", "ota/device/getversion", "thing/model/up_raw"})

# method names the SDKs send that differ from the topic's (notes §2.2: Python's OTA names)
_METHOD_ALIASES: dict[str, frozenset[str]] = {
    "ota/device/inform": frozenset({"ota.inform"}),
    "ota/device/progress": frozenset({"ota.progress"}),
    "ota/device/getversion": frozenset({"Ota.device.getversion"}),
}

# requests whose success changes the registry (`--state` saves it after them)
_STATE_PATHS = frozenset({
    "thing/device/register", "thing/topo/add", "thing/topo/delete", "combine/login",
    "combine/login/batch", "thing/attribute/update", "thing/attribute/delete",
    "thing/tag/update", "thing/tag/delete"})


def _fits(kind: str | None, value: Any) -> bool:
    """True if `value` fits thing-model type `kind` (None: the point is not in the model)."""
    if kind is None:
        return False
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind in ("int", "enum"):
        return is_int
    if kind in ("float", "double"):
        return is_int or isinstance(value, float)
    if kind == "bool":
        return isinstance(value, bool) or (is_int and value in (0, 1))
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, dict)  # struct
