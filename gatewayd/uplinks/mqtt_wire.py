"""What every MQTT-based uplink needs around aiomqtt: connect with typed errors, SUBACK checks,
a guard against PUBLISHes on wildcard topics, and the 3.11 cancellation fix.

Errors carry codes, never parsed from text: a CONNACK refusal of the credentials is
UplinkAuthError, a connection the broker never saw (TCP refused, DNS) UplinkUnreachableError,
anything else UplinkUnavailableError.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import aiomqtt
import structlog

from gatewayd.errors import UplinkAuthError, UplinkUnavailableError, UplinkUnreachableError

log = structlog.get_logger("gatewayd.uplink.mqtt")

# CONNACK refusals that mean "your credentials": MQTT 3.1.1 codes 4/5 (paho may report them as
# the MQTT 5 reason codes 134/135).
AUTH_REFUSALS = frozenset({4, 5, 134, 135})
SUBACK_FAILURE = 0x80


class DropCounter:
    """Counts dropped broker messages by cause; logs each cause once per `every_s`."""

    def __init__(self, name: str, every_s: float = 60.0) -> None:
        self.name = name
        self.every_s = every_s
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def drop(self, cause: str, **detail: Any) -> None:
        self.counts[cause] = self.counts.get(cause, 0) + 1
        now = time.monotonic()
        if now - self._last.get(cause, -self.every_s) >= self.every_s:
            self._last[cause] = now
            log.warning("mqtt_message_dropped", uplink=self.name, cause=cause,
                        total=self.counts[cause], **detail)


def guard_wildcard_topics(client: aiomqtt.Client, drops: DropCounter) -> None:
    """Drop a PUBLISH whose topic holds `#` or `+` before aiomqtt's topic check sees it.

    aiomqtt builds a `Topic` for each message inside paho's on_message; a wildcard raises
    there, paho keeps the bytes and calls it again, and the loop spins at 100 % CPU.
    """
    inner: Any = client._client.on_message

    def on_message(paho: Any, userdata: Any, message: Any) -> None:
        topic = getattr(message, "topic", "")
        if not isinstance(topic, str) or "#" in topic or "+" in topic or not topic:
            drops.drop("invalid_topic", topic=repr(topic)[:200])
            return
        inner(paho, userdata, message)

    client._client.on_message = on_message


async def connect(client: aiomqtt.Client, timeout_s: float) -> None:
    """`client.__aenter__()` with typed errors; a half-open client is cleaned up."""
    cancels = _cancels()
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await client.__aenter__()
        finally:  # a CONNACK refusal landing with a cancel: the cancel wins
            resume_cancellation(cancels)
    except aiomqtt.MqttCodeError as exc:
        rc = getattr(exc.rc, "value", exc.rc)
        if rc in AUTH_REFUSALS:
            raise UplinkAuthError(f"the broker refused the login (CONNACK {rc})") from exc
        raise UplinkUnavailableError(f"connect refused (CONNACK {rc})") from exc
    except aiomqtt.MqttError as exc:
        cause = exc.__cause__ or exc.__context__  # aiomqtt raises it `from None`
        if isinstance(cause, OSError):  # the TCP/TLS connect itself failed
            raise UplinkUnreachableError(f"cannot connect: {cause}") from exc
        raise UplinkUnavailableError(f"connect failed: {exc}") from exc
    except OSError as exc:
        raise UplinkUnreachableError(f"cannot connect: {exc}") from exc
    except TimeoutError:
        await close(client)
        raise UplinkUnavailableError(f"no CONNACK within {timeout_s:g} s") from None


async def close(client: aiomqtt.Client) -> None:
    cancels = _cancels()
    try:
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError, RuntimeError):
            async with asyncio.timeout(2):
                await client.__aexit__(None, None, None)
    finally:
        resume_cancellation(cancels)


async def subscribe(client: aiomqtt.Client, topics: Sequence[str], qos: int,
                    timeout_s: float) -> list[str]:
    """Subscribe and wait for the SUBACK; returns the topics the broker refused (0x80)."""
    if not topics:
        return []
    cancels = _cancels()
    try:
        try:
            async with asyncio.timeout(timeout_s):
                granted = await client.subscribe([(t, qos) for t in topics])
        finally:
            resume_cancellation(cancels)
    except aiomqtt.MqttError as exc:
        raise UplinkUnavailableError(f"subscribe failed: {exc}") from exc
    return refused_topics(topics, granted)


def refused_topics(topics: Sequence[str], granted: Iterable[Any] | Any) -> list[str]:
    """The topics whose SUBACK return code is a failure (>= 0x80)."""
    codes = list(granted) if isinstance(granted, list | tuple) else [granted]
    out = []
    for topic, code in zip(topics, codes, strict=False):
        value = getattr(code, "value", code)
        if isinstance(value, int) and value >= SUBACK_FAILURE:
            out.append(topic)
    return out


async def publish(client: aiomqtt.Client, topic: str, payload: bytes, qos: int,
                  timeout_s: float, retain: bool = False) -> None:
    cancels = _cancels()
    try:
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout_s)
        finally:
            resume_cancellation(cancels)
    except aiomqtt.MqttError as exc:
        raise UplinkUnavailableError(f"publish failed: {exc}") from exc


class Pipeline:
    """Publishes many messages at once straight through paho and waits for their PUBACKs.

    aiomqtt's `publish` costs O(calls pending) per call (it scans every pending id), which
    makes thousands of concurrent publishes quadratic; paho itself pipelines them in order.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho = client._client
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._early: set[int] = set()  # acked before `publish()` returned the mid
        inner: Any = self._paho.on_publish
        pending = client._pending_publishes

        def on_publish(paho: Any, userdata: Any, mid: int, *rest: Any) -> None:
            fut = self._waiting.pop(mid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(None)
            elif mid in pending:
                inner(paho, userdata, mid, *rest)
            elif len(self._early) < 100_000:
                self._early.add(mid)

        self._paho.on_publish = on_publish

    async def publish(self, msgs: Sequence[tuple[str, bytes]], qos: int, retain: bool,
                      timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        futs = []
        for topic, payload in msgs:
            info = self._paho.publish(topic, payload, qos, retain)
            if info.rc != 0:
                raise UplinkUnavailableError(f"publish failed: paho rc {info.rc}")
            if info.mid in self._early:
                self._early.discard(info.mid)
                continue
            fut = self._waiting[info.mid] = loop.create_future()
            futs.append(fut)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*futs)
        except TimeoutError:
            raise UplinkUnavailableError(f"no PUBACK within {timeout_s:g} s") from None
        finally:
            for fut in futs:
                fut.cancel()


def _cancels() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def resume_cancellation(before: int) -> None:
    """Re-raise a cancellation that aiomqtt's `asyncio.wait_for` swallowed.

    On Python 3.11, `wait_for` returns the result instead of raising CancelledError when the
    awaited PUBACK/SUBACK lands in the same loop turn as the cancel (CPython gh-86296); the
    task would then run on with its cancel request lost and never stop. A cancel request
    that arrived during the call and is still pending shows as a higher `cancelling()`.
    """
    if _cancels() > before:
        raise asyncio.CancelledError
