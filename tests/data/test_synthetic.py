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
