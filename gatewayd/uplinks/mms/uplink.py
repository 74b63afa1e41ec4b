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
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from drivers.base import Command, CommandResult, now_ms
from gatewayd.backoff import Backoff
from gatewayd.errors import UplinkAuthError, UplinkUnavailableError
from gatewayd.uplinks.base import Item, Lease, Uplink, UplinkContext, UplinkState
from gatewayd.uplinks.mms.codec import Answer, Kind, Mapper, Message, encode_ts
from gatewayd.uplinks.mms.config import MmsConfig
from gatewayd.uplinks.mms.transport import Channel, HttpChannel, WsChannel
from gatewayd.uplinks.ratelog import RateLimitedLog

_RESULTS_MAX = 1000  # results kept while the cloud is unreachable; the oldest go first
_RESULTS_PER_MESSAGE = 100


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
        self.unknown_answers = 0  # answer frames not understood, confirmed over HTTP instead
        self._data_over_http = False
        self._rl = RateLimitedLog(self.log)
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
            self._http = HttpChannel(cfg, session, self.auth_header, self.ssl)
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
            channel = WsChannel(
                cfg,
                ws,
                lambda env: self.handle_pushes([env], "ws"),
                lambda raw: self.handle_malformed(raw, "ws"),
            )
            self._channel = channel
            self.set_state(UplinkState.CONNECTED)
            await self._run_all(
                reader=channel.reader_loop(),
                catch_up=self._catch_up(),
                pump=self.pump(self._send_lease, cfg.batch_size),
                results=self._results_loop(),
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
                results=self._results_loop(),
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
        channel = self._data_channel()
        again = sum(1 for it in lease.items if it.seq <= self._wire_high)
        if again:
            self.resent += again
            self.log.info("batch_resent", count=again, first_seq=lease.items[0].seq)
        self._wire_high = max(self._wire_high, lease.last_seq)
        groups, unmapped = self.mapper.build(lease.items)
        frames = list(groups.items())
        answers = await self._send_many(channel, [(t, [m.body for m in msgs]) for t, msgs in frames])
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
            if answer.kind is Kind.UNKNOWN:
                answer = await self._confirm_unknown(message_type, msgs, answer)
                channel = self._data_channel()
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
                    (sub,) = await self._send_many(channel, [(message_type, [m.body for m in part])])
                    await self._settle(channel, message_type, part, sub, drop, poisoned)
                return
            (answer,) = await self._send_many(channel, [(message_type, [m.body for m in msgs])])

    def _data_channel(self) -> Channel:
        """Where data goes: the session's channel, or HTTP once WebSocket answers proved unreadable."""
        channel = self._channel
        if channel is None:
            raise UplinkUnavailableError("not connected")
        if self._data_over_http and self._http is not None:
            return self._http
        return channel

    async def _send_many(
        self, channel: Channel, frames: list[tuple[str, list[dict[str, Any]]]]
    ) -> list[Answer]:
        answers = await channel.send_many(frames)
        self.messages += len(frames)
        return answers

    async def _confirm_unknown(self, message_type: str, msgs: list[Message], answer: Answer) -> Answer:
        """A WebSocket answer frame we cannot read: send the same envelope once over HTTP, whose
        status is unambiguous. So every reading arrives, at most once more than needed."""
        self.unknown_answers += 1
        if not self._data_over_http:
            # The server words its answer frames in a way we cannot read: rather than guess,
            # data goes over HTTP from now on (its status is unambiguous); pushes stay on the
            # socket. Only this envelope may be stored twice.
            self._data_over_http = True
            self.log.warning(
                "ws_answers_unrecognised",
                msg=answer.msg,
                action="data is sent over HTTP from now on; this envelope is sent again",
            )
        assert self._http is not None
        self.resent += sum(len(m.items) for m in msgs)
        (confirmed,) = await self._send_many(self._http, [(message_type, [m.body for m in msgs])])
        if confirmed.kind is Kind.UNKNOWN:  # not from HTTP, but never loop on it
            return Answer(Kind.TRANSIENT, confirmed.status, confirmed.msg)
        return confirmed

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
        """Quarantine one reading; the outbox counts it and logs it, rate-limited per reason."""
        self.rejected += 1
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

    async def _results_loop(self) -> None:
        """Send queued results; a result stays queued until the server took it or refused it."""
        while True:
            while not self._results:  # results left from a failed session go first
                self._results_ready.clear()
                await self._results_ready.wait()
            channel = self._data_channel()
            batch = list(self._results)[:_RESULTS_PER_MESSAGE]
            dropped_before = self.results_dropped
            (answer,) = await self._send_many(
                channel, [(self.config.result_message_type, [m.body for m in batch])]
            )
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
                "data_over": "http" if self._data_over_http else self.config.transport,
                "answers_unrecognised": self.unknown_answers,
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


__all__ = ["MmsUplink"]
