"""Face verification metrics: k-fold accuracy and TAR at a fixed FAR, by InsightFace's protocol.

Embeddings are L2-normalised and a pair's distance is the squared Euclidean distance (``2 - 2 cos``, in
``[0, 4]``); a pair is called "same" when its distance is below a threshold. With ``k`` contiguous folds, each
fold's threshold is the one (on a 0.01 grid over ``[0, 4)``) with the best accuracy on the other ``k - 1``
folds, and the fold's accuracy is measured at it; the report is the mean and standard deviation over folds.
TAR@FAR: on the other folds, the largest threshold accepting at most ``FAR * negatives`` impostor pairs; the
fold's true accept rate at it.

>>> rng = np.random.default_rng(0)
>>> people = rng.normal(size=(20, 8))
>>> pairs = np.stack([people[[i, i if i < 10 else i - 10]] for i in range(20)]).reshape(40, 8)
>>> result = evaluate_verification(pairs + 0.01 * rng.normal(size=(40, 8)), np.arange(20) < 10)
>>> result.accuracy
1.0
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["VerificationResult", "evaluate_verification", "fold_slices", "pair_distances"]


@dataclass(frozen=True)
class VerificationResult:
    """Verification numbers over ``P`` pairs (accuracies and rates are fractions in ``[0, 1]``).

    Attributes:
        accuracy: mean test-fold accuracy; ``accuracy_std`` its standard deviation over folds.
        threshold: mean of the folds' best distance thresholds.
        tar: mean test-fold true accept rate at the threshold for ``far_target`` (over folds holding genuine
            pairs); ``tar_std`` over the same folds.
        far: mean test-fold false accept rate actually reached at those thresholds.
        fold_accuracies: the accuracy of each fold.
        impostors_per_fold: mean impostor pairs a test fold holds; a fold measures FAR in steps of one over
            it, so a ``far_target`` below that step cannot be met or checked on these pairs.
    """

    num_pairs: int
    folds: int
    accuracy: float
    accuracy_std: float
    threshold: float
    far_target: float
    tar: float
    tar_std: float
    far: float
    fold_accuracies: tuple[float, ...]
    impostors_per_fold: float

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fold_accuracies"] = list(self.fold_accuracies)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self, name: str = "") -> str:
        """One line: ``name: accuracy 99.50% +- 0.30%, threshold 1.420, TAR@FAR=1e-03 97.10% +- ...``.

        Where the FAR reached is above the one asked, the line says so, and says when the pairs are too few
        to measure the asked FAR at all.
        """
        prefix = f"{name}: " if name else ""
        reached = f"FAR reached {100 * self.far:.3f}%"
        if self.far > self.far_target:
            reached += f", above the {100 * self.far_target:.3f}% asked"
        if self.far_target * self.impostors_per_fold < 1:
            reached += (
                f"; a fold's {self.impostors_per_fold:.3g} impostor pairs measure FAR in steps of "
                f"{100 / max(self.impostors_per_fold, 1):.3g}%, too coarse for the FAR asked"
            )
        return (
            f"{prefix}accuracy {100 * self.accuracy:.2f}% +- {100 * self.accuracy_std:.2f}% "
            f"({self.folds}-fold, {self.num_pairs} pairs), threshold {self.threshold:.3f}, "
            f"TAR@FAR={self.far_target:.0e} {100 * self.tar:.2f}% +- {100 * self.tar_std:.2f}% ({reached})"
        )


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """``(P,)`` squared distances between the L2-normalised rows ``2i`` and ``2i + 1`` of ``(2P, D)``."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"embeddings: expected (2P, D), got shape {embeddings.shape}")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if not np.all(np.isfinite(embeddings)) or np.any(norms == 0):
        raise ValueError("embeddings: every row must be finite and non-zero to be L2-normalised")
    unit = embeddings / norms
    pairs = unit.reshape(-1, 2, unit.shape[1])  # (P, 2, D)
    return np.sum(np.square(pairs[:, 0] - pairs[:, 1]), axis=1)


def fold_slices(count: int, folds: int) -> list[np.ndarray]:
    """Contiguous folds of ``range(count)``; the first ``count % folds`` get one more (as sklearn's KFold)."""
    return np.array_split(np.arange(count), folds)


def evaluate_verification(
    embeddings: np.ndarray,
    issame: np.ndarray,
    *,
    folds: int = 10,
    far_target: float = 1e-3,
    thresholds: np.ndarray | None = None,
) -> VerificationResult:
    """Verification accuracy and TAR@FAR of ``(2P, D)`` embeddings against ``(P,)`` same-person flags.

    Args:
        embeddings: ``(2P, D)`` rows ``2i`` and ``2i + 1`` form pair ``i``; normalised here.
        issame: ``(P,)`` bool.
        folds: ``k`` of the k-fold protocol (10 for LFW and friends).
        far_target: the false accept rate TAR is reported at.
        thresholds: candidate distance thresholds for accuracy; default ``arange(0, 4, 0.01)``.
    """
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    distances = pair_distances(embeddings)
    if distances.size != issame.size:
        raise ValueError(f"issame: {issame.size} flags for {distances.size} pairs of embeddings")
    if not 2 <= folds <= issame.size:
        raise ValueError(f"folds: expected 2 <= folds <= pairs ({issame.size}), got {folds}")
    if not 0 < far_target < 1:
        raise ValueError(f"far_target: expected a value in (0, 1), got {far_target}")
    grid = np.arange(0.0, 4.0, 0.01) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    # correct[t, p]: whether threshold t classifies pair p right
    correct = (distances[None, :] < grid[:, None]) == issame[None, :]  # (T, P)
    accuracies, best, tars, fars = [], [], [], []
    test_folds = fold_slices(issame.size, folds)
    for test in test_folds:
        train = np.ones(issame.size, dtype=bool)
        train[test] = False
        chosen = grid[int(np.argmax(correct[:, train].mean(axis=1)))]
        best.append(chosen)
        accuracies.append(float(np.mean((distances[test] < chosen) == issame[test])))
        threshold = _far_threshold(distances[train], issame[train], far_target)
        tar, far = _rates(distances[test], issame[test], threshold)
        tars.append(tar)
        fars.append(far)
    return VerificationResult(
        num_pairs=int(issame.size),
        folds=folds,
        accuracy=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        threshold=float(np.mean(best)),
        far_target=far_target,
        tar=float(np.nanmean(tars)) if not np.all(np.isnan(tars)) else 0.0,
        tar_std=float(np.nanstd(tars)) if not np.all(np.isnan(tars)) else 0.0,
        far=float(np.mean(fars)),
        fold_accuracies=tuple(accuracies),
        impostors_per_fold=float(np.mean([(~issame[test]).sum() for test in test_folds])),
    )


def _far_threshold(distances: np.ndarray, issame: np.ndarray, far_target: float) -> float:
    """The largest threshold ``t`` with ``#(impostor distance < t) <= far_target * #impostors``."""
    impostors = np.sort(distances[~issame])
    allowed = math.floor(far_target * impostors.size)
    if impostors.size == 0:
        return math.inf
    return float(impostors[allowed]) if allowed < impostors.size else math.inf


def _rates(distances: np.ndarray, issame: np.ndarray, threshold: float) -> tuple[float, float]:
    """``(TAR, FAR)`` of calling pairs below ``threshold`` the same person (TAR NaN without genuine pairs)."""
    accept = distances < threshold
    genuine, impostor = issame.sum(), (~issame).sum()
    tar = float(accept[issame].sum() / genuine) if genuine else math.nan
    far = float(accept[~issame].sum() / impostor) if impostor else 0.0
    return tar, far
