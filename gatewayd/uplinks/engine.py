"""The delivery engine: one life cycle for every uplink; a plug-in supplies only the wire.

zigpy's shape: the radio implements `send_packet`, the core keeps concurrency and dispatch.
Here the core (`DeliveryUplink.run`) keeps the connection state machine, the session runner,
lease/ack and pacing, the in-flight window, bisect and quarantine, the command stream, reply
routing, the result buffer and the metrics. A plug-in subclasses `DeliveryUplink` and writes:

    @dataclass(frozen=True, slots=True)
    class MyConfig:
        devices: dict[str, str] = field(default_factory=dict)   # whatever the cloud needs
        def check(self, devices: set[str]) -> list[str]:         # part of the contract:
            return [f"devices.{d}: no device or actuator named {d!r}"  # every mapping names a
                    for d in self.devices if d not in devices]       # real device, else
                                                                  # `gatewayd check` fails
    class MyUplink(DeliveryUplink):
        Config = MyConfig
        batch = 1000        # items per lease           (class attributes, or set in __init__)
        window = 1          # packets in flight; >1 only if the wire keeps their order
        linger_s = 0.0      # wait for a full lease, only while the last lease was full

        async def connect(self) -> MySession:
            # Connect and log in. Raise UplinkAuthError for refused credentials (the engine
            # waits the backoff cap), UplinkUnreachableError when the cloud never saw the
            # attempt (TCP refused, DNS: not counted by `throttle`), UplinkUnavailableError
            # (or OSError/TimeoutError) for anything else transient.

    class MySession(Session):
        async def send(self, packet: Packet) -> Verdict | Sequence[Verdict]:
            # Deliver `packet.items`; return ACCEPTED, RETRY or rejected(reason), either one
            # for the whole packet or one per item. Anything the cloud said that you do not
            # recognise is RETRY; only an explicit, documented permanent refusal is
            # `rejected`. A single `rejected` for several items makes the engine bisect.
            # Raise UplinkError (or OSError/TimeoutError) when the connection is gone.
        def pack(self, items) -> list[Packet]:        # optional: split a lease into messages,
            ...                                       # in item order (default: one packet)
        async def commands(self) -> AsyncIterator[tuple[Command | Malformed, Any]]:
            ...                                       # optional: (command, reply_to) pairs
        async def reply(self, reply_to: Any, result: CommandResult) -> None:
            ...                                       # optional: answer in the cloud's format;
                                                      # raise UplinkError if it could not go out
        async def run(self) -> None: ...              # optional: a reader; returning or raising
                                                      # ends the session
        async def close(self) -> None: ...            # always called when the session ends

Transports never reach back into the uplink: a session gets what it needs when it is built.

Rules the engine keeps for every uplink:
- Backoff is capped exponential with full jitter; an auth failure waits the cap; the first
  failure after a success is logged at warning, repeats at debug. `throttle = (n, window_s)`
  limits attempts the cloud saw (an unreachable cloud did not see one).
- A session is a set of tasks (pump, commands, replies, the session's own `run`); the first to
  fail ends the session, and the outbox rewinds to its durable cursor.
- The pump leases as soon as data is committed; `linger_s` applies only after a full lease.
  Packets go out in order with up to `window` in flight, and acks advance in order. A RETRY
  verdict backs off and resends from the first unconfirmed item (go-back-N), so a series never
  reaches the cloud out of order. `rejected(reason)` quarantines (counted by reason, logged
  once per cause, rate-limited); a whole-packet refusal is bisected to find the poison.
- Commands: each `(Command, reply_to)` goes to the dispatcher with `reply_to` attached
  (`Command.reply_to`); the result comes back through a bounded buffer that survives
  disconnects (what it drops is counted), and is answered by the next session that is up.
- Every metric series of the uplink exists from the start, at 0.
- `on_batch_sent` callbacks get a `BatchSent` for each confirmed packet (status page, tests).

Live first (`split_lanes`, on unless the uplink or its config says otherwise): each session has
two lanes. The live lane carries what was committed since the session began; the backlog lane
carries everything older, oldest first, paced at `backlog_rate` (readings/s, or messages/s where
`backlog_unit = "messages"`; 0 is unlimited). Each lane is in order per series and confirms in
order; the queue records confirmations as ranges, so a restart resends nothing confirmed. The
lanes share the uplink's window of sends in flight, and a waiting live send always goes first.
The backlog's progress (rows, rate, ETA, % done) is in `status()["drain"]`, and logged every
30 s while it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers.base import Command, CommandResult
from gatewayd.backoff import Backoff, Throttle
from gatewayd.errors import UplinkAuthError, UplinkError, UplinkUnreachableError
from gatewayd.uplinks.base import Item, Uplink, UplinkContext, UplinkState
from gatewayd.uplinks.ratelog import RateLimitedLog

__all__ = [
    "ACCEPTED", "RETRY", "BatchSent", "DeliveryUplink", "Malformed", "Packet", "Session",
    "Verdict", "rejected",
]


# -- verdicts ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the cloud said about an item: accepted, retry, or rejected for `reason`."""

    kind: str  # "accepted" | "retry" | "rejected"
    reason: str = ""
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.kind == "accepted"

    @property
    def rejected(self) -> bool:
        return self.kind == "rejected"


