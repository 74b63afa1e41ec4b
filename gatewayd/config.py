"""One TOML file into typed, frozen config objects; every problem reported at once.

Each problem names the file, the key path and what was expected:
`gateway.toml: devices[2].interval: expected a duration like "10s" or "500ms", got "fast"`.
Driver and uplink sections are validated against the `Config` dataclass of the driver or
uplink class they name, so each plug-in owns its keys.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import drivers
from drivers.base import Duration, Range
from gatewayd.errors import ConfigError
from gatewayd.queue import QueueConfig
from gatewayd.schema import Builder, Secret, did_you_mean
from gatewayd.uplinks import UPLINKS, load_uplink

EX_CONFIG = 78
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_HINT = "a name of letters, digits, '.', '_' or '-' (at most 64)"


@dataclass(frozen=True, slots=True)
class GatewaySection:
    id: str
    state_dir: str = "/var/lib/gatewayd"
    stop_timeout: Duration = 10.0  # on SIGTERM: how long uplinks may flush before exit
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"  # gatewayd/loop.py; at start only

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.id):
            raise ValueError(f"id: expected {_NAME_HINT}, got {self.id!r}")


@dataclass(frozen=True, slots=True)
class HealthAuth:
    user: str
    password: Secret  # password_file = "..." (or password_env); HTTP basic auth


@dataclass(frozen=True, slots=True)
class HealthSection:
    enabled: bool = True
    listen: str = "127.0.0.1:9847"
    allow_commands: bool = False  # POST /commands from the local network (bench, commissioning)
    auth: HealthAuth | None = None  # required when listen is not a loopback address
    # host names (besides IP addresses, localhost and this machine's name) that a browser may
    # use for POST requests; anything else is refused as DNS rebinding
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f'listen: expected "host:port", got {self.listen!r}')
        for name in self.allowed_hosts:
            if not name or any(c in name for c in ":/[] "):
                raise ValueError(f"allowed_hosts: {name!r} is not a host name (no port,"
                                 " scheme or path: a Host header's name part)")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")


@dataclass(frozen=True, slots=True)
class LogSection:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON


@dataclass(frozen=True, slots=True)
class DispatchSection:
    dedupe_window: Duration = 600.0  # a redelivered command id within this gets the first result
    default_timeout: Duration = 10.0  # per action, unless the command map says otherwise


@dataclass(frozen=True, slots=True)
class DeviceCommon:
    name: str
    driver: str
    interval: Duration = 10.0
    timeout: Duration = 5.0
    enabled: bool = True
    # +/- fraction of the interval, drawn per poll. 0: the devices of one interval poll on the
    # same tick of the grid every time, so they share their wake-ups and commits (sampler.py)
    jitter: Annotated[float, Range(0.0, 0.5)] = 0.0
    backoff_max: Duration = 60.0  # longest wait between retries of a failing device


@dataclass(frozen=True, slots=True)
class ActuatorCommon:
    name: str
    driver: str
    timeout: Duration = 5.0
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class UplinkCommon:
    type: str
    enabled: bool = True
    start: Literal["now", "oldest"] | None = None  # where a new cursor starts (default: queue's)
    live_first: bool = True  # a live lane beside the backlog lane (False: strict queue order)
    backlog_rate: Annotated[float, Range(0, None)] = 0.0  # backlog pace (0: unlimited)


@dataclass(frozen=True, slots=True)
class ParamSpec:
    type: Literal["int", "float", "bool", "str"]
    required: bool = True
    min: float | None = None
    max: float | None = None
    choices: list[Any] | None = None
    default: Any = None
    to: str = ""  # the name the actuator gets (default: the same), e.g. MMS "operand" -> "channel"


@dataclass(frozen=True, slots=True)
class CommandMap:
    action: str  # the uplink-side action name: an EnOS service id, an MMS action value, ...
    actuator: str  # local actuator that carries it out
    uplink: str = "*"  # which uplink may send it ("*": any; "local": the health endpoint)
    device: str = "*"  # which local device the cloud must address ("*": any, "": the gateway)
    actuator_action: str = ""  # the action passed to the actuator (default: `action`)
    params: dict[str, ParamSpec] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)  # constant params merged in
    timeout: Duration | None = None

    @property
    def target_action(self) -> str:
        return self.actuator_action or self.action


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    driver: str
    interval: float
    timeout: float
    enabled: bool
    jitter: float
    backoff_max: float
    options: Any  # the driver's own Config instance


@dataclass(frozen=True, slots=True)
class ActuatorConfig:
    name: str
    driver: str
    timeout: float
    enabled: bool
    options: Any


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    name: str
    type: str
    enabled: bool
    start: str | None
    options: Any  # the uplink's own Config instance
    live_first: bool = True
    backlog_rate: float = 0.0  # readings/s (messages/s for uplinks that count messages); 0: none


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    gateway: GatewaySection
    queue: QueueConfig
    health: HealthSection
    log: LogSection
    dispatch: DispatchSection
    devices: tuple[DeviceConfig, ...]
    actuators: tuple[ActuatorConfig, ...]
    uplinks: tuple[UplinkConfig, ...]
    commands: tuple[CommandMap, ...]

    @property
    def state_dir(self) -> Path:
        p = Path(self.gateway.state_dir)
        return p if p.is_absolute() else (self.path.parent / p)


_SECTIONS = {"gateway", "queue", "health", "log", "dispatch", "devices", "actuators", "uplinks",
             "commands"}


def load(path: str | Path, env: Mapping[str, str] | None = None, *, read_secrets: bool = True) -> Config:
    """Read and validate the config file. Raises ConfigError listing every problem.

    With `read_secrets=False` secret files and variables are not read (their values are
    empty): everything else is checked, as `gatewayd check --no-secrets` does.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a UTF-8 text file"]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None
    return parse(doc, path, env, read_secrets=read_secrets)


