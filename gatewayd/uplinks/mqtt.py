"""The `mqtt` uplink: readings as JSON to any MQTT broker (Mosquitto, Node-RED, Home Assistant).

Each reading is published (QoS 1 by default) to `topic`, a template over `{gateway}`,
`{uplink}`, `{device}` and `{point}`, as `{"value", "ts_ms", "quality", "backlog"}`; with
`format = "batch"` the readings of one topic in a lease go as one JSON array instead. The
broker's PUBACK is the delivery confirmation. Commands arrive on `command_topic` as
`{"id", "device", "action", "params"}` and each result goes to `reply_topic` as
`{"id", "ok", "code", "message", "data"}`. The delivery engine does everything else.
"""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import aiomqtt

from drivers.base import Command, CommandResult, Duration, Range, now_ms
from gatewayd.errors import UplinkUnavailableError, UplinkUnreachableError
from gatewayd.schema import Secret
from gatewayd.uplinks import mqtt_wire
from gatewayd.uplinks.base import Item, UplinkContext, UplinkState
from gatewayd.uplinks.engine import ACCEPTED, DeliveryUplink, Malformed, Packet, Session


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str
    port: Annotated[int, Range(1, 65535)] = 1883
    username: str = ""
    password: Secret | None = None  # password_file / password_env
    client_id: str = ""  # default: gatewayd-<gateway id>-<uplink name>
    tls: bool = False
    ca_file: str = ""  # default: the system CAs
    cert_file: str = ""  # client certificate (with key_file)
    key_file: str = ""
    tls_check_hostname: bool = True
    topic: str = "gatewayd/{gateway}/{device}/{point}"
    format: Literal["reading", "batch"] = "reading"
    qos: Annotated[int, Range(0, 1)] = 1
    retain: bool = False
    command_topic: str = "gatewayd/{gateway}/command"  # "" for no commands
    reply_topic: str = "gatewayd/{gateway}/result"
    devices: list[str] = field(default_factory=list)  # publish only these (default: all)
    batch: Annotated[int, Range(1, 100_000)] = 2000  # readings leased (and in flight) at once
    keepalive: Annotated[int, Range(5, 3600)] = 60
    connect_timeout: Duration = 10.0
    publish_timeout: Duration = 15.0
    backoff_base: Duration = 1.0
    backoff_cap: Duration = 60.0

    def __post_init__(self) -> None:
        for name in ("topic", "command_topic", "reply_topic"):
            try:
                getattr(self, name).format(gateway="g", uplink="u", device="d", point="p")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"{name}: bad template ({exc}); use {{gateway}}, {{uplink}}, "
                                 "{device}, {point}") from None
        if (self.cert_file == "") != (self.key_file == ""):
            raise ValueError("cert_file and key_file go together")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ValueError("ca_file/cert_file need tls = true")

    def check(self, devices: set[str]) -> list[str]:
        return [f"devices[{i}]: no device or actuator named {d!r} in this config"
                for i, d in enumerate(self.devices) if d not in devices]


