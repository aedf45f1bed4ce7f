"""Where a head's classifier rows live, and how their updates are applied.

A row store holds a ``(C, D)`` matrix and its optimizer state, on the GPU, in host memory, or in a
parameter server. A row-sparse head pulls the rows a step needs to the compute device, and after the backward
pushes those rows' gradients back; the store applies its own (row-sparse) optimizer to them, so only the
touched rows get momentum and weight decay.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from megaclass.state_io import RowSource, SavedTensor
from megaclass.store.average import RowAverage


class RowStore(abc.ABC):
    """A ``(num_rows, dim)`` float matrix with a row-sparse optimizer attached."""

    num_rows: int
    dim: int
    device: torch.device  # where pulled rows are delivered (the compute device)

    @abc.abstractmethod
    def pull(self, ids: Tensor) -> Tensor:
        """Current values of rows ``ids (S,)`` (unique) as a ``(S, D)`` tensor on :attr:`device`."""

    @abc.abstractmethod
    def push(self, ids: Tensor, grads: Tensor, *, step: int, lr: float) -> None:
        """Apply one optimizer step with learning rate ``lr`` to rows ``ids (S,)`` given ``grads (S, D)``."""

    @abc.abstractmethod
    def read(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` as a ``(stop - start, D)`` tensor on :attr:`device` (index builds, eval)."""

    def blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows [start, start + block_rows))`` in float32 on :attr:`device`, for every block in
        order (exact scans: coverage, an exact top-k)."""
        for start in range(0, self.num_rows, block_rows):
            yield start, self.read(start, min(start + block_rows, self.num_rows))

    @abc.abstractmethod
    def rows(self) -> Tensor | RowSource:
        """All ``(num_rows, D)`` rows where they live, without a copy (index builds): stores holding a local
        tensor return it as is, in the dtype they hold it in (bfloat16 for ``bf16_sr``; :meth:`pull` and
        :meth:`read` give float32); the parameter servers' a source read a block or a set of ids at a time.
        """

    @property
    def capturable(self) -> bool:
        """Whether :meth:`pull` and :meth:`push` run on the compute device alone, never waiting for the host,
        so a CUDA graph can hold them (a step's pull, and the update it pushes)."""
        return False

    def prefetch(self, ids: Tensor) -> None:  # noqa: B027 (an optional hook: no-op by default)
        """Hint that rows ``ids`` will be pulled next, so a store may start moving them now."""

    def start_average(
        self, decay: float, *, before_swap: Callable[[], None] = lambda: None
    ) -> RowAverage | None:
        """Keep the rows' weight average from now on, where the store applies its updates in this process
        (:class:`~megaclass.store.average.RowAverage`, calling ``before_swap`` before it takes the rows'
        place); None where it cannot (the default)."""
        return None

    def flush(self) -> None:  # noqa: B027 (an optional hook: no-op by default)
        """Wait until every pushed update has been applied (before a checkpoint or an evaluation)."""

    def close(self, *, wait: bool = True) -> None:  # noqa: B027 (an optional hook: no-op by default)
        """Release what the store holds beyond its tensors (page-locked memory, threads, connections), after
        every pushed update is applied; ``wait=False`` (after an error) does not wait for those in flight."""

    @abc.abstractmethod
    def held_bytes(self) -> tuple[int, int]:
        """``(rows, optimizer state)`` bytes the store holds, wherever they live (GPU, host, servers)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Tensor | RowSource]:
        """Rows and optimizer state for a checkpoint, after every pushed update: the store's own tensors
        where it holds them (not copies, which at 10^8 rows would not fit beside them; the checkpoint writer
        streams them to its file block by block), else :class:`~megaclass.state_io.RowSource` readers that
        fetch a block of rows at a time (a parameter server's)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Tensor | SavedTensor]) -> None:
        """Restore what :meth:`state_dict` returned.

        An entry may be a :class:`~megaclass.state_io.SavedTensor` (a checkpoint's rows, left in the file),
        which a local store streams into its own tensors (:func:`~megaclass.state_io.copy_into_`) and any
        store can read a row range of (``saved[a:b]``).
        """

    @abc.abstractmethod
    def load_rows(self, rows: Tensor | RowSource) -> None:
        """Overwrite the ``(num_rows, D)`` rows alone (kept weights, an export); optimizer state stays.

        Raises:
            ValueError: ``rows`` is not ``(num_rows, D)``.
        """
