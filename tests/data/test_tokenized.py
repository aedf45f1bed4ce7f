"""Token ids: tokenised once and cached (reused, invalidated), dynamic padding, length-bucketed batches."""

import os

import numpy as np
import pytest
import torch

import megaclass.data.tokenized as tokenized
from megaclass.data.loaders import BatchLoader, open_dataset
from megaclass.data.tokenized import TokenIds, bucket_order, open_token_dataset, token_cache_path
from megaclass.errors import DataFormatError


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the tokeniser pass."""
    calls = []
    original = tokenized.tokenize_texts

    def counting(texts, tokenizer, **kwargs):
        calls.append(len(texts))
        return original(texts, tokenizer, **kwargs)

    monkeypatch.setattr(tokenized, "tokenize_texts", counting)
    return calls


def test_ids_match_the_tokenizer(write_text_data, tmp_path, tokenizer):
    write_text_data(tmp_path)
    data = open_token_dataset(tmp_path / "train.txt", tokenizer, max_length=8, progress=False)
    assert data.num_classes == 6 and data.multilabel and data.input_spec.kind == "tokens"
    assert data.input_spec.num_features == len(tokenizer)
    for row in (0, 5, 63):
        want = tokenizer(data.texts[row], truncation=True, max_length=8)["input_ids"]
        got = data.tokens.ids[data.tokens.indptr[row] : data.tokens.indptr[row + 1]].tolist()
        assert got == want, f"row {row}"
    assert data.lengths.max() <= 8


def test_cache_reused_and_invalidated(
    write_text_data, tmp_path, tokenizer, tiny_tokenizer_dir, counted, monkeypatch
):
    write_text_data(tmp_path)
    path = tmp_path / "train.txt"
    first = open_token_dataset(path, tokenizer, max_length=12, progress=False)
    assert counted == [64] and token_cache_path(path, tokenizer, max_length=12)[0].is_file()
    again = open_token_dataset(path, tokenizer, max_length=12, progress=False)
    assert counted == [64], "the cache was not reused"
    assert np.array_equal(first.tokens.ids, again.tokens.ids)
    # another maximum length: another cache
    open_token_dataset(path, tokenizer, max_length=6, progress=False)
    assert counted == [64, 64]
    # another tokenizer (lower-casing off): another cache
    from transformers import BertTokenizerFast

    cased = BertTokenizerFast(vocab_file=os.path.join(tiny_tokenizer_dir, "vocab.txt"), do_lower_case=False)
    assert token_cache_path(path, cased, max_length=12) != token_cache_path(path, tokenizer, max_length=12)
    open_token_dataset(path, cased, max_length=12, progress=False)
    assert counted == [64, 64, 64]
    # the source changes: tokenised again, and the new ids are right
    write_text_data(tmp_path, n_train=30, seed=1)
    os.utime(path, ns=(1, 1))
    changed = open_token_dataset(path, tokenizer, max_length=12, progress=False)
    assert counted[-1] == 30 and len(changed) == 30
    want = tokenizer(changed.texts[0], truncation=True, max_length=12)["input_ids"]
    assert changed.tokens.ids[: changed.tokens.indptr[1]].tolist() == want


def test_cache_falls_back_to_cache_dir(write_text_data, tmp_path, tokenizer, counted, monkeypatch):
    write_text_data(tmp_path / "data")
    path = tmp_path / "data" / "train.txt"
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "cache"))
    beside, fallback = token_cache_path(path, tokenizer, max_length=10)
    beside.mkdir()  # the cache cannot be written beside the data
    open_token_dataset(path, tokenizer, max_length=10, progress=False)
    assert fallback.is_file() and fallback.parent == tmp_path / "cache"
    open_token_dataset(path, tokenizer, max_length=10, progress=False)
    assert counted == [64]


def test_cache_off(write_text_data, tmp_path, tokenizer, counted):
    write_text_data(tmp_path)
    for _ in range(2):
        open_token_dataset(tmp_path / "train.txt", tokenizer, max_length=10, cache=False, progress=False)
    assert counted == [64, 64]
    assert not any(name.endswith(".cache.npz") and ".tok-" in name for name in os.listdir(tmp_path))


@pytest.mark.parametrize("rows", [[0], [2, 0, 1], [3, 3], [1, 2, 3, 0]])
def test_dynamic_padding(rows):
    tokens = TokenIds(np.array([5, 6, 7, 8, 9, 10], dtype=np.uint16), np.array([0, 3, 3, 4, 6]), pad_id=0)
    inputs = tokens.pad(np.array(rows))
    lengths = [3, 0, 1, 2]
    width = max(max(lengths[r] for r in rows), 1)
    assert inputs.input_ids.shape == (len(rows), width) and inputs.input_ids.dtype == torch.int64
    for i, r in enumerate(rows):
        row = tokens.ids[tokens.indptr[r] : tokens.indptr[r + 1]].tolist()
        assert inputs.input_ids[i].tolist() == row + [0] * (width - len(row))
        assert inputs.attention_mask[i].tolist() == [1] * len(row) + [0] * (width - len(row))


@pytest.mark.parametrize("count,batch_size", [(1, 4), (37, 4), (64, 8), (100, 7)])
def test_bucket_order(count, batch_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=count)
    order = rng.permutation(count)
    arranged = bucket_order(order, lengths, batch_size, seed=(3, 1), pool_batches=4)
    assert sorted(arranged.tolist()) == list(range(count))
    assert np.array_equal(arranged, bucket_order(order, lengths, batch_size, seed=(3, 1), pool_batches=4))
    full = count // batch_size
    # the partial batch stays last, so drop_last drops only it
    tail = arranged[full * batch_size :]
    pools = [set(order[s : s + 4 * batch_size].tolist()) for s in range(0, count, 4 * batch_size)]
    assert any(set(tail.tolist()) <= pool for pool in pools) or tail.size == 0
    # each batch is a run of the length-sorted pool: padding is less than in file order
    batches = arranged[: full * batch_size].reshape(full, batch_size)
    if full > 1:
        padded = sum(lengths[b].max() * batch_size for b in batches)
        plain = sum(
            lengths[order[i * batch_size : (i + 1) * batch_size]].max() * batch_size for i in range(full)
        )
        assert padded < plain


def test_loader_buckets_training_batches_only(write_text_data, tmp_path, tokenizer):
    write_text_data(tmp_path, n_train=50)
    data = open_dataset(tmp_path / "train.txt", tokenizer=tokenizer, max_length=16)
    train = BatchLoader(data, batch_size=8, seed=1)
    epoch = train.epoch_rows(2)
    assert [len(b) for b in epoch] == [8] * 6 + [2]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(50))
    assert all(np.array_equal(a, b) for a, b in zip(epoch, train.epoch_rows(2), strict=True))
    plain = BatchLoader(data, batch_size=8, shuffle=False)
    assert np.concatenate(plain.epoch_rows(0)).tolist() == list(range(50))  # evaluation keeps file order
    batch = next(iter(train.epoch(2)))
    assert batch.inputs.input_ids.shape[1] == data.lengths[epoch[0]].max()


def test_bow_file_is_refused(tmp_path, tokenizer):
    path = tmp_path / "train_bow.txt"
    path.write_text("2 3 2\n0 1:0.5\n1 2:1.0\n")
    with pytest.raises(DataFormatError, match="labels<TAB>text"):
        open_token_dataset(path, tokenizer, max_length=8)


def test_token_ids_of_a_file_that_names_its_labels(tmp_path, tokenizer):
    """A text file whose lines name their labels reads as token ids with the names' ids, and its test file
    by the training file's names, as the featurised path reads them."""
    (tmp_path / "train.txt").write_text("python,devel\ta python library\nweb\ta web server\n")
    (tmp_path / "test.txt").write_text("web\ta server\n")
    train = open_dataset(str(tmp_path / "train.txt"), tokenizer=tokenizer, max_length=8)
    assert train.label_names == ["devel", "python", "web"] and train.labels.to_lists() == [[1, 0], [2]]
    test = open_dataset(
        str(tmp_path / "test.txt"),
        tokenizer=tokenizer,
        max_length=8,
        num_classes=3,
        label_names=train.label_names,
    )
    assert test.labels.to_lists() == [[2]] and test.input_spec == train.input_spec
