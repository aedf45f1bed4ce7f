"""Fused linear layer + loss over ``C`` classes that never holds the ``B x C`` logits (bar small ones: below).

``loss(x @ weight.T + bias, targets)`` for softmax cross-entropy (optionally with an ArcFace / CosFace cosine
margin), binary cross-entropy and squared hinge, with multi-class ``LongTensor[B]`` or multi-label
:class:`~megaclass.targets.RaggedLabels` targets. Forward keeps only per-row statistics; backward
recomputes the logits class chunk by class chunk and writes the weight gradient straight into one fp32 buffer.
On the Triton and reference backends bce and squared hinge (whose ``d loss / d z`` needs no row statistic)
compute their gradients in the forward pass instead, when an input needs one, and the backward pass only
scales them; the reference backend's softmax does so too where the ``(B, C)`` float32 logits fit 256 MiB
(:func:`~.reference.holds_softmax_logits`: it holds them until the rows' lse is known).
Given a :class:`~megaclass.ops.collectives.ClassShard` the op is its collective form: this rank holds the
classes ``[start, stop)`` and the per-row statistics are reduced over the shard's ranks.

Layers: ``kernels.py`` (Triton kernels + launchers) -> ``function.py`` (custom ops, Triton backend) ->
``common.LinearLossFunction`` (autograd) and ``sharded.ShardedLinearLossFunction`` (its collective form) ->
the functionals here; ``reference.py`` is the plain-PyTorch chunked backend (the spec, the CPU path, the
benchmark baseline); ``chunked.py`` is plain PyTorch tuned for speed (cuBLAS low-precision matmuls over large
chunks, ``impl="torch"``); ``select.py`` resolves ``auto`` to one of them by a fixed rule.

One package covers the three losses because they share everything but the per-logit function: the same tiles,
the same recompute-in-backward, the same sparse correction on each sample's positives.
"""

from __future__ import annotations

from torch import Tensor

from megaclass.ops import Impl
from megaclass.ops.collectives import ClassShard
from megaclass.ops.linear_cross_entropy.common import (
    LinearLossFunction,
    LinearLossOptions,
    LossKind,
    Reduction,
    check_inputs,
    linear_loss_apply,
)
from megaclass.ops.linear_cross_entropy.reference import holds_softmax_logits, reference_linear_loss
from megaclass.ops.linear_cross_entropy.select import dense_backend, resolve_impl
from megaclass.ops.linear_cross_entropy.sharded import ShardedLinearLossFunction, sharded_linear_loss_apply
from megaclass.ops.margins import MarginConfig
from megaclass.targets import Targets

__all__ = [
    "LinearLossFunction",
    "LinearLossOptions",
    "LossKind",
    "Reduction",
    "ShardedLinearLossFunction",
    "dense_backend",
    "holds_softmax_logits",
    "linear_bce",
    "linear_cross_entropy",
    "linear_loss",
    "linear_squared_hinge",
    "reference_linear_loss",
    "resolve_impl",
]


