"""The class-selector interface: an index over the ``(C, D)`` weight rows answering nearest-class queries."""

from __future__ import annotations

import abc
import enum

from torch import Tensor

__all__ = ["ClassSelector", "Metric"]


class Metric(str, enum.Enum):
    """How a feature is compared with a class row: cosine of the angle, or the raw dot product (the logit)."""

    COSINE = "cosine"
    DOT = "dot"


class ClassSelector(abc.ABC):
    """Finds, for each feature, the classes whose weight rows score highest against it.

    :meth:`build` takes a snapshot of the rows (it may finish in the background: the previous index keeps
    answering until the new one is ready); :meth:`query` answers from the latest finished build.
    """

    @abc.abstractmethod
    def build(self, weight: Tensor, *, changed: Tensor | None = None) -> None:
        """(Re)build over ``weight (C, D)``; the rows may live on any device (chunks are moved as needed).

        ``changed``: ids of the rows updated since the previous build (None: any may have), so an index that
        keeps a snapshot refreshes only those.
        """

    @abc.abstractmethod
    def query(self, features: Tensor, n: int) -> Tensor:
        """``(B, n)`` int64 class ids on ``features``' device, best first, for ``features (B, D)``.

        An entry is ``-1`` where the index found fewer than ``n`` classes.
        """

    @property
    @abc.abstractmethod
    def is_built(self) -> bool:
        """Whether a finished build is available to :meth:`query`."""

    def wait(self) -> None:  # noqa: B027 - optional hook
        """Block until a pending background build has been swapped in."""

    def metrics(self) -> dict[str, float]:
        """Numbers about the index (last build time in ms, ...)."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that restore the served index exactly (empty when it is rebuilt from the weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work."""