ACCEPTED = Verdict("accepted")
RETRY = Verdict("retry")


def rejected(reason: str, detail: str = "") -> Verdict:
    """An explicit, documented permanent refusal: the item is quarantined."""
    return Verdict("rejected", reason, detail)


@dataclass(slots=True)
class Packet:
    """A run of items sent as one cloud message; `payload` is the plug-in's own (encoded) form."""

    items: list[Item]
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A cloud message that is no valid command: answered with a 400 result, never run."""

    id: str
    message: str


@dataclass(frozen=True, slots=True)
class BatchSent:
    uplink: str
    count: int  # items accepted
    first_seq: int
    last_seq: int
    latency_s: float
    backlog: bool = False  # sent by the backlog lane


# -- the session a plug-in implements ---------------------------------------------------------


class Session:
    """One connection to the cloud. Override `send`; the rest is optional."""

    def pack(self, items: list[Item]) -> list[Packet]:
        return [Packet(items)]

    async def send(self, packet: Packet) -> Verdict | Sequence[Verdict]:
        raise NotImplementedError

    async def commands(self) -> AsyncIterator[tuple[Command | Malformed, Any]]:
        await asyncio.Event().wait()  # no commands: wait for the session to end
        yield  # type: ignore[misc]  # pragma: no cover

    async def reply(self, reply_to: Any, result: CommandResult) -> None:
        return None

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


class _Retry(Exception):
    """A packet came back RETRY: go back to the first unconfirmed item."""


# -- the engine -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Lane:
    """One ordered stream of leases with its own in-flight window."""

    name: str
    cursor: Any  # gatewayd.queue.Lane (or _WholeOutbox): lease / ack / rewind / available
    backlog: bool = False
    last_full: bool = False
    leased_upto: int = 0  # last seq leased, and last seq acked, by this session
    acked_upto: int = 0
    inflight: deque[tuple[int, asyncio.Task[int] | None]] = field(default_factory=deque)


class _WholeOutbox:
    """An outbox without lanes (test stand-ins) as one lane."""

    backlog = False
    finished = False

    def __init__(self, outbox: Any) -> None:
        self.outbox = outbox

    async def lease(self, *args: Any) -> Any:
        return await self.outbox.lease(*args)

    async def ack(self, seq: int) -> None:
        await self.outbox.ack(seq)

    def rewind(self) -> None:
        self.outbox.rewind()

    def available(self) -> int:
        return int(self.outbox.pending())


class _Gate:
    """At most `slots` sends in flight across an uplink's lanes; a waiting live send goes first.
    Waiters of one lane are served in order, so a lane's packets keep their order."""

    def __init__(self, slots: int) -> None:
        self.free = max(1, slots)
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {False: deque(), True: deque()}

    async def acquire(self, backlog: bool) -> None:
        if self.free > 0 and not self._waiting[False] and not self._waiting[True]:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[backlog].append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, then cancelled: pass the slot on
            else:
                with contextlib.suppress(ValueError):
                    self._waiting[backlog].remove(fut)
            raise

    def release(self) -> None:
        for key in (False, True):
            waiting = self._waiting[key]
            while waiting:
                fut = waiting.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self.free += 1


