"""A strict GE Operations Hub M2M REST simulator (`gatewayd sim opshub`, or in-process in tests).

It speaks the three documented calls under `/app/iqp/rest/`: `login`, `publish` and `subscribe`
(see `shared/protocols/opshub.md`), and is strict the way the real server is: unknown or idle
tokens get the unauthorized error (code 2), unparseable bodies get the bad-JSON error (code 1),
and a publish channel that breaks a rule gets code 0 and stores nothing. Accepted metrics become
M2M_data rows that tests read back.

Where the vendor page is silent the simulator picks a default and makes it switchable:
- unauthorized answers use HTTP 200 (`unauthorized_status=401` switches);
- a second login leaves the first token valid (`login_ends_earlier=True` ends them);
- a publish of several channels is answered with a JSON array, one object per channel in order
  (`multi_answer="first"|"last"|"none"`: one object naming the first channel, the last, or none;
  with `multi_stores="named"` only the named channel is processed);
- subscribe consumes the commands it returns (`consume_on_read=False` keeps them).

Control routes (JSON), for the CLI, the bench and tests in other processes:
- `POST /sim/commands` `{"dc": "...", "command": "..."}` or `{"commands": [...]}`: queue commands;
  `GET /sim/commands` lists them; `DELETE /sim/commands` clears them.
- `GET /sim/data?dc=&metric=&after=&limit=`: stored M2M_data rows (`after` is a row id).
- `POST /sim/faults` `{"name": "status"|"slow"|"drop"|"html"|"unauthorized"|"error"|"raw",
  "stage": "publish", "count": 1, "status": 503, "delay_s": 2}` (the shared kit's form; `kind`
  is taken for `name`); `GET /sim/faults` lists them, `DELETE /sim/faults` clears them.
- `POST /sim/config` `{"unauthorized_status": 401, "consume_on_read": false,
  "idle_timeout_s": 5, "reject_vals": ["poison"]}`; `POST /sim/expire` drops every token.
- `GET /sim/stats`: counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import ssl
import sys
import time
import tomllib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

import structlog
from aiohttp import web

from gatewayd_sim.kit import (
    EXIT_USAGE,
    Changes,
    Fault,
    Faults,
    PortHold,
    add_fault_routes,
    serve,
)

log = structlog.get_logger("gatewayd_sim.opshub")

REST_PREFIX = "/app/iqp/rest"
STAGES = ("login", "publish", "subscribe")
DEFAULT_IDLE_TIMEOUT_S = 20 * 60.0  # vendor page: a token expires after 20 minutes idle

# "YYYY-MM-DDThh:mm:ss.sss±TZ", as the page specifies for `time`.
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$")
_HTML_LOGIN_PAGE = (
    "<!DOCTYPE html><html><head><title>Operations Hub - Sign in</title></head>"
    "<body><form method='post' action='/login'><input name='username'></form></body></html>"
)

FAULTS = {
    "status": "answer `status` (default 503) without processing",
    "slow": "process (and store) normally, then wait `delay_s` (default 1) before answering",
    "drop": "close the connection without an answer, before processing",
    "html": "answer HTTP 200 with an HTML sign-in page, without processing",
    "unauthorized": "answer the unauthorized error whatever the token",
    "error": "answer the error message with `code` (default 1, bad JSON) without processing",
    "raw": "answer HTTP 200 with `body` as is (malformed or hand-written answers)",
}

# M2M_data columns, in the order rows are stored.
ROW_FIELDS = ("id", "dc", "metric", "data", "latitude", "longitude", "altitude", "timestamp",
              "description", "data_type", "generic_1", "generic_2", "cloud", "received_ms")
_MET_COLUMNS = (("met", "metric"), ("val", "data"), ("desc", "description"),
                ("type", "data_type"), ("gen1", "generic_1"), ("gen2", "generic_2"))


@dataclass
class _Session:
    user: str
    last_seen: float


class _BadRequest(Exception):
    """The body breaks the message format: answered with error code 1."""


def error_body(code: int) -> dict[str, Any]:
    """The page's error message: `{"handshake":{"stage":"error","code":"<code>"}}`."""
    return {"handshake": {"stage": "error", "code": str(code)}}


