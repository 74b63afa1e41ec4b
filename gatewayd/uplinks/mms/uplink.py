"""SAP HCP IoT MMS v1 (Neo) uplink on the delivery engine: WebSocket (default) or HTTP.

Wire facts (`shared/protocols/mms.md`):
- every request carries `Authorization: Bearer <device token>`, the WebSocket upgrade included;
- upstream is `{mode, messageType, messages:[...]}`, one message type per request or frame, so a
  lease is packed into runs of readings of one message type, one envelope each;
- answers are JSON `{"msg": ...}`: 200 sync ok, 202 async ok (or, on a sync send, "not
  confirmed" with an ack URL and `retryAfterHeaderValue`), 400 bad payload, 401 bad token
  (plain text), 5xx processing failed. A 200 whose body is not JSON (a login page) is retried;
- pushes are `{messageType, sender, messages}` with no id: over WebSocket they arrive one per
  frame; over HTTP a GET drains them newest first, so the array is reversed;
- MMS has no reply channel: each command result goes upstream as a message of a result type.

Verdicts: only a 400 with a JSON `msg` (and, in answer frames without a status, the texts the
notes quote) rejects; the engine bisects and quarantines. An answer frame we cannot read is
confirmed over HTTP instead, and data stays on HTTP from then on. Everything else is a retry.
Delivery is at-least-once: MMS has no idempotency key, so a lost answer may store rows twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from drivers.base import Command, CommandResult, now_ms
from gatewayd.errors import UplinkAuthError, UplinkUnavailableError, UplinkUnreachableError
from gatewayd.uplinks.base import Item, UplinkContext
from gatewayd.uplinks.engine import (
    ACCEPTED,
    DeliveryUplink,
    Malformed,
    Packet,
    Session,
    Verdict,
    rejected,
)
from gatewayd.uplinks.mms.codec import (
    Answer,
    CommandFields,
    Kind,
    Mapper,
    encode_ts,
    read_pushes,
)
from gatewayd.uplinks.mms.config import MmsConfig
from gatewayd.uplinks.mms.transport import Channel, HttpChannel, WsChannel
from gatewayd.uplinks.ratelog import RateLimitedLog

_COMMANDS_MAX = 1000  # commands read but not yet taken by the engine


class MmsUplink(DeliveryUplink):
    """HCP IoT MMS device client. See the module docstring for the wire contract."""

    Config = MmsConfig

    def __init__(self, name: str, config: MmsConfig, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        self.config: MmsConfig = config
        self.batch = config.batch_size
        self.backoff_base_s, self.backoff_cap_s = config.backoff_base, config.backoff_cap
        self.mapper = Mapper(config.messages)
        self.fields = CommandFields(tuple(config.command_types), config.action_field,
                                    config.device_field, config.id_field, config.command_device)
        self.auth_header = {"Authorization": f"Bearer {config.token.reveal()}"}
        self.tls = self._tls()
        self.resent = 0  # readings sent again after an unconfirmed send: possible duplicates
        self.unknown_answers = 0  # answer frames not understood, confirmed over HTTP instead
        self.data_over_http = False  # set for good once answer frames proved unreadable
        self.commands_received = 0
        self.results_sent = 0
        self.rl = RateLimitedLog(self.log)
        self._arrivals = itertools.count(1)
        self._wire_high = 0  # highest seq ever written to the wire
        self._next_send = 0.0  # monotonic time the rate limit allows the next send

    def _tls(self) -> ssl.SSLContext | bool:
        if self.config.api_url.startswith("http:"):
            self.log.warning("insecure_transport", url=self.config.api_url,
                             hint="the device token travels in clear text")
        if not self.config.verify_tls:
            self.log.warning("tls_verification_disabled")
            return False
        if self.config.ca_file:
            return ssl.create_default_context(cafile=self.config.ca_file)
        return True

    async def connect(self) -> Session:
        cfg = self.config
        http_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=cfg.request_timeout))
        http = HttpChannel(cfg, http_session, self.auth_header, self.tls)
        session = MmsSession(self, http)
        try:
            if cfg.transport == "ws":
                session.ws = await self._ws_connect(http_session, session)
            else:
                session.take_pushes(await http.poll(), "http")  # proves the token first
        except BaseException:
            await http_session.close()
            raise
        return session

    async def _ws_connect(self, http: aiohttp.ClientSession, session: MmsSession) -> WsChannel:
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.request_timeout):
                ws = await http.ws_connect(cfg.ws_url, headers=self.auth_header,
                                           heartbeat=cfg.ping_interval, ssl=self.tls,
                                           max_msg_size=16 * 1024 * 1024)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise UplinkAuthError(f"websocket upgrade refused: HTTP {exc.status}") from exc
            raise UplinkUnavailableError(f"websocket upgrade failed: HTTP {exc.status}") from exc
        except TimeoutError as exc:
            raise UplinkUnavailableError("websocket connect timed out") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UplinkUnreachableError(f"websocket connect failed: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UplinkUnavailableError(f"websocket connect failed: {exc}") from exc
        return WsChannel(cfg, ws, lambda env: session.take_pushes([env], "ws"),
                         lambda raw: session.take_pushes([raw], "ws"))

    @property
    def rejected(self) -> int:
        """Readings quarantined, for any reason."""
        return sum(self.quarantined.values())

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "transport": self.config.transport,
            "data_over": "http" if self.data_over_http else self.config.transport,
            "mode": self.config.mode,
            "url": self.config.api_url,
            "device_id": self.config.device_id,
            "resent": self.resent,
            "rejected": self.rejected,
            "answers_unrecognised": self.unknown_answers,
            "commands_received": self.commands_received,
            "results_sent": self.results_sent,
        }


class MmsSession(Session):
    """One connection: the socket (ws) or none (http), plus HTTP for polls and confirmations."""

    def __init__(self, up: MmsUplink, http: HttpChannel) -> None:
        self.up = up
        self.cfg = up.config
        self.http = http
        self.ws: WsChannel | None = None
        self._commands: asyncio.Queue[tuple[Command | Malformed, Any]] = asyncio.Queue(_COMMANDS_MAX)

    # -- data ---------------------------------------------------------------------------------

    def channel(self) -> Channel:
        """Where data goes: the socket, or HTTP (the transport, or the socket's answers unread)."""
        return self.http if self.ws is None or self.up.data_over_http else self.ws

    def pack(self, items: list[Item]) -> list[Packet]:
        """Runs of items of one message type (in seq order), one envelope each; items no map
        takes form runs of their own, refused as unmapped."""
        return [Packet(run, None if mtype is None else (mtype, bodies))
                for mtype, run, bodies in self.up.mapper.runs(items)]

    async def send(self, packet: Packet) -> Verdict | Sequence[Verdict]:
        if packet.payload is None:
            r = packet.items[0].reading
            return [rejected("unmapped", f"no message type maps {r.device}.{r.point}")] * len(packet.items)
        up = self.up
        again = sum(1 for it in packet.items if it.seq <= up._wire_high)
        if again:
            up.resent += again
        up._wire_high = max(up._wire_high, packet.items[-1].seq)
        await self._pace(len(packet.items))
        verdict = await self._send_envelope(packet.payload, len(packet.items))
        return verdict

    async def _send_envelope(self, envelope: tuple[str, list[dict[str, Any]]], count: int) -> Verdict:
        (answer,) = await self.channel().send_many([envelope])
        if answer.kind is Kind.UNKNOWN:
            answer = await self._confirm_unknown(envelope, answer, count)
        if answer.kind is Kind.OK:
            return ACCEPTED
        if answer.kind is Kind.AUTH:
            raise UplinkAuthError(f"HTTP {answer.status}: {answer.msg}")
        if answer.kind is Kind.REJECTED:
            return rejected("rejected", answer.msg)
        if answer.kind is Kind.PENDING:
            return await self._pending(answer, count)
        return Verdict("retry", "transient", f"HTTP {answer.status}: {answer.msg}")

    async def _confirm_unknown(self, envelope: tuple[str, list[dict[str, Any]]], answer: Answer,
                               count: int) -> Answer:
        """An answer frame we cannot read: send the same envelope once over HTTP, whose status
        is unambiguous, and keep data on HTTP from then on. Only this envelope may be stored
        twice; pushes stay on the socket."""
        up = self.up
        up.unknown_answers += 1
        if not up.data_over_http:
            up.data_over_http = True
            up.log.warning("ws_answers_unrecognised", msg=answer.msg,
                           action="data is sent over HTTP from now on; this envelope goes again")
        up.resent += count
        (confirmed,) = await self.http.send_many([envelope])
        return Answer(Kind.TRANSIENT, 0, confirmed.msg) if confirmed.kind is Kind.UNKNOWN else confirmed

    async def _pending(self, answer: Answer, count: int) -> Verdict:
        """A 202 on a sync send: delivered only if the ack URL confirms it (or the site says so)."""
        cfg, up = self.cfg, self.up
        up.count_error("sync_202")
        up.log.debug("sync_202_ack_url", ack_url=answer.ack_url)
        if cfg.treat_sync_202_as_delivered:
            up.rl.warning("sync_202_treated_as_delivered", count=count)
            return ACCEPTED
        wait_s = min(answer.retry_after_s or cfg.sync_202_max_wait, cfg.sync_202_max_wait)
        up.rl.warning("sync_202_unconfirmed", count=count, wait_s=wait_s)
        await asyncio.sleep(wait_s)
        if cfg.check_ack_url and answer.ack_url and await self.http.check_ack(answer.ack_url):
            up.log.info("sync_202_confirmed_by_ack", count=count)
            return ACCEPTED
        up.log.info("sync_202_resend", count=count)
        return Verdict("retry", "sync_202", "sync send answered 202 and not confirmed")

    async def _pace(self, count: int) -> None:
        """Keep delivery under `max_rate` readings/s (a long backlog must not flood the cloud)."""
        rate = self.cfg.max_rate
        if not rate:
            return
        wait = self.up._next_send - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.up._next_send = max(self.up._next_send, time.monotonic()) + count / rate

    # -- commands -----------------------------------------------------------------------------

    def take_pushes(self, envelopes: list[Any], source: str) -> None:
        """Pushed envelopes (a frame, or a poll in issue order) into the command stream."""
        arrival = f"{now_ms()}.{next(self.up._arrivals)}"
        for pc in read_pushes(envelopes, self.up.fields, arrival):
            cmd: Command | Malformed
            if pc.problem:
                self.up.rl.warning("push_malformed", key=pc.problem[:40], cmd_id=pc.id,
                                   source=source, problem=pc.problem)
                cmd = Malformed(pc.id, pc.problem)
            else:
                self.up.commands_received += 1
                self.up.log.info("command_received", cmd_id=pc.id, source=source, device=pc.device,
                                 action=pc.action)
                cmd = Command(pc.id, self.up.name, pc.device, pc.action, pc.params, now_ms())
            try:
                self._commands.put_nowait((cmd, pc.id))
            except asyncio.QueueFull:
                self.up.rl.warning("command_dropped", reason="too many commands waiting", cmd_id=pc.id)

    async def commands(self) -> AsyncIterator[tuple[Command | Malformed, Any]]:
        while True:
            yield await self._commands.get()

    async def reply(self, reply_to: Any, result: CommandResult) -> None:
        """The result as a message of the result type (MMS has no reply channel)."""
        cfg, up = self.cfg, self.up
        up.log.info("command_result", cmd_id=result.command_id, ok=result.ok, code=result.code,
                    message=result.message)
        if not cfg.result_message_type:
            return
        body = {"cmd_id": str(reply_to or result.command_id), "ok": result.ok, "code": result.code,
                "message": result.message[:255],
                "timestamp": encode_ts(now_ms(), cfg.result_timestamp_format)}
        verdict = await self._send_envelope((cfg.result_message_type, [body]), 0)
        if verdict.rejected:
            up.rl.warning("result_refused", cmd_id=body["cmd_id"], msg=verdict.detail)
            up.results_dropped += 1
        elif not verdict.accepted:
            raise UplinkUnavailableError(f"result not confirmed: {verdict.detail}")
        else:
            up.results_sent += 1

    # -- the session's own loop -----------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            if self.ws is not None:
                tg.create_task(self.ws.reader_loop(), name=f"mms[{self.up.name}].reader")
                tg.create_task(self._catch_up(), name=f"mms[{self.up.name}].catch_up")
            else:
                tg.create_task(self._poll_loop(), name=f"mms[{self.up.name}].poll")
            await asyncio.Event().wait()

    async def _catch_up(self) -> None:
        """One GET after each connect, for pushes stored while the socket was down; then one
        every `ws_poll_interval` (if set), for pushes sent with method "http"."""
        while True:
            try:
                self.take_pushes(await self.http.poll(), "http")
            except UplinkAuthError:
                raise
            except UplinkUnavailableError as exc:  # the socket still works; pushes only wait
                self.up.rl.warning("catch_up_poll_failed", error=str(exc))
            if not self.cfg.ws_poll_interval:
                return
            await asyncio.sleep(self.cfg.ws_poll_interval)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval)
            self.take_pushes(await self.http.poll(), "http")

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.ws.ws.close()
        await self.http.session.close()


__all__ = ["MmsSession", "MmsUplink"]
