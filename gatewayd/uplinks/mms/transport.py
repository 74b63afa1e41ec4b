"""MMS transports: HTTP requests and one WebSocket. They send envelopes and return answers;
pushes and counts go out through the callbacks they are given, never into the uplink."""

from __future__ import annotations

import asyncio
import ssl
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from gatewayd.errors import UplinkAuthError, UplinkUnavailableError
from gatewayd.uplinks.mms.codec import (
    Answer,
    Kind,
    ack_confirms,
    classify,
    classify_frame,
    envelope,
    parse_json,
)
from gatewayd.uplinks.mms.config import MmsConfig
from gatewayd.uplinks.ratelog import RateLimitedLog

log = structlog.get_logger("gatewayd.uplink.mms")
_rl = RateLimitedLog(log)


class Channel(ABC):
    """A transport: sends envelopes and returns one `Answer` per envelope, in order."""

    @abstractmethod
    async def send_many(self, frames: list[tuple[str, list[dict[str, Any]]]]) -> list[Answer]:
        """Send `(message type, messages)` envelopes; raises UplinkUnavailableError if the
        transport fails (timeouts included)."""


class HttpChannel(Channel):
    """`POST http/data/{id}` per envelope, and the other device routes."""

    def __init__(
        self,
        cfg: MmsConfig,
        session: aiohttp.ClientSession,
        headers: dict[str, str],
        tls: ssl.SSLContext | bool,
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.headers = headers
        self.tls = tls
        self.data_url = f"{cfg.api_url}http/data/{cfg.device_id}"

    async def request(self, method: str, url: str, body: str | None = None) -> tuple[int, str]:
        """One request under the timeout; transport errors become UplinkUnavailableError."""
        headers = {**self.headers}
        if body is not None:
            headers["Content-Type"] = "application/json;charset=utf-8"
        try:
            async with asyncio.timeout(self.cfg.request_timeout):
                async with self.session.request(
                    method, url, data=body, headers=headers, ssl=self.tls
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
                "POST", self.data_url, envelope(self.cfg.mode, message_type, messages)
            )
            out.append(classify(status, text, self.cfg.mode))
        return out

    async def poll(self) -> list[Any]:
        """GET http/data: the pending pushes, oldest first. Raises on auth, 5xx, non-JSON 200."""
        status, text = await self.request("GET", self.data_url)
        if status == 204 or (status == 200 and not text.strip()):
            return []
        body = parse_json(text)
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
            log.info("ack_check_failed", error=str(exc))
            return False
        return status == 200 and ack_confirms(parse_json(text), sequence)


class WsChannel(Channel):
    """One WebSocket: frames are answered in order, pushes interleave (they carry `messages`)."""

    def __init__(
        self,
        cfg: MmsConfig,
        ws: aiohttp.ClientWebSocketResponse,
        on_push: Callable[[dict[str, Any]], None],
        on_malformed: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.ws = ws
        self.on_push = on_push
        self.on_malformed = on_malformed
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
                        await self.ws.send_str(envelope(self.cfg.mode, message_type, messages))
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
                    _rl.warning("frame_unexpected", kind="binary", size=len(msg.data))
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
        obj = parse_json(text)
        if isinstance(obj, dict) and "messages" in obj:
            self.on_push(obj)
        elif isinstance(obj, dict) and "msg" in obj and self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_result(classify_frame(obj, self.cfg.mode))
        elif isinstance(obj, dict) and "msg" in obj:
            _rl.warning("frame_unsolicited", msg=str(obj.get("msg"))[:200])
        else:
            # Answers are JSON objects with `msg`; anything else must be a push gone wrong.
            self.on_malformed(text)


def _path(url: str) -> str:
    return urlsplit(url).path.rsplit("/api/", 1)[-1]
