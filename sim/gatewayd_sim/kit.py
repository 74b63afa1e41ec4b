"""The small kit every cloud simulator shares: injected faults, waiting for a state change, the
`/sim/faults` control routes, and the CLI's exit codes and serve loop.

A simulator keeps one `Faults` and one `Changes`:
- `faults.inject(name, stage="*", count=None, **options)`: `name` is one of the simulator's
  fault names, `stage` the route or stage it applies to ("*": any), `count` how many uses
  (None: until cleared); `faults.take(name, stage)` uses one up, `faults.take_any(stage)` the
  first of any name;
- `changes.touch()` after every state change, `await changes.wait_for(predicate, timeout_s)`
  in tests.

Control routes (`add_fault_routes`): `GET /sim/faults` lists the active and known faults;
`POST /sim/faults` takes one fault `{"name", "stage", "count", ...options}`, a list of them, or
`{"<name>": true | false | {options}}`; `DELETE /sim/faults` clears them all.

A simulator that goes offline and comes back on the same port keeps the port in a `PortHold`
meanwhile (see there: a client retrying a free port on this host can otherwise take it).
"""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

EXIT_OK = 0  # stopped by SIGINT/SIGTERM
EXIT_LISTEN = 1  # cannot listen on the address
EXIT_USAGE = 2  # bad arguments or registry


