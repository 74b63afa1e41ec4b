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
import hashlib
import json
import re
import ssl
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp

from drivers.base import Command, CommandResult, Duration, Quality, Range, Reading, Value, now_ms
from gatewayd.backoff import Backoff
from gatewayd.errors import (
    UplinkAuthError,
    UplinkError,
    UplinkRejectedError,
    UplinkUnavailableError,
)
from gatewayd.schema import Secret
from gatewayd.uplinks.base import Item, Lease, Uplink, UplinkContext, UplinkState

REST_PREFIX = "/app/iqp/rest"
RESULT_METRIC = "cmd_result"
_OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_ID_RE = re.compile(r"^[^/\s]+$")  # page: avoid spaces in names and ids; "/" splits a channel
_PARAM_TYPES = ("str", "int", "float", "bool")
_POLL_BACKOFF_CAP_S = 60.0
_MAX_PENDING_COMMANDS = 1000
_PROBE_LEVELS = 3  # split levels tried before "everything refused" means a config error
_QUALITY_NAMES = {int(q): q.name.lower() for q in Quality}
_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no"}


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointMap:
    """How one local point is published: the M2M_data `metric`, `data_type`, `description`..."""

    met: str = ""  # metric name; default: the local point name
    type: str = ""  # data_type; default: "Number" for numbers, "String" otherwise
    desc: str = ""
    gen1: str = ""
    gen2: str = ""  # default: the reading's quality ("uncertain"/"bad") when it is not good


@dataclass(frozen=True, slots=True)
class DeviceMap:
    """One local device: its Ops Hub sensor id and its points."""

    sensor: str = ""  # default: the local device name
    points: dict[str, PointMap] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sensor and not _ID_RE.match(self.sensor):
            raise ValueError(f"sensor id {self.sensor!r} must not contain spaces or '/'")


@dataclass(frozen=True, slots=True)
class GpsMap:
    """The local device whose readings give the gateway's position (lat/long/alt of each entry)."""

    device: str
    lat: str = "lat"  # local point names
    long: str = "long"
    alt: str = "alt"
    decimals: Annotated[int, Range(0, 12)] = 6  # lat/long digits after the point (6: ~0.1 m)
    publish: bool = False  # also publish the GPS readings as a channel of their own


@dataclass(frozen=True, slots=True)
class CommandPattern:
    """A command string format: a regex matched against the whole string.

    Named groups become the command's params; the group `action` (or the key `action`) names
    the dispatcher action and the group `device` (or the key `device`) the local target.
    """

    pattern: str
    action: str = ""
    device: str = ""  # local device it targets; default: the device of the command's channel
    channel: str = ""  # only for commands arriving on this local device's channel ("" any)
    types: dict[str, Literal["str", "int", "float", "bool"]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            rx = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {exc}") from None
        if not self.action and "action" not in rx.groupindex:
            raise ValueError(f"pattern {self.pattern!r}: set `action` or use a (?P<action>...) "
                             "group")
        unknown = set(self.types) - set(rx.groupindex)
        if unknown:
            raise ValueError(f"types names groups the pattern lacks: {', '.join(sorted(unknown))}")


@dataclass(frozen=True, slots=True)
class OpsHubConfig:
    url: str  # site URL: "https://opshub.example.com" (the API lives under /app/iqp/rest/)
    username: str
    password: Secret
    account: str = ""  # the channel's account part; default: the username
    gateway_id: str = ""  # default: MAC of the primary interface, "01-23-45-67-89-ab"
    ca_bundle: str = ""  # PEM file of the CAs to trust (a private CA); "" = the system store
    allow_http: bool = False  # plain http:// only when set (the password travels in the body)
    utc_offset: str = "+00:00"  # time zone written in `time` and `cloud`
    poll_interval: Duration = 5.0  # subscribe polling; 0 disables command polling
    request_timeout: Duration = 30.0
    max_batch: Annotated[int, Range(1, 100_000)] = 2000  # readings per publish
    devices: dict[str, DeviceMap] = field(default_factory=dict)
    send_unmapped: bool = True  # publish devices missing from `devices` under their own name
    gps: GpsMap | None = None
    commands: list[CommandPattern] = field(default_factory=list)
    result_sensor: str = "gateway"  # result channel of commands sent to the gateway channel
    dedupe_window: Duration = 60.0
    backoff_base: Duration = 1.0
    backoff_cap: Duration = 300.0

    def __post_init__(self) -> None:
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if scheme not in ("https", "http"):
            raise ValueError(f"url must start with https:// (got {self.url!r})")
        if scheme == "http" and not self.allow_http:
            raise ValueError("url is plain http://: the password would travel unencrypted; "
                             "use https:// or set allow_http = true")
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            raise ValueError(f"ca_bundle {self.ca_bundle!r} is not a readable file")
        if not _OFFSET_RE.match(self.utc_offset):
            raise ValueError(f'utc_offset must look like "+09:00", got {self.utc_offset!r}')
        if "/" in (self.account or self.username):
            raise ValueError("account must not contain '/'")
        for what, value in (("gateway_id", self.gateway_id), ("result_sensor", self.result_sensor)):
            if value and not _ID_RE.match(value):
                raise ValueError(f"{what} {value!r} must not contain spaces or '/'")
        if self.backoff_cap < self.backoff_base:
            raise ValueError("backoff_cap must be at least backoff_base")


# -- helpers shared by the uplink (pure, unit-tested) -------------------------------------------


def primary_mac() -> str:
    """MAC of the interface holding the default route, as "01-23-45-67-89-ab".

    Falls back to the first non-loopback interface with a MAC, then to `uuid.getnode()`.
    """
    candidates: list[str] = []
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "00000000":
                candidates.append(fields[0])
    except OSError:
        pass
    net = Path("/sys/class/net")
    try:
        candidates += sorted(p.name for p in net.iterdir() if p.name != "lo")
    except OSError:
        pass
    for name in candidates:
        try:
            mac = (net / name / "address").read_text().strip().lower()
        except OSError:
            continue
        if re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac) and mac != "00:00:00:00:00:00":
            return mac.replace(":", "-")
    node = uuid.getnode()
    return "-".join(f"{(node >> s) & 0xFF:02x}" for s in range(40, -1, -8))