def parse(doc: dict[str, Any], path: Path, env: Mapping[str, str] | None = None, *,
          read_secrets: bool = True) -> Config:
    """Validate an already-parsed TOML document (see `load`)."""
    b = Builder(base_dir=path.parent, env=env, read_secrets=read_secrets)
    for key in doc:
        if key not in _SECTIONS:
            b.error(key, f"unknown section{did_you_mean(key, _SECTIONS)} "
                         f"(expected one of: {', '.join(sorted(_SECTIONS))})")
    if "gateway" not in doc:
        b.error("gateway", 'missing required section (expected [gateway] with id = "...")')
    gateway = b.build(GatewaySection, doc.get("gateway", {}), "gateway") if "gateway" in doc else None
    queue = b.build(QueueConfig, doc.get("queue", {}), "queue")
    health = b.build(HealthSection, doc.get("health", {}), "health")
    log = b.build(LogSection, doc.get("log", {}), "log")
    dispatch = b.build(DispatchSection, doc.get("dispatch", {}), "dispatch")
    devices = _plugins(b, doc.get("devices", []), "devices", DeviceCommon, drivers.DRIVERS)
    actuators = _plugins(b, doc.get("actuators", []), "actuators", ActuatorCommon, drivers.ACTUATORS)
    uplinks = _uplinks(b, doc.get("uplinks", {}))
    commands = b.value(list[CommandMap], doc.get("commands", []), "commands") or []

    if health is not None and health.enabled and not health.loopback and health.auth is None:
        b.error("health.auth", f"required when listen ({health.listen!r}) is not a loopback address: "
                               'set auth = { user = "...", password_file = "..." }')
    _check_names(b, devices, actuators)
    # Cross-references use every declared name, so one broken section does not cascade.
    declared_uplinks = set(doc["uplinks"]) if isinstance(doc.get("uplinks"), dict) else set()
    declared_actuators = _declared(doc.get("actuators")) | {a.name for a in actuators}
    declared_devices = _declared(doc.get("devices")) | declared_actuators
    _check_commands(b, commands, declared_actuators, declared_uplinks, declared_devices)
    _check_actions(b, commands, actuators)
    for u in uplinks:
        check = getattr(u.options, "check", None) or getattr(u.options, "check_devices", None)
        if check is not None:
            for problem in check(declared_devices):
                m = re.search(r"named '([^']+)'", problem)
                b.error(f"uplinks.{u.name}",
                        problem + (did_you_mean(m.group(1), declared_devices) if m else ""))

    if b.errors or gateway is None:
        raise ConfigError([f"{path}: {e}" for e in b.errors])
    return Config(path=path, gateway=gateway, queue=queue, health=health, log=log,
                  dispatch=dispatch, devices=tuple(devices), actuators=tuple(actuators),
                  uplinks=tuple(uplinks), commands=tuple(commands))


def _declared(raw: object) -> set[str]:
    if not isinstance(raw, list):
        return set()
    return {t["name"] for t in raw if isinstance(t, dict) and isinstance(t.get("name"), str)}


def _plugins(b: Builder, raw: object, section: str, common_cls: type[Any],
             registry: dict[str, str]) -> list[Any]:
    if not isinstance(raw, list):
        b.error(section, f"expected an array of tables ([[{section}]]), got a {type(raw).__name__}")
        return []
    common_keys = set(common_cls.__dataclass_fields__)
    out = []
    for i, table in enumerate(raw):
        p = f"{section}[{i}]"
        if not isinstance(table, dict):
            b.error(p, "expected a table")
            continue
        common = b.build(common_cls, {k: v for k, v in table.items() if k in common_keys}, p)
        name = table.get("name")
        if isinstance(name, str) and not _NAME_RE.match(name):
            b.error(f"{p}.name", f"expected {_NAME_HINT}, got {name!r}")
        driver = table.get("driver")
        if not isinstance(driver, str):
            continue
        if driver not in registry:
            b.error(f"{p}.driver", f"unknown driver {driver!r}{did_you_mean(driver, registry)} "
                                   f"(known: {', '.join(sorted(registry))})")
            continue
        try:
            cls = drivers.load(registry, driver)
        except ImportError as exc:
            b.error(f"{p}.driver", f"driver {driver!r} cannot be loaded: {exc}")
            continue
        rest = {k: v for k, v in table.items() if k not in common_keys}
        options = b.build(cls.Config, rest, p, also=frozenset(common_keys))
        if common is None or options is None:
            continue
        fields = {k: getattr(common, k) for k in common_keys}
        kind = DeviceConfig if common_cls is DeviceCommon else ActuatorConfig
        out.append(kind(options=options, **fields))
    return out


