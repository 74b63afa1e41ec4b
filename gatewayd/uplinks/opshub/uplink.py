"""GE Operations Hub uplink on the delivery engine: the M2M device REST API (login, publish,
subscribe).

Session: log in (paced, see `LoginPacer`) and keep the token in memory only. Any sign that the
token is no longer valid leads to a silent re-login and a retry of the same call; only a
refused login counts as an error (`auth_failed`, then the full backoff cap).

Publish: a lease is one packet; it becomes one request with one message per data channel
(`Account/Gateway/Sensor`) and, per channel, one `data` entry per sampling time and position.
Channels answered with code 1 are accepted. Channels answered with code 0, or a body refused
with error code 1, are split in halves here (the answer is per channel, not per reading) until
the single readings the server refuses are found: their verdict is `rejected`. Channels the
answer does not confirm go again one channel per publish, and so does everything once the
server answered several channels with one object [open]; still unconfirmed, the packet is a
retry.

Commands: `subscribe` is polled for the gateway channel. Each command string is matched against
the configured patterns (regexes with named groups). Commands carry no id [open: returned once
or until confirmed]: the uplink learns which from the polls, so a command the server keeps
returning runs once while a deliberate repeat runs again. Each result is published as metric
`cmd_result` on the command's channel.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.base import Command, CommandResult, Quality, Reading, Value, now_ms
from gatewayd.errors import UplinkAuthError, UplinkError, UplinkRejectedError, UplinkUnavailableError
from gatewayd.uplinks.base import Item, UplinkContext, UplinkState
from gatewayd.uplinks.engine import ACCEPTED, DeliveryUplink, Malformed, Packet, Session, Verdict, rejected
from gatewayd.uplinks.opshub.codec import (
    Metric,
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
_PROBE_LEVELS = 3  # split levels tried before "everything refused" means a config error
_QUALITY_NAMES = {int(q): q.name.lower() for q in Quality}
_SKIPPED = ACCEPTED  # a reading the config says not to publish (GPS fixes, unmapped devices)


class Unconfirmed(UplinkUnavailableError):
    """A publish was answered, but the answer left a channel without a verdict."""


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where a command's result goes: its channel, and the command string it answers."""

    dc: str
    command: str


