"""One MQTT connection to the EnOS hub: request/reply correlation over aiomqtt.

Requests go out on topic `T` with a fresh string id and are matched to replies on `T_reply`
by (reply topic, id). Ids count from 1 per connection, so they are never reused while in
flight. Everything that is not a reply is handed to `on_command`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog

from gatewayd.errors import UplinkUnavailableError
from gatewayd.uplinks.enos import protocol as P

log = structlog.get_logger("gatewayd.uplink.enos")


class Session:
    """Correlates requests and replies on one connected `aiomqtt.Client`."""

    def __init__(self, client: aiomqtt.Client, request_timeout_s: float,
                 on_command: Callable[[str, bytes], None]) -> None:
        self.client = client
        self.request_timeout_s = request_timeout_s
        self._on_command = on_command
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
                    self._on_command(topic, payload)
                except Exception:  # a cloud message must never take the connection down
                    log.exception("enos_command_handler_failed", topic=topic)
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
            log.warning("reply_malformed", topic=topic, error=str(exc))
            return
        fut = self._waiting.get((topic, P.envelope_id(env)))
        if fut is None or fut.done():
            log.debug("reply_unexpected", topic=topic, id=P.envelope_id(env))
            return
        fut.set_result(env)

    async def subscribe(self, topics: list[str]) -> None:
        """Subscribe to reply topics (QoS 1) and wait for the SUBACK."""
        cancels = _cancels()
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await self.client.subscribe([(t, 1) for t in topics])
        except aiomqtt.MqttError as exc:
            raise UplinkUnavailableError(f"subscribe failed: {exc}") from exc
        _resume_cancellation(cancels)

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
        cancels = _cancels()
        try:
            await self.client.publish(topic, payload, qos=qos, timeout=self.request_timeout_s)
        except aiomqtt.MqttError as exc:
            raise UplinkUnavailableError(f"publish failed: {exc}") from exc
        _resume_cancellation(cancels)


def _cancels() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _resume_cancellation(before: int) -> None:
    """Re-raise a cancellation that aiomqtt's `asyncio.wait_for` swallowed.

    On Python 3.11, `wait_for` returns the result instead of raising CancelledError when the
    awaited PUBACK/SUBACK lands in the same loop turn as the cancel (CPython gh-86296); the
    task would then run on with its cancel request lost and never stop. A cancel request
    that arrived during the call and is still pending shows as a higher `cancelling()`.
    """
    if _cancels() > before:
        raise asyncio.CancelledError
