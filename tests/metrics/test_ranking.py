"""Ranking metrics against hand-computed cases and a per-sample plain-Python reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megaclass.data.xmc import CSR
from megaclass.metrics.ranking import RankingMetrics, propensity
from megaclass.targets import RaggedLabels


def _reference(
    topk: list[list[int]], truth: list[list[int]], ks, inverse_propensity=None
) -> dict[str, float]:
    """Per-sample definitions, summed in Python (PS metrics as ratios of sums to the ideal ranking's; each
    sample's PSDCG divided by its unit-gain IDCG first, as pyxclib's ``psndcg``)."""
    out: dict[str, float] = {}
    n = len(topk)
    out["accuracy"] = sum(pred[0] in set(y) for pred, y in zip(topk, truth, strict=True)) / n
    for k in ks:
        precision = recall = ndcg = 0.0
        ps = ps_ideal = psdcg = psdcg_ideal = 0.0
        for pred, labels in zip(topk, truth, strict=True):
            y = set(labels)
            hits = [label in y for label in pred[:k]]
            precision += sum(hits) / k
            if y:
                recall += sum(hits) / len(y)
                dcg = sum(hit / math.log2(rank + 2) for rank, hit in enumerate(hits))
                ndcg += dcg / sum(1 / math.log2(rank + 2) for rank in range(min(k, len(y))))
            if inverse_propensity is not None:
                gains = [
                    inverse_propensity[label] if hit else 0.0 for label, hit in zip(pred, hits, strict=False)
                ]
                ps += sum(gains) / k
                best = sorted((inverse_propensity[label] for label in y), reverse=True)[:k]
                ps_ideal += sum(best) / k
                unit = sum(1 / math.log2(rank + 2) for rank in range(min(k, len(y)))) or 1.0
                psdcg += sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains)) / unit
                psdcg_ideal += sum(gain / math.log2(rank + 2) for rank, gain in enumerate(best)) / unit
        out[f"P@{k}"], out[f"R@{k}"], out[f"nDCG@{k}"] = precision / n, recall / n, ndcg / n
        if inverse_propensity is not None:
            out[f"PSP@{k}"] = ps / ps_ideal if ps_ideal else 0.0
            out[f"PSnDCG@{k}"] = psdcg / psdcg_ideal if psdcg_ideal else 0.0
    return out


def test_hand_computed_case() -> None:
    metrics = RankingMetrics(num_labels=6, ks=(1, 3))
    topk = np.array([[0, 1, 2], [3, 4, 5], [5, 0, 1]])
    truth = RaggedLabels.from_lists([[1, 2], [4], []])
    metrics.update(topk, truth)
    result = metrics.compute()
    # Sample 0: hits at ranks 2, 3; sample 1: hit at rank 2; sample 2 has no labels (counts as 0).
    assert result["P@1"] == 0.0 and result["accuracy"] == 0.0
    assert result["P@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert result["R@3"] == pytest.approx((1 + 1 + 0) / 3)
    dcg0 = 1 / math.log2(3) + 1 / math.log2(4)
    idcg0 = 1 + 1 / math.log2(3)
    assert result["nDCG@3"] == pytest.approx((dcg0 / idcg0 + (1 / math.log2(3)) / 1 + 0) / 3)
    assert "PSP@1" not in result


def test_hand_computed_propensity_case() -> None:
    p = np.array([0.5, 0.25, 1.0, 0.1])
    metrics = RankingMetrics(num_labels=4, ks=(1, 2), propensities=p)
    truth = CSR(np.array([0, 2, 3]), np.array([3, 2, 1], dtype=np.int32), None, num_columns=4)  # {3, 2}, {1}
    metrics.update(np.array([[2, 3], [1, 0]]), truth)
    result = metrics.compute()
    # PSP@1: hits 2 (1/p = 1) and 1 (1/p = 4) -> 5; ideal: 3 (10) and 1 (4) -> 14.
    assert result["PSP@1"] == pytest.approx(5 / 14)
    # PSP@2: (1 + 10) / 2 + 4 / 2 over (10 + 1) / 2 + 4 / 2.
    assert result["PSP@2"] == pytest.approx((11 / 2 + 4 / 2) / (11 / 2 + 4 / 2))
    # PSnDCG@2: each sample's PSDCG over its unit-gain IDCG (2 labels: 1 + 1/log2(3); 1 label: 1) first.
    unit = 1 + 1 / math.log2(3)
    scored = (1 + 10 / math.log2(3)) / unit + 4 / 1
    ideal = (10 + 1 / math.log2(3)) / unit + 4 / 1
    assert result["PSnDCG@2"] == pytest.approx(scored / ideal)


def _pyxclib_psndcg(topk: np.ndarray, truth: np.ndarray, inverse_propensity: np.ndarray, k: int):
    """pyxclib's ``psndcg`` (xclib.evaluation.xc_metrics) in its own dense-matrix form, for ``1..k``.

    ``truth`` is the ``(N, C)`` 0/1 label matrix; the ideal ranking takes each row's top-k of ``truth * w``
    (padding weighs 0); each row's DCG is divided by ``min(IDCG of |y| unit hits, IDCG of k unit hits)``
    before the mean, and the metric is the mean for the predictions over the mean for the ideal ranking.
    """
    weights = np.append(inverse_propensity, 0.0)
    padded = np.hstack([truth, np.zeros((truth.shape[0], 1))])
    weighted = padded * weights
    ideal = np.argsort(-weighted, axis=1, kind="stable")[:, :k]
    ideal = np.where(np.take_along_axis(weighted, ideal, axis=1) > 0, ideal, truth.shape[1])

    def flags(ids):
        return np.take_along_axis(padded, ids, axis=1) * weights[ids]

    positives = truth.sum(axis=1).astype(int)
    cumulative = np.cumsum(1 / np.log2(np.arange(1, max(positives.max(), k) + 1) + 1))
    n = cumulative[positives - 1]

    def ndcg(eval_flags):
        dcg = np.cumsum(eval_flags / np.log2(np.arange(k) + 2), axis=1)
        return np.array([np.mean(dcg[:, j] / np.minimum(n, cumulative[j])) for j in range(k)])

    return ndcg(flags(topk[:, :k])) / ndcg(flags(ideal))


def test_psndcg_matches_pyxclib_formula() -> None:
    """A hand example where the per-sample normalisation matters (samples with 1 and 4 labels)."""
    inverse_propensity = np.array([1.0, 2.0, 5.0, 1.5, 3.0, 8.0])
    truth_lists = [[2], [0, 1, 3, 4], [5, 1], []]
    topk = np.array([[2, 0, 1], [1, 5, 0], [0, 1, 5], [3, 4, 2]])
    truth = np.zeros((len(truth_lists), 6))
    for row, labels in enumerate(truth_lists):
        truth[row, labels] = 1
    metrics = RankingMetrics(6, ks=(1, 2, 3), propensities=1 / inverse_propensity)
    metrics.update(topk, RaggedLabels.from_lists(truth_lists))
    result = metrics.compute()
    expected = _pyxclib_psndcg(topk, truth, inverse_propensity, 3)
    for k in (1, 2, 3):
        assert result[f"PSnDCG@{k}"] == pytest.approx(expected[k - 1], rel=1e-12), k
    # The ratio of plain PSDCG sums (no per-sample normaliser) differs here: the test can tell them apart.
    discount = 1 / np.log2(np.arange(3) + 2)
    hits = np.take_along_axis(truth, topk, axis=1) * inverse_propensity[topk]
    best = -np.sort(-(truth * inverse_propensity), axis=1)[:, :3]
    assert abs((hits * discount).sum() / (best * discount).sum() - result["PSnDCG@3"]) > 1e-3


@pytest.mark.parametrize("num_labels", [1, 7, 1000])
@pytest.mark.parametrize("batches", [1, 3])
@pytest.mark.parametrize("with_propensity", [False, True])
def test_matches_reference_streaming(num_labels: int, batches: int, with_propensity: bool) -> None:
    rng = np.random.default_rng(num_labels + batches)
    ks = (1, 2, 5)
    samples = 37
    truth = [
        sorted(rng.choice(num_labels, rng.integers(0, min(num_labels, 6) + 1), replace=False).tolist())
        for _ in range(samples)
    ]
    # Predictions overlap the truth often; -1 pads and is never a hit.
    topk = []
    for labels in truth:
        pool = list(dict.fromkeys(labels + rng.integers(0, num_labels, 8).tolist()))
        rng.shuffle(pool)
        topk.append((pool + [-1] * 5)[:5])
    counts = np.bincount([label for row in truth for label in row], minlength=num_labels)
    p = propensity(counts, samples) if with_propensity else None
    metrics = RankingMetrics(num_labels, ks=ks, propensities=p)
    for part in np.array_split(np.arange(samples), batches):
        rows = [truth[i] for i in part]
        metrics.update(torch.tensor([topk[i] for i in part]), RaggedLabels.from_lists(rows))
    expected = _reference(topk, truth, ks, None if p is None else 1 / p)
    result = metrics.compute()
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_class_ids_targets_give_accuracy() -> None:
    metrics = RankingMetrics(num_labels=5, ks=(1, 3))
    metrics.update(torch.tensor([[1, 2, 3], [0, 4, 2], [3, 1, 0]]), torch.tensor([1, 2, 4]))
    result = metrics.compute()
    assert result["accuracy"] == result["P@1"] == pytest.approx(1 / 3)
    assert result["R@3"] == pytest.approx(2 / 3)
    metrics.reset()
    metrics.update(np.array([[4, 0, 1]]), np.array([4]))
    assert metrics.compute()["accuracy"] == 1.0 and metrics.num_samples == 1


def test_propensity_formula() -> None:
    counts = np.array([0, 1, 10, 1000])
    n = 5000
    c = (math.log(n) - 1) * (1.5 + 1) ** 0.55
    expected = [1 / (1 + c * (count + 1.5) ** -0.55) for count in counts]
    np.testing.assert_allclose(propensity(counts, n), expected, rtol=1e-12)
    assert np.all(np.diff(propensity(counts, n)) > 0)
    np.testing.assert_allclose(
        propensity(counts, n, a=0.6, b=2.6)[0], 1 / (1 + (math.log(n) - 1) * 3.6**0.6 * 2.6**-0.6)
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.update(np.zeros((2, 2), dtype=int), np.array([0, 1])), "k >= 3"),
        (lambda m: m.update(np.zeros((2, 3), dtype=int), np.array([0])), "1 samples"),
        (lambda m: m.update(np.zeros((1, 3), dtype=int), np.array([9])), "label ids"),
        (lambda m: m.update(np.zeros((1, 3), dtype=int), np.zeros((1, 2))), "class ids"),
        (lambda m: m.compute(), "no samples"),
    ],
)
def test_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(RankingMetrics(num_labels=4, ks=(1, 3)))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="num_labels"):
        RankingMetrics(0)
    with pytest.raises(ValueError, match="ks"):
        RankingMetrics(3, ks=(0,))
    with pytest.raises(ValueError, match="propensities"):
        RankingMetrics(3, propensities=np.ones(2))