class TimeFormat:
    """Formats epoch milliseconds as the page's `YYYY-MM-DDThh:mm:ss.sss±TZ`."""

    def __init__(self, utc_offset: str = "+00:00") -> None:
        m = _OFFSET_RE.match(utc_offset)
        if m is None:
            raise ValueError(f"bad utc offset {utc_offset!r}")
        sign = -1 if m.group(1) == "-" else 1
        self.offset_ms = sign * (int(m.group(2)) * 3600 + int(m.group(3)) * 60) * 1000
        self.suffix = utc_offset

    def __call__(self, ts_ms: int) -> str:
        """Raises ValueError (or OverflowError) for a time outside years 1..9999."""
        sec, ms = divmod(int(ts_ms) + self.offset_ms, 1000)
        t = time.gmtime(sec)
        if not 1 <= t.tm_year <= 9999:
            raise ValueError(f"timestamp {ts_ms} is outside years 1-9999")
        return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:"
                f"{t.tm_sec:02d}.{ms:03d}{self.suffix}")


def format_value(value: Value) -> tuple[str, str]:
    """(val, default data_type) for a reading value; the page sends every value as a string."""
    if isinstance(value, bool):
        return ("true" if value else "false"), "String"
    if isinstance(value, int):
        return str(value), "Number"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value)), "Number"  # 100.0 -> "100", as the page writes numbers
        return repr(value), "Number"
    if value is None:
        return "", "String"
    if isinstance(value, str):
        return value, "String"
    return json.dumps(value, separators=(",", ":"), sort_keys=True), "String"


def command_key(dc: str, command: str, ordinal: int) -> str:
    """The dedupe key of a polled command, which carries no id of its own: a hash of its
    channel, its string and its ordinal among identical commands in the same poll answer."""
    return hashlib.sha256(f"{dc}\n{command}\n{ordinal}".encode()).hexdigest()[:20]


_UNQUOTED_KEY = re.compile(r'([{,]\s*)([A-Za-z_]\w*)\s*:')
_UNOPENED_VALUE = re.compile(r':\s*([A-Za-z_]\w*)"')


def loads_lenient(text: str) -> Any:
    """json.loads, then a second try that repairs the vendor page's own typos.

    The page writes a command list as `{"request_type":command_list", commands: [...]}` (a
    missing quote and an unquoted key); a server built from that page may do the same.
    Raises ValueError if the text is not JSON even after the repair.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        repaired = _UNOPENED_VALUE.sub(r':"\1"', _UNQUOTED_KEY.sub(r'\1"\2":', text))
        return json.loads(repaired)


@dataclass(slots=True)
class Metric:
    """One metric ready to publish: its channel, time, position and `mets` entry."""

    item: Item | None  # None for command results (not from the queue)
    dc: str
    time: str
    position: tuple[tuple[str, str], ...]  # (("alt", ..), ("lat", ..), ("long", ..)) present ones
    met: dict[str, str]


def build_messages(metrics: Sequence[Metric], cloud: str) -> list[dict[str, Any]]:
    """Publish `messages`: one per channel (first-seen order), one `data` entry per time and
    position within it, keys in the page's order."""
    channels: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[dict[str, str]]]] = {}
    for m in metrics:
        channels.setdefault(m.dc, {}).setdefault((m.time, m.position), []).append(m.met)
    return [{"dc": dc, "cloud": cloud,
             "data": [{**dict(pos), "time": t, "mets": mets} for (t, pos), mets in entries.items()]}
            for dc, entries in channels.items()]


