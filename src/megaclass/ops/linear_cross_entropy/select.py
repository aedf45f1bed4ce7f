"""``impl="auto"``: which backend computes the dense part, decided by a fixed rule from the device, the
problem's shape and the compute dtype (never by timing), so the same problem always runs the same arithmetic
and a head can write the choice into its config.
"""

from __future__ import annotations

import torch

from megaclass.ops import Impl
from megaclass.ops.linear_cross_entropy.chunked import TorchChunkedBackend
from megaclass.ops.linear_cross_entropy.common import DenseBackend
from megaclass.ops.linear_cross_entropy.reference import ReferenceBackend

__all__ = ["TRITON_DTYPES", "dense_backend", "resolve_impl"]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # compute dtypes the kernels' dots take


def resolve_impl(
    impl: Impl | str, *, device_type: str, batch: int, num_classes: int, dim: int, dtype: torch.dtype
) -> Impl:
    """The concrete backend for ``impl`` on a problem of ``x (batch, dim)`` in ``dtype`` against
    ``num_classes`` rows (this rank's, with a shard) on ``device_type``; a pure function: the same arguments
    give the same answer, so a head can resolve ``auto`` once and record the result in its config.

    ``auto``:

    - not CUDA: ``reference`` (the spec; the Triton kernels run only in the interpreter there).
    - CUDA, a compute dtype the kernels' dots do not take (float64): ``torch`` (cuBLAS over class chunks).
    - CUDA otherwise: ``triton``, at every ``batch``, ``num_classes`` and ``dim``.

    >>> problem = {"batch": 128, "num_classes": 670_091, "dim": 768, "dtype": torch.bfloat16}
    >>> [resolve_impl("auto", device_type=device, **problem).value for device in ("cuda", "cpu")]
    ['triton', 'reference']
    """
    # Source: benchmarks/RESULTS.md, "DenseHead: fused linear + loss" (H100, B 128, D 768, bf16 compute, fp32
    # W). At C = 670,091, CE: megaclass-triton fwd 2.574 ms / bwd 5.364 / fwd+bwd 8.474 against
    # megaclass-torch 5.312 / 6.366 / 13.500; BCE: megaclass-triton fwd+bwd 8.745 ms, megaclass-torch OOM.
    # At C = 2,812,281 Triton runs CE fwd+bwd in 15.318 ms and BCE in 18.587 (half of plain PyTorch's
    # 30.644 / 39.002). No recorded shape has the cuBLAS chunks ahead in either pass, so no threshold on
    # ``batch``, ``num_classes`` or ``dim`` switches to them.
    impl = Impl(impl)
    if impl is not Impl.AUTO:
        return impl
    if device_type != "cuda":
        return Impl.REFERENCE
    if dtype not in TRITON_DTYPES:
        return Impl.TORCH
    return Impl.TRITON


def dense_backend(impl: Impl | str) -> DenseBackend:
    """The backend object of a concrete ``impl`` (``auto`` must be resolved first: :func:`resolve_impl`).

    Raises:
        ValueError: ``impl`` is ``auto`` or not an :class:`~megaclass.ops.Impl`.
    """
    impl = Impl(impl)
    if impl is Impl.TRITON:
        from megaclass.ops.linear_cross_entropy.function import TritonBackend

        return TritonBackend()
    if impl is Impl.TORCH:
        return TorchChunkedBackend()
    if impl is Impl.REFERENCE:
        return ReferenceBackend()
    raise ValueError("impl: 'auto' names no backend; resolve it first with resolve_impl(...)")
