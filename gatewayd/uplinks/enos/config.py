"""Config of the EnOS uplink (`[uplinks.<name>] type = "enos"`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from drivers.base import ByteSize, Duration, Range
from gatewayd.schema import Secret
from gatewayd.uplinks.enos.protocol import MAX_PAYLOAD_BYTES

_MIN_MESSAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class DeviceMapping:
    """How one local device appears in EnOS.

    Either a sub-device (`product_key`, `device_key` and `device_secret`, or
    `device_secret_file`/`_env`), or `gateway = true`: its points are the gateway's own.
    """

    product_key: str = ""
    device_key: str = ""
    device_secret: Secret | None = None
    gateway: bool = False
    points: dict[str, str] = field(default_factory=dict)  # local point -> EnOS measure point
    quality_points: list[str] = field(default_factory=list)  # sent as {"value", "quality"}

    def __post_init__(self) -> None:
        if self.gateway:
            if self.product_key or self.device_key or self.device_secret is not None:
                raise ValueError("a gateway = true device takes no product_key, device_key "
                                 "or device_secret")
            return
        if not self.product_key or not self.device_key:
            raise ValueError("set product_key and device_key (or gateway = true)")
        if self.device_secret is None:
            raise ValueError("set device_secret_file or device_secret_env for the sub-device")


@dataclass(frozen=True, slots=True)
class EnosConfig:
    host: str
    product_key: str
    device_key: str
    port: Annotated[int, Range(1, 65535)] = 11883
    device_secret: Secret | None = None  # static authentication (secure mode 2)
    product_secret: Secret | None = None  # dynamic activation (secure mode 3) if no device secret
    sign_method: Literal["sha256", "sha1", "md5"] = "sha256"
    # TLS (EnOS: port 18883, two-way): CA file, and an optional client certificate and key.
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_check_hostname: bool = True
    keepalive: Annotated[int, Range(60, 300)] = 60  # seconds; the hub allows 60..300
    connect_timeout: Duration = 15.0
    request_timeout: Duration = 15.0  # wait for a `_reply` before resending
    max_message_bytes: ByteSize = 256 * 1024  # packed message size; never above 512 KiB
    batch_max_points: Annotated[int, Range(1, 200_000)] = 20_000  # readings leased at once
    max_inflight: Annotated[int, Range(1, 64)] = 8  # messages awaiting their reply
    login_batch_size: Annotated[int, Range(1, 200)] = 50  # sub-devices per combine.login.batch
    prune_topology: bool = False  # topo.delete sub-devices the config no longer lists
    post_device_faults: bool = False  # thing.event.{fault_event}.post when a device fails
    fault_event: str = "deviceFault"
    backoff_base: Duration = 2.0
    backoff_cap: Duration = 300.0  # the hub blocks a device for 5 min after 4 tries in 2 min
    login_retry: Duration = 30.0  # first retry of a failed sub-device login (then doubles)
    devices: dict[str, DeviceMapping] = field(default_factory=dict)  # local device -> EnOS
    # Readings of devices not under `devices`: "skip" (not for EnOS; counted in /status),
    # "quarantine" (counted as dropped), or "gateway" (the gateway's own point device_point).
    unmapped: Literal["skip", "quarantine", "gateway"] = "skip"

    def __post_init__(self) -> None:
        if self.device_secret is None and self.product_secret is None:
            raise ValueError("set device_secret_file/_env (static) or product_secret_file/_env "
                             "(dynamic activation)")
        if not _MIN_MESSAGE_BYTES <= self.max_message_bytes <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"max_message_bytes must be from {_MIN_MESSAGE_BYTES} to "
                             f"{MAX_PAYLOAD_BYTES} (the hub discards larger messages)")
        if (self.cert_file == "") != (self.key_file == ""):
            raise ValueError("cert_file and key_file go together")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ValueError("ca_file/cert_file need tls = true")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError("backoff_base must be > 0 and <= backoff_cap")
        keys = [(m.product_key, m.device_key) for m in self.devices.values() if not m.gateway]
        if len(keys) != len(set(keys)):
            raise ValueError("two local devices map to the same EnOS sub-device")

    def check_devices(self, names: set[str]) -> list[str]:
        """Problems with the device map against the config's local device names."""
        return [f"devices.{local}: no device or actuator named {local!r} in this config"
                for local in self.devices if local not in names]
