"""The `sim` driver: deterministic waveforms per point, for benches and tests."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

from drivers.base import Buses, Driver, DriverError, Duration, Reading, now_ms


@dataclass(frozen=True, slots=True)
class WavePoint:
    shape: Literal["sine", "ramp", "walk", "const"] = "sine"
    min: float = 0.0
    max: float = 100.0
    period: Duration = 60.0  # sine and ramp: seconds per cycle
    step: float = 1.0  # walk: largest change per read
    seed: int = 0  # walk: random seed, so runs repeat
    value: float = 0.0  # const
    fail_every: int = 0  # test aid: every Nth read raises DriverError (0: never)

    def __post_init__(self) -> None:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        if self.period <= 0:
            raise ValueError("period must be positive")


@dataclass(frozen=True, slots=True)
class WaveConfig:
    points: dict[str, WavePoint] = field(default_factory=lambda: {"value": WavePoint()})
    count: int = 0  # test aid: readings per point per read beyond 1 (burst), for load benches


class WaveDriver(Driver):
    """Each read produces one value per point from its waveform at the current time."""

    Config = WaveConfig

    def __init__(self, name: str, config: WaveConfig, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self._walk = {p: (random.Random(c.seed), (c.min + c.max) / 2) for p, c in config.points.items()}
        self._reads = 0

    def value_at(self, point: str, t_s: float) -> float:
        """The waveform's value for `point` at time `t_s` (seconds)."""
        c = self.config.points[point]
        span = c.max - c.min
        if c.shape == "sine":
            return c.min + span * (0.5 + 0.5 * math.sin(2 * math.pi * t_s / c.period))
        if c.shape == "ramp":
            return c.min + span * ((t_s % c.period) / c.period)
        if c.shape == "const":
            return c.value
        rng, last = self._walk[point]
        nxt = min(c.max, max(c.min, last + rng.uniform(-c.step, c.step)))
        self._walk[point] = (rng, nxt)
        return nxt

    async def read(self) -> list[Reading]:
        self._reads += 1
        ts = now_ms()
        out: list[Reading] = []
        for point, c in self.config.points.items():
            if c.fail_every and self._reads % c.fail_every == 0:
                raise DriverError(self.name, f"simulated fault on read {self._reads}")
            for i in range(self.config.count + 1):
                out.append(Reading(self.name, point, round(self.value_at(point, ts / 1000), 6), ts + i))
        return out
