"""GE Operations Hub uplink (M2M REST): config, codec, transport (the REST session), uplink."""

from gatewayd.uplinks.opshub.codec import (
    Metric,
    PolledCommand,
    TimeFormat,
    build_messages,
    command_key,
    format_value,
    loads_lenient,
    parse_subscribe,
    primary_mac,
    publish_verdicts,
)
from gatewayd.uplinks.opshub.config import CommandPattern, DeviceMap, GpsMap, OpsHubConfig, PointMap
from gatewayd.uplinks.opshub.uplink import OpsHubUplink

__all__ = [
    "CommandPattern",
    "DeviceMap",
    "GpsMap",
    "Metric",
    "OpsHubConfig",
    "OpsHubUplink",
    "PointMap",
    "PolledCommand",
    "TimeFormat",
    "build_messages",
    "command_key",
    "format_value",
    "loads_lenient",
    "parse_subscribe",
    "primary_mac",
    "publish_verdicts",
]
