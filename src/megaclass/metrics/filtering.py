"""Filter files of the Extreme Classification Repository: ``(document, label)`` pairs left out of evaluation.

Some XMC data sets (LF-AmazonTitles, Wikipedia-500K, ...) ship ``filter_labels_test.txt``: one
``doc_id label_id`` pair a line (0-based), typically a document's link to itself. Those pairs are removed from
both the predictions and the targets before P@k and nDCG@k, as the repository's evaluation scripts do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from megaclass.errors import DataFormatError
from megaclass.targets import RaggedLabels, Targets, as_ragged

__all__ = ["LabelFilter", "read_filter_labels"]


@dataclass(frozen=True)
class LabelFilter:
    """Sorted ``doc_id * C + label_id`` keys of the pairs to drop, for ``C`` labels.

    >>> import torch
    >>> f = LabelFilter.from_pairs(np.array([[0, 2], [1, 0]]), num_classes=3)
    >>> ids, targets = f.apply(torch.tensor([[2, 1], [0, 2]]), torch.tensor([2, 1]), first_row=0, k=1)
    >>> ids.tolist(), targets.to_lists()
    ([[1], [2]], [[], [1]])
    """

    keys: np.ndarray
    num_classes: int
    max_per_doc: int  # the most pairs of one document: predictions need this many spare ids

    @classmethod
    def from_pairs(cls, pairs: np.ndarray, *, num_classes: int) -> LabelFilter:
        """From an ``(N, 2)`` array of ``(doc_id, label_id)``."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)  # (N, 2)
        keys = np.unique(pairs[:, 0] * num_classes + pairs[:, 1])
        per_doc = np.unique(keys // num_classes, return_counts=True)[1]
        return cls(keys, num_classes, int(per_doc.max(initial=0)))

    def _dropped(self, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        keys = rows * self.num_classes + labels
        return np.isin(keys, self.keys) & (labels >= 0)

    def apply(self, ids: Tensor, targets: Targets, *, first_row: int, k: int) -> tuple[Tensor, RaggedLabels]:
        """Drop filtered pairs from top ``ids (B, k')`` and ``targets`` of rows ``first_row, ...``.

        Returns:
            ``(B, k)`` ids (the best unfiltered ones, -1 padded) and the remaining targets.
        """
        import torch

        ids_np = ids.cpu().numpy()
        rows = first_row + np.arange(ids_np.shape[0])[:, None]  # (B, 1)
        dropped = self._dropped(rows, ids_np)  # (B, k')
        order = np.argsort(dropped, axis=1, kind="stable")  # kept ids first, in their rank order
        kept = np.take_along_axis(ids_np, order, axis=1)[:, :k]  # (B, k)
        kept = np.where(np.take_along_axis(dropped, order, axis=1)[:, :k], -1, kept)
        ragged = as_ragged(targets)
        labels = ragged.indices.cpu().numpy()
        sample = ragged.sample_ids().cpu().numpy()
        keep = ~self._dropped(first_row + sample, labels)  # (L,)
        lengths = np.bincount(sample[keep], minlength=ragged.batch_size)
        indptr = np.zeros(ragged.batch_size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return torch.from_numpy(kept), RaggedLabels(torch.from_numpy(indptr), torch.from_numpy(labels[keep]))


def read_filter_labels(
    path: str | os.PathLike,
    *,
    num_classes: int,
    num_documents: int | None = None,
    documents: str = "the test file",
) -> LabelFilter:
    """Read a ``filter_labels`` file: ``doc_id label_id`` a line (0-based, whitespace-separated).

    Args:
        num_documents: the rows of the file the doc ids point into; None: not checked.
        documents: that file, as messages name it (``--test test_bow.txt``).

    Raises:
        DataFormatError: naming the file and line of a malformed pair, a label outside ``[0, C)`` or a doc id
            past the last row.
    """
    path = os.fspath(path)
    pairs = []
    try:
        with open(path, "rb") as handle:  # bytes: a line that is not text is named like any other bad line
            for number, line in enumerate(handle, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not all(part.isdigit() for part in parts):  # ASCII digits only
                    seen = line.strip()[:80].decode("utf-8", errors="replace")
                    raise DataFormatError(path, f"expected 'doc_id label_id', found {seen!r}", line=number)
                doc, label = int(parts[0]), int(parts[1])
                if label >= num_classes:
                    raise DataFormatError(
                        path, f"label id {label} out of range [0, {num_classes})", line=number
                    )
                if num_documents is not None and doc >= num_documents:
                    raise DataFormatError(
                        path,
                        f"doc id {doc} out of range: {documents} has {num_documents} rows (doc ids 0 to "
                        f"{num_documents - 1})",
                        line=number,
                    )
                pairs.append((doc, label))
    except OSError as error:
        raise DataFormatError(path, f"cannot read ({error.strerror or error})") from None
    return LabelFilter.from_pairs(np.array(pairs, dtype=np.int64).reshape(-1, 2), num_classes=num_classes)