class _Pacer:
    """Spaces sends so that they stay under `rate` units a second (0: unlimited)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0

    async def take(self, units: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(self._next, now) + units / self.rate


class Drain:
    """Progress of an uplink's backlog: what is left, how fast it goes, when it will be done."""

    RATE_WINDOW_S = 30.0

    def __init__(self) -> None:
        self.total = 0  # backlog rows when this drain began (plus any found later)
        self.started = 0.0  # epoch seconds
        self.active = False
        self.done_rows = 0  # confirmed by the backlog lane in this drain
        self._samples: deque[tuple[float, int]] = deque()

    def begin(self, rows: int) -> None:
        self.total, self.done_rows, self.active = rows, 0, rows > 0
        self.started = time.time()
        self._samples.clear()
        self._samples.append((time.monotonic(), 0))

    def sent(self, n: int) -> None:
        self.done_rows += n
        now = time.monotonic()
        self._samples.append((now, self.done_rows))
        while len(self._samples) > 2 and now - self._samples[1][0] > self.RATE_WINDOW_S:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if self.active and time.monotonic() - t1 > self.RATE_WINDOW_S:
            return 0.0  # nothing confirmed for a while (the cloud refuses, or is gone)
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self, remaining: int) -> dict[str, Any]:
        rate = self.rate() if self.active else 0.0
        total = max(self.total, remaining + self.done_rows)
        return {
            "draining": self.active and remaining > 0,
            "rows": remaining,
            "total": total if self.active else remaining,
            "percent": round(100.0 * (1 - remaining / total), 1) if self.active and total else None,
            "rate_per_s": round(rate, 1),
            "eta_s": round(remaining / rate, 1) if rate > 0 and remaining else None,
            "since": round(self.started, 3) if self.active else None,
        }


