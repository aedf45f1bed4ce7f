"""Weight averaging for evaluation: an exponential moving average (EMA) of the encoder's and head's weights.

``megaclass train ... --set train.ema_decay=0.999`` keeps, beside the trained weights, their average
``avg <- decay_t * avg + (1 - decay_t) * weight`` after every optimizer step, with the warm-up
``decay_t = min(decay, (1 + t) / (10 + t))`` so that early averages do not remember the random init. The
average is what is evaluated and saved as the run's final model; it lives in every checkpoint, so a resumed
run averages exactly as an uninterrupted one. Connections a sparse head rewires restart their average from
the new weight (zero), as their optimizer state does.

Each process averages the values it holds: a class-sharded head's rows of its range, an FSDP2 encoder's
shards (their values are swapped in place, where FSDP2 gathers them from).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

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
            name: _values(param).detach().clone() for name, param in self.params.items()
        }

    @torch.no_grad()
    def update(self, *, step: int) -> None:
        """Fold the current weights in after optimizer step ``step`` (1-based)."""
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        names = list(self.params)
        torch._foreach_lerp_(
            [self.average[name] for name in names], [_values(self.params[name]) for name in names], 1 - decay
        )

    @torch.no_grad()
    def restart(self, name: str, mask: Tensor) -> None:
        """Set the average of parameter ``name`` to its current value where ``mask`` (rewired connections)."""
        average, values = self.average[name], _values(self.params[name])
        average.copy_(torch.where(mask, values, average))

    @contextlib.contextmanager
    def swapped(self, part: str | None = None) -> Iterator[None]:
        """Inside: the modules (``part``: that module's key alone) hold the averaged weights, and what they
        hold on exit is the average; on exit, the trained weights again."""
        names = self._names(part)
        self._swap(names)
        try:
            yield
        finally:
            self._swap(names)

    @torch.no_grad()
    def _swap(self, names: list[str]) -> None:
        for name in names:
            param = self.params[name]
            if _is_distributed(param):  # FSDP2 gathers from its own storage: the values are copied in
                values = _values(param)
                held = values.clone()
                values.copy_(self.average[name])
                self.average[name] = held
            else:
                self.average[name], param.data = param.data, self.average[name]

    def _names(self, part: str | None) -> list[str]:
        return [name for name in self.params if part is None or name.startswith(f"{part}.")]

    def state_dict(self, part: str | None = None) -> dict[str, Tensor]:
        """The averages, by prefixed parameter name; ``part``: that module's alone, by its own parameter
        names. A distributed parameter's is this process's shard."""
        if part is None:
            return dict(self.average)
        return {name[len(part) + 1 :]: self.average[name] for name in self._names(part)}

    def load_state_dict(self, state: Mapping[str, Tensor], part: str | None = None) -> None:
        """Restore averages saved by :meth:`state_dict` (with the same ``part``); names and shapes must
        match."""
        prefix = "" if part is None else f"{part}."
        names = self._names(part)
        given = {f"{prefix}{name}" for name in state}
        if given != set(names):
            missing, unexpected = set(names) - given, given - set(names)
            raise ValueError(
                f"weight average: the checkpoint's parameters differ (missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)})"
            )
        for name, value in state.items():
            self.average[f"{prefix}{name}"].copy_(value)


def _is_distributed(param: Tensor) -> bool:
    """Whether ``param`` is a DTensor (an FSDP2 shard)."""
    return hasattr(param, "to_local")


def _values(param: Tensor) -> Tensor:
    """The tensor holding ``param``'s values in this process: a DTensor's local shard, else ``param``."""
    return param.to_local().detach() if _is_distributed(param) else param.detach()
