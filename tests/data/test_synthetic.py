"""Synthetic data: valid files in both formats, deterministic, power-law labels, planted clusters, any C."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from megaclass.cli import main
from megaclass.data.synthetic import SynthConfig, synthesize, write_label_names
from megaclass.data.xmc import load_xmc, read_label_names


@pytest.mark.parametrize("num_labels", [1, 17, 10**7])
@pytest.mark.parametrize("fmt", ["bow", "text"])
def test_files_are_valid(tmp_path, num_labels: int, fmt: str) -> None:
    path = tmp_path / ("data.txt.gz" if fmt == "text" else "data.txt")
    synthesize(path, num_docs=300, num_labels=num_labels, num_features=500, format=fmt, seed=3)
    data = load_xmc(path, num_labels=num_labels, cache=False)
    assert len(data) == 300 and data.num_labels == num_labels and data.format == fmt
    assert data.labels.row_lengths().min() >= 1
    assert data.labels.indices.max() < num_labels
    if fmt == "bow":
        assert data.num_features == 500
        norms = np.sqrt(np.bincount(data.features.row_ids(), weights=data.features.data.astype(float) ** 2))
        np.testing.assert_allclose(norms, 1, atol=1e-5)
    else:
        assert all(word.startswith("w") and int(word[1:]) < 500 for word in data.texts[0].split())


def test_deterministic_by_seed_and_stream(tmp_path) -> None:
    paths = {}
    for name, seed, stream in [("a", 0, 0), ("b", 0, 0), ("c", 1, 0), ("d", 0, 1)]:
        paths[name] = tmp_path / f"{name}.txt"
        synthesize(paths[name], num_docs=200, num_labels=1000, seed=seed, stream=stream)
    assert filecmp.cmp(paths["a"], paths["b"], shallow=False)
    assert not filecmp.cmp(paths["a"], paths["c"], shallow=False)
    assert not filecmp.cmp(paths["a"], paths["d"], shallow=False)


def test_power_law_and_clusters(tmp_path) -> None:
    path = tmp_path / "big.txt"
    config = SynthConfig(labels_per_doc=3.0, cluster_size=8)
    synthesize(path, num_docs=8000, num_labels=2000, num_features=20_000, seed=0, config=config)
    data = load_xmc(path, cache=False)
    counts = np.sort(data.labels.column_counts())[::-1]
    assert 2.0 < data.labels.nnz / len(data) < 3.2
    # Zipf: the top label is far more frequent than the median one; many labels are rare.
    assert counts[0] > 50 * max(counts[len(counts) // 2], 1)
    assert counts[:50].sum() > 0.2 * counts.sum()
    # Planted clusters: extra labels mostly share the first label's cluster.
    rows = data.labels.to_lists()
    pairs = [(row[i], row[j]) for row in rows for i in range(len(row)) for j in range(i + 1, len(row))]
    same = np.mean([a // 8 == b // 8 for a, b in pairs])
    assert same > 0.5
    # Learnable: two documents of one label share far more features than two random documents.
    label = int(np.argmax(data.labels.column_counts()))
    with_label = [i for i, row in enumerate(rows) if label in row][:40]
    features = data.features.to_lists()
    overlap = lambda a, b: len(set(features[a]) & set(features[b]))  # noqa: E731
    within = np.mean([overlap(a, b) for a, b in zip(with_label[:-1], with_label[1:], strict=True)])
    across = np.mean([overlap(a, b) for a, b in zip(range(0, 80, 2), range(1, 80, 2), strict=True)])
    assert within > 2 * across + 1


def test_multiclass_config(tmp_path) -> None:
    path = tmp_path / "mc.txt"
    synthesize(path, num_docs=500, num_labels=50, format="text", config=SynthConfig(labels_per_doc=1))
    data = load_xmc(path, num_labels=50, cache=False)
    assert not data.multilabel


@pytest.mark.parametrize(
    "kwargs",
    [{"num_docs": 0}, {"num_labels": -1}, {"num_features": 0}, {"format": "csv"}, {"num_docs": 1.5}],
)
def test_bad_arguments(tmp_path, kwargs) -> None:
    options = {"num_docs": 10, "num_labels": 10, **kwargs}
    with pytest.raises(ValueError):
        synthesize(tmp_path / "x.txt", **options)


def test_bad_config() -> None:
    with pytest.raises(ValueError):
        SynthConfig(labels_per_doc=0.5)
    with pytest.raises(ValueError):
        SynthConfig(label_word_share=0.8, cluster_word_share=0.5)


def test_cli_synth_text_writes_label_names(tmp_path, capsys) -> None:
    out = tmp_path / "synth"
    code = main(["data", "synth", str(out), "--num-labels", "300", "--num-docs", "100", "--format", "text"])
    assert code == 0 and "wrote 100 documents" in capsys.readouterr().out
    assert read_label_names(out / "test.txt")[-1] == "L299"
    assert load_xmc(out / "test.txt", cache=False).num_labels == 300
    assert len(load_xmc(out / "train.txt", cache=False)) == 100
    write_label_names(tmp_path / "labels.txt", 3)
    assert (tmp_path / "labels.txt").read_text() == "L0\nL1\nL2\n"


def test_group_words_plant_the_upper_level_of_the_hierarchy(tmp_path) -> None:
    # Every word from the labels' groups: documents of one group draw from its words_per_group words only.
    config = SynthConfig(
        labels_per_doc=1, label_word_share=0, cluster_word_share=0, group_word_share=1, words_per_group=32
    )
    path = tmp_path / "groups.txt"
    synthesize(path, num_docs=3000, num_labels=640, num_features=50_000, seed=2, config=config)
    data = load_xmc(path, cache=False)
    group_of_doc = data.labels.indices // (config.cluster_size * config.group_size)  # one label a document
    vocabularies = [
        set(data.features.take(np.flatnonzero(group_of_doc == group)).indices.tolist()) for group in range(5)
    ]
    assert all(0 < len(words) <= 32 for words in vocabularies)
    assert all(not vocabularies[a] & vocabularies[b] for a in range(5) for b in range(a + 1, 5))


def test_planted_labels_are_learnable_far_above_the_prior(tmp_path) -> None:
    import torch

    from megaclass.data.xmc import label_features

    sets = []
    for stream, docs in enumerate((6000, 1000)):
        path = tmp_path / f"{stream}.txt"
        synthesize(path, num_docs=docs, num_labels=1000, num_features=20_000, seed=5, stream=stream)
        sets.append(load_xmc(path, num_labels=1000, cache=False))
    train, test = sets
    centroids = torch.from_numpy(label_features(train.features, train.labels, dim=None))  # (C, F)
    rows = test.features
    dense = torch.zeros(len(rows), rows.num_columns)
    dense[torch.from_numpy(rows.row_ids()), torch.from_numpy(rows.indices.astype(np.int64))] = (
        torch.from_numpy(rows.data)
    )
    top = (dense @ centroids.T).argmax(dim=1).numpy()  # (N,) the nearest label centroid
    precision = np.mean([label in row for label, row in zip(top, test.labels.to_lists(), strict=True)])
    prior = test.labels.column_counts().max() / len(test)  # P@1 of always answering the most frequent label
    assert precision > 0.5 and precision > 4 * prior, (precision, prior)


def test_cli_synth_bow_has_a_header(tmp_path, capsys) -> None:
    out = tmp_path / "synth"
    args = ["data", "synth", str(out), "--num-labels", "5000", "--num-docs", "200", "--num-features", "3000"]
    assert main(args) == 0
    assert (out / "train_bow.txt").read_text().split("\n", 1)[0] == "200 3000 5000"
    test = load_xmc(out / "test_bow.txt", cache=False)
    assert (len(test), test.num_features, test.num_labels) == (40, 3000, 5000)
