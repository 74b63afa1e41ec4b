"""The EnOS uplink: a gateway device on the EnOS hub over MQTT 3.1.1.

Per connection: connect with the EnOS sign (or activate dynamically first), subscribe every
reply topic before the first request, reconcile the sub-device topology, log the sub-devices in
by batches, then pump the outbox (live data through `post.batch`, backlog through
`resume.batch`) while commands flow to the dispatcher. See `shared/protocols/enos.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from drivers.base import Command, CommandResult, Quality, now_ms
from gatewayd.backoff import Backoff, Throttle
from gatewayd.errors import UplinkAuthError, UplinkError, UplinkUnavailableError
from gatewayd.uplinks.base import Item, Lease, Uplink, UplinkContext, UplinkState
from gatewayd.uplinks.enos import protocol as P
from gatewayd.uplinks.enos.config import EnosConfig
from gatewayd.uplinks.enos.packing import Message, Target, build_entries, pack
from gatewayd.uplinks.enos.session import Session
from gatewayd.uplinks.enos.sign import device_sign, mqtt_credentials

Key = tuple[str, str]

# CONNACK refusals that mean "your credentials": MQTT 3.1.1 codes 4/5 (paho may report them as
# the MQTT 5 reason codes 134/135).
_AUTH_REFUSALS = frozenset({4, 5, 134, 135})
_HUB_THROTTLE = (4, 120.0)  # the hub blocks a device for 5 min after more tries than this
_ACTIVATION_WAIT_S = 30.0
_MAX_RESENDS = 2  # a batch whose reply times out is resent this often before reconnecting
_REMEMBERED_COMMANDS = 1000


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


class EnosUplink(Uplink):
    """Delivers readings to EnOS and takes commands from it. See the module docstring."""

    Config = EnosConfig

    def __init__(self, name: str, config: EnosConfig, ctx: UplinkContext) -> None:
        self._state_changed = asyncio.Event()
        super().__init__(name, config, ctx)
        self.config: EnosConfig = config
        self.gateway: Key = (config.product_key, config.device_key)
        self.subs: dict[str, SubDevice] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        for local, m in config.devices.items():
            if not m.gateway:
                assert m.device_secret is not None
                self.subs[local] = SubDevice(local, (m.product_key, m.device_key),
                                             m.device_secret.reveal())
        self._by_key = {s.key: s for s in self.subs.values()}
        self._session: Session | None = None
        self._commands: OrderedDict[str, str] = OrderedDict()  # command id -> its topic
        self._last_values: dict[Key, dict[str, Any]] = {}  # for measurepoint.get
        self._faulty: set[str] = set()  # local devices whose last reading was BAD
        # Driver failures reported by the samplers, waiting to be posted (kept while offline).
        self._fault_events: dict[str, tuple[bool, str, int]] = {}
        self._fault_wanted = asyncio.Event()
        self._login_wanted = asyncio.Event()
        self._activation: asyncio.Future[tuple[str, str]] | None = None
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self.points_post = 0
        self.points_resume = 0
        self.quarantined = 0
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

    async def run(self) -> None:
        cfg = self.config
        backoff = Backoff(cfg.backoff_base, cfg.backoff_cap, floor_s=min(0.1, cfg.backoff_base))
        try:
            await self.connection_loop(self._connected_session, backoff, Throttle(*_HUB_THROTTLE))
        finally:
            self.set_state(UplinkState.STOPPED)

    async def _connected_session(self) -> None:
        cfg = self.config
        mode, secret = self._credentials()
        cid, user, password = mqtt_credentials(cfg.product_key, cfg.device_key, secret, mode,
                                               str(now_ms()), method=cfg.sign_method)
        try:
            tls = self._tls_context()
        except (OSError, ssl.SSLError) as exc:
            raise UplinkUnavailableError(f"TLS setup failed: {exc}") from exc
        client = aiomqtt.Client(cfg.host, cfg.port, username=user, password=password,
                                identifier=cid, protocol=aiomqtt.ProtocolVersion.V311,
                                keepalive=cfg.keepalive, clean_session=True,
                                tls_context=tls, timeout=cfg.request_timeout,
                                max_inflight_messages=max(20, cfg.max_inflight * 2),
                                # Replies are small writes right after a PUBACK: without
                                # NODELAY, Nagle + delayed ACK add ~40 ms to each command.
                                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.set_state(UplinkState.AUTHENTICATING)
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            rc = getattr(exc.rc, "value", exc.rc)
            if rc in _AUTH_REFUSALS:
                raise UplinkAuthError(f"hub refused the login (CONNACK {rc}): check product "
                                      "key, device key and secret") from exc
            raise UplinkUnavailableError(f"connect failed: {exc}") from exc
        except aiomqtt.MqttError as exc:
            raise UplinkUnavailableError(f"connect failed: {exc}") from exc
        except TimeoutError:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):  # drop the half-open client
                async with asyncio.timeout(2):
                    await client.__aexit__(None, None, None)
            raise UplinkUnavailableError(f"no CONNACK within {cfg.connect_timeout:g} s") from None
        session = self._session = Session(client, cfg.request_timeout, self._on_command)
        self.log.info("enos_connected", host=cfg.host, port=cfg.port, secure_mode=mode,
                      tls=cfg.tls)
        try:
            await self._run_session(session, mode)
        except* UplinkAuthError as eg:
            raise _first(eg) from None
        except* (UplinkError, OSError, TimeoutError) as eg:
            first = _first(eg)
            if isinstance(first, UplinkError):
                raise first from None
            raise UplinkUnavailableError(f"{type(first).__name__}: {first}") from first
        finally:
            self._session = None
            for sub in self.subs.values():
                if sub.state == "logged_in":
                    sub.state = "in_topology"  # the hub logs them off with the connection
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(2):
                    await client.__aexit__(None, None, None)

    async def _run_session(self, session: Session, mode: int) -> None:
        # Reader and work both run as children: when one fails the group cancels the other.
        # (The parent only waits; on 3.11 a stale cancel count on the parent task would stop
        # the group from cancelling a body that ran in the parent itself.)
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(session.read_loop(), name=f"enos-read[{self.name}]")
            tg.create_task(self._work(session, mode, tg, reader), name=f"enos-work[{self.name}]")

    async def _work(self, session: Session, mode: int, tg: asyncio.TaskGroup,
                    reader: asyncio.Task[None]) -> None:
        if mode == 3:
            await self._activate(session)
            reader.cancel()  # the session ends; the next one connects with the new secret
            return
        # Reply subscriptions first: the hub only answers topics we subscribed (§6.2).
        await session.subscribe(self._reply_topics())
        if self.subs:
            await self._reconcile(session)
            await self._login(session, [s for s in self.subs.values()
                                        if s.state == "in_topology"])
        self.set_state(UplinkState.CONNECTED)
        tg.create_task(self._login_retry_loop(session), name=f"enos-relogin[{self.name}]")
        if self.config.post_device_faults:
            tg.create_task(self._fault_loop(session), name=f"enos-faults[{self.name}]")
        await self.pump(self._send_lease, self.config.batch_max_points)

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
        if self.config.post_device_faults:
            topics += [P.sys_topic(*s.key, "thing/event/+/post") + P.REPLY_SUFFIX
                       for s in self.subs.values()]
        return topics

    async def _activate(self, session: Session) -> None:
        """Secure mode 3: wait for `thing/activate/info`, keep the secret, reconnect with it."""
        self._activation = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(_ACTIVATION_WAIT_S):
                msg_id, secret = await self._activation
        except TimeoutError:
            raise UplinkUnavailableError("no activation info from the hub (is dynamic "
                                         "activation enabled and the device inactive?)") from None
        finally:
            self._activation = None
        self._store_secret(secret)
        topic = P.session_topic(*self.gateway, "thing/activate/info") + P.REPLY_SUFFIX
        await session.publish(topic, P.reply(msg_id, P.OK, None, "device activate success"))
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
        self.quarantined += 1
        self.ctx.outbox.quarantine(item, reason, detail)

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

    async def _send_lease(self, lease: Lease) -> None:
        """Deliver a lease; returns once every reading was accepted or quarantined."""
        if self.config.post_device_faults:
            await self._post_faults(lease.items)
        entries = build_entries(lease.items, self._target, self._reject)
        messages = pack(entries, self.config.max_message_bytes, self._reject)
        for msg in messages:
            msg.allow_offline = any(
                e.key is not None and self._by_key[e.key].state != "logged_in"
                for e in msg.entries)
        limit = asyncio.Semaphore(self.config.max_inflight)

        async def one(msg: Message) -> None:
            async with limit:
                await self._deliver(msg)

        async with asyncio.TaskGroup() as tg:
            for i, msg in enumerate(messages):
                tg.create_task(one(msg), name=f"enos-batch[{self.name}:{i}]")
        for msg in messages:
            for e in msg.entries:
                if e.key is not None:
                    self._last_values.setdefault(e.key, {}).update(e.points)

    async def _deliver(self, msg: Message, relogged: bool = False) -> None:
        session = self._session
        if session is None:
            raise UplinkUnavailableError("not connected")
        kind = "resume" if msg.resume else "post"
        topic = P.sys_topic(*self.gateway, f"thing/measurepoint/{kind}/batch")
        prefix = (f'","version":"1.0","method":"thing.measurepoint.{kind}.batch",'
                  f'"allowOfflineSubDevice":{"true" if msg.allow_offline else "false"},'
                  f'"skipInvalidMeasurepoints":false,"params":').encode()
        body = msg.params_json() + b"}"
        for attempt in range(_MAX_RESENDS + 1):
            try:
                env = await session.request_raw(
                    topic, lambda msg_id: b'{"id":"' + msg_id.encode() + prefix + body)
                break
            except TimeoutError:
                self.log.warning("enos_batch_timeout", kind=kind, attempt=attempt + 1,
                                 count=len(msg.items))
        else:
            raise UplinkUnavailableError(f"no reply to {kind}.batch after {_MAX_RESENDS + 1} "
                                         "tries")
        self.messages += 1
        code = P.reply_code(env)
        if code == P.OK:
            n = sum(len(e.points) for e in msg.entries)
            if msg.resume:
                self.points_resume += n
            else:
                self.points_post += n
            return
        message = str(env.get("message") or "")
        if code in (P.SUB_DEVICE_NO_PERMISSION, P.NO_PERMISSION) and not relogged:
            # Our view of who is logged in is stale: log in again, then resend once.
            await self._relogin_for(session, msg)
            await self._deliver(msg, relogged=True)
            return
        if code in P.PERMANENT_DATA_CODES or code in (P.SUB_DEVICE_NO_PERMISSION,
                                                       P.NO_PERMISSION):
            parts = msg.halves()
            if len(parts) == 1:
                for it in msg.items:
                    self._reject(it, f"code_{code}", message)
                self.log.warning("enos_points_refused", code=code, message=message,
                                 count=len(msg.items))
                return
            for part in parts:  # bisect to isolate the offending item
                await self._deliver(part, relogged=True)
            return
        raise UplinkUnavailableError(f"{kind}.batch refused with code {code}: {message}")

    async def _relogin_for(self, session: Session, msg: Message) -> None:
        subs = {self._by_key[e.key] for e in msg.entries if e.key is not None}
        subs = {s for s in subs if s.state != "disabled"}
        if subs:
            await self._login(session, sorted(subs, key=lambda s: s.name))
            msg.allow_offline = any(s.state != "logged_in" for s in subs)

    async def _post_faults(self, items: Iterable[Item]) -> None:
        """`thing.event.{fault_event}.post` when a device's readings turn bad or good again."""
        changes: dict[str, tuple[bool, Item]] = {}
        for it in items:
            bad = it.reading.quality == Quality.BAD
            if bad != (it.reading.device in self._faulty):
                changes[it.reading.device] = (bad, it)
                (self._faulty.add if bad else self._faulty.discard)(it.reading.device)
        session = self._session
        if session is None:
            return
        for device, (bad, it) in changes.items():
            await self._post_fault_event(session, device, {"faulty": bad, "point": it.reading.point},
                                         it.reading.ts_ms)

    def device_state(self, device: str, failing: bool, error: str, ts_ms: int) -> None:
        """A driver started or stopped failing: post it as a fault event (after a reconnect too)."""
        if self.config.post_device_faults and device in self.config.devices:
            self._fault_events[device] = (failing, error, ts_ms)
            self._fault_wanted.set()

    async def _fault_loop(self, session: Session) -> None:
        if self._fault_events:
            self._fault_wanted.set()  # changes that happened while offline
        while True:
            await self._fault_wanted.wait()
            self._fault_wanted.clear()
            while self._fault_events:
                device, (failing, error, ts_ms) = next(iter(self._fault_events.items()))
                body = {"faulty": failing, "error": error[:200]}
                if await self._post_fault_event(session, device, body, ts_ms):
                    # Only forget it if no newer change arrived while posting.
                    if self._fault_events.get(device) == (failing, error, ts_ms):
                        del self._fault_events[device]
                else:
                    break  # sub-device not logged in yet, or no answer: retry on the next change
                           # or the next session

    async def _post_fault_event(self, session: Session, device: str, body: dict[str, Any],
                                ts_ms: int) -> bool:
        """Post one fault event for a mapped, logged-in device. True once the hub answered."""
        mapping = self.config.devices.get(device)
        if mapping is None:
            return True  # not an EnOS device: nothing to post
        key = self.gateway if mapping.gateway else (mapping.product_key, mapping.device_key)
        if not mapping.gateway and self.subs[device].state != "logged_in":
            return False
        event = self.config.fault_event
        params = {"events": {"device": device, **body}, "time": ts_ms}
        try:
            env = await session.request(P.sys_topic(*key, f"thing/event/{event}/post"),
                                        f"thing.event.{event}.post", params)
        except TimeoutError:
            self.log.warning("enos_fault_event_timeout", device=device)
            return False
        self.log.info("enos_fault_event", device=device, faulty=body["faulty"],
                      code=P.reply_code(env))
        return True

    # -- commands --------------------------------------------------------------------------

    def _on_command(self, topic_name: str, payload: bytes) -> None:
        """A message the hub pushed: activation, sub-device state, service or set/get."""
        topic = P.Topic.parse(topic_name)
        msg_id = ""
        try:
            env = P.parse_envelope(payload)
            msg_id = P.envelope_id(env)
            if topic is None:
                raise ValueError(f"unexpected topic {topic_name}")
            key = (topic.pk, topic.dk)
            if topic.root == "session" and key == self.gateway:
                self._on_session_command(topic_name, topic, msg_id, env)
                return
            if topic.root != "sys" or not topic.path.startswith("thing/service/"):
                raise ValueError(f"unsupported command topic {topic_name}")
            device = self._local_device(key)
            if device is None:
                self._answer(topic_name, msg_id, P.DEVICE_CODE_BASE + 404,
                             f"{topic.pk}&{topic.dk} is not an enabled device of this gateway")
                return
            service = topic.path[len("thing/service/"):]
            params = env.get("params")
            if service == "measurepoint/get":
                self._measurepoint_get(topic_name, msg_id, key, params)
                return
            action = "measurepoint.set" if service == "measurepoint/set" else service
            if not isinstance(params, dict):
                self._answer(topic_name, msg_id, P.DEVICE_CODE_BASE + 400,
                             f"params of {action} must be an object")
                return
            if not msg_id:
                raise ValueError("command without an id")
        except (P.EnvelopeError, ValueError) as exc:
            self.log.warning("enos_command_malformed", topic=topic_name, error=str(exc))
            self._answer(topic_name, msg_id, P.DEVICE_CODE_BASE + 400, f"malformed command: {exc}")
            return
        self._commands[msg_id] = topic_name
        while len(self._commands) > _REMEMBERED_COMMANDS:
            self._commands.popitem(last=False)
        cmd = Command(msg_id, self.name, device, action, params, now_ms())
        self.log.info("enos_command", id=msg_id, device=device or "(gateway)", action=action)
        self.ctx.submit_command(cmd)

    def _local_device(self, key: Key) -> str | None:
        """"" for the gateway, the local name of a configured, enabled sub-device, else None.

        The hub only pushes commands for sub-devices logged in on this connection; a command
        can land just before our login reply does, so "logged in" is not checked here.
        """
        if key == self.gateway:
            return ""
        sub = self._by_key.get(key)
        return sub.name if sub is not None and sub.state != "disabled" else None

    def _measurepoint_get(self, topic: str, msg_id: str, key: Key, params: Any) -> None:
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            self._answer(topic, msg_id, P.DEVICE_CODE_BASE + 400,
                         "params of measurepoint.get must be a list of names")
            return
        last = self._last_values.get(key, {})
        self._answer(topic, msg_id, P.OK, "", {p: last[p] for p in params if p in last})

    def _on_session_command(self, topic_name: str, topic: P.Topic, msg_id: str,
                            env: dict[str, Any]) -> None:
        params = env.get("params")
        if topic.path == "thing/activate/info":
            secret = params.get("deviceSecret") if isinstance(params, dict) else None
            if self._activation is not None and not self._activation.done() and \
                    isinstance(secret, str) and secret:
                self._activation.set_result((msg_id, secret))
            else:
                self.log.warning("enos_activation_unexpected")
            return
        action = topic.path.removeprefix("combine/")
        if action not in ("enable", "disable", "delete") or not isinstance(params, list):
            self._answer(topic_name, msg_id, P.DEVICE_CODE_BASE + 400,
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
        self._answer(topic_name, msg_id, P.OK, "")

    def _answer(self, topic: str, msg_id: str, code: int, message: str,
                data: Any = None) -> None:
        """Reply on `<topic>_reply` in the background (never blocks the reader)."""
        session = self._session
        if session is None:
            self.log.warning("enos_reply_lost", topic=topic, id=msg_id, reason="not connected")
            return
        task = asyncio.get_running_loop().create_task(
            self._publish_reply(session, topic, msg_id, code, message, data),
            name=f"enos-reply[{self.name}:{msg_id}]")
        self._reply_tasks.add(task)
        task.add_done_callback(self._reply_tasks.discard)

    async def _publish_reply(self, session: Session, topic: str, msg_id: str, code: int,
                             message: str, data: Any) -> None:
        try:
            await session.publish(topic + P.REPLY_SUFFIX, P.reply(msg_id, code, data, message))
        except UplinkError as exc:
            self.log.warning("enos_reply_lost", topic=topic, id=msg_id, error=str(exc))

    async def reply(self, command: Command, result: CommandResult) -> None:
        """Answer a command on `<topic>_reply`: 200 and data, or 2000 + the dispatcher code."""
        topic = self._commands.pop(command.id, None)
        if topic is None:
            self.log.warning("enos_reply_unknown_command", id=command.id)
            return
        session = self._session
        if session is None:
            self.log.warning("enos_reply_lost", id=command.id, reason="not connected")
            return
        code = P.OK if result.ok else (result.code if result.code >= P.DEVICE_CODE_BASE
                                       else P.DEVICE_CODE_BASE + result.code)
        await self._publish_reply(session, topic, command.id, code, result.message,
                                  dict(result.data) if result.ok else None)

    # -- status ----------------------------------------------------------------------------

    def set_state(self, state: UplinkState, error: str = "") -> None:
        super().set_state(state, error)
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    async def wait_for_state(self, *states: UplinkState, timeout_s: float = 10.0) -> None:
        """Wait until the uplink is in one of `states` (benches and tests). Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while self.state not in states:
                await self._state_changed.wait()

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update({
            "gateway": f"{self.gateway[0]}/{self.gateway[1]}",
            "sub_devices": {s.name: {"state": s.state, "code": s.code, "error": s.error}
                            for s in self.subs.values()},
            "logged_in": sorted(s.name for s in self.subs.values() if s.state == "logged_in"),
            "points_post": self.points_post,
            "points_resume": self.points_resume,
            "quarantined": self.quarantined,
            "skipped_unmapped": self.skipped,
            "activated_secret": self.secret_path.exists(),
        })
        return out


def _first(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = eg
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _point_id(text: str) -> str:
    """A measure point id from free text: letters, digits and underscores only."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)
