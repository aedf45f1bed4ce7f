"""Fixed fan-in sparse layer: every label reads exactly ``K`` inputs (SPARTEX), optionally shared by groups
of ``G`` labels (HASTE), with fused losses and chunked top-k.

Five layers: Triton kernels and launchers (``kernels.py``, loaded only when a CUDA tensor runs them), chunked
PyTorch launchers (``chunked.py``: sparse matrix products on the CPU), both with the cached column order of
the index that their input gradient needs (``columns.py``), the autograd Function and functionals
(``function.py``), fused losses and top-k (``losses.py``) and the plain reference (``reference.py``).
"""

from megaclass.ops.fixed_fanin.function import (
    FaninLoss,
    FixedFaninFunction,
    FixedFaninOptions,
    fixed_fanin,
    fixed_fanin_rows,
    fixed_fanin_rows_positive,
)
from megaclass.ops.fixed_fanin.losses import combine_loss, fixed_fanin_loss, fixed_fanin_topk, positive_logits
from megaclass.ops.fixed_fanin.reference import (
    reference_fixed_fanin,
    reference_fixed_fanin_loss,
    reference_row_values,
)

__all__ = [
    "FaninLoss",
    "FixedFaninFunction",
    "FixedFaninOptions",
    "combine_loss",
    "fixed_fanin",
    "fixed_fanin_loss",
    "fixed_fanin_rows",
    "fixed_fanin_rows_positive",
    "fixed_fanin_topk",
    "positive_logits",
    "reference_fixed_fanin",
    "reference_fixed_fanin_loss",
    "reference_row_values",
]
