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

__all__ = ["TRITON_DTYPES", "TRITON_MAX_BATCH", "dense_backend", "resolve_impl"]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # compute dtypes the kernels' dots take
TRITON_MAX_BATCH = 128  # the kernels' largest row block: above it they read W once more per block of rows


def resolve_impl(
    impl: Impl | str, *, device_type: str, batch: int, num_classes: int, dim: int, dtype: torch.dtype
) -> Impl:
    """The concrete backend for ``impl`` on a problem of ``x (batch, dim)`` in ``dtype`` against
    ``num_classes`` rows (this rank's, with a shard) on ``device_type``; a pure function: the same arguments
    give the same answer, so a head can resolve ``auto`` once and record the result in its config.

    ``auto``:

    - not CUDA: ``reference`` (the spec; the Triton kernels run only in the interpreter there).
    - CUDA, a compute dtype the kernels' dots do not take (float64): ``torch`` (cuBLAS over class chunks).
    - CUDA, ``batch <= 128`` (one row block of the kernels): ``triton``; a larger batch: ``torch``.

    ``num_classes`` and ``dim`` do not move the choice at the shapes measured (below).

    >>> problem = {"num_classes": 670_091, "dim": 768, "dtype": torch.bfloat16}
    >>> [resolve_impl("auto", device_type="cuda", batch=batch, **problem).value for batch in (128, 512)]
    ['triton', 'torch']
    """
    # Source: benchmarks/RESULTS.md, "DenseHead: fused linear + loss" (H100, B 128, D 768, bf16 compute, fp32
    # W): at C = 670,091 CE fwd+bwd takes megaclass-triton 8.474 ms against megaclass-torch 13.500, and
    # at C = 2,812,281 Triton is the fastest provider measured (CE 15.318 ms, BCE 18.587).
    # Above one row block the Triton kernels read W once per 128 rows, cuBLAS does not; on an H200
    # (torch 2.11, Triton 3.6; `python benchmarks/heads.py --skip-check --providers
    # megaclass-triton,megaclass-torch --losses ce,bce --modes fwd+bwd --classes 65536 670091 --batch B`),
    # fwd+bwd ms triton / torch at C = 670,091, D 768:
    #   B 32: CE 3.95 / 7.18, BCE 3.51 / 4.82;  B 128: CE 3.95 / 5.88, BCE 4.61 / 5.32;
    #   B 192: CE 11.01 / 7.97, BCE 14.93 / 5.91;  B 512: CE 19.85 / 12.49;  B 4096: CE 136.7 / 80.1.
    # At C = 65,536 the two are within 0.7 ms of each other up to B 192 and cuBLAS leads from B 256 on
    # (B 1024: CE 4.90 / 3.02, B 4096: 14.44 / 8.71).
    impl = Impl(impl)
    if impl is not Impl.AUTO:
        return impl
    if device_type != "cuda":
        return Impl.REFERENCE
    if dtype not in TRITON_DTYPES or batch > TRITON_MAX_BATCH:
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
