"""MLP encoder over sparse TF-IDF rows: an embedding-bag first layer, then dense hidden layers.

The first layer never materialises a dense ``(B, F)`` input: it sums the weight rows of each sample's
non-zero features, scaled by their values (``torch.nn.functional.embedding_bag`` with per-sample weights),
which is ``x @ W`` for a sparse ``x`` at the cost of its non-zeros.

Over a large vocabulary (``model.sparse_grad``, by default from :data:`SPARSE_GRAD_FEATURES` features) the
first layer's gradient is a sparse tensor of the rows the batch touched, ``(N, H0)`` values at the batch's
``N`` non-zeros, instead of a dense ``(F, H0)`` one: the optimizer then moves those rows only ("lazy" Adam,
:class:`~megaclass.train.low_precision.BF16AdamW`), and a step no longer reads and writes the whole table
(4 GiB of weights, and twice that of Adam's moments, for a million n-grams x 1,024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from megaclass.data.batch import InputSpec, SparseInputs
from megaclass.ops.row_optimizers import init_rows_
from megaclass.schema import ConfigError

__all__ = ["SPARSE_GRAD_FEATURES", "MLPConfig", "MLPEncoder"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
SPARSE_GRAD_FEATURES = 1 << 17  # model.sparse_grad=auto: sparse from this many input features
_BLOCK_INIT_WEIGHTS = 1 << 26  # a first layer larger than this draws its initial weights in seeded blocks


@dataclass(frozen=True)
class MLPConfig:
    """An MLP over sparse rows; the output width ``D`` is the last hidden width."""

    type: Literal["mlp"] = "mlp"
    hidden: tuple[int, ...] = (1024,)  # widths of the layers; the first is the embedding bag over features
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"  # after every layer, the last included
    dropout: float = 0.0  # after every activation; regularises wide first layers on small data
    input_dropout: float = 0.0  # drop this fraction of each row's non-zeros (rescaling the rest) in training
    layer_norm: bool = False  # LayerNorm before each activation: steadier with large learning rates
    init_scale: float = 1.0  # multiplies the first layer's default init; TF-IDF rows have unit L2 norm
    # the first layer's gradient as the rows a batch touched, updated lazily; auto: from 2^17 features, where
    # a batch touches a small share of the table (one process: under torchrun the update is dense)
    sparse_grad: bool | Literal["auto"] = "auto"

    @property
    def out_features(self) -> int:
        """``D``, the feature width the encoder gives (known from the config alone)."""
        return self.hidden[-1]

    def __post_init__(self) -> None:
        if not self.hidden or any(width <= 0 for width in self.hidden):
            raise ConfigError(f"model.hidden: expected one or more positive widths, got {list(self.hidden)}")
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}: expected a value in [0, 1), got {getattr(self, name)}")
        if self.init_scale <= 0:
            raise ConfigError(f"model.init_scale: expected > 0, got {self.init_scale}")
        if self.sparse_grad not in (True, False, "auto"):
            raise ConfigError(f"model.sparse_grad: expected true, false or auto, got {self.sparse_grad!r}")

    def resolved_sparse_grad(self, num_features: int) -> bool:
        """``sparse_grad`` for ``num_features`` inputs (``auto``: from :data:`SPARSE_GRAD_FEATURES`)."""
        if self.sparse_grad == "auto":
            return num_features >= SPARSE_GRAD_FEATURES
        return bool(self.sparse_grad)


def _init_uniform_(table: Tensor, bound: float) -> None:
    """Fill ``table`` from U(-bound, bound). A table of more than 2^26 weights (a million n-grams x 1,024:
    seconds on one core) is drawn by :func:`~megaclass.ops.row_optimizers.init_rows_` (seeded chunks of
    rows, on several threads), its seed one draw from the global generator: the same on any thread count."""
    if table.numel() <= _BLOCK_INIT_WEIGHTS or table.is_meta:  # meta: a memory plan's model, shapes alone
        nn.init.uniform_(table, -bound, bound)
        return
    seed = int(torch.randint(0, 1 << 62, ()))
    init_rows_(table.detach(), seed=seed, bound=bound)  # the storage: its threads write without autograd


class _RowSparseEmbeddingBag(torch.autograd.Function):
    """``embedding_bag(indices, table, indptr, per_sample_weights=weights)`` in sums, whose gradient for
    ``table (F, H)`` is a sparse ``(F, H)`` tensor: entry ``n`` adds ``weights[n] * grad[row of n]`` to row
    ``indices[n]``. On an accelerator it is left uncoalesced (no sort, no host sync: a CUDA graph may capture
    it); on the CPU it comes coalesced, a row per distinct index (:func:`_summed_rows`)."""

    @staticmethod
    def forward(ctx, indices: Tensor, indptr: Tensor, weights: Tensor, table: Tensor) -> Tensor:
        ctx.save_for_backward(indices, indptr, weights)
        ctx.table_shape = table.shape
        return nn.functional.embedding_bag(
            indices, table, indptr, mode="sum", include_last_offset=True, per_sample_weights=weights
        )  # (B, H)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None, Tensor]:
        indices, indptr, weights = ctx.saved_tensors
        entries = torch.arange(indices.numel(), device=indices.device)
        rows = torch.searchsorted(indptr[1:], entries, right=True)  # (N,) the sample of each entry
        if grad.device.type == "cpu":
            return None, None, None, _summed_rows(indices, rows, weights, grad, ctx.table_shape)
        values = grad[rows] * weights.unsqueeze(1).to(grad.dtype)  # (N, H)
        # valid by construction: no check (it would sync); a scope, as torch 2.11 warns despite the argument
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            table_grad = torch.sparse_coo_tensor(
                indices.unsqueeze(0), values, ctx.table_shape, check_invariants=False, is_coalesced=False
            )
        return None, None, None, table_grad


def _summed_rows(indices: Tensor, rows: Tensor, weights: Tensor, grad: Tensor, shape: torch.Size) -> Tensor:
    """The table's gradient as a coalesced sparse ``(F, H)`` tensor: for each distinct index ``f``, the sum of
    ``weights[n] * grad[rows[n]]`` over its entries ``n`` that move it (a non-zero weight, a sample whose
    gradient is not all zeros). The sums are an ``embedding_bag`` over the batch's gradient, a bag a distinct
    index: the ``(N, H)`` products are never made, nor sorted."""
    live = (weights != 0) & grad.ne(0).any(1)[rows]  # (N,) entries that move their row
    indices, rows, weights = indices[live], rows[live], weights[live]
    columns, order = torch.sort(indices, stable=True)  # (N,) the entries bag by bag
    distinct, counts = torch.unique_consecutive(columns, return_counts=True)  # (U,)
    ends = torch.cumsum(counts, 0)
    values = nn.functional.embedding_bag(
        rows[order],
        grad,
        torch.cat([ends.new_zeros(1), ends]),
        mode="sum",
        include_last_offset=True,
        per_sample_weights=weights[order].to(grad.dtype),
    )  # (U, H)
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        return torch.sparse_coo_tensor(
            distinct.unsqueeze(0), values, shape, check_invariants=False, is_coalesced=True
        )


class MLPEncoder(nn.Module):
    """Sparse rows ``(B, F)`` given as (indices, offsets, weights) to features ``(B, D)``.

    Args:
        config: the layer widths, activation, dropout and normalisation.
        input_spec: must be ``kind="sparse"``; gives ``F = num_features``.

    >>> from megaclass.data.batch import InputSpec, SparseInputs
    >>> encoder = MLPEncoder(MLPConfig(hidden=(8, 4)), InputSpec(kind="sparse", num_features=10))
    >>> rows = SparseInputs.from_lists([[1, 7], [3]], [[0.5, 0.5], [1.0]])
    >>> encoder(rows).shape
    torch.Size([2, 4])
    """

    # entries of weight 0 add nothing to a row's sum: a CUDA graph may pad the inputs to a fixed size
    pads_sparse_inputs = True

    def __init__(self, config: MLPConfig, input_spec: InputSpec) -> None:
        super().__init__()
        if input_spec.kind != "sparse":
            raise ConfigError(
                f"model.type mlp: needs sparse feature rows, but the data gives {input_spec.kind!r}"
            )
        self.config = config
        self.num_features = input_spec.num_features
        first = config.hidden[0]
        self.embedding = nn.Parameter(torch.empty(self.num_features, first))  # (F, H0)
        self.bias = nn.Parameter(torch.zeros(first))
        _init_uniform_(self.embedding, config.init_scale / first**0.5)
        widths = config.hidden
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.norms = nn.ModuleList(
            nn.LayerNorm(width) if config.layer_norm else nn.Identity() for width in config.hidden
        )
        self.activation = _ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)
        self.out_features = config.hidden[-1]
        # the first layer's gradient is sparse (model.sparse_grad): its optimizer must take sparse gradients
        self.sparse_gradient = config.resolved_sparse_grad(self.num_features)

    def forward(self, inputs: SparseInputs) -> Tensor:
        """Features ``(B, D)`` of the sparse rows ``inputs``."""
        weights = inputs.weights.to(self.embedding.dtype)  # (N,)
        weights = nn.functional.dropout(weights, self.config.input_dropout, self.training)
        if self.sparse_gradient and torch.is_grad_enabled() and self.embedding.requires_grad:
            hidden = _RowSparseEmbeddingBag.apply(inputs.indices, inputs.indptr, weights, self.embedding)
        else:
            hidden = nn.functional.embedding_bag(
                inputs.indices,
                self.embedding,
                inputs.indptr,
                mode="sum",
                include_last_offset=True,
                per_sample_weights=weights,
            )  # (B, H0)
        hidden = self.dropout(self.activation(self.norms[0](hidden + self.bias)))
        for linear, norm in zip(self.linears, self.norms[1:], strict=False):
            hidden = self.dropout(self.activation(norm(linear(hidden))))  # (B, H_i)
        return hidden
