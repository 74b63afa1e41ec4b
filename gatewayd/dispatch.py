"""The dispatcher: validates commands against the command map and runs them on actuators.

Anything not in the map is refused (404), never executed. Params are typed and range-checked
(400). A redelivery (the same uplink, the same id *and* the same content within the dedupe
window) gets the first result without running again; anything else runs, a deliberate repeat
under a new id too, and so does a reused id with a different command (an EnOS hub that
restarted counts from cmd-1 again). Actions run under a timeout (504), one at a time per
actuator; an actuator that raises gives a 500; a full inbox answers 503 (busy). Every command
gets a result, and every result goes back to the uplink that sent it (with `reply_to`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog

from drivers.base import Actuator, Command, CommandResult, DriverError, now_ms
from gatewayd.config import CommandMap, DispatchSection, ParamSpec
from gatewayd.errors import CommandError

log = structlog.get_logger("gatewayd.dispatch")

Replier = Callable[[Command, CommandResult], Awaitable[None]]

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def coerce(name: str, spec: ParamSpec, raw: Any) -> Any:
    """Convert one param to its declared type and check its range. Raises CommandError(400)."""
    if spec.type == "bool":
        if isinstance(raw, bool):
            value: Any = raw
        elif isinstance(raw, int | float) and raw in (0, 1):
            value = bool(raw)
        elif isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            value = raw.strip().lower() in _TRUE
        else:
            raise CommandError(400, f"param {name!r}: expected a boolean, got {raw!r}")
    elif spec.type in ("int", "float"):
        if isinstance(raw, bool):
            raise CommandError(400, f"param {name!r}: expected a number, got {raw!r}")
        try:
            value = float(raw.strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError):
            raise CommandError(400, f"param {name!r}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise CommandError(400, f"param {name!r}: expected a finite number, got {raw!r}")
        if spec.type == "int":
            if not value.is_integer():
                raise CommandError(400, f"param {name!r}: expected an integer, got {raw!r}")
            value = int(value)
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            raise CommandError(400, f"param {name!r}: {value} is outside "
                                    f"[{_fmt(spec.min)}, {_fmt(spec.max)}]")
    else:
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            raise CommandError(400, f"param {name!r}: expected a string, got {raw!r}")
        value = str(raw)
    if spec.choices is not None and value not in spec.choices:
        raise CommandError(400, f"param {name!r}: {value!r} is not one of {spec.choices!r}")
    return value


def _fmt(x: float | None) -> str:
    if x is None:
        return "-inf"
    return str(int(x)) if float(x).is_integer() else str(x)


def validate_params(mapping: CommandMap, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check params against the map's specs; returns the typed params (fixed ones merged)."""
    if not isinstance(params, Mapping):
        raise CommandError(400, f"params: expected an object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(mapping.params) - set(mapping.fixed))
    if unknown:
        raise CommandError(400, f"unknown param(s) {', '.join(map(repr, unknown))}; "
                                f"expected: {', '.join(sorted(mapping.params)) or 'none'}")
    out: dict[str, Any] = {}
    for name, spec in mapping.params.items():
        target = spec.to or name
        if name in params:
            out[target] = coerce(name, spec, params[name])
        elif spec.default is not None:
            out[target] = spec.default
        elif spec.required:
            raise CommandError(400, f"missing param {name!r} ({spec.type})")
    out.update(mapping.fixed)
    return out


class Dispatcher:
    """Runs commands from every uplink; see the module docstring for the rules."""

    def __init__(self, commands: Sequence[CommandMap], actuators: Mapping[str, Actuator],
                 config: DispatchSection, timeouts: Mapping[str, float] | None = None,
                 metrics: Any = None) -> None:
        self.commands = list(commands)
        self.actuators = dict(actuators)
        self.config = config
        self.timeouts = dict(timeouts or {})
        self.metrics = metrics
        self.repliers: dict[str, Replier] = {}
        self._locks = {name: asyncio.Lock() for name in self.actuators}
        self._done: OrderedDict[tuple[str, str, str], tuple[float, CommandResult]] = OrderedDict()
        self._inflight: dict[tuple[str, str, str], asyncio.Future[CommandResult]] = {}
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self._inbox: asyncio.Queue[Command] = asyncio.Queue(maxsize=1000)
        self.counts: dict[str, int] = {}
        self.observers: list[Callable[[Command, CommandResult, float], None]] = []  # status page

    def find(self, cmd: Command) -> CommandMap | None:
        """The most specific mapping for the command's uplink, device and action."""
        best: tuple[int, CommandMap] | None = None
        for m in self.commands:
            if m.action != cmd.action:
                continue
            if m.uplink not in ("*", cmd.uplink):
                continue
            if m.device not in ("*", cmd.device):
                continue
            score = (m.uplink != "*") * 2 + (m.device != "*")
            if best is None or score > best[0]:
                best = (score, m)
        return best[1] if best else None

    def submit(self, cmd: Command) -> None:
        """Queue a command from an uplink; its result goes to `repliers[cmd.uplink]`."""
        try:
            self._inbox.put_nowait(cmd)
        except asyncio.QueueFull:
            log.warning("command_refused_busy", uplink=cmd.uplink, id=cmd.id, action=cmd.action)
            self._count(cmd.uplink, "busy")
            busy = CommandResult(cmd.id, False, 503, "busy: too many commands waiting, try again")
            task = asyncio.get_running_loop().create_task(self._reply(cmd, busy),
                                                          name=f"command-busy[{cmd.uplink}]")
            self._reply_tasks.add(task)
            task.add_done_callback(self._reply_tasks.discard)

    async def run(self) -> None:
        """Take submitted commands and run each in its own task. Runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            while True:
                cmd = await self._inbox.get()
                tg.create_task(self._handle(cmd), name=f"command[{cmd.uplink}:{cmd.id}]")

    async def _handle(self, cmd: Command) -> None:
        await self._reply(cmd, await self.execute(cmd))

    async def _reply(self, cmd: Command, result: CommandResult) -> None:
        replier = self.repliers.get(cmd.uplink)
        if replier is None:
            return
        try:
            async with asyncio.timeout(30):
                await replier(cmd, result)
        except Exception as exc:  # a failed reply must not take the dispatcher down
            log.warning("command_reply_failed", uplink=cmd.uplink, id=cmd.id, error=repr(exc))

    async def execute(self, cmd: Command) -> CommandResult:
        """Validate and run one command; never raises (except cancellation)."""
        key = (cmd.uplink, cmd.id, _content(cmd))
        self._expire()
        if key in self._done:
            first = self._done[key][1]
            log.info("command_duplicate", uplink=cmd.uplink, id=cmd.id, action=cmd.action)
            self._count(cmd.uplink, "duplicate")
            return CommandResult(cmd.id, first.ok, first.code, first.message,
                                 {**first.data, "duplicate": True})
        if key in self._inflight:
            self._count(cmd.uplink, "duplicate")
            first = await asyncio.shield(self._inflight[key])
            return CommandResult(cmd.id, first.ok, first.code, first.message,
                                 {**first.data, "duplicate": True})
        fut: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        started = time.perf_counter()
        try:
            result = await self._run(cmd)
        finally:
            del self._inflight[key]
        if not fut.done():
            fut.set_result(result)
        self._done[key] = (time.monotonic(), result)
        outcome = "ok" if result.ok else f"error_{result.code}"
        self._count(cmd.uplink, outcome)
        if self.metrics is not None:
            self.metrics.command_latency.labels(cmd.uplink).observe(time.perf_counter() - started)
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        for observe in self.observers:
            observe(cmd, result, latency_ms)
        (log.info if result.ok else log.warning)(
            "command_done", uplink=cmd.uplink, id=cmd.id, device=cmd.device, action=cmd.action,
            ok=result.ok, code=result.code, message=result.message, latency_ms=latency_ms)
        return result

    async def _run(self, cmd: Command) -> CommandResult:
        mapping = self.find(cmd)
        if mapping is None:
            dev = f" for device {cmd.device!r}" if cmd.device else ""
            return CommandResult(cmd.id, False, 404, f"no command mapping for action {cmd.action!r}"
                                                     f"{dev} from uplink {cmd.uplink!r}")
        try:
            params = validate_params(mapping, cmd.params)
        except CommandError as exc:
            return CommandResult(cmd.id, False, exc.code, exc.message)
        actuator = self.actuators.get(mapping.actuator)
        if actuator is None:
            return CommandResult(cmd.id, False, 503, f"actuator {mapping.actuator!r} is not available")
        timeout = mapping.timeout or self.timeouts.get(actuator.name) or self.config.default_timeout
        try:
            async with self._locks[actuator.name]:
                async with asyncio.timeout(timeout):
                    data = await actuator.apply(mapping.target_action, params)
        except TimeoutError:
            return CommandResult(cmd.id, False, 504,
                                 f"actuator {actuator.name!r} timed out after {timeout:g}s")
        except DriverError as exc:
            return CommandResult(cmd.id, False, 500, exc.message)
        except Exception as exc:  # an actuator bug must not take the gateway down
            log.exception("actuator_crashed", actuator=actuator.name, id=cmd.id)
            return CommandResult(cmd.id, False, 500, f"actuator {actuator.name!r} failed: {exc!r}")
        return CommandResult(cmd.id, True, 200, "ok", data if isinstance(data, dict) else {})

    def _expire(self) -> None:
        horizon = time.monotonic() - self.config.dedupe_window
        while self._done:
            key, (t, _) = next(iter(self._done.items()))
            if t >= horizon and len(self._done) <= 100_000:
                break
            del self._done[key]

    def _count(self, uplink: str, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if self.metrics is not None:
            self.metrics.commands.labels(uplink, outcome).inc()


def _content(cmd: Command) -> str:
    """What makes two arrivals of one id the same message: target, action and params."""
    try:
        params = json.dumps(cmd.params, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        params = repr(cmd.params)
    return f"{cmd.device}\x00{cmd.action}\x00{params}"


def local_command(action: str, device: str, params: Mapping[str, Any], cmd_id: str) -> Command:
    """A command from the local health endpoint (bench, commissioning)."""
    return Command(cmd_id, "local", device, action, dict(params), now_ms())
