"""The gateway service: builds every part from the config and owns them in one TaskGroup.

Start: open the queue, create drivers and actuators, start samplers, uplinks, the dispatcher,
the health server and the watchdog; READY=1 once the queue is open and every device had its
first open attempt. Stop (the `stop` event, set on SIGTERM/SIGINT): stop sampling, commit the
open window, give uplinks up to `gateway.stop_timeout` to deliver what is queued, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import structlog

import drivers
from drivers.base import Actuator, Driver, DriverError
from drivers.bus import BusManager
from gatewayd import __version__
from gatewayd.config import ActuatorConfig, Config, DeviceConfig, UplinkConfig, load
from gatewayd.dispatch import Dispatcher
from gatewayd.errors import ConfigError
from gatewayd.health import HealthServer
from gatewayd.loop import loop_name
from gatewayd.metrics import Metrics
from gatewayd.notify import Notifier
from gatewayd.queue import Queue
from gatewayd.sampler import PortLoads, Sampler
from gatewayd.uplinks import load_uplink
from gatewayd.uplinks.base import DeviceInfo, Uplink, UplinkContext
from gatewayd.web.recent import Recent

log = structlog.get_logger("gatewayd.service")

# A reload that removes an uplink keeps its cursor (and so its undelivered rows) this long, so
# putting the section back within it loses nothing.
REMOVED_CURSOR_GRACE_S = 3600.0
_RESTART_SECTIONS = ("gateway", "queue", "health")  # these apply at the next start only


class _Observed:
    """The queue as samplers see it: each batch is shown to an observer (the status page's
    recent values) before it is queued. The observer is in-memory and cheap."""

    __slots__ = ("_observe", "_queue")

    def __init__(self, queue: Queue, observe: Any) -> None:
        self._queue, self._observe = queue, observe

    def submit(self, readings: Any) -> asyncio.Future[bool]:
        try:
            self._observe(readings)
        except Exception:  # the view's bug must never cost a reading
            log.exception("readings_observer_failed")
        return self._queue.submit(readings)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


class Gateway:
    """Everything one config describes, wired together."""

    def __init__(self, config: Config, notifier: Notifier | None = None,
                 buses: Any = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.metrics.driver_events = self._driver_events
        self.buses = buses if buses is not None else BusManager()
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self.stopping = False
        self.queue: Queue | None = None
        self.samplers: list[Sampler] = []
        self.port_loads = PortLoads()  # polls asked of and made on each shared serial port
        self.actuators: dict[str, Actuator] = {}
        self.actuator_errors: dict[str, str] = {}
        self.uplinks: dict[str, Uplink] = {}
        self.dispatcher: Dispatcher = Dispatcher([], {}, config.dispatch)
        self.health: HealthServer | None = None
        self.recent = Recent()  # last values per point, for the status page (memory only)
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._reload_requested = asyncio.Event()
        self._infos: dict[str, DeviceInfo] = {}  # shared by every uplink context; updated in place
        self._removed_uplinks: dict[str, asyncio.TimerHandle] = {}
        self.reloads = 0

    # -- building -------------------------------------------------------------------------------

    async def _build(self) -> None:
        cfg = self.config
        enabled_uplinks = [u for u in cfg.uplinks if u.enabled]
        self.queue = Queue(cfg.state_dir / "queue.db", cfg.queue, [u.name for u in enabled_uplinks],
                           self.metrics, {u.name: u.start for u in enabled_uplinks if u.start})
        await self.queue.open()
        for d in cfg.devices:
            if d.enabled:
                self.samplers.append(self._make_sampler(d))
        for a in cfg.actuators:
            if a.enabled:
                await self._open_actuator(a)
        self.dispatcher = Dispatcher(cfg.commands, self.actuators, cfg.dispatch,
                                     self._actuator_timeouts(cfg), self.metrics)
        self._set_infos(cfg)
        for u in enabled_uplinks:
            self._make_uplink(u)
        if cfg.health.enabled:
            self.health = HealthServer(cfg.health, self)

    def _make_sampler(self, d: DeviceConfig) -> Sampler:
        assert self.queue is not None
        cls = drivers.load(drivers.DRIVERS, d.driver)
        driver: Driver = cls(d.name, d.options, self.buses)
        # The status page's recent values are fed as readings are submitted (if it is served).
        queue: Any = (_Observed(self.queue, self.recent.record) if self.config.health.enabled
                      else self.queue)
        return Sampler(driver, d.interval, d.timeout, d.jitter, d.backoff_max, queue, self.metrics,
                       on_state=self._device_state, ports=self.port_loads)

    async def _open_actuator(self, a: ActuatorConfig) -> None:
        cls = drivers.load(drivers.ACTUATORS, a.driver)
        act: Actuator = cls(a.name, a.options, self.buses)
        self.actuator_errors.pop(a.name, None)
        try:
            async with asyncio.timeout(a.timeout):
                await act.open()
        except (DriverError, TimeoutError) as exc:
            # Keep it: commands will say what is wrong, and the next one may succeed.
            self.actuator_errors[a.name] = str(exc) or "open timed out"
            log.warning("actuator_open_failed", actuator=a.name, error=self.actuator_errors[a.name])
        self.actuators[a.name] = act

    @staticmethod
    def _actuator_timeouts(cfg: Config) -> dict[str, float]:
        return {a.name: a.timeout for a in cfg.actuators if a.enabled}

    def _set_infos(self, cfg: Config) -> None:
        self._infos.clear()
        self._infos.update({d.name: DeviceInfo(d.name, d.driver, "device") for d in cfg.devices})
        self._infos.update({a.name: DeviceInfo(a.name, a.driver, "actuator") for a in cfg.actuators})

    def _make_uplink(self, u: UplinkConfig) -> Uplink:
        assert self.queue is not None
        cfg = self.config
        ctx = UplinkContext(gateway_id=cfg.gateway.id, state_dir=cfg.state_dir,
                            outbox=self.queue.outbox(u.name),
                            submit_command=self.dispatcher.submit, devices=self._infos,
                            metrics=self.metrics, live_first=u.live_first,
                            backlog_rate=u.backlog_rate)
        uplink: Uplink = load_uplink(u.type)(u.name, u.options, ctx)
        self.uplinks[u.name] = uplink
        self.dispatcher.repliers[u.name] = uplink.reply
        return uplink

    def _device_state(self, device: str, failing: bool, error: str, ts_ms: int) -> None:
        for uplink in self.uplinks.values():
            try:
                uplink.device_state(device, failing, error, ts_ms)
            except Exception:  # one uplink's bug must not stop a sampler
                log.exception("device_state_hook_failed", uplink=uplink.name, device=device)

    # -- running --------------------------------------------------------------------------------

    def _spawn(self, tg: asyncio.TaskGroup, name: str, coro: Any) -> asyncio.Task[Any]:
        task = tg.create_task(coro, name=name)
        self._tasks[name] = task
        return task

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down gracefully."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._build()
            assert self.queue is not None
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._spawn(tg, "queue", self.queue.run())
                samplers = [self._spawn(tg, f"sampler[{s.driver.name}]", s.run()) for s in self.samplers]
                uplinks = [self._spawn(tg, f"uplink[{n}]", u.run()) for n, u in self.uplinks.items()]
                others = [self._spawn(tg, "dispatcher", self.dispatcher.run())]
                if self.health is not None:
                    others.append(self._spawn(tg, "health", self.health.serve()))
                others.append(self._spawn(tg, "watchdog", self.notifier.watchdog_loop(self.alive)))
                await self._wait_ready(stop)
                self.ready.set()
                self.notifier.notify(f"READY=1\nSTATUS=sampling {len(samplers)} devices, "
                                     f"{len(uplinks)} uplinks")
                log.info("gateway_ready", version=__version__, gateway=cfg.gateway.id,
                         event_loop=loop_name(asyncio.get_running_loop()), devices=len(samplers),
                         actuators=len(self.actuators),
                         uplinks=list(self.uplinks), state_dir=str(cfg.state_dir))
                await self._serve(stop)
                samplers = [self._tasks[f"sampler[{s.driver.name}]"] for s in self.samplers]
                uplinks = [self._tasks[f"uplink[{n}]"] for n in self.uplinks]
                await self._shutdown(samplers, uplinks, others)
        finally:
            await self._close()

    # -- reload (SIGHUP) ---------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Ask for a config reload (the SIGHUP handler); it runs in the service's loop."""
        self._reload_requested.set()

    async def _serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            stopper = asyncio.ensure_future(stop.wait())
            reloader = asyncio.ensure_future(self._reload_requested.wait())
            try:
                await asyncio.wait({stopper, reloader}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in (stopper, reloader):
                    f.cancel()
                await asyncio.gather(stopper, reloader, return_exceptions=True)
            if stop.is_set():
                return
            self._reload_requested.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file and apply it without losing a reading. An invalid file
        changes nothing: the located errors are logged and the old config keeps running."""
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            try:
                new = await asyncio.to_thread(load, self.config.path)
            except ConfigError as exc:
                log.error("reload_failed", path=str(self.config.path), problems=exc.problems,
                          action="kept the running config")
                return False
            await self._apply(new)
            return True
        finally:
            self.notifier.notify(f"READY=1\nSTATUS=sampling {len(self.samplers)} devices, "
                                 f"{len(self.uplinks)} uplinks")

    async def _apply(self, new: Config) -> None:
        old = self.config
        assert self.queue is not None and self._tg is not None
        pinned = [s for s in _RESTART_SECTIONS if getattr(new, s) != getattr(old, s)]
        if pinned:
            log.warning("reload_needs_restart", sections=pinned,
                        detail="these sections apply at the next start; the rest is applied now")
            new = dataclasses.replace(new, **{s: getattr(old, s) for s in pinned})
        self.config = new
        changes: dict[str, list[str]] = {}
        if new.log != old.log:
            from gatewayd import logs

            logs.setup(new.log.level, new.log.format)

        def diff(olds: Any, news: Any) -> tuple[list[str], list[str], list[str]]:
            a = {x.name: x for x in olds if x.enabled}
            b = {x.name: x for x in news if x.enabled}
            removed = [n for n in a if n not in b]
            added = [n for n in b if n not in a]
            changed = [n for n in b if n in a and a[n] != b[n]]
            return removed, added, changed

        # Devices: stop what went or changed, then start what came or changed.
        removed, added, changed = diff(old.devices, new.devices)
        by_name = {d.name: d for d in new.devices}
        for name in [*removed, *changed]:
            await self._stop_sampler(name)
        for name in [*changed, *added]:
            sampler = self._make_sampler(by_name[name])
            self.samplers.append(sampler)
            self._spawn(self._tg, f"sampler[{name}]", sampler.run())
        changes.update(devices_removed=removed, devices_added=added, devices_changed=changed)

        # Actuators and the command map swap in place (in-flight commands finish on the old one).
        removed, added, changed = diff(old.actuators, new.actuators)
        acts = {a.name: a for a in new.actuators}
        for name in [*removed, *changed]:
            act = self.actuators.pop(name, None)
            self.actuator_errors.pop(name, None)
            if act is not None:
                with contextlib.suppress(Exception):
                    await act.close()
        for name in [*changed, *added]:
            await self._open_actuator(acts[name])
        d = self.dispatcher
        d.commands = list(new.commands)
        d.actuators = dict(self.actuators)
        d.timeouts = self._actuator_timeouts(new)
        d.config = new.dispatch
        for name in self.actuators:
            d._locks.setdefault(name, asyncio.Lock())
        changes.update(actuators_removed=removed, actuators_added=added, actuators_changed=changed)
        self._set_infos(new)

        # Uplinks: a changed one restarts on its kept cursor; a removed one keeps its cursor
        # for a grace period; an added one gets a cursor (or finds the one it had).
        removed, added, changed = diff(old.uplinks, new.uplinks)
        ups = {u.name: u for u in new.uplinks}
        for name in [*removed, *changed]:
            await self._stop_uplink(name)
        for name in removed:
            loop = asyncio.get_running_loop()
            self._removed_uplinks[name] = loop.call_later(
                REMOVED_CURSOR_GRACE_S, lambda n=name: self._spawn(  # type: ignore[misc]
                    self._tg, f"drop_cursor[{n}]", self._drop_cursor(n)))
            log.info("uplink_cursor_kept", uplink=name, grace_s=REMOVED_CURSOR_GRACE_S,
                     pending=self.queue.outbox(name).pending())
        for name in [*changed, *added]:
            timer = self._removed_uplinks.pop(name, None)
            if timer is not None:
                timer.cancel()
            await self.queue.add_uplink(name, ups[name].start)
            self.queue.outbox(name).rewind()  # resend what the old session had in flight
            uplink = self._make_uplink(ups[name])
            self._spawn(self._tg, f"uplink[{name}]", uplink.run())
        changes.update(uplinks_removed=removed, uplinks_added=added, uplinks_changed=changed)
        self.reloads += 1
        log.info("config_reloaded", path=str(new.path), **{k: v for k, v in changes.items() if v})

    async def _stop_sampler(self, name: str) -> None:
        task = self._tasks.pop(f"sampler[{name}]", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for s in [s for s in self.samplers if s.driver.name == name]:
            self.samplers.remove(s)
            with contextlib.suppress(Exception):
                await s.driver.close()
        # Readings it submitted are in the open window: the commit loop makes them durable.

    async def _stop_uplink(self, name: str) -> None:
        task = self._tasks.pop(f"uplink[{name}]", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.uplinks.pop(name, None)
        self.dispatcher.repliers.pop(name, None)
        assert self.queue is not None
        ob = self.queue.outbox(name)
        ob.set_connected(False)
        ob.rewind()

    async def _drop_cursor(self, name: str) -> None:
        self._tasks.pop(f"drop_cursor[{name}]", None)  # a one-off, not a loop to supervise
        self._removed_uplinks.pop(name, None)
        if name not in self.uplinks and self.queue is not None:
            await self.queue.drop_uplink(name)

    async def _wait_ready(self, stop: asyncio.Event) -> None:
        waits = [s.status.opened.wait() for s in self.samplers if s.status.opened is not None]
        if self.health is not None:
            waits.append(self.health.started.wait())
        if not waits:
            return
        longest = max([s.timeout_s for s in self.samplers], default=1.0) + 1.0
        stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        gathered: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*waits))
        try:
            await asyncio.wait({stopper, gathered}, timeout=longest,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (stopper, gathered):
                f.cancel()
            await asyncio.gather(stopper, gathered, return_exceptions=True)

    async def _shutdown(self, samplers: list[asyncio.Task[Any]], uplinks: list[asyncio.Task[Any]],
                        others: list[asyncio.Task[Any]]) -> None:
        assert self.queue is not None
        self.stopping = True
        self.notifier.notify("STOPPING=1")
        log.info("gateway_stopping", stop_timeout_s=self.config.gateway.stop_timeout)
        for t in samplers:
            t.cancel()
        await asyncio.gather(*samplers, return_exceptions=True)
        await self.queue.flush()
        deadline = time.monotonic() + self.config.gateway.stop_timeout
        connected = [self.queue.outbox(n) for n in self.uplinks]
        while time.monotonic() < deadline:
            waiting = [ob for ob in connected if ob.connected and ob.pending()]
            if not waiting:
                break
            await self.queue.wait_committed(self.queue.tail, 0.05)
        left = {ob.name: ob.pending() for ob in connected if ob.pending()}
        if left:
            log.info("uplinks_not_flushed", pending=left)
        for t in [*uplinks, *others, self._tasks["queue"]]:
            t.cancel()

    async def _close(self) -> None:
        for timer in self._removed_uplinks.values():
            timer.cancel()
        self._removed_uplinks.clear()
        for act in self.actuators.values():
            with contextlib.suppress(Exception):
                await act.close()
        for s in self.samplers:
            with contextlib.suppress(Exception):
                await s.driver.close()
        with contextlib.suppress(Exception):
            await self.buses.close()
        if self.queue is not None:
            await self.queue.close()
        self.notifier.close()
        log.info("gateway_stopped")

    # -- health -----------------------------------------------------------------------------------

    def alive(self) -> bool:
        """Liveness (the watchdog, /healthz): every core loop runs. A failing device, an offline
        cloud or a full disk is degraded, not dead: a restart would not fix it."""
        return not self.dead_loops()

    def dead_loops(self) -> list[str]:
        return [f"task {name} is not running" for name, t in self._tasks.items()
                if t.done() and not self.stopping and name != "watchdog"]

    def _storage_problem(self) -> str:
        q = self.queue
        if q is None or q.storage.ok:
            return ""
        st = q.storage
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.since))
        return (f"queue cannot store readings: {st.state} since {since} ({st.where}: {st.detail});"
                f" {st.held} held in memory, {st.dropped} dropped")

    def _failing_devices(self) -> list[str]:
        return [f"device {s.driver.name} is failing: {s.status.last_error}"
                for s in self.samplers if s.status.state == "failing"]

    def _failing_uplinks(self) -> list[str]:
        out = []
        for name, u in self.uplinks.items():
            state = str(getattr(u, "state", ""))
            error = getattr(u, "last_error", "")
            # Backing off, refused, or trying again after a failure: not delivering.
            if state in ("backing_off", "auth_failed") or (
                    error and state in ("connecting", "authenticating")):
                out.append(f"uplink {name} is {state}" + (f": {error}" if error else ""))
        return out

    def degraded(self) -> list[str]:
        """What works less than it should: each failing device and uplink, storage, start."""
        out = [] if self.ready.is_set() else ["starting"]
        storage = self._storage_problem()
        return [*out, *([storage] if storage else []), *self._failing_devices(),
                *self._failing_uplinks()]

    def not_ready(self) -> list[str]:
        """Why the gateway does not do its job (/readyz 503): starting, a dead loop, storage
        that refuses writes, every device failing, or every uplink failing."""
        out = [] if self.ready.is_set() else ["starting"]
        out += self.dead_loops()
        storage = self._storage_problem()
        if storage:
            out.append(storage)
        failing = self._failing_devices()
        if self.samplers and len(failing) == len(self.samplers):
            out.append(f"every device is failing ({len(failing)})")
        failing = self._failing_uplinks()
        if self.uplinks and len(failing) == len(self.uplinks):
            out.append(f"every uplink is failing ({len(failing)})")
        return out

    def problems(self) -> list[str]:
        """Why the gateway is not healthy ([] when every loop runs and storage works)."""
        if not self.ready.is_set():
            return ["starting"]
        storage = self._storage_problem()
        return [*self.dead_loops(), *([storage] if storage else [])]

    async def refresh_gauges(self) -> None:
        if self.queue is None:
            return
        self.queue.update_gauges()
        stats = await self.queue.backlog_stats()
        for name, s in stats.items():
            self.metrics.backlog_age.labels(name).set(s["oldest_age_s"])
            self.metrics.backlog_ranges.labels(name).set(s.get("ranges", 0))
            status = getattr(self.uplinks.get(name), "drain_status", None)
            d = status() if callable(status) else {}
            self.metrics.backlog_drain_rate.labels(name).set(d.get("rate_per_s") or 0.0)
            eta = d.get("eta_s")
            self.metrics.backlog_eta.labels(name).set(eta if eta is not None else -1)

    def _driver_events(self) -> list[tuple[str, str, int]]:
        return [(s.driver.name, key, value) for s in self.samplers
                for key, value in s.driver.stats().items()]

    async def status(self) -> dict[str, Any]:
        q = self.queue
        backlog = await q.backlog_stats() if q is not None else {}
        cfg = self.config
        drivers_by_name = {d.name: d.driver for d in cfg.devices}
        drivers_by_name.update({a.name: a.driver for a in cfg.actuators})
        types_by_name = {u.name: u.type for u in cfg.uplinks}
        return {
            "gateway": self.config.gateway.id,
            "version": __version__,
            "event_loop": loop_name(asyncio.get_running_loop()),
            "ready": self.ready.is_set(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "problems": self.problems(),
            "queue": None if q is None else q.status(),
            # Times are UTC epoch seconds (`since`, `last_read`), durations end in `_s`; `driver`
            # and `type` are the names the config uses, not class names.
            "devices": {s.driver.name: {**s.status.as_dict(s.driver.stats()),
                                        "driver": drivers_by_name.get(s.driver.name, "")}
                        for s in self.samplers},
            "ports": self.port_loads.status(),
            "uplinks": {n: {**u.status(), "type": types_by_name.get(n, ""),
                            "backlog": backlog.get(n, {})}
                        for n, u in self.uplinks.items()},
            "actuators": {n: {"driver": drivers_by_name.get(n, ""),
                              "error": self.actuator_errors.get(n, ""),
                              **a.state()} for n, a in self.actuators.items()},
            "commands": dict(self.dispatcher.counts),
        }
