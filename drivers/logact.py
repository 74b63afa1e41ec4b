"""The `log` actuator: records every action it receives. For benches, tests and dry runs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import ActionError, Actuator, Buses, Duration


@dataclass(frozen=True, slots=True)
class LogActuatorConfig:
    delay: Duration = 0.0  # test aid: how long each action takes
    fail_action: str = ""  # test aid: this action raises ActionError
    history: int = 100  # actions kept for /status


class LogActuator(Actuator):
    """Accepts any action, keeps the last few, and answers with what it did."""

    Config = LogActuatorConfig

    def __init__(self, name: str, config: LogActuatorConfig, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self.actions: list[tuple[str, dict[str, Any]]] = []

    async def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if self.config.delay:
            await asyncio.sleep(self.config.delay)
        if action == self.config.fail_action:
            raise ActionError(self.name, f"action {action!r} failed (configured to fail)")
        self.actions.append((action, dict(params)))
        del self.actions[: -self.config.history]
        return {"applied": action, "count": len(self.actions)}

    def state(self) -> dict[str, Any]:
        return {"last": [{"action": a, "params": p} for a, p in self.actions[-5:]]}