def valid_time(value: object) -> bool:
    """True if `value` is a timestamp in the page's `YYYY-MM-DDThh:mm:ss.sss±TZ` form."""
    if not isinstance(value, str) or not _TIME_RE.match(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _random_token() -> str:
    return "-".join(secrets.token_hex(4).upper() for _ in range(4))


def _scalar(value: object) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


class OpsHubSimulator:
    """The simulator; `async with OpsHubSimulator(users={"u": "p"}) as sim:` serves on `sim.url`.

    `users` maps username to password; each user's account name is the username. `tokens`
    pre-issues tokens (token -> username), e.g. to replay the vendor page's examples. `clock`
    (monotonic seconds) decides idle expiry; tests may pass a controllable one.
    `token_factory` makes the token of each successful login (default: four random hex groups,
    in the shape of the page's "00000000-00000000-00409DFF-FF521DB2").
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        unauthorized_status: int = 200,
        consume_on_read: bool = True,
        tokens: Mapping[str, str] | None = None,
        max_rows: int = 1_000_000,
        keep_requests: int = 200,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
        token_factory: Callable[[], str] | None = None,
        multi_answer: str = "array",
        multi_stores: str = "all",
        login_ends_earlier: bool = False,
    ) -> None:
        self.users = dict(users if users is not None else {"demo": "demo"})
        self.multi_answer = multi_answer
        self.multi_stores = multi_stores
        self.login_ends_earlier = login_ends_earlier
        _check_switches(multi_answer, multi_stores)
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.unauthorized_status = unauthorized_status
        self.consume_on_read = consume_on_read
        self.reject_vals: set[str] = set()
        self.ssl_context = ssl_context
        self.clock = clock
        self.token_factory = token_factory or _random_token
        self._sessions: dict[str, _Session] = {
            t: _Session(u, clock()) for t, u in (tokens or {}).items()
        }
        self._rows: deque[tuple[Any, ...]] = deque(maxlen=max_rows)
        self.rows_total = 0
        self._commands: list[tuple[str, str]] = []  # (dc, command) in arrival order
        self.faults = Faults(FAULTS, STAGES)
        self.requests: deque[tuple[str, bytes]] = deque(maxlen=keep_requests)  # (stage, raw body)
        self.stats: Counter[str] = Counter()
        self.changes = Changes()
        self._runner: web.AppRunner | None = None
        self._hold = PortHold(host)  # the port stays ours while offline (see PortHold)
        self._stopping = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The site URL (what the uplink's `url` key takes)."""
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        self._stopping.clear()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for stage in STAGES:
            app.router.add_post(f"{REST_PREFIX}/{stage}", self._stage_handler(stage))
        app.router.add_post("/sim/commands", self._h_add_commands)
        app.router.add_get("/sim/commands", self._h_list_commands)
        app.router.add_delete("/sim/commands", self._h_clear_commands)
        app.router.add_get("/sim/data", self._h_data)
        add_fault_routes(app, self.faults, self.changes)
        app.router.add_post("/sim/config", self._h_config)
        app.router.add_post("/sim/expire", self._h_expire)
        app.router.add_get("/sim/stats", self._h_stats)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        self._hold.release()
        log.info("opshub_sim_started", url=self.url)

    async def stop(self) -> None:
        self._hold.release()
        await self._close()

    async def _close(self) -> None:
        if self._runner is not None:
            self._stopping.set()
            await self._runner.cleanup()
            self._runner = None
            log.info("opshub_sim_stopped", url=self.url)

    async def go_offline(self) -> None:
        """Stop listening, as an outage would: tokens and stored rows are kept, and the port
        stays reserved for `go_online`."""
        if self._runner is not None:
            await self._close()
            if not await self._hold.hold_soon(self.port):
                log.warning("opshub_sim_port_not_held", port=self.port)

    async def go_online(self) -> None:
        """Listen again on the same port."""
        if self._runner is None:
            await self.start()

    async def restart(self) -> None:
        """Stop and start again on the same port, as a server reboot: tokens are lost, stored
        rows and queued commands are kept (they live in the server's database)."""
        await self.go_offline()
        self._sessions.clear()
        await self.go_online()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- Python control API (the /sim routes call these) ----------------------------------------

    def queue_command(self, dc: str, command: str) -> None:
        """Queue `command` for channel `dc` (sensor, gateway or account level)."""
        self._commands.append((dc, command))
        self.stats["commands_queued"] += 1

    def pending_commands(self) -> list[dict[str, str]]:
        return [{"dc": dc, "command": c} for dc, c in self._commands]

    def clear_commands(self) -> None:
        self._commands.clear()

    def inject(self, name: str, stage: str = "*", count: int | None = 1, **options: Any) -> Fault:
        """Add a fault (see FAULTS) for `count` calls of `stage` (None or -1: until cleared);
        faults apply in the order they were added."""
        return self.faults.inject(name, stage, count, **options)

    def clear_faults(self) -> None:
        self.faults.clear()

    def expire_tokens(self) -> None:
        """Forget every token, as if each had been idle past the timeout."""
        self._sessions.clear()

    def rows(self, dc: str | None = None, metric: str | None = None, after: int = 0,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Stored M2M_data rows with id > `after`, oldest first, filtered by channel and metric."""
        out: list[dict[str, Any]] = []
        for row in self._rows:
            if limit is not None and len(out) >= limit:
                break
            if row[0] <= after or (dc is not None and row[1] != dc):
                continue
            if metric is not None and row[2] != metric:
                continue
            out.append(dict(zip(ROW_FIELDS, row, strict=True)))
        return out

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until `predicate()` holds; it is re-checked after every request handled."""
        await self.changes.wait_for(predicate, timeout_s)

    # -- the REST stages ------------------------------------------------------------------------

    def _stage_handler(self, stage: str) -> Callable[[web.Request], Any]:
        handlers = {"login": self._login, "publish": self._publish, "subscribe": self._subscribe}

        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            self.requests.append((stage, raw))
            self.stats[f"{stage}_requests"] += 1
            try:
                fault = self._take_fault(stage)
                if fault is not None and fault.name != "slow":
                    return await self._apply_fault(fault, request)
                try:
                    body = self._parse(raw, stage)
                    status, answer = handlers[stage](body)
                except _BadRequest as exc:
                    self.stats["bad_json"] += 1
                    log.info("opshub_sim_bad_request", stage=stage, reason=str(exc))
                    status, answer = 200, error_body(1)
                if fault is not None:  # slow: stored already, answer late (the client may retry)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(float(fault.options.get("delay_s", 1.0))):
                            await self._stopping.wait()  # a stop cuts the delay short
                return _json_response(answer, status)
            finally:
                self.changes.touch()

        return handle

    def _take_fault(self, stage: str) -> Fault | None:
        fault = self.faults.take_any(stage)
        if fault is not None:
            self.stats[f"fault_{fault.name}"] += 1
        return fault

    async def _apply_fault(self, fault: Fault, request: web.Request) -> web.StreamResponse:
        opts = fault.options
        if fault.name == "status":
            return web.json_response({"error": "injected"}, status=int(opts.get("status", 503)))
        if fault.name == "html":
            return web.Response(text=_HTML_LOGIN_PAGE, content_type="text/html")
        if fault.name == "unauthorized":
            status, answer = self._unauthorized()
            return _json_response(answer, status)
        if fault.name == "error":
            return _json_response(error_body(int(opts.get("code", 1))))
        if fault.name == "raw":
            return web.Response(text=str(opts.get("body", "")), content_type="application/json")
        # drop: close the socket under the request; the client sees a disconnect, no answer.
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # aiohttp treats this as a vanished client: nothing sent

    def _parse(self, raw: bytes, stage: str) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise _BadRequest(f"not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _BadRequest("not a JSON object")
        handshake = body.get("handshake")
        if not isinstance(handshake, dict) or handshake.get("stage") != stage:
            raise _BadRequest(f"handshake.stage is not {stage!r}")
        return body

    def _unauthorized(self) -> tuple[int, dict[str, Any]]:
        self.stats["unauthorized"] += 1
        return self.unauthorized_status, error_body(2)

    def _user_for(self, body: Mapping[str, Any]) -> str | None:
        """The token's user if the token is known and not idle past the timeout; touches it."""
        token = body.get("token")
        session = self._sessions.get(token) if isinstance(token, str) else None
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen >= self.idle_timeout_s:
            del self._sessions[token]  # type: ignore[arg-type]
            self.stats["tokens_expired"] += 1
            return None
        session.last_seen = now
        return session.user

    def _login(self, body: dict[str, Any]) -> tuple[int, Any]:
        creds = body.get("login")
        if not isinstance(creds, dict):
            raise _BadRequest("login object missing")
        user, password = creds.get("username"), creds.get("password")
        if not isinstance(user, str) or not isinstance(password, str):
            raise _BadRequest("username and password must be strings")
        if self.users.get(user) != password:
            self.stats["logins_refused"] += 1
            log.info("opshub_sim_login_refused", user=user)
            return 200, {"handshake": {"stage": "login", "code": "0"}}
        token = self.token_factory()
        if self.login_ends_earlier:
            ended = [t for t, sess in self._sessions.items() if sess.user == user]
            for t in ended:
                del self._sessions[t]
            self.stats["tokens_ended_by_login"] += len(ended)
        self._sessions[token] = _Session(user, self.clock())
        self.stats["logins"] += 1
        return 200, {"handshake": {"stage": "login", "code": "1"}, "token": token}

    def _publish(self, body: dict[str, Any]) -> tuple[int, Any]:
        user = self._user_for(body)
        if user is None:
            return self._unauthorized()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty array")
        if not all(isinstance(m, dict) and isinstance(m.get("dc"), str) for m in messages):
            raise _BadRequest("every message needs a dc string")
        answers = []
        now_ms = time.time_ns() // 1_000_000
        single = len(messages) > 1 and self.multi_answer != "array"
        named = {"first": 0, "last": len(messages) - 1}.get(self.multi_answer, -1)
        for i, message in enumerate(messages):
            dc = message["dc"]
            problem = self._check_message(message, user)
            if single and self.multi_stores == "named" and i != named:
                continue  # the reading where only the channel answered is processed
            if problem is None:
                self._store(message, now_ms)
                self.stats["channels_accepted"] += 1
            else:
                self.stats["channels_rejected"] += 1
                log.info("opshub_sim_publish_rejected", dc=dc, reason=problem)
            answers.append({"handshake": {"stage": "publish", "code": "0" if problem else "1",
                                          "dc": dc}})
        if not single:
            return 200, answers[0] if len(answers) == 1 else answers
        if named >= 0:
            return 200, answers[0] if self.multi_stores == "named" else answers[named]
        # one object for the whole publish, naming no channel: code 1 only if all were taken
        code = "1" if all(a["handshake"]["code"] == "1" for a in answers) else "0"
        return 200, {"handshake": {"stage": "publish", "code": code}}

    def _check_message(self, message: Mapping[str, Any], user: str) -> str | None:
        """Why this channel's message is refused (code 0), or None if it is valid."""
        parts = message["dc"].split("/")
        if len(parts) != 3 or not all(parts):
            return "dc must be Account/Gateway/Sensor"
        if parts[0] != user:
            return f"account {parts[0]!r} is not the token's account"
        cloud = message.get("cloud")
        if cloud is not None and not valid_time(cloud):
            return "cloud is not an ISO 8601 timestamp"
        data = message.get("data")
        if not isinstance(data, list) or not data:
            return "data must be a non-empty array"
        for entry in data:
            if not isinstance(entry, dict):
                return "data entries must be objects"
            if "time" in entry and not valid_time(entry["time"]):
                return f"time {entry['time']!r} is not YYYY-MM-DDThh:mm:ss.sss±TZ"
            for key in ("lat", "long", "alt"):
                if key in entry and not _scalar(entry[key]):
                    return f"{key} must be a string or number"
            mets = entry.get("mets")
            if not isinstance(mets, list) or not mets:
                return "mets must be a non-empty array"
            for met in mets:
                if not isinstance(met, dict):
                    return "mets entries must be objects"
                if not isinstance(met.get("met"), str) or not met["met"]:
                    return "met is required"
                if not _scalar(met.get("val")):
                    return "val is required (a string or number)"
                if str(met["val"]) in self.reject_vals:
                    return f"val {met['val']!r} refused (injected)"
        return None

    def _store(self, message: Mapping[str, Any], now_ms: int) -> None:
        dc, cloud = message["dc"], message.get("cloud")
        for entry in message["data"]:
            common = (_text(entry.get("lat")), _text(entry.get("long")), _text(entry.get("alt")),
                      entry.get("time"))
            for met in entry["mets"]:
                self.rows_total += 1
                m, v, d, t, g1, g2 = (_text(met.get(k)) for k, _ in _MET_COLUMNS)
                self._rows.append((self.rows_total, dc, m, v, *common, d, t, g1, g2, cloud,
                                   now_ms))

    def _subscribe(self, body: dict[str, Any]) -> tuple[int, Any]:
        user = self._user_for(body)
        if user is None:
            return self._unauthorized()
        payload = body.get("payload")
        if not isinstance(payload, dict) or payload.get("request_type") != "subscribe":
            raise _BadRequest("payload.request_type must be 'subscribe'")
        dc = payload.get("dc")
        if not isinstance(dc, str) or not dc or len(dc.split("/")) > 3:
            raise _BadRequest("payload.dc must be Account[/Gateway[/Sensor]]")
        if dc.split("/")[0] != user:
            return self._unauthorized()
        matched: list[tuple[str, str]] = []
        rest: list[tuple[str, str]] = []
        for queued in self._commands:
            # a gateway or account subscription collects the commands of every channel under it
            under = queued[0] == dc or queued[0].startswith(dc + "/")
            (matched if under else rest).append(queued)
        if not matched:
            return 200, {"handshake": {"stage": "subscribe"}, "token": body["token"],
                         "payload": {"request_type": "no_commands", "dc": dc}}
        if self.consume_on_read:
            self._commands = rest
        self.stats["commands_delivered"] += len(matched)
        return 200, {"handshake": {"stage": "subscribe"},
                     "payload": {"request_type": "command_list",
                                 "commands": [{"dc": d, "command": c} for d, c in matched]}}

    # -- control routes -------------------------------------------------------------------------

    async def _h_add_commands(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        items = body.get("commands", [body]) if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(
                isinstance(c, dict) and isinstance(c.get("dc"), str)
                and isinstance(c.get("command"), str) for c in items):
            raise web.HTTPBadRequest(
                text='expected {"dc": str, "command": str} or {"commands": [...]}')
        for c in items:
            self.queue_command(c["dc"], c["command"])
        return web.json_response({"queued": len(items), "pending": len(self._commands)})

    async def _h_list_commands(self, request: web.Request) -> web.Response:
        return web.json_response({"commands": self.pending_commands()})

    async def _h_clear_commands(self, request: web.Request) -> web.Response:
        self.clear_commands()
        return web.json_response({"pending": 0})

    async def _h_data(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            after = int(q.get("after", "0"))
            limit = int(q.get("limit", "10000"))
        except ValueError:
            raise web.HTTPBadRequest(text="after and limit must be integers") from None
        rows = self.rows(q.get("dc"), q.get("metric"), after, limit)
        return web.json_response({"rows": rows, "total": self.rows_total})

    async def _h_config(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if "unauthorized_status" in body:
            if body["unauthorized_status"] not in (200, 401):
                raise web.HTTPBadRequest(text="unauthorized_status must be 200 or 401")
            self.unauthorized_status = body["unauthorized_status"]
        if "consume_on_read" in body:
            self.consume_on_read = bool(body["consume_on_read"])
        if "idle_timeout_s" in body:
            self.idle_timeout_s = float(body["idle_timeout_s"])
        if "reject_vals" in body:
            self.reject_vals = {str(v) for v in body["reject_vals"]}
        if "login_ends_earlier" in body:
            self.login_ends_earlier = bool(body["login_ends_earlier"])
        if "multi_answer" in body or "multi_stores" in body:
            answer = body.get("multi_answer", self.multi_answer)
            stores = body.get("multi_stores", self.multi_stores)
            try:
                _check_switches(answer, stores)
            except ValueError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
            self.multi_answer, self.multi_stores = answer, stores
        return web.json_response(self.settings())

    async def _h_expire(self, request: web.Request) -> web.Response:
        self.expire_tokens()
        return web.json_response({"tokens": 0})

    async def _h_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"rows_total": self.rows_total, "tokens": len(self._sessions),
                                  "pending_commands": len(self._commands), **self.stats,
                                  "settings": self.settings()})

    def settings(self) -> dict[str, Any]:
        return {"unauthorized_status": self.unauthorized_status,
                "consume_on_read": self.consume_on_read, "idle_timeout_s": self.idle_timeout_s,
                "reject_vals": sorted(self.reject_vals), "multi_answer": self.multi_answer,
                "multi_stores": self.multi_stores, "login_ends_earlier": self.login_ends_earlier}


MULTI_ANSWERS = ("array", "first", "last", "none")
MULTI_STORES = ("all", "named")


def _check_switches(multi_answer: str, multi_stores: str) -> None:
    if multi_answer not in MULTI_ANSWERS:
        raise ValueError(f"multi_answer must be one of {', '.join(MULTI_ANSWERS)}")
    if multi_stores not in MULTI_STORES:
        raise ValueError(f"multi_stores must be one of {', '.join(MULTI_STORES)}")


def _json_response(answer: Any, status: int = 200) -> web.Response:
    """Compact JSON, as the vendor page writes its messages."""
    return web.Response(text=json.dumps(answer, separators=(",", ":")), status=status,
                        content_type="application/json")


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body is not JSON") from None


# -- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `gatewayd sim opshub`."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790, help="0 picks a free port")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                        help="an account (repeatable; default demo:demo)")
    parser.add_argument("--users-file", metavar="TOML",
                        help='accounts from a TOML file: [users] NAME = "PASSWORD"')
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        metavar="SECONDS", help="token idle expiry (default 1200)")
    parser.add_argument("--unauthorized-status", type=int, choices=(200, 401), default=200,
                        help="HTTP status of the unauthorized error (default 200)")
    parser.add_argument("--keep-commands", action="store_true",
                        help="return commands on every poll instead of consuming them")
    parser.add_argument("--max-rows", type=int, default=1_000_000,
                        help="rows kept for read-back (older ones are forgotten, still counted)")
    parser.add_argument("--multi-answer", choices=MULTI_ANSWERS, default="array",
                        help="[open] answer to a publish of several channels: an array (default),"
                             " or one object naming the first channel, the last, or none")
    parser.add_argument("--multi-stores", choices=MULTI_STORES, default="all",
                        help="with --multi-answer first/last: store every channel (default) or"
                             " only the one the answer names")
    parser.add_argument("--login-ends-earlier", action="store_true",
                        help="[open] a new login ends the user's earlier tokens")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")


def parse_users(specs: Iterable[str], users_file: str | None = None) -> dict[str, str]:
    """{"name": "password"} from "name:password" strings and a TOML `[users]` table.

    Raises ValueError with a readable message.
    """
    users: dict[str, str] = {}
    if users_file:
        try:
            with open(users_file, "rb") as f:
                table = tomllib.load(f).get("users")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"--users-file {users_file}: {exc}") from None
        if not isinstance(table, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            raise ValueError(f'--users-file {users_file}: expected [users] NAME = "PASSWORD"')
        users.update(table)
    for spec in specs:
        name, sep, password = spec.partition(":")
        if not sep or not name:
            raise ValueError(f"--user expects NAME:PASSWORD, got {spec!r}")
        users[name] = password
    return users or {"demo": "demo"}


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; prints one JSON line with the URL once listening. Returns
    the exit status (see `kit`)."""
    try:
        users = parse_users(args.user, args.users_file)
        ctx = None
        if args.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
        sim = OpsHubSimulator(users, host=args.host, port=args.port,
                              idle_timeout_s=args.idle_timeout,
                              unauthorized_status=args.unauthorized_status,
                              consume_on_read=not args.keep_commands, max_rows=args.max_rows,
                              ssl_context=ctx, multi_answer=args.multi_answer,
                              multi_stores=args.multi_stores,
                              login_ends_earlier=args.login_ends_earlier)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return serve("opshub", sim.start, sim.stop,
                 lambda: print(json.dumps({"opshub_sim": sim.url}), flush=True))


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="gatewayd sim opshub")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