class OpsHubUplink(DeliveryUplink):
    """The Operations Hub uplink (config type "opshub")."""

    Config = OpsHubConfig

    def __init__(self, name: str, config: OpsHubConfig, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        self.batch = config.max_batch
        self.backoff_base_s, self.backoff_cap_s = config.backoff_base, config.backoff_cap
        self.account = config.account or config.username
        self.gateway_id = config.gateway_id or primary_mac()
        self.gateway_dc = f"{self.account}/{self.gateway_id}"
        self.time_format = TimeFormat(config.utc_offset)
        self.clock_ms: Callable[[], int] = now_ms  # sending time for `cloud`; tests pin it
        self.api: OpsHubApi | None = None
        self._patterns = [(p, re.compile(p.pattern)) for p in config.commands]
        self._sensor_to_device = {(m.sensor or d): d for d, m in config.devices.items()}
        self._position: dict[str, str] = {}  # last GPS fix: "lat"/"long"/"alt" -> value
        self._fixes: dict[int, dict[str, str]] = {}  # first seq of a lease -> GPS fix before it
        self._accepted_once = False  # the server took something: a refusal is then the data's
        self._one_channel = False  # one channel per publish (the server answers one object)
        self._rl = RateLimitedLog(self.log)
        self._pacer = LoginPacer(config.min_login_interval, config.backoff_cap)
        self._last_poll: set[str] = set()  # command keys of the previous poll
        self._last_problems: set[tuple[str, str]] = set()  # and its malformed parts
        self._keeps: bool | None = None  # the server returns a command until...? (learnt)
        self._unmapped_logged: set[str] = set()
        self.counters: Counter[str] = Counter()
        self.polls = 0
        self.publishes = 0  # publish requests (a packet may take several: split, one channel)
        self.commands_received = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def connect(self) -> Session:
        api = OpsHubApi(self.config, self.log, self.counters, self._pacer)
        await api.__aenter__()
        try:
            self.set_state(UplinkState.AUTHENTICATING)
            await api.ensure_login()
        except BaseException:
            await api.__aexit__(None, None, None)
            raise
        self.api = api
        return OpsHubSession(self, api)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "gateway_dc": self.gateway_dc,
                "logins": self.counters["logins"], "relogins": self.counters["relogins"],
                "polls": self.polls, "publishes": self.publishes,
                "commands_received": self.commands_received,
                "one_channel_per_publish": self._one_channel,
                "commands_kept_by_server": self._keeps}

    # -- publish --------------------------------------------------------------------------------

    def entries(self, items: Sequence[Item]) -> list[Metric | Verdict]:
        """What each queued reading becomes: a metric to publish, or its verdict right away.

        GPS readings update the position (and are published only if `gps.publish`); a reading
        whose time cannot be formatted is rejected. A lease sent again (after a retry or a
        reconnect) starts from the GPS fix it started from the first time.
        """
        if items:
            first = items[0].seq
            if first in self._fixes:
                self._position = dict(self._fixes[first])
            else:
                self._fixes[first] = dict(self._position)
                if len(self._fixes) > 64:
                    self._fixes.pop(next(iter(self._fixes)))
        return self._entries(items)

    def metrics_for(self, items: Iterable[Item]) -> list[Metric]:
        """The metrics to publish for `items` (see `entries`)."""
        return [e for e in self.entries(list(items)) if isinstance(e, Metric)]

    def _entries(self, items: Iterable[Item]) -> list[Metric | Verdict]:
        gps = self.config.gps
        out: list[Metric | Verdict] = []
        times: dict[int, str] = {}
        for item in items:
            out.append(self._entry(item, gps, times))
        return out

    def _entry(self, item: Item, gps: Any, times: dict[int, str]) -> Metric | Verdict:
        r = item.reading
        if gps is not None and r.device == gps.device:
            for key in ("lat", "long", "alt"):
                if r.point == getattr(gps, key) and r.value is not None:
                    self._position[key] = self._coordinate(key, r.value)
            if not gps.publish:
                return _SKIPPED
        dev = self.config.devices.get(r.device)
        if dev is None and not self.config.send_unmapped:
            if r.device not in self._unmapped_logged:
                self._unmapped_logged.add(r.device)
                self.log.info("opshub_device_unmapped", device=r.device)
            return _SKIPPED
        stamp = times.get(r.ts_ms)
        if stamp is None:
            try:
                stamp = times[r.ts_ms] = self.time_format(r.ts_ms)
            except (ValueError, OverflowError, OSError) as exc:
                return rejected("bad_timestamp", str(exc)[:200])
        return Metric(item, self._dc((dev.sensor if dev else "") or r.device), stamp,
                      tuple(sorted(self._position.items())),
                      self._met(r, dev.points.get(r.point) if dev else None))

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

    async def deliver(self, metrics: list[Metric]) -> list[Metric]:
        """Publish `metrics` until each is accepted or known refused; returns the refused ones.

        Refused metrics are split in halves, breadth first, until each refused single one is
        known. Raises UplinkUnavailableError if an answer left a channel unconfirmed, and
        UplinkRejectedError if the server refused everything before it ever accepted anything:
        that is a wrong account or gateway id, not poison data.
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
        return singles

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
            raise Unconfirmed(f"publish answer did not confirm channel {pending[0].dc}")
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

    async def _publish(self, metrics: Sequence[Metric],
                       channels: Sequence[str]) -> tuple[dict[str, bool], bool]:
        assert self.api is not None
        messages = build_messages(metrics, self.time_format(self.clock_ms()))
        fields = b'"messages":' + json.dumps(messages, separators=(",", ":"),
                                              ensure_ascii=False).encode()
        answer = await self.api.call("publish", fields)
        self.publishes += 1
        return publish_verdicts(answer, channels)

    # -- commands -------------------------------------------------------------------------------

    def handle_poll(self, answer: Any) -> list[tuple[Command | Malformed, ReplyTo]]:
        """One subscribe answer as (command, reply_to) pairs, malformed ones included.

        A command has no id; its key is a hash of channel, string and ordinal among identical
        ones in this answer. [open] whether the server returns a command once or until it is
        confirmed: learnt from the first poll after one that had commands (all of them back
        again: kept). Where kept, a key seen in the previous poll is the same command again
        and is skipped; otherwise every sighting is new, so a deliberate repeat runs again.
        Each new one gets an id of its own, so the dispatcher runs it.
        """
        commands, problems = parse_subscribe(answer)
        out: list[tuple[Command | Malformed, ReplyTo]] = []
        last_problems, self._last_problems = self._last_problems, set(problems)
        for dc, reason in problems:
            if (dc, reason) in last_problems:
                continue  # the same broken answer poll after poll: one error result
            self._rl.warning("opshub_command_malformed", key=reason[:40], dc=dc or None,
                             reason=reason)
            cid = f"oh-{command_key(dc, reason, -1)}-{self.polls}"
            out.append((Malformed(cid, reason), ReplyTo(dc or self._dc(self.config.result_sensor), "")))
        payload = answer.get("payload") if isinstance(answer, dict) else None
        if isinstance(payload, dict) and str(payload.get("request_type", "")).strip() == "result":
            self.log.info("opshub_subscribe_result", payload=str(payload)[:300])
        ordinals: dict[tuple[str, str], int] = {}
        keys: list[str] = []
        for pc in commands:
            ordinal = ordinals[(pc.dc, pc.command)] = ordinals.get((pc.dc, pc.command), -1) + 1
            keys.append(command_key(pc.dc, pc.command, ordinal))
        if self._keeps is None and self._last_poll:
            self._keeps = self._last_poll <= set(keys)
            self.log.info("opshub_commands_learnt",
                          server=("returns a command until confirmed" if self._keeps
                                  else "returns each command once"))
        previous, self._last_poll = self._last_poll, set(keys)
        for pc, key in zip(commands, keys, strict=True):
            if key in previous and self._keeps is not False:
                self.log.debug("opshub_command_again", key=key, dc=pc.dc)
                continue
            self.commands_received += 1
            out.append(self._command(f"oh-{key}-{self.polls}-{self.commands_received}", pc.dc,
                                     pc.command))
        return out

    def _command(self, cid: str, dc: str, text: str) -> tuple[Command | Malformed, ReplyTo]:
        parts = dc.split("/")
        if parts[:2] != self.gateway_dc.split("/") or len(parts) > 3:
            self._rl.warning("opshub_command_foreign", id=cid, dc=dc)
            return (Malformed(cid, f"channel {dc} is not this gateway's"),
                    ReplyTo(self._dc(self.config.result_sensor), text))
        sensor = parts[2] if len(parts) == 3 else ""
        reply_to = ReplyTo(dc if sensor else self._dc(self.config.result_sensor), text)
        channel_device = self._sensor_to_device.get(sensor, sensor)
        try:
            device, action, params = self.parse_command(text, channel_device)
        except ValueError as exc:
            self._rl.warning("opshub_command_unparsed", key=text[:40], id=cid, dc=dc,
                             command=text[:200], reason=str(exc))
            return Malformed(cid, str(exc)), reply_to
        self.log.info("opshub_command_received", id=cid, dc=dc, device=device, action=action)
        return Command(cid, self.name, device, action, params, now_ms()), reply_to

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

    def result_metric(self, reply_to: Any, result: CommandResult) -> Metric:
        """A command result as the `cmd_result` metric on the command's channel."""
        if not isinstance(reply_to, ReplyTo):
            reply_to = ReplyTo(self._dc(self.config.result_sensor), "")
        message = result.message or ("ok" if result.ok else "error")
        met = {"met": RESULT_METRIC, "val": str(result.code), "type": "Number", "desc": message[:500]}
        if result.command_id:
            met["gen1"] = result.command_id
        if reply_to.command:
            met["gen2"] = reply_to.command[:500]
        return Metric(None, reply_to.dc, self.time_format(now_ms()), (), met)


