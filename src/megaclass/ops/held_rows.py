"""How rows and their row-shaped optimizer state are held (float32, or bfloat16 with stochastic rounding), and
the write-back of a step's updated rows in that form: one rule for every store and parameter-server shard."""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
from torch import Tensor

from megaclass.ops.row_optimizers import put_rows_
from megaclass.ops.stochastic_rounding import rounding_seed, stochastic_round

__all__ = ["RowDtype", "put_held_", "put_held_rows_"]


class RowDtype(str, enum.Enum):
    """How a store or a shard holds its rows and their row-shaped optimizer state."""

    FLOAT32 = "float32"
    BF16_SR = "bf16_sr"  # bfloat16, updated in fp32 and written back with stochastic rounding: half the bytes

    @property
    def held(self) -> torch.dtype:
        """The tensors' dtype."""
        return torch.bfloat16 if self is RowDtype.BF16_SR else torch.float32


def put_held_rows_(written: Sequence[tuple[Tensor, Tensor]], ids: Tensor, *, seed: int) -> None:
    """Write each ``(target, values)`` pair's updated float32 ``values (S, ...)`` into rows ``ids (S,)`` of
    ``target``: into a bfloat16 target stochastically rounded, pair ``i``'s noise seeded by
    ``rounding_seed(seed, i)`` (so a resumed run repeats the same bits); into another as they are."""
    for stream, (target, values) in enumerate(written):
        if target.dtype == torch.bfloat16:
            values = stochastic_round(values, seed=rounding_seed(seed, stream))
        put_rows_(target, ids, values)


def put_held_(written: Sequence[tuple[Tensor, Tensor]], *, seed: int) -> None:
    """Write each ``(target, values)`` pair's updated float32 ``values`` into the whole of ``target`` (same
    shape), as :func:`put_held_rows_` writes rows: into a bfloat16 target stochastically rounded with pair
    ``i``'s noise seeded by ``rounding_seed(seed, i)`` (the same bits); another copied, unless ``values`` is
    ``target`` itself (updated in place)."""
    for stream, (target, values) in enumerate(written):
        if target.dtype == torch.bfloat16:
            stochastic_round(values, seed=rounding_seed(seed, stream), out=target)
        elif values is not target:
            target.copy_(values)
