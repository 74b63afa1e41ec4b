"""The daemon's exception taxonomy: one root, few leaves, facts as attributes."""

from __future__ import annotations

from drivers.base import DriverError

__all__ = [
    "CommandError",
    "ConfigError",
    "DriverError",
    "GatewayError",
    "QueueSchemaError",
    "UplinkAuthError",
    "UplinkError",
    "UplinkRejectedError",
    "UplinkUnavailableError",
    "UplinkUnreachableError",
]


class GatewayError(Exception):
    """Root of the daemon's own errors."""


class QueueSchemaError(GatewayError):
    """The queue database was written by a newer gatewayd: refuse to start (exit 73), never
    rename it aside or touch it."""

    def __init__(self, path: str, found: int, known: int) -> None:
        super().__init__(f"{path}: queue schema version {found} is newer than this gatewayd "
                         f"knows ({known}); install the newer gatewayd again, or move the file "
                         "away to start an empty queue")
        self.path, self.found, self.known = path, found, known


class ConfigError(GatewayError):
    """The config is invalid. Carries every problem found, each naming file and key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UplinkError(GatewayError):
    """An uplink failed to deliver or to talk to its cloud."""


class UplinkUnavailableError(UplinkError):
    """Transient: the cloud is unreachable, timed out or answered 5xx. Retry with backoff."""


class UplinkUnreachableError(UplinkUnavailableError):
    """Transient, and the cloud never saw the attempt (TCP refused, DNS, no route): connection
    throttles do not count it."""


class UplinkRejectedError(UplinkError):
    """The cloud refused something (4xx, an error code). Permanent for what was sent."""


class UplinkAuthError(UplinkRejectedError):
    """The cloud refused our credentials. Wait the full backoff cap before retrying."""


class CommandError(GatewayError):
    """A command could not be mapped or its parameters are wrong."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
