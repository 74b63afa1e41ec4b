"""GE Operations Hub uplink: the M2M device REST API (login, publish, subscribe).

Session: log in on start and keep the token in memory only. Any sign that the token is no
longer valid (error code 2 as a number or a string, HTTP 401/403, a 200 whose body is not JSON)
leads to one silent re-login and one retry of the same call; only a refused re-login counts as an
error (`auth_failed`, then the full backoff cap).

Publish: a lease becomes one request with one message per data channel
(`Account/Gateway/Sensor`) and, per channel, one `data` entry per sampling time and position.
Channels answered with code 1 are done; a channel answered with code 0, or a whole body refused
with error code 1, is split in halves until the single reading the server refuses is found and
quarantined, so a poison reading never wedges the outbox. Channels the reply does not name are
sent again.

Commands: `subscribe` is polled for the gateway channel. Each command string is matched against
the configured patterns (regexes with named groups); a match becomes a `Command` for the
dispatcher, with an id hashed from the channel, the string and its ordinal among identical
commands in the same poll, deduplicated within a window. Each result is published as metric
`cmd_result` on the command's channel.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.base import Command, CommandResult, Quality, Reading, Value, now_ms
from gatewayd.backoff import Backoff
from gatewayd.errors import UplinkAuthError, UplinkError, UplinkRejectedError, UplinkUnavailableError
from gatewayd.uplinks.base import Item, Lease, Uplink, UplinkContext, UplinkState
from gatewayd.uplinks.opshub.codec import (
    Metric,
    PolledCommand,
    TimeFormat,
    build_messages,
    command_key,
    convert,
    format_value,
    parse_subscribe,
    primary_mac,
    publish_verdicts,
)
from gatewayd.uplinks.opshub.config import OpsHubConfig, PointMap
from gatewayd.uplinks.opshub.transport import BodyRejected, LoginPacer, OpsHubApi
from gatewayd.uplinks.ratelog import RateLimitedLog

RESULT_METRIC = "cmd_result"
_POLL_BACKOFF_CAP_S = 60.0
_MAX_PENDING_COMMANDS = 1000
_PROBE_LEVELS = 3  # split levels tried before "everything refused" means a config error
_QUALITY_NAMES = {int(q): q.name.lower() for q in Quality}


# -- the uplink ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """A command handed to the dispatcher, remembered for its result."""

    dc: str
    command: str


class OpsHubUplink(Uplink):
    """The Operations Hub uplink (config type "opshub")."""

    Config = OpsHubConfig

    def __init__(self, name: str, config: OpsHubConfig, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        self.account = config.account or config.username
        self.gateway_id = config.gateway_id or primary_mac()
        self.gateway_dc = f"{self.account}/{self.gateway_id}"
        self.time_format = TimeFormat(config.utc_offset)
        self.clock_ms: Callable[[], int] = now_ms  # sending time for `cloud`; tests pin it
        self.api: OpsHubApi | None = None
        self._patterns = [(p, re.compile(p.pattern)) for p in config.commands]
        self._sensor_to_device = {(m.sensor or d): d for d, m in config.devices.items()}
        self._position: dict[str, str] = {}  # last GPS fix: "lat"/"long"/"alt" -> value
        self._accepted_once = False  # the server took something: a refusal is then the data's
        self._one_channel = False  # one channel per publish (the server answers one object)
        self._rl = RateLimitedLog(self.log)
        self._pacer = LoginPacer(config.min_login_interval, config.backoff_cap)
        self._seen: dict[str, float] = {}  # command id -> monotonic time last seen
        # command id -> where its result goes; bounded, as a refused-busy command gets no reply
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._results: deque[Metric] = deque(maxlen=1000)
        self._results_ready = asyncio.Event()
        self._unmapped_logged: set[str] = set()
        self.counters: Counter[str] = Counter()
        self.polls = 0
        self.commands_received = 0
        self.quarantined = 0
        self.results_dropped = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(self.config.backoff_base, self.config.backoff_cap,
                          floor_s=min(0.05, self.config.backoff_base))
        self.log.info("opshub_starting", url=self.config.url, gateway_dc=self.gateway_dc)
        try:
            await self.connection_loop(self._session, backoff)
        finally:
            self.set_state(UplinkState.STOPPED)

    async def _session(self) -> None:
        async with OpsHubApi(self.config, self.log, self.counters, self._pacer) as api:
            self.api = api
            try:
                self.set_state(UplinkState.AUTHENTICATING)
                await api.ensure_login()
                self.set_state(UplinkState.CONNECTED)
                loops = [("publish", self.pump(self._send, self.config.max_batch)),
                         ("results", self._results_loop())]
                if self.config.poll_interval > 0:
                    loops.append(("poll", self._poll_loop()))
                await _first_failure(self.name, loops)
            finally:
                self.api = None

    def status(self) -> dict[str, Any]:
        return {**super().status(), "gateway_dc": self.gateway_dc,
                "logins": self.counters["logins"], "relogins": self.counters["relogins"],
                "polls": self.polls, "commands_received": self.commands_received,
                "results_pending": len(self._results), "quarantined": self.quarantined,
                "one_channel_per_publish": self._one_channel}

    # -- publish --------------------------------------------------------------------------------

    def metrics_for(self, items: Iterable[Item]) -> list[Metric]:
        """Map queued readings to publishable metrics, attaching the GPS position in effect.

        GPS readings update the position (and are published only if `gps.publish`); readings
        whose time cannot be formatted are quarantined here.
        """
        gps = self.config.gps
        out: list[Metric] = []
        times: dict[int, str] = {}
        for item in items:
            r = item.reading
            if gps is not None and r.device == gps.device:
                for key in ("lat", "long", "alt"):
                    if r.point == getattr(gps, key) and r.value is not None:
                        self._position[key] = self._coordinate(key, r.value)
                if not gps.publish:
                    continue
            dev = self.config.devices.get(r.device)
            if dev is None and not self.config.send_unmapped:
                if r.device not in self._unmapped_logged:
                    self._unmapped_logged.add(r.device)
                    self.log.info("opshub_device_unmapped", device=r.device)
                continue
            stamp = times.get(r.ts_ms)
            if stamp is None:
                try:
                    stamp = times[r.ts_ms] = self.time_format(r.ts_ms)
                except (ValueError, OverflowError, OSError) as exc:
                    self._quarantine(item, "bad_timestamp", str(exc))
                    continue
            out.append(Metric(item, self._dc((dev.sensor if dev else "") or r.device), stamp,
                              tuple(sorted(self._position.items())),
                              self._met(r, dev.points.get(r.point) if dev else None)))
        return out

    def _coordinate(self, key: str, value: Value) -> str:
        gps = self.config.gps
        if (gps is not None and key != "alt" and isinstance(value, int | float)
                and not isinstance(value, bool)):
            return f"{value:.{gps.decimals}f}"
        return format_value(value)[0]

    def _dc(self, sensor: str) -> str:
        return f"{self.gateway_dc}/{sensor}"

    @staticmethod
    def _met(r: Reading, point: PointMap | None) -> dict[str, str]:
        val, auto_type = format_value(r.value)
        p = point or PointMap()
        met = {"met": p.met or r.point, "val": val, "type": p.type or auto_type}
        if p.desc:
            met["desc"] = p.desc
        if p.gen1:
            met["gen1"] = p.gen1
        if p.gen2:
            met["gen2"] = p.gen2
        elif r.quality != Quality.GOOD:
            met["gen2"] = _QUALITY_NAMES.get(r.quality, f"quality_{r.quality}")
        return met

    async def _send(self, lease: Lease) -> None:
        position = dict(self._position)
        try:
            await self.deliver(self.metrics_for(lease.items))
        except BaseException:
            self._position = position  # the lease goes again: replay it from the same fix
            raise

    async def deliver(self, metrics: list[Metric]) -> None:
        """Publish `metrics` until every one is accepted or quarantined as refused.

        Refused metrics are split in halves, breadth first, until each refused single one is
        known. Raises UplinkError (the session ends, the lease goes again later) for transient
        failures, and if the server refused everything before it ever accepted anything: that
        is a wrong account or gateway id, not poison data, and nothing is quarantined.
        """
        refused = await self._publish_answered(metrics)
        groups, singles, level = ([refused] if refused else []), [], 0
        while groups:
            level += 1
            deeper = []
            for group in groups:
                if len(group) == 1:
                    singles.append(group[0])
                    continue
                half = len(group) // 2
                for part in (group[:half], group[half:]):
                    bad = await self._publish_answered(part)
                    if bad:
                        deeper.append(bad)
            # one poison reading leaves a good half at level 1; a few leave one by level 3
            if not self._accepted_once and (level >= _PROBE_LEVELS or not deeper):
                raise UplinkRejectedError(f"server refused every channel ({metrics[0].dc}, ...):"
                                          " check account and gateway_id")
            groups = deeper
        for m in singles:
            if m.item is not None:
                self._quarantine(m.item, "refused", f"{m.dc} {m.met}")
            else:
                self.results_dropped += 1
                self.log.warning("opshub_result_refused", dc=m.dc, met=m.met)

    async def _publish_answered(self, metrics: list[Metric]) -> list[Metric]:
        """Publish until every channel has a verdict; returns the refused metrics.

        Channels left without a verdict go again one channel per publish, whose answer cannot
        be ambiguous; so does everything once the server answered several channels with one
        object. A channel still without a verdict then is a transient failure: the lease goes
        again after the backoff.
        """
        pending, refused = metrics, list[Metric]()
        for round_ in range(2):
            if not pending:
                break
            one = self._one_channel or round_ > 0
            unsure: list[Metric] = []
            for group in _by_channel(pending) if one else [pending]:
                verdicts = await self._publish_group(group)
                refused += [m for m in group if verdicts.get(m.dc) is False]
                unsure += [m for m in group if m.dc not in verdicts]
            pending = unsure
        if pending:
            raise UplinkUnavailableError(f"publish answer did not confirm channel {pending[0].dc}")
        return refused

    async def _publish_group(self, group: list[Metric]) -> dict[str, bool]:
        channels = list(dict.fromkeys(m.dc for m in group))
        try:
            verdicts, single = await self._publish(group, channels)
        except BodyRejected as exc:
            self.log.warning("opshub_publish_refused", reason=str(exc), count=len(group))
            return dict.fromkeys(channels, False)
        if single and not self._one_channel:
            self._one_channel = True
            self.log.warning("opshub_one_answer_for_several_channels", channels=len(channels),
                             answered=sorted(verdicts),
                             action="one channel per publish from now on; the rest go again")
        if any(verdicts.values()):
            self._accepted_once = True
        if len(verdicts) < len(channels):
            self._rl.warning("opshub_reply_missing_channels",
                             channels=[c for c in channels if c not in verdicts][:5])
        return verdicts

    def _quarantine(self, item: Item, reason: str, detail: str) -> None:
        """Count and log it as dropped (the outbox logs, rate-limited); the lease acks past it."""
        self.quarantined += 1
        self.ctx.outbox.quarantine(item, reason, detail[:200])

    async def _publish(self, metrics: Sequence[Metric],
                       channels: Sequence[str]) -> tuple[dict[str, bool], bool]:
        assert self.api is not None
        messages = build_messages(metrics, self.time_format(self.clock_ms()))
        fields = b'"messages":' + json.dumps(messages, separators=(",", ":"),
                                              ensure_ascii=False).encode()
        answer = await self.api.call("publish", fields)
        self.messages += 1
        return publish_verdicts(answer, channels)

    # -- commands -------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        assert self.api is not None
        fields = b'"payload":' + json.dumps({"dc": self.gateway_dc, "request_type": "subscribe"},
                                            separators=(",", ":")).encode()
        failures = 0
        while True:
            try:
                answer = await self.api.call("subscribe", fields)
            except UplinkAuthError:
                raise
            except (BodyRejected, UplinkError) as exc:
                # commands are broken, data may not be: keep the session (publish fails on
                # its own if the server is really gone) and poll again more slowly
                failures += 1
                self.count_error("poll")
                self.log.warning("opshub_poll_failed", error=str(exc), failures=failures)
                await asyncio.sleep(min(_POLL_BACKOFF_CAP_S,
                                        self.config.poll_interval * 2 ** min(failures, 10)))
                continue
            failures = 0
            self.polls += 1
            self.handle_poll(answer)
            await asyncio.sleep(self.config.poll_interval)

    def handle_poll(self, answer: Any) -> None:
        """Turn one subscribe answer into commands for the dispatcher (or error results)."""
        commands, problems = parse_subscribe(answer)
        now = time.monotonic()
        self._seen = {k: t for k, t in self._seen.items()
                      if now - t < self.config.dedupe_window}
        for dc, reason in problems:
            key = command_key(dc, reason, -1)
            if key in self._seen:  # the same broken answer again: one error result per window
                self._seen[key] = now
                continue
            self._seen[key] = now
            self.log.warning("opshub_command_malformed", dc=dc or None, reason=reason)
            self._add_result(dc or self._dc(self.config.result_sensor), "", "", 400, reason)
        payload = answer.get("payload") if isinstance(answer, dict) else None
        if isinstance(payload, dict) and str(payload.get("request_type", "")).strip() == "result":
            self.log.info("opshub_subscribe_result", payload=str(payload)[:300])
        ordinals: dict[tuple[str, str], int] = {}
        for pc in commands:
            ordinal = ordinals[(pc.dc, pc.command)] = ordinals.get((pc.dc, pc.command), -1) + 1
            key = command_key(pc.dc, pc.command, ordinal)
            if key in self._seen:
                self._seen[key] = now  # still being redelivered: the window restarts
                self.log.info("opshub_command_duplicate", key=key, dc=pc.dc)
                continue
            self._seen[key] = now
            self.commands_received += 1
            # A sighting after the window is a new command: it gets a new id, so the
            # dispatcher (which dedupes ids for its own, longer window) runs it again.
            self._submit(f"oh-{key}-{self.commands_received}", pc)

    def _submit(self, cid: str, pc: PolledCommand) -> None:
        parts = pc.dc.split("/")
        if parts[:2] != self.gateway_dc.split("/") or len(parts) > 3:
            self.log.warning("opshub_command_foreign", id=cid, dc=pc.dc)
            self._add_result(self._dc(self.config.result_sensor), cid, pc.command, 404,
                             f"channel {pc.dc} is not this gateway's")
            return
        sensor = parts[2] if len(parts) == 3 else ""
        result_dc = pc.dc if sensor else self._dc(self.config.result_sensor)
        channel_device = self._sensor_to_device.get(sensor, sensor)
        try:
            device, action, params = self.parse_command(pc.command, channel_device)
        except ValueError as exc:
            self.log.warning("opshub_command_unparsed", id=cid, dc=pc.dc, command=pc.command[:200],
                             reason=str(exc))
            if self.ctx.metrics is not None:
                self.ctx.metrics.commands.labels(self.name, "unparsed").inc()
            self._add_result(result_dc, cid, pc.command, 400, str(exc))
            return
        self._pending[cid] = _Pending(result_dc, pc.command)
        if len(self._pending) > _MAX_PENDING_COMMANDS:
            self._pending.popitem(last=False)
        self.log.info("opshub_command_received", id=cid, dc=pc.dc, device=device, action=action)
        self.ctx.submit_command(Command(cid, self.name, device, action, params, now_ms()))

    def parse_command(self, text: str, channel_device: str) -> tuple[str, str, dict[str, Any]]:
        """(device, action, params) from a command string via the first matching pattern.

        Raises ValueError if no pattern matches or a typed group does not convert.
        """
        for pat, rx in self._patterns:
            if pat.channel and pat.channel != channel_device:
                continue
            m = rx.fullmatch(text.strip())
            if m is None:
                continue
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            action = groups.pop("action", "") or pat.action
            device = groups.pop("device", "") or pat.device or channel_device
            params: dict[str, Any] = {}
            for key, value in groups.items():
                kind = pat.types.get(key, "str")
                try:
                    params[key] = convert(value, kind)
                except ValueError:
                    raise ValueError(f"{key}={value!r} is not a valid {kind}") from None
            return device, action, params
        raise ValueError(f"no command pattern matches {text[:80]!r}")

    async def reply(self, command: Command, result: CommandResult) -> None:
        """Queue the result as a `cmd_result` metric on the command's channel; never raises."""
        pending = self._pending.pop(command.id, None)
        if pending is None:
            sensor = next((s for s, d in self._sensor_to_device.items() if d == command.device),
                          command.device or self.config.result_sensor)
            pending = _Pending(self._dc(sensor), "")
        self.log.info("opshub_command_result", id=command.id, ok=result.ok, code=result.code)
        self._add_result(pending.dc, command.id, pending.command, result.code,
                         result.message or ("ok" if result.ok else "error"))

    def _add_result(self, dc: str, cid: str, command: str, code: int, message: str) -> None:
        if len(self._results) == self._results.maxlen:
            self.results_dropped += 1
            self.log.warning("opshub_result_dropped", dc=self._results[0].dc, reason="full")
        met = {"met": RESULT_METRIC, "val": str(code), "type": "Number", "desc": message[:500]}
        if cid:
            met["gen1"] = cid
        if command:
            met["gen2"] = command[:500]
        self._results.append(Metric(None, dc, self.time_format(now_ms()), (), met))
        self._results_ready.set()

    async def _results_loop(self) -> None:
        if self._results:
            self._results_ready.set()  # left over from the previous session
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            batch = list(self._results)
            self._results.clear()
            try:
                await self.deliver(batch)
            except BaseException:
                # keep them for the next session, ahead of anything newer
                self._results.extendleft(reversed(batch))
                raise


def _by_channel(metrics: list[Metric]) -> list[list[Metric]]:
    """The metrics grouped by channel, channels in first-seen order, each group in order."""
    groups: dict[str, list[Metric]] = {}
    for m in metrics:
        groups.setdefault(m.dc, []).append(m)
    return list(groups.values())


async def _first_failure(name: str, loops: list[tuple[str, Any]]) -> None:
    """Run coroutines as named tasks until the first one fails; cancel the rest, re-raise it."""
    tasks = [asyncio.create_task(coro, name=f"opshub[{name}].{what}") for what, coro in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        exc = t.exception()
        if exc is not None:
            raise exc
    raise UplinkError("a session loop ended")


__all__ = ["OpsHubUplink"]