def linear_loss(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    *,
    bias: Tensor | None = None,
    options: LinearLossOptions | None = None,
    impl: Impl | str = Impl.AUTO,
    shard: ClassShard | None = None,
) -> Tensor:
    """Scalar ``options.loss`` of the logits ``x @ weight.T (+ bias)``, never building them whole.

    Args:
        x: ``(B, D)`` features in the compute dtype (fp32, or bf16 / fp16 with fp32 accumulation).
        weight: ``(C, D)`` class rows, any float dtype (fp32 master weights are cast tile by tile); with a
            ``shard``, ``(stop - start, D)``: this rank's rows.
        targets: ``LongTensor (B,)`` class ids or :class:`~megaclass.targets.RaggedLabels` (a sample's labels
            distinct); global ids in ``[0, C)`` with a shard.
        bias: ``(C,)`` or None (with a shard, this rank's ``(stop - start,)``).
        options: loss, reduction, margin, reference chunk size.
        impl: ``triton`` (fused kernels), ``torch`` (cuBLAS matmuls over large chunks), ``reference``
            (the fp32-accumulating spec); ``auto`` picks one by :func:`resolve_impl`'s fixed rule.
        shard: the classes this rank holds, ``None`` (or a whole shard): all of them. Every rank of the
            shard's group passes the same ``x`` and ``targets``; the loss is the whole problem's, held by
            every rank, and ``dx`` this rank's classes' share (the ranks' shares sum to the whole ``dx``).

    Returns:
        A 0-dim float32 tensor; gradients flow to ``x``, ``weight`` and ``bias``.

    >>> import torch
    >>> x, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 9])
    >>> whole = linear_loss(x, w, y, shard=ClassShard(0, 10, 10))  # one rank: the plain op
    >>> torch.equal(whole, linear_loss(x, w, y))
    True
    """
    options = options or LinearLossOptions()
    check_inputs(x, weight, bias, options)
    if shard is not None and weight.shape[0] != shard.size:
        raise ValueError(
            f"weight must hold the shard's rows [{shard.start}, {shard.stop}) of C={shard.num_classes}: "
            f"({shard.size}, D), got shape {tuple(weight.shape)}"
        )
    resolved = resolve_impl(
        impl,
        device_type=x.device.type,
        batch=x.shape[0],
        num_classes=weight.shape[0],
        dim=x.shape[1],
        dtype=x.dtype,
    )
    backend = dense_backend(resolved)
    if shard is None or shard.is_whole:
        return linear_loss_apply(x, weight, targets, bias, options, backend)
    return sharded_linear_loss_apply(x, weight, targets, bias, options, backend, shard)


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    *,
    bias: Tensor | None = None,
    margin: MarginConfig | None = None,
    reduction: Reduction | str = Reduction.MEAN,
    chunk_size: int = 8192,
    impl: Impl | str = Impl.AUTO,
) -> Tensor:
    """Softmax cross-entropy of ``x @ weight.T (+ bias)``; for ragged targets the mean over each sample's
    positives of ``-log softmax`` (samples without labels are left out of the mean).

    With a ``margin`` (multi-class targets, no bias) the logits are ``s * cos`` with the target's cosine
    margin.

    >>> import torch
    >>> x, w = torch.randn(4, 8), torch.randn(10, 8)
    >>> loss = linear_cross_entropy(x, w, torch.tensor([1, 2, 3, 4]))
    >>> dense = torch.nn.functional.cross_entropy(x @ w.T, torch.tensor([1, 2, 3, 4]))
    >>> torch.allclose(loss, dense, atol=1e-5)
    True
    """
    options = LinearLossOptions(
        LossKind.SOFTMAX, Reduction(reduction), margin or MarginConfig(), chunk_size=chunk_size
    )
    return linear_loss(x, weight, targets, bias=bias, options=options, impl=impl)


def linear_bce(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    *,
    bias: Tensor | None = None,
    reduction: Reduction | str = Reduction.MEAN,
    chunk_size: int = 8192,
    impl: Impl | str = Impl.AUTO,
) -> Tensor:
    """Binary cross-entropy of ``x @ weight.T (+ bias)`` against the positives (every other class negative),
    summed over classes, averaged over samples (``mean``) or summed (``sum``).

    >>> import torch, torch.nn.functional as F
    >>> x, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
    >>> dense = F.binary_cross_entropy_with_logits(x @ w.T, F.one_hot(y, 10).float(), reduction="sum") / 4
    >>> torch.allclose(linear_bce(x, w, y), dense, atol=1e-4)
    True
    """
    options = LinearLossOptions(LossKind.BCE, Reduction(reduction), chunk_size=chunk_size)
    return linear_loss(x, weight, targets, bias=bias, options=options, impl=impl)


def linear_squared_hinge(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    *,
    bias: Tensor | None = None,
    reduction: Reduction | str = Reduction.MEAN,
    chunk_size: int = 8192,
    impl: Impl | str = Impl.AUTO,
) -> Tensor:
    """Squared hinge ``sum_c relu(1 - y_c z_c)^2`` with ``y_c = +1`` on positives and ``-1`` elsewhere,
    summed over classes, averaged over samples (``mean``) or summed (``sum``)."""
    options = LinearLossOptions(LossKind.SQUARED_HINGE, Reduction(reduction), chunk_size=chunk_size)
    return linear_loss(x, weight, targets, bias=bias, options=options, impl=impl)
