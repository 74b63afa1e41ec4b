"""The EnOS uplink: a gateway device on the EnOS hub over MQTT 3.1.1, on the delivery engine.

`connect()`: connect with the EnOS sign (or activate dynamically first, then reconnect),
subscribe every reply topic before the first request, reconcile the sub-device topology and
log the sub-devices in by batches. The session (`_Link`) then packs leases into
`post.batch` (live) and `resume.batch` (backlog) messages, in queue order, which the engine
sends with up to `max_inflight` in flight on the one connection (so the hub sees them in
order), and turns the hub's pushes into commands. See `shared/protocols/enos.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from drivers.base import Command, CommandResult, Quality, now_ms
from gatewayd.backoff import Backoff
from gatewayd.errors import UplinkError, UplinkUnavailableError, UplinkUnreachableError
from gatewayd.uplinks import mqtt_wire
from gatewayd.uplinks.base import Item, UplinkContext, UplinkState
from gatewayd.uplinks.engine import (
    ACCEPTED,
    RETRY,
    DeliveryUplink,
    Malformed,
    Packet,
    Verdict,
    rejected,
)
from gatewayd.uplinks.engine import Session as EngineSession
from gatewayd.uplinks.enos import protocol as P
from gatewayd.uplinks.enos.config import EnosConfig
from gatewayd.uplinks.enos.packing import Message, Target, build_entries, pack
from gatewayd.uplinks.enos.session import Session
from gatewayd.uplinks.enos.sign import device_sign, mqtt_credentials

Key = tuple[str, str]

_HUB_THROTTLE = (4, 120.0)  # the hub blocks a device for 5 min after more logins than this
_ACTIVATION_WAIT_S = 30.0
_MAX_RESENDS = 2  # a batch whose reply times out is resent this often before reconnecting
_FAULT_EVENTS_MAX = 1000  # fault events kept while they cannot be posted


@dataclass(eq=False)
class SubDevice:
    """A configured sub-device and where it stands with the hub."""

    name: str  # local device name
    key: Key
    secret: str
    state: str = "configured"  # configured, in_topology, logged_in, failed, disabled
    code: int = 0
    error: str = ""

    def fail(self, code: int, error: str) -> None:
        self.state, self.code, self.error = "failed", code, error


class EnosUplink(DeliveryUplink):
    """Delivers readings to EnOS and takes commands from it. See the module docstring."""

    Config = EnosConfig
    backlog_unit = "messages"  # the hub limits messages per device and second
    throttle = _HUB_THROTTLE

    def __init__(self, name: str, config: EnosConfig, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        self.config: EnosConfig = config
        self.batch, self.window = config.batch_max_points, config.max_inflight
        self.backoff_base_s, self.backoff_cap_s = config.backoff_base, config.backoff_cap
        self.gateway: Key = (config.product_key, config.device_key)
        self.subs: dict[str, SubDevice] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        for local, m in config.devices.items():
            if not m.gateway:
                assert m.device_secret is not None
                self.subs[local] = SubDevice(local, (m.product_key, m.device_key),
                                             m.device_secret.reveal())
        self._by_key = {s.key: s for s in self.subs.values()}
        self._last_values: dict[Key, dict[str, Any]] = {}  # for measurepoint.get
        self._faulty: set[str] = set()  # local devices whose last reading was BAD
        # Fault events waiting to be posted, in order (kept while offline).
        self._fault_events: deque[tuple[str, dict[str, Any], int]] = deque()
        self._fault_wanted = asyncio.Event()
        self._login_wanted = asyncio.Event()
        self.drops = mqtt_wire.DropCounter(name)
        self.subscriptions_refused: list[str] = []
        self.points_post = 0
        self.points_resume = 0
        self.skipped = 0  # readings of devices not mapped to EnOS (unmapped = "skip")
        self._skipped_devices: set[str] = set()

    # -- credentials -----------------------------------------------------------------------

    @property
    def secret_path(self) -> Path:
        """Where a dynamically activated device secret is kept (mode 0600)."""
        return self.ctx.state_dir / f"enos-{self.name}.device_secret"

    def _credentials(self) -> tuple[int, str]:
        """(secure mode, secret): static secret, else a persisted activated one, else mode 3."""
        cfg = self.config
        if cfg.device_secret is not None:
            return 2, cfg.device_secret.reveal()
        with contextlib.suppress(FileNotFoundError):
            stored = self.secret_path.read_text().strip()
            if stored:
                return 2, stored
        assert cfg.product_secret is not None
        return 3, cfg.product_secret.reveal()

    def _store_secret(self, secret: str) -> None:
        """Persist the activated secret atomically, readable by our user only."""
        path = self.secret_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secret.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _tls_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not cfg.tls:
            return None
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
        ctx.check_hostname = cfg.tls_check_hostname
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        return ctx

    # -- connection ------------------------------------------------------------------------

    async def connect(self) -> _Link:
        cfg = self.config
        mode, secret = self._credentials()
        cid, user, password = mqtt_credentials(cfg.product_key, cfg.device_key, secret, mode,
                                               str(now_ms()), method=cfg.sign_method)
        try:
            tls = self._tls_context()
        except (OSError, ssl.SSLError) as exc:
            raise UplinkUnreachableError(f"TLS setup failed: {exc}") from exc
        client = aiomqtt.Client(cfg.host, cfg.port, username=user, password=password,
                                identifier=cid, protocol=aiomqtt.ProtocolVersion.V311,
                                keepalive=cfg.keepalive, clean_session=True,
                                tls_context=tls, timeout=cfg.request_timeout,
                                max_inflight_messages=max(20, cfg.max_inflight * 2),
                                # Replies are small writes right after a PUBACK: without
                                # NODELAY, Nagle + delayed ACK add ~40 ms to each command.
                                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        mqtt_wire.guard_wildcard_topics(client, self.drops)
        self.set_state(UplinkState.AUTHENTICATING)
        try:
            await mqtt_wire.connect(client, cfg.connect_timeout)
        except UplinkError as exc:
            if isinstance(exc.__cause__, aiomqtt.MqttCodeError) and \
                    isinstance(exc, mqtt_wire.UplinkAuthError):
                raise mqtt_wire.UplinkAuthError(
                    f"hub refused the login ({exc}): check product key, device key and "
                    "secret") from exc
            raise
        wire = Session(client, cfg.request_timeout, self.drops)
        reader = asyncio.get_running_loop().create_task(wire.read_loop(),
                                                        name=f"enos-read[{self.name}]")
        self.log.info("enos_connected", host=cfg.host, port=cfg.port, secure_mode=mode,
                      tls=cfg.tls)
        try:
            await self._handshake(wire, mode, reader)
        except BaseException:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._logged_off()
            await mqtt_wire.close(client)
            raise
        return _Link(self, wire, client, reader)

    async def _handshake(self, wire: Session, mode: int, reader: asyncio.Task[None]) -> None:
        """Activation, reply subscriptions, topology and logins, racing the reader."""
        async def steps() -> None:
            if mode == 3:
                await self._activate(wire)
                raise UplinkUnavailableError("activated: reconnecting with the device secret")
            # Reply subscriptions first: the hub only answers topics we subscribed (§6.2).
            self.subscriptions_refused = []
            self._note_refused(await wire.subscribe(self._reply_topics()))
            if self.subs:
                await self._reconcile(wire)
                await self._login(wire, [s for s in self.subs.values()
                                         if s.state == "in_topology"])
        work = asyncio.ensure_future(steps())
        done, _ = await asyncio.wait({work, reader}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            reader.result()  # raises why the connection ended
            raise UplinkUnavailableError("connection closed during login")
        work.result()

    def _note_refused(self, topics: list[str]) -> None:
        """A SUBACK refusal (0x80): shown in /status and logged, since replies will not come."""
        if topics:
            self.subscriptions_refused += topics
            self.count_error("subscribe_refused")
            self.log.error("enos_subscription_refused", topics=topics[:10], count=len(topics))

    def _logged_off(self) -> None:
        for sub in self.subs.values():
            if sub.state == "logged_in":
                sub.state = "in_topology"  # the hub logs them off with the connection

    def _reply_topics(self) -> list[str]:
        pk, dk = self.gateway
        sys_paths = ["thing/measurepoint/post/batch", "thing/measurepoint/resume/batch",
                     "thing/event/+/post"]
        if self.subs:
            sys_paths += ["thing/topo/get", "thing/topo/add", "thing/topo/delete"]
        topics = [P.sys_topic(pk, dk, p) + P.REPLY_SUFFIX for p in sys_paths]
        if self.subs:
            topics += [P.session_topic(pk, dk, p) + P.REPLY_SUFFIX
                       for p in ("combine/login/batch", "combine/logout")]
        return topics

    async def _activate(self, wire: Session) -> None:
        """Secure mode 3: wait for `thing/activate/info`, keep the secret, reconnect with it."""
        path = P.session_topic(*self.gateway, "thing/activate/info")
        try:
            async with asyncio.timeout(_ACTIVATION_WAIT_S):
                while True:
                    topic, payload = await wire.inbox.get()
                    if topic != path:
                        continue
                    try:
                        env = P.parse_envelope(payload)
                    except P.EnvelopeError:
                        self.log.warning("enos_activation_unexpected")
                        continue
                    params = env.get("params")
                    secret = params.get("deviceSecret") if isinstance(params, dict) else None
                    if isinstance(secret, str) and secret:
                        msg_id = P.envelope_id(env)
                        break
                    self.log.warning("enos_activation_unexpected")
        except TimeoutError:
            raise UplinkUnavailableError("no activation info from the hub (is dynamic "
                                         "activation enabled and the device inactive?)") from None
        self._store_secret(secret)
        await wire.publish(path + P.REPLY_SUFFIX,
                           P.reply(msg_id, P.OK, None, "device activate success"))
        self.log.info("enos_activated", secret_file=str(self.secret_path))

    # -- topology and login ----------------------------------------------------------------

    def _sub_params(self, sub: SubDevice, client_id: str, ts: str) -> dict[str, Any]:
        pk, dk = sub.key
        return {"productKey": pk, "deviceKey": dk, "clientId": client_id, "timestamp": ts,
                "signMethod": self.config.sign_method,
                "sign": device_sign(pk, dk, sub.secret, client_id, ts, self.config.sign_method)}

    async def _reconcile(self, session: Session) -> None:
        """Make the hub's topology hold every configured sub-device (and, if asked, no more)."""
        pk, dk = self.gateway
        env = await session.request(P.sys_topic(pk, dk, "thing/topo/get"), "thing.topo.get", {})
        if P.reply_code(env) != P.OK or not isinstance(env.get("data"), list):
            raise UplinkUnavailableError(f"topo.get failed: {env.get('code')} "
                                         f"{env.get('message', '')}")
        present = {(d.get("productKey"), d.get("deviceKey")) for d in env["data"]
                   if isinstance(d, dict)}
        missing = []
        for sub in self.subs.values():
            if sub.state == "disabled":
                continue
            if sub.key in present:
                sub.state = "in_topology"
            else:
                missing.append(sub)
        await self._topo_add(session, missing)
        extras = present - set(self._by_key)
        if extras and self.config.prune_topology:
            params = [{"productKey": k[0], "deviceKey": k[1]} for k in sorted(extras)]
            env = await session.request(P.sys_topic(pk, dk, "thing/topo/delete"),
                                        "thing.topo.delete", params)
            self.log.info("enos_topology_pruned", removed=len(params), code=P.reply_code(env),
                          message=env.get("message", ""))

    async def _topo_add(self, session: Session, subs: list[SubDevice]) -> None:
        """Add `subs`; on a refusal, add them one by one so one bad sub fails alone."""
        if not subs:
            return
        pk, dk = self.gateway
        ts = str(now_ms())
        params = [self._sub_params(s, f"{s.key[0]}.{s.key[1]}.{ts}", ts) for s in subs]
        env = await session.request(P.sys_topic(pk, dk, "thing/topo/add"), "thing.topo.add",
                                    params)
        code = P.reply_code(env)
        if code == P.OK:
            for s in subs:
                s.state = "in_topology"
            self.log.info("enos_topology_added", count=len(subs))
        elif len(subs) > 1:
            for s in subs:
                await self._topo_add(session, [s])
        else:
            subs[0].fail(code or 0, f"topo.add: {env.get('message', '')}")
            self.log.warning("enos_topology_add_failed", device=subs[0].name, code=code,
                             message=env.get("message", ""))

    async def _login(self, session: Session, subs: list[SubDevice]) -> None:
        """`combine.login.batch` in chunks of `login_batch_size`."""
        pk, dk = self.gateway
        size = self.config.login_batch_size
        for i in range(0, len(subs), size):
            chunk = subs[i:i + size]
            ts, client_id = str(now_ms()), "login.batch"
            params = {"clientId": client_id, "timestamp": ts,
                      "signMethod": self.config.sign_method,
                      "subDevices": [{"productKey": s.key[0], "deviceKey": s.key[1],
                                      "secureMode": "2",
                                      "sign": self._sub_params(s, client_id, ts)["sign"]}
                                     for s in chunk]}
            env = await session.request(P.session_topic(pk, dk, "combine/login/batch"),
                                        "combine.login.batch", params, version="1.1")
            code = P.reply_code(env) or 0
            data = env.get("data")
            listed = data.get("loginedSubDevices") if isinstance(data, dict) else None
            logged = {(d.get("productKey"), d.get("deviceKey"))
                      for d in (listed if isinstance(listed, list) else []) if isinstance(d, dict)}
            for s in chunk:
                if s.key in logged:
                    s.state, s.code, s.error = "logged_in", 0, ""
                else:
                    s.fail(code, str(env.get("message") or "login failed"))
            failed = [s.name for s in chunk if s.state == "failed"]
            self.log.info("enos_sub_devices_login", logged_in=len(chunk) - len(failed),
                          failed=failed, code=code)
            # The hub may drop a sub-device's subscriptions when its session ends (protocol
            # notes §7.10): subscribe its reply topics after each login.
            logged_now = [s for s in chunk if s.state == "logged_in"]
            if logged_now and self.config.post_device_faults:
                self._note_refused(await session.subscribe(
                    [P.sys_topic(*s.key, "thing/event/+/post") + P.REPLY_SUFFIX
                     for s in logged_now]))

    async def _login_retry_loop(self, session: Session) -> None:
        """Retry failed sub-devices with backoff, and log in re-enabled ones at once."""
        retry_s = self.config.login_retry
        backoff = Backoff(retry_s, max(600.0, retry_s), floor_s=retry_s / 2)  # never a tight loop
        while True:
            retry = [s for s in self.subs.values() if s.state in ("failed", "configured")]
            delay = backoff.next_delay() if retry else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._login_wanted.wait()
            self._login_wanted.clear()
            retry = [s for s in self.subs.values() if s.state in ("failed", "configured")]
            if not retry:
                backoff.reset()
                continue
            await self._topo_add(session, [s for s in retry if s.code == 0 or
                                           s.error.startswith("topo.add")])
            await self._login(session, [s for s in retry if s.state != "failed" or
                                        not s.error.startswith("topo.add")])
            if all(s.state == "logged_in" for s in retry):
                backoff.reset()


    # -- data ------------------------------------------------------------------------------

    def _reject(self, item: Item, reason: str, detail: str) -> None:
        self.quarantine(item, rejected(reason, detail))

    def _target(self, item: Item) -> Target | None:
        r = item.reading
        cache_key = (r.device, r.point)
        target = self._targets.get(cache_key)
        if target is None:
            mapping = self.config.devices.get(r.device)
            if mapping is None:
                policy = self.config.unmapped
                if policy == "gateway":  # the gateway's own point "<device>_<point>"
                    target = Target(None, None, _point_id(f"{r.device}_{r.point}"), False)
                    self._targets[cache_key] = target
                    return target
                if policy == "quarantine":
                    self._reject(item, "unmapped", f"device {r.device!r} is not in the EnOS map")
                    return None
                self.skipped += 1
                if r.device not in self._skipped_devices:
                    self._skipped_devices.add(r.device)
                    self.log.info("enos_device_not_mapped", device=r.device,
                                  hint="add it under devices, or set unmapped")
                return None
            point = mapping.points.get(r.point, r.point)
            target = Target(None if mapping.gateway else mapping.product_key,
                            None if mapping.gateway else mapping.device_key,
                            point, r.point in mapping.quality_points)
            self._targets[cache_key] = target
        sub = self.subs.get(r.device)
        if sub is not None and sub.state == "disabled":
            self._reject(item, "sub_device_disabled", f"{r.device} was disabled in EnOS")
            return None
        return target


    def _pack(self, items: list[Item]) -> list[Packet]:
        """Messages in queue order: a new one whenever the lane (post/resume) changes."""
        if self.config.post_device_faults:
            self._note_quality_faults(items)
        entries = build_entries(items, self._target, self._reject)
        out = []
        for msg in pack(entries, self.config.max_message_bytes, self._reject):
            msg.allow_offline = any(
                e.key is not None and self._by_key[e.key].state != "logged_in"
                for e in msg.entries)
            out.append(Packet(msg.items, msg))
        return out

    async def _deliver(self, wire: Session, msg: Message) -> Verdict:
        """Send one message; the hub's code becomes the verdict."""
        kind = "resume" if msg.resume else "post"
        topic = P.sys_topic(*self.gateway, f"thing/measurepoint/{kind}/batch")
        for relogged in (False, True):
            prefix = (f'","version":"1.0","method":"thing.measurepoint.{kind}.batch",'
                      f'"allowOfflineSubDevice":{"true" if msg.allow_offline else "false"},'
                      f'"skipInvalidMeasurepoints":false,"params":').encode()
            rest = prefix + msg.params_json() + b"}"

            def build(msg_id: str, rest: bytes = rest) -> bytes:
                return b'{"id":"' + msg_id.encode() + rest

            for attempt in range(_MAX_RESENDS + 1):
                try:
                    env = await wire.request_raw(topic, build)
                    break
                except TimeoutError:
                    self.log.warning("enos_batch_timeout", kind=kind, attempt=attempt + 1,
                                     count=len(msg.items))
            else:
                raise UplinkUnavailableError(f"no reply to {kind}.batch after "
                                             f"{_MAX_RESENDS + 1} tries")
            code = P.reply_code(env)
            if code == P.OK:
                n = sum(len(e.points) for e in msg.entries)
                if msg.resume:
                    self.points_resume += n
                else:
                    self.points_post += n
                for e in msg.entries:
                    if e.key is not None:
                        self._last_values.setdefault(e.key, {}).update(e.points)
                return ACCEPTED
            message = str(env.get("message") or "")
            if code in (P.SUB_DEVICE_NO_PERMISSION, P.NO_PERMISSION) and not relogged:
                # Our view of who is logged in is stale: log in again, then resend once.
                await self._relogin_for(wire, msg)
                continue
            if code in P.PERMANENT_DATA_CODES or code in (P.SUB_DEVICE_NO_PERMISSION,
                                                           P.NO_PERMISSION):
                if len(msg.items) == 1:
                    self.log.warning("enos_points_refused", code=code, message=message)
                return rejected(f"code_{code}", message)
            break
        self.log.warning("enos_batch_unknown_answer", kind=kind, code=code,
                         message=str(env.get("message") or "")[:200])
        return RETRY  # a code we do not know is never a reason to drop data

    async def _relogin_for(self, wire: Session, msg: Message) -> None:
        subs = {self._by_key[e.key] for e in msg.entries if e.key is not None}
        subs = {s for s in subs if s.state != "disabled"}
        if subs:
            await self._login(wire, sorted(subs, key=lambda s: s.name))
            msg.allow_offline = any(s.state != "logged_in" for s in subs)

    # -- device faults ---------------------------------------------------------------------

    def _note_quality_faults(self, items: Iterable[Item]) -> None:
        """A device's readings turned bad or good again: queue a fault event."""
        for it in items:
            bad = it.reading.quality == Quality.BAD
            if bad != (it.reading.device in self._faulty):
                (self._faulty.add if bad else self._faulty.discard)(it.reading.device)
                self._queue_fault(it.reading.device, {"faulty": bad, "point": it.reading.point},
                                  it.reading.ts_ms)

    def device_state(self, device: str, failing: bool, error: str, ts_ms: int) -> None:
        """A driver started or stopped failing: post it as a fault event (after a reconnect too)."""
        if self.config.post_device_faults and device in self.config.devices:
            self._queue_fault(device, {"faulty": failing, "error": error[:200]}, ts_ms)

    def _queue_fault(self, device: str, body: dict[str, Any], ts_ms: int) -> None:
        if device not in self.config.devices:
            return
        if len(self._fault_events) >= _FAULT_EVENTS_MAX:
            self._fault_events.popleft()
            self.count_error("fault_event_dropped")
        self._fault_events.append((device, body, ts_ms))
        self._fault_wanted.set()

    async def _fault_loop(self, wire: Session) -> None:
        while True:
            while self._fault_events:
                device, body, ts_ms = self._fault_events[0]
                if not await self._post_fault_event(wire, device, body, ts_ms):
                    break  # sub-device not logged in yet, or no answer: retry on the next
                           # change or the next session
                self._fault_events.popleft()
            self._fault_wanted.clear()
            await self._fault_wanted.wait()

    async def _post_fault_event(self, wire: Session, device: str, body: dict[str, Any],
                                ts_ms: int) -> bool:
        """Post one fault event for a mapped, logged-in device. True once the hub answered."""
        mapping = self.config.devices[device]
        key = self.gateway if mapping.gateway else (mapping.product_key, mapping.device_key)
        if not mapping.gateway and self.subs[device].state != "logged_in":
            return False
        event = self.config.fault_event
        params = {"events": {"device": device, **body}, "time": ts_ms}
        try:
            env = await wire.request(P.sys_topic(*key, f"thing/event/{event}/post"),
                                     f"thing.event.{event}.post", params)
        except TimeoutError:
            self.log.warning("enos_fault_event_timeout", device=device)
            return False
        self.log.info("enos_fault_event", device=device, faulty=body["faulty"],
                      code=P.reply_code(env))
        return True

    # -- commands --------------------------------------------------------------------------

    async def _command(self, wire: Session, topic_name: str,
                       payload: bytes) -> tuple[Command | Malformed, str] | None:
        """A message the hub pushed: a command for the dispatcher, or answered here (None)."""
        topic = P.Topic.parse(topic_name)
        msg_id = ""
        try:
            env = P.parse_envelope(payload)
            msg_id = P.envelope_id(env)
            if topic is None:
                raise ValueError(f"unexpected topic {topic_name}")
            key = (topic.pk, topic.dk)
            if topic.root == "session" and key == self.gateway:
                await self._session_command(wire, topic_name, topic, msg_id, env)
                return None
            if topic.root != "sys" or not topic.path.startswith("thing/service/"):
                raise ValueError(f"unsupported command topic {topic_name}")
            device = self._local_device(key)
            if device is None:
                await self._answer(wire, topic_name, msg_id, P.DEVICE_CODE_BASE + 404,
                                   f"{topic.pk}&{topic.dk} is not an enabled device of this "
                                   "gateway")
                return None
            service = topic.path[len("thing/service/"):]
            params = env.get("params")
            if service == "measurepoint/get":
                await self._measurepoint_get(wire, topic_name, msg_id, key, params)
                return None
            action = "measurepoint.set" if service == "measurepoint/set" else service
            if not isinstance(params, dict):
                return Malformed(msg_id, f"params of {action} must be an object"), topic_name
            if not msg_id:
                raise ValueError("command without an id")
        except (P.EnvelopeError, ValueError) as exc:
            return Malformed(msg_id, str(exc)), topic_name
        self.log.info("enos_command", id=msg_id, device=device or "(gateway)", action=action)
        return Command(msg_id, self.name, device, action, params, now_ms()), topic_name

    def _local_device(self, key: Key) -> str | None:
        """"" for the gateway, the local name of a configured, enabled sub-device, else None.

        The hub only pushes commands for sub-devices logged in on this connection; a command
        can land just before our login reply does, so "logged in" is not checked here.
        """
        if key == self.gateway:
            return ""
        sub = self._by_key.get(key)
        return sub.name if sub is not None and sub.state != "disabled" else None

    async def _measurepoint_get(self, wire: Session, topic: str, msg_id: str, key: Key,
                                params: Any) -> None:
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            await self._answer(wire, topic, msg_id, P.DEVICE_CODE_BASE + 400,
                               "params of measurepoint.get must be a list of names")
            return
        last = self._last_values.get(key, {})
        await self._answer(wire, topic, msg_id, P.OK, "", {p: last[p] for p in params if p in last})

    async def _session_command(self, wire: Session, topic_name: str, topic: P.Topic,
                               msg_id: str, env: dict[str, Any]) -> None:
        params = env.get("params")
        if topic.path == "thing/activate/info":
            self.log.warning("enos_activation_unexpected")
            return
        action = topic.path.removeprefix("combine/")
        if action not in ("enable", "disable", "delete") or not isinstance(params, list):
            await self._answer(wire, topic_name, msg_id, P.DEVICE_CODE_BASE + 400,
                               f"unsupported session command {topic.path}")
            return
        for p in params:
            if not isinstance(p, dict):
                continue
            sub = self._by_key.get((str(p.get("productKey")), str(p.get("deviceKey"))))
            if sub is None:
                continue
            if action == "enable":
                sub.state, sub.code, sub.error = "configured", 0, ""
                self._login_wanted.set()
            else:
                sub.state, sub.error = "disabled", f"combine.{action} from the cloud"
            self.log.warning("enos_sub_device_" + action + "d", device=sub.name)
        await self._answer(wire, topic_name, msg_id, P.OK, "")

    async def _answer(self, wire: Session, topic: str, msg_id: str, code: int, message: str,
                      data: Any = None) -> None:
        """Reply on `<topic>_reply`."""
        await wire.publish(topic + P.REPLY_SUFFIX, P.reply(msg_id, code, data, message))

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update({
            "gateway": f"{self.gateway[0]}/{self.gateway[1]}",
            "sub_devices": {s.name: {"state": s.state, "code": s.code, "error": s.error}
                            for s in self.subs.values()},
            "logged_in": sorted(s.name for s in self.subs.values() if s.state == "logged_in"),
            "points_post": self.points_post,
            "points_resume": self.points_resume,
            "skipped_unmapped": self.skipped,
            "activated_secret": self.secret_path.exists(),
            "subscriptions_refused": list(self.subscriptions_refused),
            "dropped_messages": dict(self.drops.counts),
        })
        return out


