"""Weight averaging for evaluation: an exponential moving average (EMA) of the encoder's and head's weights.

``megaclass train ... --set train.ema_decay=0.999`` keeps, beside the trained weights, their average
``avg <- decay_t * avg + (1 - decay_t) * weight`` after every optimizer step, with the warm-up
``decay_t = min(decay, (1 + t) / (10 + t))`` (:func:`~megaclass.ops.row_average.ema_decay_at`) so that early
averages do not remember the random init. The average is what is evaluated and saved as the run's final
model; it lives in every checkpoint, so a resumed run averages exactly as an uninterrupted one. Connections a
sparse head rewires restart their average from the new weight (zero), as their optimizer state does. The rows
of a sampled head's store, a few updated a step, are averaged by the store, each row brought up to date when
it changes (:class:`~megaclass.store.average.RowAverage`): the same numbers, without a pass over every row a
step.

Each process averages the values it holds: a class-sharded head's rows of its range, an FSDP2 encoder's
shards (their values are swapped in place, where FSDP2 gathers them from).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from megaclass.ops.row_average import ema_decay_at
from megaclass.store.average import RowAverage

__all__ = ["WeightAverage"]


class WeightAverage:
    """EMA of the floating-point parameters of named modules.

    Args:
        modules: ``{"encoder": encoder, "head": head}``; the state's names are prefixed by the keys.
        decay: the long-run decay in ``(0, 1)``.
        rows: weights outside the parameters that keep their own average, by prefixed state-dict name
            (``{"head.store.weight": ...}``: :meth:`~megaclass.heads.Head.average_rows`, the same ``decay``).

    >>> model = nn.Linear(2, 2)
    >>> average = WeightAverage({"model": model}, decay=0.9)
    >>> average.update(step=1)
    >>> with average.swapped():
    ...     pass
    """

    def __init__(
        self, modules: dict[str, nn.Module], *, decay: float, rows: Mapping[str, RowAverage] | None = None
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a value in (0, 1), got {decay}")
        self.decay = decay
        self.rows = dict(rows or {})
        self.step = 0  # the last optimizer step folded in
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
        """Fold the current weights in after optimizer step ``step`` (1-based); :attr:`rows` fold their own
        as they change."""
        decay = ema_decay_at(self.decay, step)
        names = list(self.params)
        if names:
            torch._foreach_lerp_(
                [self.average[name] for name in names],
                [_values(self.params[name]) for name in names],
                1 - decay,
            )
        self.step = step

    @torch.no_grad()
    def restart(self, name: str, mask: Tensor) -> None:
        """Set the average of parameter ``name`` to its current value where ``mask`` (rewired connections)."""
        average, values = self.average[name], _values(self.params[name])
        average.copy_(torch.where(mask, values, average))

    @contextlib.contextmanager
    def swapped(self, part: str | None = None) -> Iterator[None]:
        """Inside: the modules (``part``: that module's key alone) hold the averaged weights, and what they
        hold on exit is the average; on exit, the trained weights again."""
        names, rows = self._names(part), self._row_names(part)
        self._swap(names)
        for name in rows:
            self.rows[name].swap_(step=self.step)
        try:
            yield
        finally:
            self._swap(names)
            for name in rows:
                self.rows[name].swap_(step=self.step)

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

    def _row_names(self, part: str | None) -> list[str]:
        return [name for name in self.rows if part is None or name.startswith(f"{part}.")]

    def state_dict(self, part: str | None = None) -> dict[str, Tensor]:
        """The averages, by prefixed parameter (or :attr:`rows`) name; ``part``: that module's alone, by its
        own names. A distributed parameter's is this process's shard; rows are brought up to date first and
        given as they are held (not copies)."""
        state = {name: self.average[name] for name in self._names(part)}
        state.update({name: self.rows[name].exact(step=self.step) for name in self._row_names(part)})
        if part is None:
            return state
        return {name[len(part) + 1 :]: value for name, value in state.items()}

    def load_state_dict(
        self, state: Mapping[str, Tensor], part: str | None = None, *, step: int | None = None
    ) -> None:
        """Restore averages saved by :meth:`state_dict` (with the same ``part``) after optimizer step
        ``step`` (None: :attr:`step`); names and shapes must match. Rows whose average was not saved (a
        checkpoint from before they were averaged) start it from their values now."""
        step = self.step if step is None else step
        prefix = "" if part is None else f"{part}."
        names, rows = self._names(part), self._row_names(part)
        given = {f"{prefix}{name}" for name in state}
        missing, unexpected = set(names) - given, given - set(names) - set(rows)
        if missing or unexpected:
            raise ValueError(
                f"weight average: the checkpoint's parameters differ (missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)})"
            )
        for name, value in state.items():
            if f"{prefix}{name}" in self.average:
                self.average[f"{prefix}{name}"].copy_(value)
        for name in rows:
            average = self.rows[name]
            saved = state.get(name[len(prefix) :])
            if saved is None:
                average.restart_(step=step)
            else:
                average.load_(saved, step=step)
        self.step = step


def _is_distributed(param: Tensor) -> bool:
    """Whether ``param`` is a DTensor (an FSDP2 shard)."""
    return hasattr(param, "to_local")


def _values(param: Tensor) -> Tensor:
    """The tensor holding ``param``'s values in this process: a DTensor's local shard, else ``param``."""
    return param.to_local().detach() if _is_distributed(param) else param.detach()