def publish_verdicts(answer: Any) -> dict[str, bool]:
    """Channel -> accepted, from a publish answer (one object, or an array of them)."""
    answers = answer if isinstance(answer, list) else [answer]
    out: dict[str, bool] = {}
    for a in answers:
        hs = a.get("handshake") if isinstance(a, dict) else None
        if not isinstance(hs, dict) or hs.get("stage") != "publish":
            continue
        if not isinstance(hs.get("dc"), str):
            continue
        out[hs["dc"]] = str(hs.get("code")).strip() == "1"
    return out


@dataclass(frozen=True, slots=True)
class PolledCommand:
    dc: str
    command: str


def parse_subscribe(answer: Any) -> tuple[list[PolledCommand], list[tuple[str, str]]]:
    """(commands, problems) from a subscribe answer; a problem is (dc or "", reason).

    Accepts `command_list`, `no_commands` (also the page's `" no_commands"`) and `result`.
    """
    payload = answer.get("payload") if isinstance(answer, dict) else None
    if not isinstance(payload, dict):
        return [], [("", "subscribe answer has no payload object")]
    kind = str(payload.get("request_type", "")).strip()
    if kind in ("no_commands", "result"):
        return [], []
    if kind != "command_list":
        return [], [("", f"unknown request_type {payload.get('request_type')!r}")]
    raw = payload.get("commands")
    if not isinstance(raw, list):
        return [], [("", "command_list without a commands array")]
    commands, problems = [], []
    for i, entry in enumerate(raw):
        dc = entry.get("dc") if isinstance(entry, dict) else None
        cmd = entry.get("command") if isinstance(entry, dict) else None
        if isinstance(dc, str) and isinstance(cmd, str):
            commands.append(PolledCommand(dc, cmd))
        else:
            problems.append((dc if isinstance(dc, str) else "",
                             f"commands[{i}] needs string dc and command, got {entry!r:.200}"))
    return commands, problems


def _convert(value: str, kind: str) -> Any:
    if kind == "int":
        return int(value, 0)
    if kind == "float":
        return float(value)
    if kind == "bool":
        low = value.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(f"{value!r} is not a boolean")
    return value


# -- the REST session ---------------------------------------------------------------------------


class _TokenInvalid(Exception):
    """The server no longer accepts the token (or answered like a login page)."""


class _BodyRejected(Exception):
    """The server refused the whole body (error code 1, HTTP 400/413/422)."""