def _uplinks(b: Builder, raw: object) -> list[UplinkConfig]:
    if not isinstance(raw, dict):
        b.error("uplinks", "expected a table of uplinks ([uplinks.<name>])")
        return []
    out = []
    common_keys = set(UplinkCommon.__dataclass_fields__)
    for name, table in raw.items():
        p = f"uplinks.{name}"
        if not _NAME_RE.match(name):
            b.error(p, f"expected {_NAME_HINT} as the uplink name")
            continue
        if not isinstance(table, dict):
            b.error(p, "expected a table")
            continue
        common = b.build(UplinkCommon, {k: v for k, v in table.items() if k in common_keys}, p)
        if common is None:
            continue
        if common.type not in UPLINKS:
            b.error(f"{p}.type", f"unknown uplink type {common.type!r}{did_you_mean(common.type, UPLINKS)} "
                                 f"(known: {', '.join(sorted(UPLINKS))})")
            continue
        try:
            cls = load_uplink(common.type)
        except ImportError as exc:
            b.error(f"{p}.type", f"uplink type {common.type!r} cannot be loaded: {exc}")
            continue
        options = b.build(cls.Config, {k: v for k, v in table.items() if k not in common_keys}, p,
                          also=frozenset(common_keys))
        if options is not None:
            out.append(UplinkConfig(name, common.type, common.enabled, common.start, options,
                                    common.live_first, common.backlog_rate))
    return out


def _check_names(b: Builder, devices: list[DeviceConfig], actuators: list[ActuatorConfig]) -> None:
    seen: dict[str, str] = {}
    groups: list[tuple[str, list[Any]]] = [("devices", devices), ("actuators", actuators)]
    for section, items in groups:
        for i, item in enumerate(items):
            where = f"{section}[{i}]"
            if item.name in seen:
                b.error(f"{where}.name", f"duplicate name {item.name!r} (already used by {seen[item.name]})")
            else:
                seen[item.name] = where


def _check_commands(b: Builder, commands: list[CommandMap], actuators: set[str],
                    uplinks: set[str], devices: set[str]) -> None:
    seen: dict[tuple[str, str, str], int] = {}
    for i, c in enumerate(commands):
        if c is None:
            continue
        p = f"commands[{i}]"
        if c.actuator not in actuators:
            known = ", ".join(sorted(actuators)) or "none configured"
            b.error(f"{p}.actuator", f"no actuator named {c.actuator!r}"
                                     f"{did_you_mean(c.actuator, actuators)} (actuators: {known})")
        if c.uplink not in uplinks | {"*", "local"}:
            known = ", ".join(sorted(uplinks | {"*", "local"}))
            b.error(f"{p}.uplink", f"no uplink named {c.uplink!r}{did_you_mean(c.uplink, uplinks)} "
                                   f"(expected one of: {known})")
        if c.device not in devices | {"*", ""}:
            b.error(f"{p}.device", f"no device or actuator named {c.device!r}"
                                   f"{did_you_mean(c.device, devices)}")
        key = (c.uplink, c.device, c.action)
        if key in seen:
            b.error(p, f"duplicate mapping for uplink={c.uplink!r} device={c.device!r} "
                       f"action={c.action!r} (first at commands[{seen[key]}])")
        seen[key] = i
        for name, spec in c.params.items():
            if spec is None:
                continue
            if spec.min is not None and spec.max is not None and spec.min > spec.max:
                b.error(f"{p}.params.{name}", f"min ({spec.min}) is above max ({spec.max})")
            if spec.min is not None and spec.type not in ("int", "float"):
                b.error(f"{p}.params.{name}.min", f"min/max apply to int and float, not {spec.type}")


def _check_actions(b: Builder, commands: list[CommandMap], actuators: list[ActuatorConfig]) -> None:
    """Each mapping's actuator action must be one the actuator carries out (when it says)."""
    by_name = {a.name: a for a in actuators}
    for i, c in enumerate(commands):
        a = by_name.get(c.actuator) if c is not None else None
        if a is None:
            continue
        cls = drivers.load(drivers.ACTUATORS, a.driver)
        actions = cls.known_actions(a.options)
        if actions is None or c.target_action in actions:
            continue
        key = "actuator_action" if c.actuator_action else "action"
        b.error(f"commands[{i}].{key}",
                f"actuator {a.name!r} ({a.driver}) has no action {c.target_action!r}"
                f"{did_you_mean(c.target_action, actions)} (actions: {', '.join(sorted(actions))})")
