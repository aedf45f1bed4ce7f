"""When and how much a fixed fan-in layer rewires: a pure function of the step, so a resumed run rewires
exactly as an uninterrupted one."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from megaclass.schema import ConfigError

__all__ = ["DSTConfig", "RewireMode", "rewire_fraction"]


class RewireMode(str, enum.Enum):
    """``interval``: a constant ``fraction`` every ``interval`` steps; ``fraction``: the fraction
    cosine-annealed to zero at the stop point; ``threshold``: prune only magnitudes below ``threshold``,
    at most the annealed fraction."""

    INTERVAL = "interval"
    FRACTION = "fraction"
    THRESHOLD = "threshold"


@dataclass(frozen=True)
class DSTConfig:
    """Dynamic sparse training of a fixed fan-in layer."""

    enabled: bool = True  # false: the random initial topology stays fixed
    mode: RewireMode = RewireMode.FRACTION
    interval: int = 1000  # steps between rewirings
    fraction: float = 0.3  # share of a row's K connections rewired at the first rewiring
    threshold: float = 1e-3  # threshold mode: connection magnitude below which a connection may be pruned
    # share of training after which the topology is frozen, as SPARTEX froze it at 2/3: connections grown late
    # start at zero under a decayed lr and rarely earn their place (+0.2 to +0.3 P@1 on two sets, RESULTS.md)
    stop: float = 0.67
    stop_step: int = 0  # absolute stop step; 0: `stop` times the total steps the trainer binds (else never)
    reset_optimizer_state: bool = True  # false reproduces SPARTEX: a new connection inherits the old state
    seed: int = 0  # seeds the initial topology and the regrowth draws

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", RewireMode(self.mode))  # accept the mode's name as a string
        except ValueError:
            raise ConfigError(
                f"dst.mode: {self.mode!r} is not one of {[m.value for m in RewireMode]}"
            ) from None
        if self.interval < 1:
            raise ConfigError(f"dst.interval: expected >= 1 step, got {self.interval}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"dst.fraction: expected in [0, 1], got {self.fraction}")
        if not 0.0 < self.stop <= 1.0:
            raise ConfigError(f"dst.stop: expected in (0, 1], got {self.stop}")
        if self.stop_step < 0 or self.threshold < 0:
            raise ConfigError(
                f"dst.stop_step and dst.threshold: expected >= 0, got {self.stop_step}, {self.threshold}"
            )


def stop_step(config: DSTConfig, total_steps: int | None) -> float:
    """The step from which no rewiring happens (infinite when neither ``stop_step`` nor a total is known)."""
    if config.stop_step:
        return float(config.stop_step)
    return config.stop * total_steps if total_steps else math.inf


def rewire_fraction(config: DSTConfig, step: int, total_steps: int | None) -> float:
    """Share of each row's connections to rewire after ``step`` (1-based steps done); 0 if not due."""
    end = stop_step(config, total_steps)
    if not config.enabled or step <= 0 or step % config.interval or step >= end:
        return 0.0
    if config.mode is RewireMode.INTERVAL or math.isinf(end):
        return config.fraction
    return config.fraction * 0.5 * (1.0 + math.cos(math.pi * step / end))
