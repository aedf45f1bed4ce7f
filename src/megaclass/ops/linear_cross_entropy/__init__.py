"""Fused linear layer + loss over ``C`` classes that never holds the ``B x C`` logits.

``loss(x @ weight.T + bias, targets)`` for softmax cross-entropy (optionally with an ArcFace / CosFace cosine
margin), binary cross-entropy and squared hinge, with multi-class ``LongTensor[B]`` or multi-label
:class:`~megaclass.targets.RaggedLabels` targets. Forward keeps only per-row statistics; backward
recomputes the logits class chunk by class chunk and writes the weight gradient straight into one fp32 buffer.

Layers: ``kernels.py`` (Triton kernels + launchers) -> ``function.py`` (custom ops, Triton backend) ->
``common.LinearLossFunction`` (autograd) -> the functionals here; ``reference.py`` is the plain-PyTorch
chunked backend (the spec, the CPU path, the benchmark baseline); ``chunked.py`` is plain PyTorch tuned for
speed (cuBLAS low-precision matmuls over large chunks, ``impl="torch"``); ``select.py`` makes ``auto`` on CUDA
run whichever of Triton and ``torch`` it measured faster for the problem.

One package covers the three losses because they share everything but the per-logit function: the same tiles,
the same recompute-in-backward, the same sparse correction on each sample's positives.
"""

from __future__ import annotations

from torch import Tensor

from megaclass.heads.losses import MarginConfig
from megaclass.ops import Impl
from megaclass.ops.linear_cross_entropy.chunked import TorchChunkedBackend
from megaclass.ops.linear_cross_entropy.common import (
    DenseBackend,
    LinearLossFunction,
    LinearLossOptions,
    LossKind,
    Reduction,
    linear_loss_apply,
)
from megaclass.ops.linear_cross_entropy.reference import ReferenceBackend, reference_linear_loss
from megaclass.targets import Targets

__all__ = [
    "LinearLossFunction",
    "LinearLossOptions",
    "LossKind",
    "Reduction",
    "dense_backend",
    "linear_bce",
    "linear_cross_entropy",
    "linear_loss",
    "linear_squared_hinge",
    "reference_linear_loss",
]


def dense_backend(impl: Impl | str, *tensors: Tensor) -> DenseBackend:
    """The backend computing the dense part for ``impl`` on ``tensors``' device.

    ``auto``: on CUDA the faster of Triton and ``torch`` as measured once per problem
    (:class:`~.select.MeasuredBackend`), elsewhere ``reference``.
    """
    impl = Impl(impl)
    if impl is Impl.AUTO:
        if not all(tensor.is_cuda for tensor in tensors):
            return ReferenceBackend()
        from megaclass.ops.linear_cross_entropy.function import TritonBackend
        from megaclass.ops.linear_cross_entropy.select import MeasuredBackend

        return MeasuredBackend((TritonBackend(), TorchChunkedBackend()))
    if impl is Impl.TRITON:
        from megaclass.ops.linear_cross_entropy.function import TritonBackend

        return TritonBackend()
    return TorchChunkedBackend() if impl is Impl.TORCH else ReferenceBackend()


def linear_loss(
    x: Tensor,
    weight: Tensor,
    targets: Targets,
    *,
    bias: Tensor | None = None,
    options: LinearLossOptions | None = None,
    impl: Impl | str = Impl.AUTO,
) -> Tensor:
    """Scalar ``options.loss`` of the logits ``x @ weight.T (+ bias)``, never building them whole.

    Args:
        x: ``(B, D)`` features in the compute dtype (fp32, or bf16 / fp16 with fp32 accumulation).
        weight: ``(C, D)`` class rows, any float dtype (fp32 master weights are cast tile by tile).
        targets: ``LongTensor (B,)`` class ids or :class:`~megaclass.targets.RaggedLabels` (a sample's labels
            distinct).
        bias: ``(C,)`` or None.
        options: loss, reduction, margin, reference chunk size.
        impl: ``triton`` (fused kernels), ``torch`` (cuBLAS matmuls over large chunks), ``reference``
            (the fp32-accumulating spec); ``auto`` runs the faster of the first two on CUDA, ``reference``
            elsewhere.

    Returns:
        A 0-dim float32 tensor; gradients flow to ``x``, ``weight`` and ``bias``.
    """
    return linear_loss_apply(
        x, weight, targets, bias, options or LinearLossOptions(), dense_backend(impl, x, weight)
    )


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
