"""Data sources: format sniffing, batches against the file, seeded resumable order, sharding, workers."""

import gzip

import numpy as np
import pytest
import torch

from megaclass.data.batch import InputSpec
from megaclass.data.featurizer import FeaturizerConfig
from megaclass.data.loaders import BatchLoader, SparseDataset, detect_format, open_dataset
from megaclass.data.verification_bin import save_verification_bin
from megaclass.errors import DataFormatError
from megaclass.targets import RaggedLabels

_BOW = "5 6 4\n0,2 1:0.5 4:0.25\n3 0:1\n 2:0.5\n1,2,3 5:0.125 1:0.5\n1\n"
_TEXT = "0\tfirst text\n2\tsecond text here\n1\tthird\n2\tfourth text\n"


@pytest.fixture
def bow(tmp_path):
    path = tmp_path / "data.txt.gz"
    with gzip.open(path, "wt") as file:
        file.write(_BOW)
    return str(path)


def _dense_rows(dataset: SparseDataset, rows) -> np.ndarray:
    csr = dataset.features.take(np.asarray(rows))
    dense = np.zeros((len(rows), dataset.input_spec.num_features), dtype=np.float32)
    for row in range(len(rows)):
        for position in range(csr.indptr[row], csr.indptr[row + 1]):
            dense[row, csr.indices[position]] += csr.data[position]
    return dense


def test_formats_are_detected(tmp_path, bow):
    text = tmp_path / "text.txt"
    text.write_text(_TEXT)
    assert detect_format(bow) == "xmc-bow" and detect_format(str(text)) == "xmc-text"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataFormatError, match="empty.txt:1: empty file"):
        detect_format(str(tmp_path / "empty.txt"))
    (tmp_path / "odd.txt").write_text("hello world\n")
    with pytest.raises(DataFormatError, match="odd.txt:1: unknown format: first line 'hello world' is"):
        detect_format(str(tmp_path / "odd.txt"))
    with pytest.raises(DataFormatError, match="no such file"):
        detect_format(str(tmp_path / "missing.txt"))
    pairs = str(tmp_path / "lfw.bin")  # a verification set given where data goes: told where it belongs
    save_verification_bin(pairs, [b"a", b"b"], [True])
    with pytest.raises(DataFormatError, match=r"lfw\.bin: a pickled face verification set .*verification"):
        detect_format(pairs)
    with pytest.raises(ValueError, match="data format 'csv'"):
        open_dataset(bow, data_format="csv")


@pytest.mark.parametrize("rows", [[0], [4, 2, 0], [3, 3, 1, 2], [2]])
def test_batch_matches_the_file(bow, rows):
    dataset = open_dataset(bow)
    assert (len(dataset), dataset.num_classes, dataset.multilabel) == (5, 4, True)
    assert dataset.input_spec == InputSpec(kind="sparse", num_features=6)
    batch = dataset.batch(np.array(rows))
    inputs = batch.inputs
    dense = torch.zeros(len(rows), 6)
    sample = torch.repeat_interleave(torch.arange(len(rows)), inputs.indptr.diff())
    dense.index_put_((sample, inputs.indices), inputs.weights, accumulate=True)
    np.testing.assert_array_equal(dense.numpy(), _dense_rows(dataset, rows))
    file_labels = [[0, 2], [3], [], [1, 2, 3], [1]]
    assert isinstance(batch.targets, RaggedLabels)
    assert batch.targets.to_lists() == [file_labels[r] for r in rows]
    np.testing.assert_array_equal(dataset.label_counts(), [1, 2, 2, 2])
    assert dataset.label_counts() is dataset.label_counts()  # counted once: one (C,) array a run holds


def test_one_label_data_gives_class_ids(tmp_path):
    path = tmp_path / "multiclass.txt"
    path.write_text("3 4 5\n4 0:1\n0 1:1\n2 3:0.5\n")
    dataset = open_dataset(str(path))
    assert not dataset.multilabel
    targets = dataset.batch(np.array([2, 0])).targets
    assert targets.dtype == torch.int64 and targets.tolist() == [2, 4]


def test_text_data_goes_through_a_featurizer(tmp_path):
    train_path, test_path = tmp_path / "train.txt", tmp_path / "test.txt"
    train_path.write_text(_TEXT)
    test_path.write_text("1\tsecond text\n")
    train = open_dataset(str(train_path), featurizer_config=None)
    assert train.featurizer is not None and train.input_spec.kind == "sparse"
    test = open_dataset(str(test_path), num_classes=train.num_classes, featurizer=train.featurizer)
    assert test.input_spec == train.input_spec and test.num_classes == 3
    assert test.batch(np.array([0])).inputs.indices.numel() > 0


def test_texts_with_no_n_gram_in_min_df_of_them_are_refused_by_name(tmp_path):
    path = tmp_path / "few.txt"
    path.write_text("0\tqx\n1\tzv\n")  # no word or character n-gram in two texts
    with pytest.raises(DataFormatError, match=r"few.txt: no word or character n-gram is in 2 of its 2 texts"):
        open_dataset(str(path), featurizer_config=None)
    assert open_dataset(str(path), featurizer_config=FeaturizerConfig(min_df=1)).input_spec.num_features > 0


@pytest.mark.parametrize("count", [1, 7, 64])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_order_is_seeded_and_complete(count, batch_size, drop_last):
    dataset = list(range(count))
    loader = BatchLoader(dataset, batch_size=batch_size, seed=3, drop_last=drop_last)
    epoch0 = loader.epoch_rows(0)
    assert len(epoch0) == loader.steps_per_epoch()
    assert all(len(rows) <= batch_size for rows in epoch0)
    flat = np.concatenate(epoch0)
    if not drop_last or count < batch_size:
        assert sorted(flat.tolist()) == dataset
    again = BatchLoader(dataset, batch_size=batch_size, seed=3, drop_last=drop_last).epoch_rows(0)
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, again, strict=True)), (
        "same seed, epoch: same order"
    )
    if count > 5:
        assert not np.array_equal(np.concatenate(loader.epoch_rows(1)), flat), "each epoch reshuffles"


@pytest.mark.parametrize(("count", "world_size"), [(10, 2), (11, 3), (2, 4)])
def test_shards_cover_every_row(count, world_size):
    shards = [
        np.concatenate(
            BatchLoader(list(range(count)), batch_size=2, rank=rank, world_size=world_size).epoch_rows(5)
        )
        for rank in range(world_size)
    ]
    assert len({len(shard) for shard in shards}) == 1, "every rank gets as many rows"
    assert set(np.concatenate(shards).tolist()) == set(range(count))


def test_resume_mid_epoch_and_workers_give_the_same_batches(bow):
    dataset = open_dataset(bow)
    loader = BatchLoader(dataset, batch_size=2, seed=1)
    full = [batch.targets.to_lists() for batch in loader.epoch(4)]
    assert [batch.targets.to_lists() for batch in loader.epoch(4, start_step=1)] == full[1:]
    workers = BatchLoader(dataset, batch_size=2, seed=1, num_workers=1)
    assert [batch.targets.to_lists() for batch in workers.epoch(4)] == full


def test_loader_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader([1], batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader([1], batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no rows"):
        BatchLoader([], batch_size=1)
