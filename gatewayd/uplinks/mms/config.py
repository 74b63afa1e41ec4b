"""MMS uplink configuration: `[uplinks.<name>] type = "mms"` and its message maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal
from urllib.parse import urlsplit

from drivers.base import Duration, Range, Reading
from gatewayd.schema import Secret

API_PATH = "/com.sap.iotservices.mms/v1/api/"
SOURCES = ("device", "point", "sensor", "value", "quality")


@dataclass(frozen=True, slots=True)
class MessageMap:
    """Which readings go to one fromDevice message type, and how their fields are filled.

    Two layouts:
    - one message per reading (default): `fields` maps MMS field -> reading attribute, one of
      device, point, sensor ("device.point"), value, quality;
    - wide (`point_fields` set): local point -> MMS field; readings of one device sampled at the
      same time share one message; `fields` may add e.g. `{ device = "device" }`.
    """

    message_type: str
    devices: list[str] = field(default_factory=list)  # local devices; empty: any
    points: list[str] = field(default_factory=list)  # local points; empty: any
    fields: dict[str, str] | None = None
    point_fields: dict[str, str] = field(default_factory=dict)
    timestamp_field: str = "timestamp"  # "" to send no timestamp
    timestamp_format: Literal["s", "ms", "iso"] = "s"

    def __post_init__(self) -> None:
        if not self.message_type:
            raise ValueError("message_type must not be empty")
        for name, source in self.field_sources().items():
            if source not in SOURCES:
                raise ValueError(f"fields.{name}: expected one of {', '.join(SOURCES)}, got {source!r}")

    def field_sources(self) -> dict[str, str]:
        if self.fields is not None:
            return self.fields
        return {} if self.point_fields else {"sensor": "sensor", "value": "value"}

    def matches(self, reading: Reading) -> bool:
        if self.devices and reading.device not in self.devices:
            return False
        if self.point_fields and reading.point not in self.point_fields:
            return False
        return not self.points or reading.point in self.points


def _default_maps() -> list[MessageMap]:
    return [MessageMap("m0t0y0p0e1")]


@dataclass(frozen=True, slots=True)
class MmsConfig:
    """`[uplinks.<name>] type = "mms"` keys."""

    device_id: str
    token: Secret
    host: str = ""  # "iotmms<account>.<landscape>", or a full "https://..." base URL
    account: str = ""  # with `landscape`, instead of `host`
    landscape: str = "hana.ondemand.com"
    transport: Literal["ws", "http"] = "ws"
    mode: Literal["sync", "async"] = "sync"
    messages: list[MessageMap] = field(default_factory=_default_maps)
    command_types: list[str] = field(default_factory=lambda: ["m0t0y0p0e3"])
    action_field: str = "opcode"
    device_field: str = ""  # command field naming the local device, if the type has one
    command_device: str = ""  # local device for commands without `device_field`
    id_field: str = "cmd_id"
    result_message_type: str = ""  # fromDevice type for results; "" logs them only
    result_timestamp_format: Literal["s", "ms", "iso"] = "s"
    poll_interval: Annotated[Duration, Range(0.05, 3600)] = 5.0  # http transport
    ws_poll_interval: Duration = 60.0  # ws transport: GET for method-"http" pushes; 0: only
    # once after each (re)connect
    batch_size: Annotated[int, Range(1, 100_000)] = 1000
    request_timeout: Annotated[Duration, Range(0.05, 600)] = 10.0
    ping_interval: Annotated[Duration, Range(0.1, 3600)] = 30.0  # no pong in half of it: reconnect
    treat_sync_202_as_delivered: bool = False
    check_ack_url: bool = True
    sync_202_max_wait: Duration = 60.0
    max_rate: Annotated[float, Range(0, None)] = 0.0  # readings/s sent at most; 0: no limit
    ws_async_answers: bool = True  # the server answers async frames; false: confirm on write
    backoff_base: Duration = 1.0
    backoff_cap: Duration = 60.0
    verify_tls: bool = True
    ca_file: str = ""

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        if not self.host and not self.account:
            raise ValueError("set host (iotmms<account>.<landscape> or a URL), or account and landscape")
        if self.host and self.account:
            raise ValueError("give either host or account/landscape, not both")
        if not self.messages:
            raise ValueError("messages: at least one message type mapping is needed")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError("backoff_base must be > 0 and backoff_cap >= backoff_base")
        parts = urlsplit(self.api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"host: not a usable URL: {self.host!r}")

    def check(self, names: set[str]) -> list[str]:
        """Problems with the local device names the maps and commands use, as key paths."""
        problems = [
            f"messages[{i}].devices[{j}]: no device or actuator named {name!r} in this config"
            for i, m in enumerate(self.messages)
            for j, name in enumerate(m.devices)
            if name not in names
        ]
        if self.command_device and self.command_device not in names:
            problems.append(
                f"command_device: no device or actuator named {self.command_device!r} in this config"
            )
        return problems

    @property
    def api_url(self) -> str:
        """The API base, ending in `/com.sap.iotservices.mms/v1/api/`."""
        if self.host:
            base = self.host if "://" in self.host else f"https://{self.host}"
        else:
            base = f"https://iotmms{self.account}.{self.landscape}"
        base = base.rstrip("/")
        if not base.endswith(API_PATH.rstrip("/")):
            base += API_PATH.rstrip("/")
        return base + "/"

    @property
    def ws_url(self) -> str:
        api = self.api_url
        scheme = "wss" if api.startswith("https:") else "ws"
        return f"{scheme}:{api.split(':', 1)[1]}ws/data/{self.device_id}"
