"""Serial command actuator: sends a configured template per action, optionally checks the
instrument's answer against a regex, and times out.

Templates use named fields only (`RELAY {channel} {state}\r`); booleans render as `true_text`
and `false_text`. Attribute or index access in templates is refused at config time.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import ActionError, Actuator, Buses, DriverError, Duration
from drivers.serialport import SerialLinkConfig, SerialPort


@dataclass(frozen=True, slots=True, kw_only=True)
class SerialCommandConfig(SerialLinkConfig):
    commands: dict[str, str]  # action -> template, e.g. {set = "RELAY {channel} {state}\r"}
    response: str = ""  # regex a good answer matches; empty: do not wait for an answer
    error: str = ""  # regex of an error answer (checked before `response`)
    response_timeout: Duration = 1.0
    terminator: str = "\n"
    encoding: str = "ascii"
    true_text: str = "ON"
    false_text: str = "OFF"

    def __post_init__(self) -> None:
        SerialLinkConfig.__post_init__(self)
        if not self.commands:
            raise ValueError("commands: configure at least one action template")
        for action, template in self.commands.items():
            template_fields(template, action)
        for key in ("response", "error"):
            try:
                re.compile(getattr(self, key))
            except re.error as exc:
                raise ValueError(f"{key} is not a valid regular expression: {exc}") from exc


def template_fields(template: str, action: str) -> list[str]:
    """The field names of a template; ValueError for anything but plain {name} fields."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"commands.{action}: bad template: {exc}") from exc
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or conv:
            raise ValueError(f"commands.{action}: field {{{name}}} must be a plain name")
        if spec and "{" in spec:
            raise ValueError(f"commands.{action}: nested fields are not allowed")
        names.append(name)
    return names


class SerialCommand(Actuator):
    """One command per action; the serial port lock is held until the answer arrives."""

    Config = SerialCommandConfig

    def __init__(self, name: str, config: SerialCommandConfig, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self._fields = {a: template_fields(t, a) for a, t in config.commands.items()}
        self._response = re.compile(config.response) if config.response else None
        self._error = re.compile(config.error) if config.error else None
        self.last: dict[str, Any] = {}

    def _port(self) -> SerialPort:
        return self.config.shared_port(self.buses)

    @classmethod
    def known_actions(cls, config: Any) -> frozenset[str]:
        return frozenset(config.commands)

    def render(self, action: str, params: Mapping[str, Any]) -> bytes:
        """The bytes to send for `action`; ActionError for an unknown action or missing param."""
        c = self.config
        if action not in c.commands:
            raise ActionError(self.name, f"unknown action {action!r} (known: {', '.join(c.commands)})")
        values = {}
        for name in self._fields[action]:
            if name not in params:
                raise ActionError(self.name, f"missing param {name!r} for {action}")
            v = params[name]
            values[name] = (c.true_text if v else c.false_text) if isinstance(v, bool) else v
        try:
            return c.commands[action].format(**values).encode(c.encoding)
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise ActionError(self.name, f"cannot render {action}: {exc}") from exc

    async def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        data = self.render(action, params)
        c = self.config
        port = self._port()
        async with port.lock:
            port.discard_input()
            await port.write(data, self.name)
            result: dict[str, Any] = {"sent": data.decode(c.encoding, "replace").strip()}
            if self._response is None:
                self.last = {"action": action, **result}
                return result
            try:
                raw = await port.read_until(c.terminator.encode(c.encoding), c.response_timeout,
                                            self.name)
            except DriverError as exc:
                raise ActionError(self.name, f"no answer to {result['sent']!r}: {exc.message}") from exc
        answer = raw.decode(c.encoding, "replace").strip()
        if self._error is not None and self._error.search(answer):
            raise ActionError(self.name, f"instrument refused {result['sent']!r}: {answer!r}")
        m = self._response.search(answer)
        if m is None:
            raise ActionError(self.name, f"unexpected answer to {result['sent']!r}: {answer!r}")
        result["response"] = answer
        result.update({k: v for k, v in m.groupdict().items() if v is not None})
        self.last = {"action": action, **result}
        return result

    def state(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

