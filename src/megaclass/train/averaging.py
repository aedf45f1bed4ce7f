"""Weight averaging for evaluation: an exponential moving average (EMA) of the encoder's and head's weights.

``megaclass train ... --set train.ema_decay=0.999`` keeps, beside the trained weights, their average
``avg <- decay_t * avg + (1 - decay_t) * weight`` after every optimizer step, with the warm-up
``decay_t = min(decay, (1 + t) / (10 + t))`` so that early averages do not remember the random init. The
average is what is evaluated and saved as the run's final model; it lives in every checkpoint, so a resumed
run averages exactly as an uninterrupted one. Connections a sparse head rewires restart their average from
the new weight (zero), as their optimizer state does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """EMA of the floating-point parameters of named modules.

    Args:
        modules: ``{"encoder": encoder, "head": head}``; the state's names are prefixed by the keys.
        decay: the long-run decay in ``(0, 1)``.

    >>> model = nn.Linear(2, 2)
    >>> average = WeightAverage({"model": model}, decay=0.9)
    >>> average.update(step=1)
    >>> with average.swapped():
    ...     pass
    """

    def __init__(self, modules: dict[str, nn.Module], *, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a value in (0, 1), got {decay}")
        self.decay = decay
        self.params: dict[str, nn.Parameter] = {
            f"{prefix}.{name}": param
            for prefix, module in modules.items()
            for name, param in module.named_parameters()
            if param.is_floating_point()
        }
        self.average: dict[str, Tensor] = {
            name: param.detach().clone() for name, param in self.params.items()
        }

    @torch.no_grad()
    def update(self, *, step: int) -> None:
        """Fold the current weights in after optimizer step ``step`` (1-based)."""
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        names = list(self.params)
        torch._foreach_lerp_(
            [self.average[name] for name in names], [self.params[name].detach() for name in names], 1 - decay
        )

    @torch.no_grad()
    def restart(self, name: str, mask: Tensor) -> None:
        """Set the average of parameter ``name`` to its current value where ``mask`` (rewired connections)."""
        average, param = self.average[name], self.params[name]
        average.copy_(torch.where(mask, param.detach(), average))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the modules hold the averaged weights; on exit, the trained weights again."""
        with torch.no_grad():
            for name, param in self.params.items():
                self.average[name], param.data = param.data, self.average[name]
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    self.average[name], param.data = param.data, self.average[name]

    def state_dict(self) -> dict[str, Tensor]:
        """The averages, by prefixed parameter name."""
        return dict(self.average)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore averages saved by :meth:`state_dict`; names and shapes must match."""
        if set(state) != set(self.average):
            missing, unexpected = set(self.average) - set(state), set(state) - set(self.average)
            raise ValueError(
                f"weight average: the checkpoint's parameters differ (missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)})"
            )
        for name, value in state.items():
            self.average[name].copy_(value)