class DeliveryUplink(Uplink):
    """An uplink whose life cycle the engine runs. Subclasses implement `connect()`."""

    batch: int = 1000
    max_bytes: int = 0
    window: int = 1
    linger_s: float = 0.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    throttle: tuple[int, float] | None = None
    stable_s: float = 30.0  # a session up this long resets the backoff
    results_max: int = 1000  # command results kept while disconnected
    reply_timeout_s: float = 30.0
    split_lanes: bool = True  # live first: a live lane and a backlog lane per session
    backlog_unit: str = "readings"  # what backlog_rate counts: "readings" or "messages"
    drain_log_s: float = 30.0  # progress line while a backlog drains

    def __init__(self, name: str, config: Any, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        self.session: Session | None = None
        self.quarantined: dict[str, int] = {}
        self.results_dropped = 0
        self.attempts = {"seen": 0, "unreachable": 0}  # connects the cloud saw / never saw
        self.on_batch_sent: list[Callable[[BatchSent], None]] = []
        self._results: deque[tuple[Any, CommandResult]] = deque()
        self._results_wanted = asyncio.Event()
        self._lanes: list[_Lane] = []
        self._gate = _Gate(self.window)
        self.drain = Drain()
        self.backlog_rate = float(getattr(ctx, "backlog_rate", 0.0) or 0.0)
        if not getattr(ctx, "live_first", True):
            self.split_lanes = False
        self._failures = 0  # consecutive failed attempts (for the warning/debug rule)
        self._backoff: Backoff | None = None
        self._state_changed = asyncio.Event()
        self._malformed_log = RateLimitedLog(self.log)  # hostile input must not flood the log
        self._init_metrics()

    # -- what plug-ins implement --------------------------------------------------------

    async def connect(self) -> Session:
        raise NotImplementedError

    # -- the old contract, implemented once -------------------------------------------------

    async def reply(self, command: Command, result: CommandResult) -> None:
        """The dispatcher's replier: buffer the result for `command.reply_to`."""
        if len(self._results) >= self.results_max:
            self._results.popleft()
            self.results_dropped += 1
            self._metric_commands("result_dropped")
            self.log.warning("command_result_dropped", id=command.id,
                             buffered=self.results_max)
        self._results.append((command.reply_to, result))
        self._results_wanted.set()

    async def run(self) -> None:
        backoff = self._backoff = Backoff(self.backoff_base_s, self.backoff_cap_s,
                                          floor_s=min(0.05, self.backoff_base_s))
        throttle = Throttle(*self.throttle) if self.throttle else None
        try:
            while True:
                if throttle is not None and (wait := throttle.wait_s()) > 0:
                    self.set_state(UplinkState.BACKING_OFF)
                    self.log.info("uplink_throttled", wait_s=round(wait, 2))
                    await asyncio.sleep(wait)
                delay = await self._connect_once(backoff, throttle)
                self.log.debug("uplink_retry", delay_s=round(delay, 2), attempt=backoff.attempt)
                await asyncio.sleep(delay)
        finally:
            self.set_state(UplinkState.STOPPED)

    async def _connect_once(self, backoff: Backoff, throttle: Throttle | None) -> float:
        """One connect and session; returns the delay before the next attempt."""
        self.set_state(UplinkState.CONNECTING)
        started = time.monotonic()
        try:
            session = await self.connect()
        except BaseException as exc:
            seen = not isinstance(exc, UplinkUnreachableError)
            self.attempts["seen" if seen else "unreachable"] += 1
            if throttle is not None and seen:
                throttle.record()
            if isinstance(exc, UplinkAuthError):
                return self._note_failure(exc, "auth", backoff.cap_delay(), UplinkState.AUTH_FAILED)
            if isinstance(exc, UplinkError | OSError | TimeoutError):
                return self._note_failure(exc, _kind(exc), backoff.next_delay())
            raise
        self.attempts["seen"] += 1
        if throttle is not None:
            throttle.record()
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        # The session's TaskGroup runs in a child task: on 3.11 a TaskGroup whose child fails
        # leaves a stale cancel count on the task it runs in, which would hide a real cancel.
        runner = asyncio.get_running_loop().create_task(self._run_session_tasks(session),
                                                        name=f"session-runner[{self.name}]")
        try:
            await runner
            exc2: BaseException = UplinkError("session ended")
        except* UplinkAuthError as eg:
            exc2 = _first(eg)
        except* (UplinkError, OSError, TimeoutError) as eg:
            exc2 = _first(eg)
        finally:
            if not runner.done():
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
            self.session = None
            self.ctx.outbox.rewind()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await session.close()
        if task is not None and task.cancelling() > cancels:
            # Cancelled while a session task failed: on 3.11 the TaskGroup then raises the
            # task's error instead of CancelledError. The cancellation still wins.
            raise asyncio.CancelledError
        if time.monotonic() - started >= self.stable_s:
            backoff.reset()
        if isinstance(exc2, UplinkAuthError):
            return self._note_failure(exc2, "auth", backoff.cap_delay(), UplinkState.AUTH_FAILED)
        return self._note_failure(exc2, _kind(exc2), backoff.next_delay())

    def _note_failure(self, exc: BaseException, kind: str, delay: float,
                state: UplinkState = UplinkState.BACKING_OFF) -> float:
        self.count_error(kind)
        text = str(exc) if isinstance(exc, UplinkError) else f"{type(exc).__name__}: {exc}"
        self._failures += 1
        (self.log.warning if self._failures == 1 else self.log.debug)(
            "uplink_failed", error=text, kind=kind, retry_in_s=round(delay, 2),
            failures=self._failures)
        self.set_state(state, text)
        return delay

    async def _run_session_tasks(self, session: Session) -> None:
        self.session = session
        self.set_state(UplinkState.CONNECTED)
        if self._failures:
            self.log.info("uplink_recovered", after_failures=self._failures)
        self._failures = 0
        self._lanes = self._open_lanes()
        self._gate = _Gate(self.window)
        async with asyncio.TaskGroup() as tg:
            # The first task that fails ends the session: the group cancels the others.
            tg.create_task(self._end_when_done(session.run()), name=f"session[{self.name}]")
            for lane in self._lanes:
                tg.create_task(self._pump_lane(session, lane), name=f"pump[{self.name}:{lane.name}]")
                if lane.backlog:
                    tg.create_task(self._report_drain(lane), name=f"drain[{self.name}]")
            tg.create_task(self._command_stream(session), name=f"commands[{self.name}]")
            tg.create_task(self._result_flush(session), name=f"replies[{self.name}]")

    @staticmethod
    async def _end_when_done(coro: Any) -> None:
        await coro
        raise UplinkError("session ended")

    # -- delivery ---------------------------------------------------------------------------

    def _open_lanes(self) -> list[_Lane]:
        outbox = self.ctx.outbox
        open_lanes = getattr(outbox, "lanes", None)  # the queue's Outbox; stand-ins may lack it
        if open_lanes is None:
            return [_Lane("default", _WholeOutbox(outbox))]
        cursors = open_lanes(self.split_lanes)
        lanes = [_Lane(c.kind, c, backlog=c.backlog) for c in cursors]
        for lane in lanes:
            if lane.backlog:
                rows = lane.cursor.remaining()
                self.drain.begin(rows)
                if rows:
                    self.log.info("backlog_drain_started", rows=rows,
                                  backlog_rate=self.backlog_rate or None, unit=self.backlog_unit)
        return lanes

    async def _report_drain(self, lane: _Lane) -> None:
        """A progress line every `drain_log_s` while the backlog drains."""
        while self.drain.active:
            await asyncio.sleep(self.drain_log_s)
            if not self.drain.active:
                return
            snap = self.drain.snapshot(lane.cursor.remaining())
            self.log.info("backlog_draining", percent=snap["percent"], rows=snap["rows"],
                          total=snap["total"], rate_per_s=snap["rate_per_s"], eta_s=snap["eta_s"])

    def drain_status(self) -> dict[str, Any]:
        lane = next((ln for ln in self._lanes if ln.backlog), None)
        outbox = self.ctx.outbox
        if lane is not None and self.session is not None:
            remaining = lane.cursor.remaining()
        else:  # offline: all that waits is backlog
            remaining = int(getattr(outbox, "backlog_rows", outbox.pending)())
        return {**self.drain.snapshot(remaining), "backlog_rate": self.backlog_rate or None,
                "unit": self.backlog_unit, "live_first": self.split_lanes}

    async def _pump_lane(self, session: Session, lane: _Lane) -> None:
        retry = Backoff(self.backoff_base_s, self.backoff_cap_s,
                        floor_s=min(0.05, self.backoff_base_s))
        pacer = _Pacer(self.backlog_rate if lane.backlog else 0.0)
        try:
            while True:
                try:
                    if await self._pump_lane_once(session, lane, retry, pacer):
                        return  # a bounded lane (the backlog) is done
                except _Retry as exc:
                    # Go back to the first unconfirmed item, once the window is cleared.
                    await self._drain_lane(lane)
                    lane.cursor.rewind()
                    delay = retry.next_delay()
                    self.count_error("retry")
                    (self.log.warning if retry.attempt == 1 else self.log.debug)(
                        "uplink_batch_retry", reason=str(exc), retry_in_s=round(delay, 2))
                    await asyncio.sleep(delay)
        finally:
            await self._drain_lane(lane)

    async def _pump_lane_once(self, session: Session, lane: _Lane, retry: Backoff,
                              pacer: _Pacer) -> bool:
        """Lease, send, settle; returns True once a bounded lane has nothing left."""
        cursor = lane.cursor
        while True:
            if lane.inflight:
                head = lane.inflight[0][1]
                if len(lane.inflight) >= self.window or head is None or head.done() or \
                        cursor.available() < self.batch:
                    # A full window, a confirmed head, or less than a full lease waiting: settle
                    # first (under a trickle this gathers data into fewer, fuller messages).
                    await self._settle_lane(lane, retry)
                    continue
                lease = await cursor.lease(self.batch, self.max_bytes, 0.0, 0.0)
                if not lease.items:
                    await self._settle_lane(lane, retry)
                    continue
            else:
                # Lease as soon as a commit lands; linger only while the load fills leases.
                lease = await cursor.lease(self.batch, self.max_bytes, None,
                                           self.linger_s if lane.last_full else 0.0)
                if not lease.items:
                    if cursor.finished:
                        self._drain_done(lane)
                        return True
                    continue
                lane.acked_upto = lease.items[0].seq - 1
            lane.leased_upto = lease.last_seq
            lane.last_full = len(lease.items) >= self.batch
            packets = session.pack(lease.items)
            for i, packet in enumerate(packets):
                upto = lease.last_seq if i == len(packets) - 1 else packet.items[-1].seq
                while len(lane.inflight) >= self.window:
                    await self._settle_lane(lane, retry)
                await pacer.take(len(packet.items) if self.backlog_unit == "readings" else 1)
                task = asyncio.get_running_loop().create_task(
                    self._deliver_packet(session, packet, lane.backlog),
                    name=f"send[{self.name}:{lane.name}]")
                lane.inflight.append((upto, task))
            if not packets:  # nothing to send (all skipped): ack in turn
                lane.inflight.append((lease.last_seq, None))

    async def _settle_lane(self, lane: _Lane, retry: Backoff) -> None:
        """Wait for the oldest packet in flight; ack up to the last confirmed one, in order."""
        upto: int | None = None
        try:
            while lane.inflight:
                seq, task = lane.inflight[0]
                if task is not None:
                    if not task.done():
                        if upto is not None:
                            break
                        await asyncio.wait({task})
                    task.result()  # the send's error ends the session; _Retry goes back
                lane.inflight.popleft()
                upto = lane.acked_upto = seq
        finally:
            if upto is not None:
                await lane.cursor.ack(upto)
                retry.reset()

    @staticmethod
    async def _drain_lane(lane: _Lane) -> None:
        tasks = [t for _, t in lane.inflight if t is not None]
        lane.inflight.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drain_done(self, lane: _Lane) -> None:
        if self.drain.active:
            self.drain.active = False
            self.log.info("backlog_drained", rows=self.drain.done_rows,
                          took_s=round(time.time() - self.drain.started, 1))

    async def _send(self, session: Session, packet: Packet, backlog: bool
                    ) -> Verdict | Sequence[Verdict]:
        await self._gate.acquire(backlog)
        try:
            return await session.send(packet)
        finally:
            self._gate.release()

    async def _deliver_packet(self, session: Session, packet: Packet, backlog: bool = False) -> int:
        """Send one packet until every item is accepted or quarantined; returns the count sent."""
        started = time.perf_counter()
        verdicts = await self._send(session, packet, backlog)
        items = packet.items
        if isinstance(verdicts, Verdict):
            if verdicts.accepted:
                return self._count_sent(packet, len(items), started, backlog)
            if verdicts.kind == "retry":
                raise _Retry(verdicts.detail or verdicts.reason or "the cloud asked to retry")
            if len(items) == 1:
                self.quarantine(items[0], verdicts)
                if backlog:
                    self.drain.sent(1)
                return 0
            # One refusal for several items: bisect to isolate the poison.
            mid = len(items) // 2
            n = 0
            for half in (items[:mid], items[mid:]):
                for sub in session.pack(half):
                    n += await self._deliver_packet(session, sub, backlog)
            return n
        if len(verdicts) != len(items):
            raise _Retry(f"{len(verdicts)} verdicts for {len(items)} items")
        if any(v.kind == "retry" for v in verdicts):
            # Keep what was refused for good; the rest goes again (in order) after a backoff.
            raise _Retry(next(v.detail or v.reason for v in verdicts if v.kind == "retry")
                         or "the cloud asked to retry")
        ok = 0
        for it, v in zip(items, verdicts, strict=True):
            if v.accepted:
                ok += 1
            else:
                self.quarantine(it, v)
        if backlog:
            self.drain.sent(len(items) - ok)  # quarantined: settled, part of the progress
        return self._count_sent(packet, ok, started, backlog)

    def _count_sent(self, packet: Packet, count: int, started: float, backlog: bool = False) -> int:
        self.messages += 1
        self.sent += count
        if backlog:
            self.drain.sent(count)
        if self.ctx.metrics is not None and count:
            self.ctx.metrics.readings_sent.labels(self.name).inc(count)
        ev = BatchSent(self.name, count, packet.items[0].seq, packet.items[-1].seq,
                       time.perf_counter() - started, backlog)
        for cb in self.on_batch_sent:
            cb(ev)
        return count

    def quarantine(self, item: Item, v: Verdict) -> None:
        """Drop `item` for good (counted by reason; the outbox logs once per cause)."""
        reason = v.reason or "rejected"
        self.quarantined[reason] = self.quarantined.get(reason, 0) + 1
        self.ctx.outbox.quarantine(item, reason, v.detail)  # counts and logs (rate-limited)

    # -- commands ---------------------------------------------------------------------------

    async def _command_stream(self, session: Session) -> None:
        async for cmd, reply_to in session.commands():
            if isinstance(cmd, Malformed):
                self._metric_commands("malformed")
                self._malformed_log.warning("command_malformed", key=cmd.message[:40], id=cmd.id,
                                            error=cmd.message[:200])
                await self.reply(Command(cmd.id, self.name, "", "", {}, reply_to=reply_to),
                                 CommandResult(cmd.id, False, 400, f"malformed command: "
                                                                   f"{cmd.message}"))
                continue
            self.ctx.submit_command(dataclasses.replace(cmd, reply_to=reply_to))

    async def _result_flush(self, session: Session) -> None:
        while True:
            while self._results:
                reply_to, result = self._results[0]
                try:
                    async with asyncio.timeout(self.reply_timeout_s):
                        await session.reply(reply_to, result)
                except (UplinkError, OSError, TimeoutError):
                    raise  # keep it buffered; the session ends and the next one answers
                self._results.popleft()
            self._results_wanted.clear()
            await self._results_wanted.wait()

    # -- metrics and status -------------------------------------------------------------------

    def _init_metrics(self) -> None:
        m = self.ctx.metrics
        if m is None:
            return
        m.readings_sent.labels(self.name)
        m.readings_acked.labels(self.name)
        m.readings_dropped.labels(self.name, "rejected")
        for kind in ("auth", "unavailable", "unreachable", "retry"):
            m.uplink_errors.labels(self.name, kind)
        for outcome in ("ok", "duplicate", "busy", "malformed", "result_dropped"):
            m.commands.labels(self.name, outcome)
        m.backlog_rows.labels(self.name)
        m.backlog_drain_rate.labels(self.name)
        m.backlog_eta.labels(self.name).set(-1)
        m.backlog_ranges.labels(self.name)
        m.uplink_state(self.name, str(self.state))

    def _metric_commands(self, outcome: str) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.commands.labels(self.name, outcome).inc()

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
        return {**super().status(), "quarantined": sum(self.quarantined.values()),
                "quarantined_by_reason": dict(self.quarantined),
                "results_buffered": len(self._results), "results_dropped": self.results_dropped,
                "connect_attempts": dict(self.attempts), "drain": self.drain_status()}


def _kind(exc: BaseException) -> str:
    if isinstance(exc, UplinkUnreachableError):
        return "unreachable"
    return "unavailable"


def _first(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = eg
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