class _Link(EngineSession):
    """One connected session of an EnosUplink, as the engine drives it."""

    def __init__(self, uplink: EnosUplink, wire: Session, client: aiomqtt.Client,
                 reader: asyncio.Task[None]) -> None:
        self.up, self.wire, self.client, self.reader = uplink, wire, client, reader

    def pack(self, items: list[Item]) -> list[Packet]:
        return self.up._pack(items)

    async def send(self, packet: Packet) -> Verdict:
        msg = packet.payload if packet.payload is not None else self.up._pack(packet.items)
        assert isinstance(msg, Message)
        return await self.up._deliver(self.wire, msg)

    async def commands(self) -> AsyncIterator[tuple[Command | Malformed, Any]]:
        while True:
            topic, payload = await self.wire.inbox.get()
            got = await self.up._command(self.wire, topic, payload)
            if got is not None:
                yield got

    async def reply(self, reply_to: Any, result: CommandResult) -> None:
        """Answer on `<topic>_reply`: 200 and data, or 2000 + the dispatcher code."""
        code = P.OK if result.ok else (result.code if result.code >= P.DEVICE_CODE_BASE
                                       else P.DEVICE_CODE_BASE + result.code)
        await self.wire.publish(str(reply_to) + P.REPLY_SUFFIX,
                                P.reply(result.command_id, code,
                                        dict(result.data) if result.ok else None,
                                        result.message))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.up._login_retry_loop(self.wire), name=f"enos-relogin[{self.up.name}]")
            if self.up.config.post_device_faults:
                tg.create_task(self.up._fault_loop(self.wire), name=f"enos-faults[{self.up.name}]")
            await self.reader

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        self.up._logged_off()
        await mqtt_wire.close(self.client)


def _point_id(text: str) -> str:
    """A measure point id from free text: letters, digits and underscores only."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)