class MqttUplink(DeliveryUplink):
    Config = MqttConfig

    def __init__(self, name: str, config: MqttConfig, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        self.config: MqttConfig = config
        self.batch, self.backoff_base_s, self.backoff_cap_s = (config.batch, config.backoff_base,
                                                               config.backoff_cap)
        fields = {"gateway": ctx.gateway_id, "uplink": name}
        self._topic = config.topic.replace("{gateway}", ctx.gateway_id).replace("{uplink}", name)
        self.command_topic = config.command_topic.format(**fields, device="", point="")
        self.reply_topic = config.reply_topic.format(**fields, device="", point="")
        self._topics: dict[tuple[str, str], str] = {}
        self._wanted = set(config.devices)
        self.drops, self.skipped = mqtt_wire.DropCounter(name), 0
        self.subscriptions_refused: list[str] = []

    def topic_of(self, device: str, point: str) -> str:
        t = self._topics.get((device, point))
        if t is None:
            t = self._topics[(device, point)] = self._topic.format(device=device, point=point)
        return t

    async def connect(self) -> Session:
        cfg = self.config
        tls = None
        try:
            if cfg.tls:
                tls = ssl.create_default_context(cafile=cfg.ca_file or None)
                tls.check_hostname = cfg.tls_check_hostname
                if cfg.cert_file:
                    tls.load_cert_chain(cfg.cert_file, cfg.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise UplinkUnreachableError(f"TLS setup failed: {exc}") from exc
        client = aiomqtt.Client(
            cfg.host, cfg.port, username=cfg.username or None,
            password=cfg.password.reveal() if cfg.password else None,
            identifier=cfg.client_id or f"gatewayd-{self.ctx.gateway_id}-{self.name}",
            keepalive=cfg.keepalive, tls_context=tls, timeout=cfg.publish_timeout,
            # 0: no paho limit (its limit costs O(in flight) per PUBACK); a lease bounds it.
            max_inflight_messages=0, max_queued_incoming_messages=1000)
        client.pending_calls_threshold = cfg.batch + 100  # a lease in flight is not a warning
        mqtt_wire.guard_wildcard_topics(client, self.drops)
        self.set_state(UplinkState.AUTHENTICATING)
        await mqtt_wire.connect(client, cfg.connect_timeout)
        try:
            if self.command_topic:
                self.subscriptions_refused = await mqtt_wire.subscribe(
                    client, [self.command_topic], 1, cfg.publish_timeout)
                if self.subscriptions_refused:
                    self.count_error("subscribe_refused")
                    self.log.error("mqtt_subscription_refused", topic=self.command_topic)
        except BaseException:
            await mqtt_wire.close(client)
            raise
        return _Link(self, client)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "broker": f"{self.config.host}:{self.config.port}",
                "subscriptions_refused": self.subscriptions_refused, "skipped_devices":
                self.skipped, "dropped_messages": dict(self.drops.counts)}


def _reading(it: Item) -> dict[str, Any]:
    r = it.reading
    return {"value": r.value, "ts_ms": r.ts_ms, "quality": r.quality, "backlog": it.backlog}


class _Link(Session):
    def __init__(self, up: MqttUplink, client: aiomqtt.Client) -> None:
        self.up, self.client, self.cfg = up, client, up.config
        self.pipeline = mqtt_wire.Pipeline(client)

    def pack(self, items: list[Item]) -> list[Packet]:
        if self.up._wanted:
            kept = [it for it in items if it.reading.device in self.up._wanted]
            self.up.skipped += len(items) - len(kept)
            items = kept
        return [Packet(items)] if items else []

    async def send(self, packet: Packet) -> Any:
        up, cfg = self.up, self.cfg
        if cfg.format == "batch":
            by_topic: dict[str, list[dict[str, Any]]] = {}
            for it in packet.items:
                by_topic.setdefault(up.topic_of(it.reading.device, it.reading.point),
                                    []).append(_reading(it))
            msgs = [(t, json.dumps(v, separators=(",", ":")).encode()) for t, v in by_topic.items()]
        else:
            msgs = [(up.topic_of(it.reading.device, it.reading.point),
                     json.dumps(_reading(it), separators=(",", ":")).encode())
                    for it in packet.items]
        # paho sends them in this order; all wait for their PUBACKs together.
        await self.pipeline.publish(msgs, cfg.qos, cfg.retain, cfg.publish_timeout)
        return ACCEPTED

    async def commands(self) -> AsyncIterator[tuple[Command | Malformed, Any]]:
        try:
            async for msg in self.client.messages:
                yield self._command(msg.payload), self.up.reply_topic
        except aiomqtt.MqttError as exc:
            raise UplinkUnavailableError(f"connection lost: {exc}") from exc
        raise UplinkUnavailableError("connection closed by the broker")

    def _command(self, payload: Any) -> Command | Malformed:
        try:
            body = json.loads(payload)
        except (ValueError, TypeError, RecursionError) as exc:
            return Malformed("", f"not JSON: {str(exc)[:100]}")
        if not isinstance(body, dict):
            return Malformed("", "expected a JSON object")
        cmd_id = body.get("id")
        cmd_id = str(cmd_id) if isinstance(cmd_id, str | int) else uuid.uuid4().hex
        action, device, params = body.get("action"), body.get("device", ""), body.get("params", {})
        if not isinstance(action, str) or not action or not isinstance(device, str) or \
                not isinstance(params, dict):
            return Malformed(cmd_id, 'expected {"id", "action": str, "device": str, "params": {}}')
        return Command(cmd_id, self.up.name, device, action, params, now_ms())

    async def reply(self, reply_to: Any, result: CommandResult) -> None:
        body = {"id": result.command_id, "ok": result.ok, "code": result.code,
                "message": result.message, "data": dict(result.data)}
        await mqtt_wire.publish(self.client, str(reply_to),
                                json.dumps(body, default=str).encode(), 1, self.cfg.publish_timeout)

    async def close(self) -> None:
        await mqtt_wire.close(self.client)