class OpsHubApi:
    """One HTTP session to the site: login, and calls with one silent re-login and retry."""

    def __init__(self, config: OpsHubConfig, log: Any, counters: Counter[str] | None = None) -> None:
        self.config = config
        self.log = log
        self.base = config.url.rstrip("/") + REST_PREFIX
        self.token: str | None = None
        self.counters = counters if counters is not None else Counter()  # logins, relogins
        self._login_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpsHubApi:
        tls: ssl.SSLContext | bool = False
        if self.config.url.lower().startswith("https://"):
            # verification stays on; a private CA is added, never a bypass
            tls = ssl.create_default_context(cafile=self.config.ca_bundle or None)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=4),
            headers={"Content-Type": "application/json", "Accept": "application/json"})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _post(self, stage: str, body: bytes) -> Any:
        """POST one body; the decoded answer, or the exception that classifies it."""
        assert self._http is not None
        try:
            async with asyncio.timeout(self.config.request_timeout):
                async with self._http.post(f"{self.base}/{stage}", data=body) as resp:
                    status = resp.status
                    text = await resp.text(errors="replace")
        except (aiohttp.ClientError, OSError) as exc:
            raise UplinkUnavailableError(f"{stage}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise UplinkUnavailableError(
                f"{stage}: no answer in {self.config.request_timeout}s") from exc
        if status in (401, 403):
            raise _TokenInvalid(f"HTTP {status}")
        if status in (400, 413, 422):
            raise _BodyRejected(f"HTTP {status}")
        if status == 429 or status >= 500:
            raise UplinkUnavailableError(f"{stage}: HTTP {status}")
        if status >= 300:
            raise UplinkRejectedError(f"{stage}: HTTP {status} (check the site url)")
        try:
            answer = loads_lenient(text)
        except ValueError:
            # a proxy or SSO front end answers an expired session with its HTML sign-in page
            raise _TokenInvalid(f"HTTP {status} body is not JSON: {text[:60]!r}") from None
        hs = answer.get("handshake") if isinstance(answer, dict) else None
        if isinstance(hs, dict) and hs.get("stage") == "error":
            code = str(hs.get("code")).strip()
            if code == "2":
                raise _TokenInvalid("error code 2 (unauthorized)")
            if code == "1":
                raise _BodyRejected("error code 1 (bad JSON format)")
            raise UplinkRejectedError(f"{stage}: error code {code}")
        return answer

    async def login(self) -> None:
        """Exchange the credentials for a token. Raises UplinkAuthError if refused."""
        body = json.dumps({"handshake": {"stage": "login"},
                           "login": {"username": self.config.username,
                                     "password": self.config.password.reveal()}},
                          separators=(",", ":")).encode()
        try:
            answer = await self._post("login", body)
        except _TokenInvalid as exc:
            if str(exc).startswith("HTTP 40"):  # 401/403 on the login itself: credentials
                raise UplinkAuthError(f"login refused for user {self.config.username!r} "
                                      f"({exc})") from None
            raise UplinkUnavailableError(f"login: {exc}") from None
        except _BodyRejected as exc:
            raise UplinkUnavailableError(f"login: {exc}") from None
        hs = answer.get("handshake") if isinstance(answer, dict) else None
        code = str(hs.get("code")).strip() if isinstance(hs, dict) else ""
        token = answer.get("token") if isinstance(answer, dict) else None
        if code == "1" and isinstance(token, str) and token:
            self.token = token
            self.counters["logins"] += 1
            self.log.info("opshub_logged_in", user=self.config.username)
            return
        self.token = None
        if code == "0":
            raise UplinkAuthError(f"login refused for user {self.config.username!r}")
        raise UplinkUnavailableError(f"login: unexpected answer {str(answer)[:120]}")

    async def _relogin(self, failed_token: str | None) -> None:
        async with self._login_lock:
            if self.token is not None and self.token != failed_token:
                return  # a concurrent call logged in already
            await self.login()

    async def call(self, stage: str, fields: bytes) -> Any:
        """POST `{"handshake":{"stage":..},"token":..,<fields>}`; re-login and retry once if the
        token is refused. `fields` is the JSON text of the remaining keys, without braces.

        Raises _BodyRejected, UplinkAuthError, UplinkUnavailableError or UplinkRejectedError.
        """
        if self.token is None:
            await self._relogin(None)
        for attempt in (1, 2):
            token = self.token
            body = b'{"handshake":{"stage":"%s"},"token":%s,%s}' % (
                stage.encode(), json.dumps(token).encode(), fields)
            try:
                return await self._post(stage, body)
            except _TokenInvalid as exc:
                if attempt == 2:
                    raise UplinkUnavailableError(
                        f"{stage}: token refused right after a new login ({exc})") from None
                self.log.info("opshub_token_invalid", stage=stage, sign=str(exc))
                self.token = None if self.token == token else self.token
                await self._relogin(token)
                self.counters["relogins"] += 1
        raise AssertionError("unreachable")


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
        async with OpsHubApi(self.config, self.log, self.counters) as api:
            self.api = api
            try:
                self.set_state(UplinkState.AUTHENTICATING)
                await api.login()
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
                "results_pending": len(self._results), "quarantined": self.quarantined}

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
        """Publish until every channel got an answer; returns the refused metrics.

        Channels the answer does not name are sent again, twice at most.
        """
        pending, refused = metrics, list[Metric]()
        for _ in range(3):
            if not pending:
                return refused
            try:
                verdicts = await self._publish(pending)
            except _BodyRejected as exc:
                self.log.warning("opshub_publish_refused", reason=str(exc), count=len(pending))
                verdicts = dict.fromkeys({m.dc for m in pending}, False)
            if any(verdicts.values()):
                self._accepted_once = True
            refused += [m for m in pending if verdicts.get(m.dc) is False]
            pending = [m for m in pending if m.dc not in verdicts]
            if pending:
                self.log.warning("opshub_reply_missing_channels",
                                 channels=sorted({m.dc for m in pending}))
        if pending:
            raise UplinkUnavailableError("publish answers did not name every channel")
        return refused

    def _quarantine(self, item: Item, reason: str, detail: str) -> None:
        """Count and log it as dropped (the outbox logs, rate-limited); the lease acks past it."""
        self.quarantined += 1
        self.ctx.outbox.quarantine(item, reason, detail[:200])

    async def _publish(self, metrics: Sequence[Metric]) -> dict[str, bool]:
        assert self.api is not None
        messages = build_messages(metrics, self.time_format(self.clock_ms()))
        fields = b'"messages":' + json.dumps(messages, separators=(",", ":"),
                                              ensure_ascii=False).encode()
        answer = await self.api.call("publish", fields)
        self.messages += 1
        return publish_verdicts(answer)

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
            except (_BodyRejected, UplinkError) as exc:
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
                    params[key] = _convert(value, kind)
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


__all__ = ["CommandPattern", "DeviceMap", "GpsMap", "OpsHubConfig", "OpsHubUplink", "PointMap"]
