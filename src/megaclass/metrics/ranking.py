"""Ranking metrics of extreme classification, computed from top-k predictions, streaming over batches.

Conventions (those of the Extreme Classification Repository and pyxclib):

- ``P@k = |top-k ∩ y| / k``; ``R@k = |top-k ∩ y| / |y|``; ``nDCG@k = DCG@k / IDCG@k`` with gains ``1 /
  log2(rank + 1)`` and ``IDCG@k`` the DCG of ``min(k, |y|)`` hits. Each is the mean over samples; a sample
  with no labels counts in the mean with 0 in every metric.
- ``PSP@k`` and ``PSnDCG@k`` weight a hit on label ``l`` by ``1 / p_l`` (propensities of Jain et al. 2016) and
  are normalised, as pyxclib's ``psprecision`` / ``psndcg`` do, by the same metric of the ideal ranking (each
  sample's labels by decreasing ``1 / p_l``, the best ``k``): ``PSP@k = sum_i PSP_i / sum_i PSP*_i``, and
  ``PSnDCG@k = sum_i (PSDCG_i / Z_i) / sum_i (PSDCG*_i / Z_i)`` where ``Z_i`` is the sample's unit-gain
  ``IDCG@k`` (the DCG of ``min(k, |y_i|)`` hits), so each sample enters as its own nDCG does. They lie in
  ``[0, 1]``.
- ``accuracy`` is the share of samples whose top-1 prediction is one of its labels (``P@1``; top-1 accuracy
  for one-label data).

>>> metrics = RankingMetrics(num_labels=4, ks=(1, 2))
>>> metrics.update(np.array([[1, 2], [0, 3]]), np.array([2, 0]))
>>> metrics.compute()["P@1"], metrics.compute()["R@2"]
(0.5, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["RankingMetrics", "propensity"]


def propensity(label_counts: np.ndarray, num_samples: int, *, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """Label propensities ``p_l = 1 / (1 + C (N_l + B)^-A)``, ``C = (ln N - 1)(B + 1)^A`` (Jain et al. 2016).

    Args:
        label_counts: ``(C,)`` number of training samples of each label (``N_l``).
        num_samples: the number of training samples ``N``.
        a: ``A``; the repository uses 0.55 in general, 0.6 for Amazon and 0.5 for Wikipedia data sets.
        b: ``B``; 1.5 in general, 2.6 for Amazon, 0.4 for Wikipedia.

    Returns:
        ``(C,)`` float64 propensities in ``(0, 1)``; rare labels have small ones.
    """
    if num_samples < 1:
        raise ValueError(f"propensity: num_samples must be positive, got {num_samples}")
    c = (np.log(num_samples) - 1.0) * (b + 1.0) ** a
    p = np.array(label_counts, dtype=np.float64)  # worked in place: one (C,) array at 10^8 labels, no more
    p += b
    np.log(p, out=p)
    p *= -a
    np.exp(p, out=p)
    p *= c
    p += 1.0
    return np.reciprocal(p, out=p)


def _targets_as_csr(targets: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, indices)`` int64 NumPy arrays from CSR rows, RaggedLabels or ``(B,)`` class ids."""
    if hasattr(targets, "indptr") and hasattr(targets, "indices"):
        indptr, indices = targets.indptr, targets.indices
        if hasattr(indptr, "detach"):
            indptr, indices = indptr.detach().cpu().numpy(), indices.detach().cpu().numpy()
        indptr, indices = np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    else:
        ids = targets.detach().cpu().numpy() if hasattr(targets, "detach") else np.asarray(targets)
        if ids.ndim != 1:
            raise ValueError(
                f"targets: expected (B,) class ids, CSR rows or RaggedLabels, got shape {ids.shape}"
            )
        indices = ids.astype(np.int64)
        indptr = np.arange(indices.size + 1, dtype=np.int64)
    if indptr.size - 1 != batch:
        raise ValueError(f"targets: {indptr.size - 1} samples but topk_ids has {batch} rows")
    return indptr, indices


