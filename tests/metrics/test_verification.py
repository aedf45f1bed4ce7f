import json
import math

import numpy as np
import pytest
from sklearn.model_selection import KFold

from megaclass.metrics.verification import evaluate_verification, pair_distances


def reference_protocol(embeddings, issame, folds, far_target):
    """InsightFace's ``calculate_roc`` accuracy and TAR@FAR by brute force over thresholds, plainly."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distance = np.array([np.sum((unit[2 * i] - unit[2 * i + 1]) ** 2) for i in range(len(issame))])
    thresholds = np.arange(0, 4, 0.01)
    accuracies, best, tars = [], [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(np.arange(len(issame))):
        train_acc = [np.mean((distance[train] < t) == issame[train]) for t in thresholds]
        chosen = thresholds[int(np.argmax(train_acc))]
        best.append(chosen)
        accuracies.append(np.mean((distance[test] < chosen) == issame[test]))
        candidates = sorted(set(distance[train].tolist()) | {math.inf, 0.0})
        negatives = max((~issame[train]).sum(), 1)
        ok = [
            t for t in candidates if ((distance[train] < t) & ~issame[train]).sum() / negatives <= far_target
        ]
        threshold = max(ok)
        positives = issame[test].sum()
        if positives:
            tars.append(((distance[test] < threshold) & issame[test]).sum() / positives)
    return np.mean(accuracies), np.std(accuracies), np.mean(best), np.mean(tars) if tars else 0.0


@pytest.mark.parametrize("pairs", [10, 61, 300])
@pytest.mark.parametrize("dim", [1, 7, 128])
@pytest.mark.parametrize("folds", [2, 10])
@pytest.mark.parametrize("far_target", [1e-3, 0.1])
@pytest.mark.parametrize("noise", [0.3, 1.5])
def test_matches_reference_protocol(pairs, dim, folds, far_target, noise):
    rng = np.random.default_rng(pairs * dim + folds)
    issame = rng.random(pairs) < 0.5
    anchors = rng.normal(size=(pairs, dim))
    others = np.where(
        issame[:, None], anchors + noise * rng.normal(size=(pairs, dim)), rng.normal(size=(pairs, dim))
    )
    embeddings = np.stack([anchors, others], axis=1).reshape(2 * pairs, dim) * rng.uniform(
        0.5, 3, (2 * pairs, 1)
    )
    result = evaluate_verification(embeddings, issame, folds=folds, far_target=far_target)
    accuracy, std, threshold, tar = reference_protocol(embeddings, issame, folds, far_target)
    assert result.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert result.accuracy_std == pytest.approx(std, abs=1e-12)
    assert result.threshold == pytest.approx(threshold, abs=1e-12)
    assert result.tar == pytest.approx(tar, abs=1e-12)
    assert len(result.fold_accuracies) == folds and result.num_pairs == pairs


def test_perfect_and_hopeless_embeddings():
    rng = np.random.default_rng(0)
    people = rng.normal(size=(40, 16))
    same = np.stack([people[:20], people[:20] + 1e-3]).transpose(1, 0, 2)  # (20, 2, 16)
    different = np.stack([people[20:30], people[30:40]]).transpose(1, 0, 2)  # (10, 2, 16)
    order = np.argsort(np.arange(30) % 3, kind="stable")  # spread the 10 impostor pairs over the folds
    embeddings = np.concatenate([same, different])[np.argsort(order)].reshape(60, 16)
    issame = (np.arange(30) < 20)[np.argsort(order)]
    result = evaluate_verification(embeddings, issame, folds=5)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0 and result.tar == 1.0
    flipped = evaluate_verification(embeddings, ~issame, folds=5)
    assert flipped.accuracy == pytest.approx(2 / 3)  # no better than calling every pair "different"


def test_distances_are_squared_l2_of_unit_rows():
    embeddings = np.array([[3.0, 0.0], [0.0, 5.0], [1.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(pair_distances(embeddings), [2.0, 0.0], atol=1e-12)


@pytest.mark.parametrize(
    "embeddings, issame, kwargs, message",
    [
        (np.ones((5, 3)), np.ones(2, bool), {}, r"expected \(2P, D\)"),
        (np.ones((4, 3)), np.ones(3, bool), {}, "3 flags for 2 pairs"),
        (np.vstack([np.zeros(3), np.ones((3, 3))]), np.ones(2, bool), {"folds": 2}, "non-zero"),
        (np.ones((4, 3)), np.ones(2, bool), {"folds": 10}, "folds"),
        (np.ones((8, 3)), np.ones(4, bool), {"folds": 2, "far_target": 0.0}, "far_target"),
    ],
    ids=["odd-rows", "count", "zero-row", "folds", "far"],
)
def test_bad_arguments(embeddings, issame, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_verification(embeddings, issame, **kwargs)


def test_text_and_json_output():
    rng = np.random.default_rng(1)
    result = evaluate_verification(rng.normal(size=(40, 4)), rng.random(20) < 0.5, folds=4)
    text = result.format("lfw")
    assert text.startswith("lfw: accuracy ") and "4-fold, 20 pairs" in text and "TAR@FAR=1e-03" in text
    data = json.loads(result.to_json())
    assert data["accuracy"] == result.accuracy and len(data["fold_accuracies"]) == 4


def test_the_line_says_when_the_pairs_cannot_measure_the_far_asked():
    rng = np.random.default_rng(2)
    issame = np.arange(20) % 2 == 0  # 10 impostor pairs, 2.5 a fold of 4
    embeddings = rng.normal(size=(40, 4))
    few = evaluate_verification(embeddings, issame, folds=4, far_target=1e-3)
    assert few.impostors_per_fold == 2.5
    coarse = "a fold's 2.5 impostor pairs measure FAR in steps of 40%, too coarse for the FAR asked"
    assert coarse in few.format()
    assert (f"FAR reached {100 * few.far:.3f}%, above the 0.100% asked" in few.format()) == (few.far > 1e-3)
    enough = evaluate_verification(embeddings, issame, folds=4, far_target=0.5)
    assert "too coarse" not in enough.format()
    assert ("above the 50.000% asked" in enough.format()) == (enough.far > 0.5)
