"""Uplinks by config `type`, as "module:Class", imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

UPLINKS: dict[str, str] = {
    "jsonl": "gatewayd.uplinks.jsonl:JsonlUplink",
    "mqtt": "gatewayd.uplinks.mqtt:MqttUplink",
    "enos": "gatewayd.uplinks.enos:EnosUplink",
    "mms": "gatewayd.uplinks.mms:MmsUplink",
    "opshub": "gatewayd.uplinks.opshub:OpsHubUplink",
}


def load_uplink(type_name: str) -> type[Any]:
    """Import and return the uplink class for `type_name`. Raises KeyError or ImportError."""
    module_name, _, attr = UPLINKS[type_name].partition(":")
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