class PortHold:
    """Keeps a TCP port reserved while no server listens on it, as a cloud's address stays its own
    through an outage.

    A port nobody has bound is free for the kernel to hand out as the local port of an outgoing
    connection. A client on this host retrying `127.0.0.1:port` through the outage (the gateway
    under test) is then, once in some tens of thousands of attempts, given `port` itself: TCP's
    simultaneous open connects the socket to itself, the client reads its own CONNECT back, and
    the port stays taken, so the server cannot listen on it again (EADDRINUSE). A socket bound
    to the port with SO_REUSEADDR and not listening prevents that and changes nothing a client
    sees: a connection is still refused, as on a port nobody listens on. A listener that sets
    SO_REUSEADDR too (asyncio, aiohttp, `socket.create_server` and mosquitto all do) can bind
    and listen while the hold is in place, so coming back has no gap; going offline has one, from
    closing the listener to `hold`, of a few microseconds for a server in this process.

    `hold(port)` after the listener is closed, `release()` once a listener is up again."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._socks: dict[int, socket.socket] = {}
        weakref.finalize(self, _close_all, self._socks)  # a hold never outlives its owner

    @classmethod
    def any_port(cls, host: str = "127.0.0.1") -> tuple[PortHold, int]:
        """A hold on a free port the kernel picks, and the port: for a server that starts later
        (another process), so the port cannot be taken before it listens."""
        hold = cls(host)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
        hold._socks[port] = sock
        return hold, port

    def hold(self, port: int) -> bool:
        """Reserve `port` now; False while something still has it (a listener not yet closed)."""
        if port in self._socks:
            return True
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, port))
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise
            return False
        self._socks[port] = sock
        return True

    async def hold_soon(self, port: int, timeout_s: float = 2.0) -> bool:
        """`hold`, retried while a listener this loop is closing still has the port (uvloop
        closes it on a later iteration). False if it is still taken after `timeout_s`: the
        server will then report the port in use when it listens again."""
        deadline = time.monotonic() + timeout_s
        while not self.hold(port):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)  # polling a condition; the bind is the sync point
        return True

    def release(self, port: int | None = None) -> None:
        """Let `port` (None: every held port) go, once a listener has it again or for good."""
        for p in [port] if port is not None else list(self._socks):
            sock = self._socks.pop(p, None)
            if sock is not None:
                sock.close()

    @property
    def held(self) -> list[int]:
        return sorted(self._socks)


def _close_all(socks: dict[int, socket.socket]) -> None:
    for sock in socks.values():
        sock.close()
    socks.clear()


@dataclass(slots=True)
class Fault:
    """One injected misbehaviour: `name` on `stage`, for `count` more uses (None: until cleared)."""

    name: str
    stage: str = "*"
    count: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "count": self.count, **self.options}


class Faults:
    """The active faults of one simulator, applied in the order they were injected."""

    def __init__(self, known: Mapping[str, str], stages: Iterable[str] = ()) -> None:
        self.known = dict(known)  # name -> what it does
        self.stages = set(stages)
        self.active: list[Fault] = []

    def inject(self, name: str, stage: str = "*", count: int | None = None, **options: Any) -> Fault:
        """Switch a fault on. Raises ValueError for an unknown name or stage."""
        if name not in self.known:
            raise ValueError(f"unknown fault {name!r} (known: {', '.join(self.known)})")
        if stage != "*" and self.stages and stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r} (known: {', '.join(sorted(self.stages))})")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise ValueError("count must be an integer")
        fault = Fault(name, stage, None if count is None or count < 0 else count, options)
        self.active.append(fault)
        return fault

    def clear(self, name: str | None = None) -> None:
        """Switch one fault (every injection of that name), or all, off."""
        self.active = [] if name is None else [f for f in self.active if f.name != name]

    def take(self, name: str, stage: str = "*", subject: Any = None) -> Fault | None:
        """The first active fault `name` for `stage`, using up one of its uses. With a `match`
        option, only if `subject` (as JSON text) contains it."""
        return self._take(lambda f: f.name == name, stage, subject)

    def take_any(self, stage: str) -> Fault | None:
        """The first active fault of any name for `stage`."""
        return self._take(lambda f: True, stage, None)

    def _take(self, pick: Callable[[Fault], bool], stage: str, subject: Any) -> Fault | None:
        for fault in self.active:
            if not pick(fault) or fault.stage not in ("*", stage):
                continue
            match = fault.options.get("match")
            if match is not None and str(match) not in json.dumps(subject, default=str):
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.active.remove(fault)
            return fault
        return None

    def set_from_json(self, body: Any) -> None:
        """Apply a control request body (see the module docstring). Raises ValueError."""
        if isinstance(body, list):
            for spec in body:
                self.set_from_json(spec)
            return
        if not isinstance(body, dict):
            raise ValueError("expected a fault object, a list of them, or {name: spec}")
        if "name" in body or "kind" in body:
            spec = dict(body)
            name = spec.pop("name", None) or spec.pop("kind")
            count = spec.pop("count", spec.pop("times", None))
            self.inject(str(name), str(spec.pop("stage", "*")), count, **spec)
            return
        for name, spec in body.items():
            if spec is False or spec is None:
                self.clear(name)
            elif spec is True:
                self.inject(name)
            elif isinstance(spec, dict):
                opts = dict(spec)
                count = opts.pop("count", opts.pop("times", None))
                self.inject(name, str(opts.pop("stage", "*")), count, **opts)
            else:
                raise ValueError(f"fault {name}: expected true, false or an object")

    def as_json(self) -> dict[str, Any]:
        return {"active": [f.as_json() for f in self.active], "known": self.known}


class Changes:
    """Lets tests wait for a simulator's state to change, whatever changed it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def touch(self) -> None:
        """Wake every waiter (they re-check their predicate)."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until `predicate()` holds, re-checked after every change. Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._event.wait()


def add_fault_routes(app: web.Application, faults: Faults, changes: Changes | None = None) -> None:
    """`GET|POST|DELETE /sim/faults` on `app`."""

    async def get(_request: web.Request) -> web.Response:
        return web.json_response(faults.as_json())

    async def post(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            faults.set_from_json(body)
        except (ValueError, TypeError, RecursionError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if changes is not None:
            changes.touch()
        return web.json_response(faults.as_json())

    async def delete(_request: web.Request) -> web.Response:
        faults.clear()
        return web.json_response(faults.as_json())

    app.router.add_get("/sim/faults", get)
    app.router.add_post("/sim/faults", post)
    app.router.add_delete("/sim/faults", delete)


def serve(name: str, start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]],
          banner: Callable[[], None]) -> int:
    """Run a simulator until SIGINT/SIGTERM: EXIT_OK, or EXIT_LISTEN if it cannot listen."""

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        await start()
        try:
            banner()
            await done.wait()
        finally:
            await stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"gatewayd sim {name}: cannot listen: {exc}", flush=True)
        return EXIT_LISTEN
    except KeyboardInterrupt:
        pass
    return EXIT_OK
