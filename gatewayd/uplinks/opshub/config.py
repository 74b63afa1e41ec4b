"""Operations Hub uplink configuration: `[uplinks.<name>] type = "opshub"`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from drivers.base import Duration, Range
from gatewayd.schema import Secret

_OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_ID_RE = re.compile(r"^[^/\s]+$")  # page: avoid spaces in names and ids; "/" splits a channel



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
    backoff_base: Duration = 1.0
    backoff_cap: Duration = 300.0
    min_login_interval: Duration = 1.0  # logins at least this far apart, more while tokens die young

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

    def check(self, names: set[str]) -> list[str]:
        """Problems with the local device names the maps and commands use, as key paths."""
        def missing(name: str) -> str:
            return f"no device or actuator named {name!r} in this config"

        problems = [f"devices.{d}: {missing(d)}" for d in self.devices if d not in names]
        if self.gps is not None and self.gps.device not in names:
            problems.append(f"gps.device: {missing(self.gps.device)}")
        for i, c in enumerate(self.commands):
            for key in ("device", "channel"):
                value = getattr(c, key)
                if value and value not in names:
                    problems.append(f"commands[{i}].{key}: {missing(value)}")
        return problems