class RankingMetrics:
    """Streaming P@k, nDCG@k, R@k, PSP@k, PSnDCG@k and top-1 accuracy (see the module docstring).

    Args:
        num_labels: the label space size ``C``.
        ks: the cut-offs to report.
        propensities: ``(C,)`` label propensities (:func:`propensity`); PSP@k and PSnDCG@k only when given.
    """

    def __init__(
        self, num_labels: int, *, ks: Sequence[int] = (1, 3, 5), propensities: np.ndarray | None = None
    ) -> None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {num_labels}")
        ks = tuple(sorted({int(k) for k in ks}))
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be positive cut-offs, got {ks}")
        if propensities is not None:
            propensities = np.asarray(propensities, dtype=np.float64)
            if propensities.shape != (num_labels,) or not propensities.min(initial=1.0) > 0:  # NaN: refused
                raise ValueError(
                    f"propensities must be ({num_labels},) and positive, got shape {propensities.shape}"
                )
        self.num_labels = num_labels
        self.ks = ks
        self.inverse_propensity = None if propensities is None else np.reciprocal(propensities)
        self._discount = 1.0 / np.log2(np.arange(ks[-1], dtype=np.float64) + 2.0)  # (k,)
        self.reset()

    def reset(self) -> None:
        """Forget all samples seen."""
        self.num_samples = 0
        self._sums: dict[str, float] = {}

    def _add(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + float(value)

    def update(self, topk_ids: Any, targets: Any) -> None:
        """Add a batch.

        Args:
            topk_ids: ``(B, k)`` predicted label ids, best first, ``k >= max(ks)`` (ndarray or tensor); ids
                out of ``[0, C)`` (padding such as -1) count as misses.
            targets: the true labels: CSR rows (``indptr``/``indices``), RaggedLabels, or ``(B,)`` class ids.
        """
        ids = topk_ids.detach().cpu().numpy() if hasattr(topk_ids, "detach") else np.asarray(topk_ids)
        if ids.ndim != 2 or ids.shape[1] < self.ks[-1]:
            raise ValueError(f"topk_ids: expected (B, k) with k >= {self.ks[-1]}, got shape {ids.shape}")
        ids = ids[:, : self.ks[-1]].astype(np.int64)  # (B, k)
        batch = ids.shape[0]
        indptr, indices = _targets_as_csr(targets, batch)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_labels):
            raise ValueError(
                f"targets: label ids must lie in [0, {self.num_labels}), got {indices.min()}..{indices.max()}"
            )
        hits = self._hits(ids, indptr, indices)  # (B, k) bool
        lengths = np.diff(indptr)  # (B,)
        self.num_samples += batch
        self._add_plain(hits, lengths)
        if self.inverse_propensity is not None:
            self._add_propensity_scored(ids, hits, indptr, indices, lengths)

    def _hits(self, ids: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """``(B, k)`` whether each prediction is one of its sample's labels (sorted-key membership)."""
        batch = ids.shape[0]
        row_of_label = np.repeat(np.arange(batch, dtype=np.int64), np.diff(indptr))
        truth = np.unique(row_of_label * self.num_labels + indices)  # (L,) sorted keys
        valid = (ids >= 0) & (ids < self.num_labels)
        keys = np.arange(batch, dtype=np.int64)[:, None] * self.num_labels + ids  # (B, k)
        where = np.searchsorted(truth, keys)
        found = truth[np.minimum(where, truth.size - 1)] == keys if truth.size else np.zeros_like(valid)
        return found & valid

    def _add_plain(self, hits: np.ndarray, lengths: np.ndarray) -> None:
        cumulative_hits = np.cumsum(hits, axis=1)  # (B, k)
        dcg = np.cumsum(hits * self._discount, axis=1)  # (B, k)
        ideal = np.concatenate([[0.0], np.cumsum(self._discount)])  # ideal[n]: DCG of n hits
        has_labels = lengths > 0
        self._add("accuracy", hits[:, 0].sum())
        for k in self.ks:
            self._add(f"P@{k}", cumulative_hits[:, k - 1].sum() / k)
            self._add(f"R@{k}", (cumulative_hits[:, k - 1][has_labels] / lengths[has_labels]).sum())
            best = ideal[np.minimum(lengths, k)]
            self._add(f"nDCG@{k}", (dcg[:, k - 1][has_labels] / best[has_labels]).sum())

    def _add_propensity_scored(self, ids, hits, indptr: np.ndarray, indices: np.ndarray, lengths) -> None:
        """Sums of propensity-weighted P@k and per-sample normalised DCG@k, and of their ideal values."""
        weight = np.where(hits, self.inverse_propensity[np.clip(ids, 0, self.num_labels - 1)], 0.0)  # (B, k)
        scored = np.cumsum(weight, axis=1)  # (B, k)
        scored_dcg = np.cumsum(weight * self._discount, axis=1)  # (B, k)
        # Ideal ranking: each sample's labels by decreasing 1 / p, the best k of them.
        batch = indptr.size - 1
        row = np.repeat(np.arange(batch, dtype=np.int64), np.diff(indptr))  # (L,)
        label_weight = self.inverse_propensity[indices]
        order = np.lexsort((-label_weight, row))
        rank = np.arange(order.size, dtype=np.int64) - indptr[row[order]]  # rank inside its sample
        ordered_weight, ordered_row = label_weight[order], row[order]
        unit_ideal = np.concatenate([[1.0], np.cumsum(self._discount)])  # [n]: DCG of n unit hits; 0 -> 1
        for k in self.ks:
            top = rank < k
            self._add(f"PSP@{k}", scored[:, k - 1].sum() / k)
            self._add(f"PSP@{k}:ideal", ordered_weight[top].sum() / k)
            ideal_dcg = np.bincount(
                ordered_row[top], weights=ordered_weight[top] * self._discount[rank[top]], minlength=batch
            )  # (B,)
            normaliser = unit_ideal[np.minimum(lengths, k)]  # (B,) Z_i; a sample without labels adds 0
            self._add(f"PSnDCG@{k}", (scored_dcg[:, k - 1] / normaliser).sum())
            self._add(f"PSnDCG@{k}:ideal", (ideal_dcg / normaliser).sum())

    def compute(self) -> dict[str, float]:
        """The metrics over all samples seen (``P@k``, ``nDCG@k``, ``R@k``, ``PSP@k``, ``PSnDCG@k``, ...)."""
        if self.num_samples == 0:
            raise ValueError("RankingMetrics.compute: no samples were added")
        out: dict[str, float] = {}
        for name in ("P", "nDCG", "R"):
            for k in self.ks:
                out[f"{name}@{k}"] = self._sums[f"{name}@{k}"] / self.num_samples
        if self.inverse_propensity is not None:
            for name in ("PSP", "PSnDCG"):
                for k in self.ks:
                    ideal = self._sums[f"{name}@{k}:ideal"]
                    out[f"{name}@{k}"] = self._sums[f"{name}@{k}"] / ideal if ideal > 0 else 0.0
        out["accuracy"] = self._sums["accuracy"] / self.num_samples
        return out
