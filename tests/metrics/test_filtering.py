"""Filter files: (document, label) pairs removed from predictions and targets before ranking metrics."""

import numpy as np
import pytest
import torch

from megaclass.errors import DataFormatError
from megaclass.metrics.filtering import LabelFilter, read_filter_labels
from megaclass.metrics.ranking import RankingMetrics
from megaclass.targets import RaggedLabels


def _reference(ids, targets, pairs, first_row, k):
    """Row by row with Python sets."""
    banned = {(int(d), int(l)) for d, l in pairs}
    out_ids, out_targets = [], []
    for b, (row, labels) in enumerate(zip(ids.tolist(), targets.to_lists(), strict=True)):
        doc = first_row + b
        kept = [i for i in row if (doc, i) not in banned][:k]
        out_ids.append(kept + [-1] * (k - len(kept)))
        out_targets.append([label for label in labels if (doc, label) not in banned])
    return out_ids, out_targets


@pytest.mark.parametrize("first_row", [0, 3])
@pytest.mark.parametrize("k", [1, 3])
def test_apply_matches_reference(first_row, k):
    rng = np.random.default_rng(0)
    classes, batch = 9, 6
    ids = torch.stack([torch.randperm(classes)[: k + 2] for _ in range(batch)])  # (B, k + 2)
    targets = RaggedLabels.from_lists(
        [sorted(rng.choice(classes, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(batch)]
    )
    pairs = np.array(
        [[first_row + b, int(ids[b, j])] for b in range(batch) for j in range(2) if (b + j) % 2 == 0]
        + [[first_row + 1, int(l)] for l in targets.to_lists()[1]]
    )
    label_filter = LabelFilter.from_pairs(pairs, num_classes=classes)
    got_ids, got_targets = label_filter.apply(ids, targets, first_row=first_row, k=k)
    want_ids, want_targets = _reference(ids, targets, pairs, first_row, k)
    assert got_ids.tolist() == want_ids and got_targets.to_lists() == want_targets


def test_filtered_metrics(tmp_path):
    path = tmp_path / "filter_labels_test.txt"
    path.write_text("0 4\n1 2\n\n")
    label_filter = read_filter_labels(path, num_classes=5)
    assert label_filter.max_per_doc == 1
    ids = torch.tensor([[4, 1], [2, 0]])  # each row's best prediction is a filtered self-link
    targets = RaggedLabels.from_lists([[4, 1], [0]])
    kept_ids, kept_targets = label_filter.apply(ids, targets, first_row=0, k=1)
    metrics = RankingMetrics(5, ks=(1,))
    metrics.update(kept_ids, kept_targets)
    assert metrics.compute()["P@1"] == 1.0


@pytest.mark.parametrize(
    "text,problem", [("0\n", "doc_id label_id"), ("0 x\n", "doc_id label_id"), ("1 7\n", "range")]
)
def test_bad_filter_file(tmp_path, text, problem):
    path = tmp_path / "filter.txt"
    path.write_text("0 1\n" + text)
    with pytest.raises(DataFormatError, match=problem) as error:
        read_filter_labels(path, num_classes=5)
    assert ":2:" in str(error.value)


def test_doc_ids_past_the_test_rows_are_refused(tmp_path):
    path = tmp_path / "filter.txt"
    path.write_text("0 1\n3 2\n")  # the last row's id is in range
    label_filter = read_filter_labels(path, num_classes=5, num_documents=4, documents="--test t.txt")
    assert label_filter.keys.tolist() == [1, 17]
    path.write_text("0 1\n9999 3\n")
    with pytest.raises(DataFormatError) as error:
        read_filter_labels(path, num_classes=5, num_documents=600, documents="--test t.txt")
    assert str(error.value) == (
        f"{path}:2: doc id 9999 out of range: --test t.txt has 600 rows (doc ids 0 to 599)"
    )


def test_unreadable_filter_files_name_the_file_in_plain_words(tmp_path):
    with pytest.raises(DataFormatError) as error:
        read_filter_labels(tmp_path / "none.txt", num_classes=5)
    assert str(error.value) == f"{tmp_path / 'none.txt'}: cannot read (No such file or directory)"
    (tmp_path / "bytes.txt").write_bytes(b"0 1\n\xff\xfe 2\n")
    with pytest.raises(DataFormatError, match=r"bytes.txt:2: expected 'doc_id label_id'") as error:
        read_filter_labels(tmp_path / "bytes.txt", num_classes=5)
    assert "b'" not in str(error.value)
