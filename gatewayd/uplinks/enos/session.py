"""One MQTT connection to the EnOS hub: request/reply correlation over aiomqtt.

Requests go out on topic `T` with a fresh string id and are matched to replies on `T_reply`
by (reply topic, id). Ids count from 1 per connection, so they are never reused while in
flight. Everything that is not a reply goes to `inbox`, as (topic, payload), for the uplink
to read: the connection never calls back into the uplink.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog

from gatewayd.errors import UplinkUnavailableError
from gatewayd.uplinks import mqtt_wire
from gatewayd.uplinks.enos import protocol as P

log = structlog.get_logger("gatewayd.uplink.enos")

_INBOX_MAX = 1000  # hub pushes not yet read; beyond this they are dropped (and counted)


class Session:
    """Correlates requests and replies on one connected `aiomqtt.Client`."""

    def __init__(self, client: aiomqtt.Client, request_timeout_s: float,
                 drops: mqtt_wire.DropCounter) -> None:
        self.client = client
        self.request_timeout_s = request_timeout_s
        self.inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(_INBOX_MAX)
        self._drops = drops
        self._ids = itertools.count(1)
        self._waiting: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self.closed = False

    def next_id(self) -> str:
        return str(next(self._ids))

    async def read_loop(self) -> None:
        """Route incoming messages until the connection drops (raises UplinkUnavailableError)."""
        try:
            async for msg in self.client.messages:
                topic = str(msg.topic)
                payload = msg.payload if isinstance(msg.payload, bytes) else \
                    str(msg.payload or "").encode()
                if topic.endswith(P.REPLY_SUFFIX):
                    self._on_reply(topic, payload)
                    continue
                try:
                    self.inbox.put_nowait((topic, payload))
                except asyncio.QueueFull:
                    self._drops.drop("inbox_full", topic=topic)
        except aiomqtt.MqttError as exc:
            raise UplinkUnavailableError(f"connection lost: {exc}") from exc
        finally:
            self.closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(UplinkUnavailableError("connection lost"))
        raise UplinkUnavailableError("connection closed by the hub")

    def _on_reply(self, topic: str, payload: bytes) -> None:
        try:
            env = P.parse_envelope(payload)
        except P.EnvelopeError as exc:
            self._drops.drop("malformed_reply", topic=topic, error=str(exc)[:200])
            return
        fut = self._waiting.get((topic, P.envelope_id(env)))
        if fut is None or fut.done():
            log.debug("reply_unexpected", topic=topic, id=P.envelope_id(env))
            return
        fut.set_result(env)

    async def subscribe(self, topics: list[str]) -> list[str]:
        """Subscribe (QoS 1) and wait for the SUBACK; returns the topics the hub refused."""
        return await mqtt_wire.subscribe(self.client, topics, 1, self.request_timeout_s)

    async def request(self, topic: str, method: str, params: Any, **top_level: Any) -> dict[str, Any]:
        """Send a request and return its reply envelope. Raises TimeoutError if none came."""
        def build(msg_id: str) -> bytes:
            return P.request(msg_id, method, params, **top_level)
        return await self.request_raw(topic, build)

    async def request_raw(self, topic: str, build: Callable[[str], bytes]) -> dict[str, Any]:
        """Like `request`, with the payload built by `build(id)`."""
        msg_id = self.next_id()
        key = (topic + P.REPLY_SUFFIX, msg_id)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await self.publish(topic, build(msg_id), qos=1)
                return await fut
        finally:
            del self._waiting[key]

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        if self.closed:
            raise UplinkUnavailableError("connection lost")
        await mqtt_wire.publish(self.client, topic, payload, qos, self.request_timeout_s)