class OpsHubSession(Session):
    """One logged-in REST session: publishes leases, polls for commands, publishes results."""

    def __init__(self, up: OpsHubUplink, api: OpsHubApi) -> None:
        self.up = up
        self.api = api

    def pack(self, items: list[Item]) -> list[Packet]:
        return [Packet(items, self.up.entries(items))]

    async def send(self, packet: Packet) -> Verdict | Sequence[Verdict]:
        entries: list[Metric | Verdict] = packet.payload
        metrics = [e for e in entries if isinstance(e, Metric)]
        refused: dict[int, Metric] = {}
        if metrics:
            try:
                refused = {id(m): m for m in await self.up.deliver(metrics)}
            except Unconfirmed as exc:  # the server answered, but not for every channel
                return Verdict("retry", "unconfirmed", str(exc))
        if not refused and all(isinstance(e, Metric) or e.accepted for e in entries):
            return ACCEPTED
        out: list[Verdict] = []
        for e in entries:
            if isinstance(e, Verdict):
                out.append(e)
            elif id(e) in refused:
                out.append(rejected("refused", f"{e.dc} {e.met}"[:200]))
            else:
                out.append(ACCEPTED)
        return out

    async def reply(self, reply_to: Any, result: CommandResult) -> None:
        up = self.up
        up.log.info("opshub_command_result", id=result.command_id, ok=result.ok, code=result.code)
        metric = up.result_metric(reply_to, result)
        if await up.deliver([metric]):
            up.results_dropped += 1
            up._rl.warning("opshub_result_refused", dc=metric.dc, met=metric.met)

    async def commands(self) -> AsyncIterator[tuple[Command | Malformed, Any]]:
        up, interval = self.up, self.up.config.poll_interval
        if interval <= 0:
            await asyncio.Event().wait()
        fields = b'"payload":' + json.dumps({"dc": up.gateway_dc, "request_type": "subscribe"},
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
                up.count_error("poll")
                up._rl.warning("opshub_poll_failed", error=str(exc), failures=failures)
                await asyncio.sleep(min(_POLL_BACKOFF_CAP_S, interval * 2 ** min(failures, 10)))
                continue
            failures = 0
            up.polls += 1
            for pair in up.handle_poll(answer):
                yield pair
            await asyncio.sleep(interval)

    async def close(self) -> None:
        self.up.api = None
        await self.api.__aexit__(None, None, None)


def _by_channel(metrics: list[Metric]) -> list[list[Metric]]:
    """The metrics grouped by channel, channels in first-seen order, each group in order."""
    groups: dict[str, list[Metric]] = {}
    for m in metrics:
        groups.setdefault(m.dc, []).append(m)
    return list(groups.values())


__all__ = ["OpsHubSession", "OpsHubUplink", "ReplyTo"]
