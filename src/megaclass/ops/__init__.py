"""Kernels: one file per op, each with Triton kernels, launchers, an autograd Function, a plain-PyTorch
reference and a public functional taking ``impl="auto"``.

Triton is imported only inside the files that launch kernels, when a kernel is launched.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch


class Impl(str, enum.Enum):
    """Which implementation an op runs: ``auto`` picks Triton for CUDA tensors, the reference otherwise.

    ``torch`` is plain PyTorch tuned for speed (native low-precision matmuls over large chunks, cuBLAS on
    CUDA) where an op has one; ``reference`` is the executable spec. An op may refine ``auto`` by a fixed rule
    of the device, shape and dtype (the fused linear losses: ``linear_cross_entropy.resolve_impl``)."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"
    REFERENCE = "reference"


def resolve_impl(impl: Impl | str, *tensors: torch.Tensor) -> Impl:
    """The concrete implementation for ``impl`` given the tensors an op runs on (chosen at call time)."""
    on_cuda = all(t.is_cuda for t in tensors)
    return resolve_impl_on(impl, "cuda" if on_cuda else "cpu")


def resolve_impl_on(impl: Impl | str, device_type: str) -> Impl:
    """``impl`` on a device of ``device_type``: ``auto`` is Triton on CUDA, the reference elsewhere."""
    impl = Impl(impl)
    if impl is not Impl.AUTO:
        return impl
    return Impl.TRITON if device_type == "cuda" else Impl.REFERENCE


def autotune_enabled() -> bool:
    """Whether kernels autotune launch configs (``MEGACLASS_AUTOTUNE=1``); off by default and in tests."""
    return os.environ.get("MEGACLASS_AUTOTUNE", "0") == "1"


_host_pool: ThreadPoolExecutor | None = None  # made at the first host work split over threads


def run_split(work: Callable[[int, int], object], bounds: Sequence[int]) -> None:
    """``work(bounds[i], bounds[i + 1])`` for every piece: the first on this thread, the others at once on a
    process-wide pool (numpy work that lets go of the GIL runs side by side); returns when all are done."""
    global _host_pool
    if len(bounds) > 2 and _host_pool is None:
        _host_pool = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="host")
    parts = [_host_pool.submit(work, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
    work(bounds[0], bounds[1])
    for part in parts:
        part.result()
