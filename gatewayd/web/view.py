"""The on-site view: one JSON document of devices, uplinks, actuators and the queue, and a
server-sent-events stream of its changes.

Cost: nothing while nobody watches. With clients, one builder ticks once a second, builds the
update once and sends the same bytes to every client; an update that equals the previous one
is not sent (a comment keeps idle connections alive). Values come from `Recent` (memory);
the queue is asked for its backlog's oldest age at most every BACKLOG_EVERY_S seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import TYPE_CHECKING, Any

import structlog

from gatewayd.httpd import BodyWriter, Request, Response, json_response
from gatewayd.web.recent import BUCKET_S, SLOTS

if TYPE_CHECKING:
    from drivers.base import Command, CommandResult
    from gatewayd.service import Gateway

log = structlog.get_logger("gatewayd.web")

TICK_S = 1.0
BACKLOG_EVERY_S = 5.0
KEEPALIVE_S = 15.0
MAX_CLIENTS = 32
CLIENT_BACKLOG = 8  # updates queued for a slow client before it is dropped (it reconnects)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False)


def storage_condition(q: Any) -> dict[str, Any]:
    """The queue's storage condition: {"condition": ok / disk_full / read_only / io_error ...}.

    Shown from the queue's `storage` (a `Storage` with `as_dict()`: state, since, detail,
    held, dropped, acks_pending) when the queue has it; else derived from `store_error`.
    """
    as_dict = getattr(getattr(q, "storage", None), "as_dict", None)
    if callable(as_dict):
        with contextlib.suppress(Exception):
            d = dict(as_dict())
            return {**d, "condition": str(d.get("state", "unknown"))}
    err = getattr(q, "store_error", "") or ""
    return {"condition": err or "ok", "store_failed": getattr(q, "store_failed", 0)}


class _Drain:
    """Backlog drain progress of one uplink: share of the peak backlog delivered, and a rate."""

    __slots__ = ("last_rows", "last_t", "peak", "rate")

    def __init__(self) -> None:
        self.peak, self.last_rows, self.last_t, self.rate = 0, 0, 0.0, 0.0

    def update(self, rows: int, now: float) -> dict[str, Any]:
        if rows == 0:
            self.peak, self.rate = 0, 0.0
        self.peak = max(self.peak, rows)
        dt = now - self.last_t
        if self.last_t and dt >= 0.5:
            inst = max(0.0, (self.last_rows - rows) / dt)
            self.rate = inst if not self.rate else 0.7 * self.rate + 0.3 * inst
            self.last_rows, self.last_t = rows, now
        elif not self.last_t:
            self.last_rows, self.last_t = rows, now
        pct = 100.0 if not self.peak else round(100.0 * (1 - rows / self.peak), 1)
        eta = round(rows / self.rate) if rows and self.rate > 0 else None
        return {"peak": self.peak, "pct": pct, "rate_per_s": round(self.rate, 1), "eta_s": eta}


class View:
    """Builds the view of one gateway and streams it."""

    def __init__(self, gateway: Gateway, allow_commands: bool) -> None:
        self.gateway = gateway
        self.allow_commands = allow_commands
        self.last_commands: dict[str, dict[str, Any]] = {}  # actuator -> its last command
        self._drain: dict[str, _Drain] = {}
        self._backlog: dict[str, dict[str, Any]] = {}
        self._backlog_at = -math.inf
        self._clients: set[asyncio.Queue[str | None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False
        self._error_logged_at = -math.inf
        observers = getattr(gateway.dispatcher, "observers", None)
        if observers is not None:
            observers.append(self.on_command)

    # -- command results (the dispatcher's observer) ------------------------------------------

    def on_command(self, cmd: Command, result: CommandResult, latency_ms: float) -> None:
        mapping = self.gateway.dispatcher.find(cmd)
        target = mapping.actuator if mapping is not None else "(unmapped)"
        self.last_commands[target] = {
            "action": cmd.action, "device": cmd.device, "uplink": cmd.uplink, "id": cmd.id,
            "ok": result.ok, "code": result.code, "message": result.message[:200],
            "latency_ms": round(latency_ms, 1), "at_ms": int(time.time() * 1000)}

    # -- the document --------------------------------------------------------------------------

    def _drain_of(self, name: str, uplink: Any, rows: int, mono: float) -> dict[str, Any]:
        """The engine's own drain progress (since the connection began) where the uplink has it,
        else the page's estimate from the backlog's size over time."""
        status = getattr(uplink, "drain_status", None)
        if callable(status):
            d = status()
            if d.get("draining"):
                return {"peak": d["total"], "pct": d["percent"], "rate_per_s": d["rate_per_s"],
                        "eta_s": round(d["eta_s"]) if d.get("eta_s") is not None else None}
        return self._drain.setdefault(name, _Drain()).update(rows, mono)

    async def _backlog_stats(self) -> dict[str, dict[str, Any]]:
        q = self.gateway.queue
        now = time.monotonic()
        if q is not None and now - self._backlog_at >= BACKLOG_EVERY_S:
            self._backlog_at = now
            try:
                self._backlog = await q.backlog_stats()
            except Exception as exc:  # a failing disk must not take the page down
                log.debug("view_backlog_failed", error=repr(exc))
        return self._backlog

    async def build(self, history: bool, points_since: int | None = None) -> dict[str, Any]:
        """The whole view; `points_since` limits points to those changed after that seq."""
        gw = self.gateway
        recent = gw.recent
        now_ms = int(time.time() * 1000)
        if points_since is None:
            points = recent.snapshot(history=history, now_ms=now_ms)
        else:
            points = recent.changed_since(points_since)
        devices = {}
        for s in gw.samplers:
            st = s.status
            devices[st.name] = {
                "driver": st.driver, "state": st.state, "since": round(st.since, 1),
                "last_error": st.last_error, "reads": st.reads, "failures": st.failures,
                "last_read_ms": st.last_read_ms, "interval_s": s.interval_s,
                "points": points.get(st.name, {})}
        backlog = await self._backlog_stats()
        mono = time.monotonic()
        uplinks = {}
        for name, u in gw.uplinks.items():
            base = u.status()
            ob = gw.queue.outbox(name) if gw.queue is not None else None
            rows = ob.pending() if ob is not None else 0
            b = backlog.get(name, {})
            age = b.get("oldest_age_s") or 0.0
            uplinks[name] = {
                "type": base.get("type", ""), "state": base.get("state", ""),
                "since": base.get("since", 0), "last_error": base.get("last_error", ""),
                "sent": base.get("sent", 0),
                "dropped": sum((ob.dropped if ob is not None else {}).values()),
                "backlog": {"rows": rows, "bytes": b.get("bytes", 0),
                            "oldest_ts_ms": int(now_ms - age * 1000) if rows and age else None,
                            "drain": self._drain_of(name, u, rows, mono)}}
        actuators = {}
        for name, a in gw.actuators.items():
            actuators[name] = {"driver": type(a).__name__, "error": gw.actuator_errors.get(name, ""),
                               "last": self.last_commands.get(name)}
        q = gw.queue
        cfg = gw.config.queue
        queue = None if q is None else {
            "rows": q.rows, "bytes": q.bytes_est, "dropped": q.dropped_total,
            "caps": {"max_rows": cfg.max_rows, "max_bytes": cfg.max_bytes, "max_age_s": cfg.max_age,
                     "max_file_size": cfg.max_file_size},
            "storage": storage_condition(q)}
        doc: dict[str, Any] = {
            "gateway": gw.config.gateway.id, "ready": gw.ready.is_set(), "problems": gw.problems(),
            "devices": devices, "uplinks": uplinks, "actuators": actuators, "queue": queue,
            "seq": recent.seq}
        if points_since is None:
            from gatewayd import __version__

            doc.update({
                "version": __version__, "started_at": gw.started_at, "now_ms": now_ms,
                "bucket_s": BUCKET_S, "window_s": BUCKET_S * SLOTS,
                "commands_allowed": self.allow_commands,
                "command_actions": [{"action": c.action, "device": c.device, "actuator": c.actuator}
                                    for c in gw.config.commands if c.uplink in ("*", "local")]
                if self.allow_commands else []})
        return doc

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle_json(self, request: Request) -> Response:
        history = request.query.get("history", "1") != "0"
        return json_response(await self.build(history), dumps=_dumps)

    async def handle_events(self, request: Request) -> Response:
        if len(self._clients) >= MAX_CLIENTS or self._closed:
            return json_response({"ok": False, "message": "too many status page clients"},
                                 status=503)
        return Response(content_type="text/event-stream", stream=self._stream, headers=[
            ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")])

    async def _stream(self, out: BodyWriter) -> None:
        """One client's stream: a snapshot, then the ticker's updates, until it ends or the
        client goes away (the server then cancels this) or falls behind."""
        inbox: asyncio.Queue[str | None] = asyncio.Queue(CLIENT_BACKLOG)
        self._clients.add(inbox)
        try:
            snapshot = _dumps(await self.build(history=True))
            await out.write(f"retry: 2000\nevent: snapshot\ndata: {snapshot}\n\n".encode())
            if self._ticker is None or self._ticker.done():
                self._ticker = asyncio.create_task(self._tick(), name="status-page")
            while True:
                try:
                    msg = await asyncio.wait_for(inbox.get(), KEEPALIVE_S)
                except TimeoutError:
                    await out.write(b": keepalive\n\n")
                    continue
                if msg is None:  # closing, or this client fell behind
                    break
                await out.write(msg.encode())
        except ConnectionError:
            pass  # gone, or too slow to take one write: it reconnects
        finally:
            self._clients.discard(inbox)

    async def _tick(self) -> None:
        """Build one update per tick while anyone listens; send it only if it changed."""
        seq = self.gateway.recent.seq
        last = ""
        while self._clients and not self._closed:
            await asyncio.sleep(TICK_S)
            try:
                doc = await self.build(history=False, points_since=seq)
            except Exception as exc:  # a bug here must not stop the daemon: log it once a minute
                now = time.monotonic()
                if now - self._error_logged_at >= 60:
                    self._error_logged_at = now
                    log.exception("status_page_update_failed", error=repr(exc))
                continue
            seq = doc["seq"]
            body = _dumps(doc)
            if body == last:
                continue
            last = body
            msg = f"event: update\ndata: {body}\n\n"
            for inbox in list(self._clients):
                try:
                    inbox.put_nowait(msg)
                except asyncio.QueueFull:  # too slow: drop it, it reconnects and gets a snapshot
                    self._clients.discard(inbox)
                    with contextlib.suppress(asyncio.QueueFull):
                        inbox.get_nowait()
                        inbox.put_nowait(None)

    async def close(self) -> None:
        """On shutdown: end every stream so the server can close at once."""
        self._closed = True
        for inbox in list(self._clients):
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:
                    inbox.get_nowait()
            inbox.put_nowait(None)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
