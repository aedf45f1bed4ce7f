"""MLP encoder over sparse TF-IDF rows: an embedding-bag first layer, then dense hidden layers.

The first layer never materialises a dense ``(B, F)`` input: it sums the weight rows of each sample's
non-zero features, scaled by their values (``torch.nn.functional.embedding_bag`` with per-sample weights),
which is ``x @ W`` for a sparse ``x`` at the cost of its non-zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from megaclass.data.batch import InputSpec, SparseInputs
from megaclass.schema import ConfigError

__all__ = ["MLPConfig", "MLPEncoder"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


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
        bound = config.init_scale / first**0.5
        nn.init.uniform_(self.embedding, -bound, bound)
        widths = config.hidden
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.norms = nn.ModuleList(
            nn.LayerNorm(width) if config.layer_norm else nn.Identity() for width in config.hidden
        )
        self.activation = _ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)
        self.out_features = config.hidden[-1]

    def forward(self, inputs: SparseInputs) -> Tensor:
        """Features ``(B, D)`` of the sparse rows ``inputs``."""
        weights = inputs.weights.to(self.embedding.dtype)  # (N,)
        weights = nn.functional.dropout(weights, self.config.input_dropout, self.training)
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
