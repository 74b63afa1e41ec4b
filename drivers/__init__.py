"""Hardware drivers. Registries map a config name to "module:Class", imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

DRIVERS: dict[str, str] = {
    "sim": "drivers.wave:WaveDriver",
}

ACTUATORS: dict[str, str] = {
    "log": "drivers.logact:LogActuator",
}


def load(registry: dict[str, str], name: str) -> type[Any]:
    """Import and return the class registered under `name`. Raises KeyError if unknown."""
    module_name, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
