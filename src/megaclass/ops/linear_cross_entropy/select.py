"""``impl="auto"`` on CUDA: time the Triton kernels against the cuBLAS-chunked backend once per problem and
keep the faster, separately for the forward reduction and the backward gradients.

Which one wins depends on the card, ``B``, ``C``, ``D`` and the dtypes, so it is measured rather than guessed:
the first call of a pass for a new problem runs every candidate once untimed (compilation, allocator warm-up),
then :data:`TIMED_ROUNDS` timed rounds, and caches the index of the fastest by median. That first call costs a
few extra passes and deliberate host syncs; later calls dispatch from the cache. Under ``torch.compile`` (no
timing while tracing) the first candidate runs.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from megaclass.ops.linear_cross_entropy.common import DenseBackend, LinearLossOptions

__all__ = ["MeasuredBackend", "cuda_event_timer", "measured_choices"]

TIMED_ROUNDS = 3
Timer = Callable[[Callable[[], Any]], float]  # runs a call once, returns its milliseconds
_CHOICES: dict[tuple, int] = {}  # problem key -> index of the fastest candidate


def cuda_event_timer(call: Callable[[], Any]) -> float:
    """Milliseconds of one ``call()`` on the current CUDA stream (CPU tensors: wall clock)."""
    if not torch.cuda.is_available():
        begin = time.perf_counter()
        call()
        return (time.perf_counter() - begin) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()  # deliberate sync: the selection is measured once per problem
    return start.elapsed_time(end)


class MeasuredBackend:
    """A :class:`DenseBackend` that runs, per pass and problem, whichever of ``candidates`` measured fastest.

    Args:
        candidates: backends computing the same thing; the first one runs under ``torch.compile``.
        timer: times one call in milliseconds (CUDA events by default).
    """

    def __init__(self, candidates: Sequence[DenseBackend], *, timer: Timer = cuda_event_timer) -> None:
        if not candidates:
            raise ValueError("candidates must hold at least one backend")
        self.candidates = tuple(candidates)
        self.timer = timer

    def reduce(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        exclude: Tensor | None,
        options: LinearLossOptions,
    ) -> Tensor:
        key = ("reduce", *_problem(x, weight, bias, exclude, options))
        return self._run(key, lambda backend: backend.reduce(x, weight, bias, exclude, options))

    def grads(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        exclude: Tensor | None,
        lse: Tensor,
        coef: Tensor,
        options: LinearLossOptions,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        key = ("grads", *_problem(x, weight, bias, exclude, options))
        return self._run(key, lambda backend: backend.grads(x, weight, bias, exclude, lse, coef, options))

    def choice(self, key: tuple) -> DenseBackend | None:
        """The backend measured fastest for ``key``, or None before it was measured."""
        index = _CHOICES.get((self._names(), *key))
        return None if index is None else self.candidates[index]

    def _names(self) -> tuple[str, ...]:
        return tuple(type(backend).__name__ for backend in self.candidates)

    def _run(self, key: tuple, call: Callable[[DenseBackend], Any]) -> Any:
        if len(self.candidates) == 1 or torch.compiler.is_compiling():
            return call(self.candidates[0])
        full_key = (self._names(), *key)
        if full_key not in _CHOICES:
            _CHOICES[full_key] = self._measure(call)
        return call(self.candidates[_CHOICES[full_key]])

    def _measure(self, call: Callable[[DenseBackend], Any]) -> int:
        """Index of the fastest candidate: one untimed call each, then the median of timed rounds. Outputs
        are dropped at once, so the peak memory is one candidate's, not the sum. A candidate that fails its
        first call (a kernel this card or compiler cannot build) is left out with a warning."""
        working: list[int] = []
        failure: Exception | None = None
        for index, backend in enumerate(self.candidates):
            try:
                self.timer(lambda backend=backend: call(backend))  # compile and warm up, untimed
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # any failure of one candidate: measure the others
                warnings.warn(
                    f"{type(backend).__name__} failed, left out of impl='auto': {error!r}", stacklevel=4
                )
                failure = error
            else:
                working.append(index)
        if not working:
            raise RuntimeError("every candidate backend failed") from failure
        samples: dict[int, list[float]] = {index: [] for index in working}
        for _ in range(TIMED_ROUNDS):
            for index in working:
                samples[index].append(self.timer(lambda index=index: call(self.candidates[index])))
        return min(working, key=lambda index: statistics.median(samples[index]))


def measured_choices() -> dict[str, str]:
    """What every measured problem picked so far: ``"grads B=128 D=768 C=670091 softmax bfloat16"`` to the
    backend's class name (for logs and benchmarks)."""
    described = {}
    for (names, kind, _device, shape, classes, dtype, _wdtype, loss, *_), index in _CHOICES.items():
        key = f"{kind} B={shape[0]} D={shape[1]} C={classes} {loss.value} {str(dtype).removeprefix('torch.')}"
        described[key] = names[index]
    return described


def _problem(
    x: Tensor, weight: Tensor, bias: Tensor | None, exclude: Tensor | None, options: LinearLossOptions
) -> tuple:
    """What the speed of a pass depends on: device, sizes, dtypes, loss and flags (not values)."""
    return (
        str(x.device),
        tuple(x.shape),
        weight.shape[0],
        x.dtype,
        weight.dtype,
        options.loss,
        options.cosine,
        bias is not None,
        exclude is not None,
    )
