"""TextFeaturizer against a pure-Python reference (the documented hash, string loops) and scikit-learn."""

from __future__ import annotations

import math
import pickle
import re
from collections import Counter

import numpy as np
import pytest
import torch

from megaclass.data import featurizer as featurizer_module
from megaclass.data.featurizer import FeaturizerConfig, TextFeaturizer, featurizer_threads, ngram_hash
from megaclass.schema import ConfigError

TEXTS = [
    "usr/share/doc/libfoo-dev/README.Debian",
    "Hello, World! hello world",
    "",
    "   ",
    "a",
    "x y z",
    "Ünïcode wörds and ÜNÏ",
    "line\nbreak inside",
    "tab\tseparated\twords  double  space",
    "usr/lib/python3/dist-packages/foo/__init__.py",
    "AAAA aaaa AaAa",
]


def _word_tokens(text: bytes) -> list[bytes]:
    return re.findall(rb"[A-Za-z0-9\x80-\xff]+", text)


def _char_wb(text: bytes, min_n: int, max_n: int) -> list[bytes]:
    """scikit-learn's ``_char_wb_ngrams`` loop, on bytes."""
    grams = []
    for word in text.split():
        padded = b" " + word + b" "
        for n in range(min_n, max_n + 1):
            offset = 0
            grams.append(padded[offset : offset + n])
            while offset + n < len(padded):
                offset += 1
                grams.append(padded[offset : offset + n])
            if offset == 0:
                break
    return grams


def _reference_ids(text: str, config: FeaturizerConfig) -> list[int]:
    data = text.encode("utf-8")
    if config.lowercase:
        data = data.lower()  # ASCII only, as documented
    ids = []
    if config.word_ngrams is not None:
        words = _word_tokens(data)
        for n in range(config.word_ngrams[0], config.word_ngrams[1] + 1):
            ids.extend(ngram_hash("word", words[i : i + n]) for i in range(len(words) - n + 1))
    if config.char_ngrams is not None:
        ids.extend(ngram_hash("char", [gram]) for gram in _char_wb(data, *config.char_ngrams))
    return ids


def _reference(
    train: list[str], test: list[str], config: FeaturizerConfig
) -> tuple[list[dict[int, float]], int]:
    """TF-IDF rows as {column: value} dicts, built with Counters."""
    train_ids = [_reference_ids(text, config) for text in train]
    if config.n_features is not None:
        column_of = lambda key: key % config.n_features  # noqa: E731
        width = config.n_features
        df = Counter(column for ids in train_ids for column in {column_of(key) for key in ids})
        idf = lambda column: math.log((1 + len(train)) / (1 + df.get(column, 0))) + 1  # noqa: E731
    else:
        df = Counter(key for ids in train_ids for key in set(ids))
        tf_total = Counter(key for ids in train_ids for key in ids)
        kept = [key for key in df if df[key] >= config.min_df]
        if config.max_features is not None:
            kept = sorted(kept, key=lambda key: (-tf_total[key], key))[: config.max_features]
        vocabulary = {key: column for column, key in enumerate(sorted(kept))}
        column_of = vocabulary.get
        width = len(vocabulary)
        weights = {vocabulary[key]: math.log((1 + len(train)) / (1 + df[key])) + 1 for key in kept}
        idf = weights.__getitem__
    out = []
    for text in test:
        counts = Counter(column_of(key) for key in _reference_ids(text, config))
        counts.pop(None, None)
        row = {}
        for column, tf in counts.items():
            value = 1 + math.log(tf) if config.sublinear_tf else tf
            row[column] = value * (idf(column) if config.idf else 1.0)
        norm = math.sqrt(sum(value * value for value in row.values()))
        if config.norm and norm > 0:
            row = {column: value / norm for column, value in row.items()}
        out.append(row)
    return out, width


def _as_dicts(rows) -> list[dict[int, float]]:
    out = []
    for columns, start in zip(rows.to_lists(), rows.indptr[:-1], strict=True):
        assert columns == sorted(set(columns)), "column ids sorted and unique"
        out.append(dict(zip(columns, rows.data[start : start + len(columns)].tolist(), strict=True)))
    return out


def _dense(rows) -> np.ndarray:
    out = np.zeros((len(rows), rows.num_columns))
    for row, (columns, start) in enumerate(zip(rows.to_lists(), rows.indptr[:-1], strict=True)):
        out[row, columns] = rows.data[start : start + len(columns)]
        assert columns == sorted(set(columns)), "column ids sorted and unique"
    return out


CONFIGS = [
    FeaturizerConfig(word_ngrams=(1, 2), char_ngrams=None, min_df=1),
    FeaturizerConfig(word_ngrams=None, char_ngrams=(3, 5), min_df=1),
    FeaturizerConfig(word_ngrams=(2, 3), char_ngrams=(1, 2), min_df=2, max_features=25),
    FeaturizerConfig(word_ngrams=(1, 1), char_ngrams=(4, 4), lowercase=False, sublinear_tf=False, idf=False),
    FeaturizerConfig(word_ngrams=(1, 2), char_ngrams=(3, 4), n_features=37, norm=False),
    FeaturizerConfig(word_ngrams=(1, 1), char_ngrams=None, n_features=1 << 20, idf=False),
]


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    """Chunks featurised on one thread, or on three whose results are combined in order."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("chunk_bytes", [1 << 22, 16])
def test_matches_python_reference(
    config: FeaturizerConfig, chunk_bytes: int, threads: int, monkeypatch
) -> None:
    monkeypatch.setattr(featurizer_module, "_CHUNK_BYTES", chunk_bytes)  # 16: many chunks, one text each
    monkeypatch.setattr(featurizer_module, "_MERGE_ENTRIES", chunk_bytes // 4)  # and merges of count tables
    train, test = TEXTS, TEXTS[::-1] + ["unseen words only", "hello"]
    featurizer = TextFeaturizer(config).fit(train)
    rows = featurizer.transform(test)
    expected, width = _reference(train, test, config)
    assert rows.num_columns == width == featurizer.num_features
    assert len(rows) == len(test) and rows.data.dtype == np.float32 and rows.indices.dtype == np.int32
    for row, (got, want) in enumerate(zip(_as_dicts(rows), expected, strict=True)):
        assert got.keys() == want.keys(), f"row {row}: columns differ"
        for column, value in want.items():
            assert got[column] == pytest.approx(value, rel=1e-6), f"row {row}, column {column}"


def test_matches_scikit_learn_char_wb_and_words() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    rng = np.random.default_rng(0)
    parts = ["usr", "share", "doc", "lib", "python3", "foo", "bar", "x", "README", "a-b_c"]
    texts = [
        "/".join(rng.choice(parts, rng.integers(1, 6))) + rng.choice(["", ".html", " 1.2 x"])
        for _ in range(300)
    ]
    cases = [
        (
            FeaturizerConfig(word_ngrams=None, char_ngrams=(2, 4), min_df=2, max_features=None),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True),
        ),
        (
            FeaturizerConfig(word_ngrams=(1, 2), char_ngrams=None, min_df=1, max_features=None),
            TfidfVectorizer(token_pattern=r"[a-z0-9]+", ngram_range=(1, 2), sublinear_tf=True),
        ),
    ]
    for config, vectorizer in cases:
        ours = TextFeaturizer(config).fit(texts)
        theirs = vectorizer.fit(texts)
        names = theirs.get_feature_names_out()
        kind = "word" if config.word_ngrams else "char"
        ids = [
            ngram_hash(
                kind, [part.encode() for part in name.split(" ")] if kind == "word" else [name.encode()]
            )
            for name in names
        ]
        columns = np.searchsorted(ours.vocabulary, ids)
        np.testing.assert_array_equal(ours.vocabulary[columns], ids)  # the same vocabulary
        expected = theirs.transform(texts).toarray()
        got = _dense(ours.transform(texts))[:, columns]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_state_round_trip_and_pickle() -> None:
    config = FeaturizerConfig(word_ngrams=(1, 2), char_ngrams=(3, 3), min_df=1)
    featurizer = TextFeaturizer(config).fit(TEXTS)
    state = featurizer.state_dict()
    assert set(state) == {"config", "vocabulary", "idf", "num_documents"}
    assert state["vocabulary"].dtype == np.int64 and state["idf"].dtype == np.float32
    as_tensors = {
        **state,
        "vocabulary": torch.from_numpy(state["vocabulary"]),
        "idf": torch.from_numpy(state["idf"]),
    }
    for restored in (TextFeaturizer.from_state(as_tensors), pickle.loads(pickle.dumps(featurizer))):
        a, b = featurizer.transform(TEXTS), restored.transform(TEXTS)
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.data, b.data)
        assert restored.config == config


def test_unfitted_and_bad_configs() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        TextFeaturizer().transform(["x"])
    with pytest.raises(ValueError, match="no texts"):
        TextFeaturizer().fit([])
    for bad in (
        {"word_ngrams": (2, 1)},
        {"char_ngrams": (0, 3)},
        {"word_ngrams": None, "char_ngrams": None},
        {"n_features": 0},
        {"min_df": 0},
        {"max_features": 0},
    ):
        with pytest.raises(ConfigError):
            FeaturizerConfig(**bad)


def test_empty_vocabulary_gives_empty_rows() -> None:
    featurizer = TextFeaturizer(FeaturizerConfig(word_ngrams=(1, 1), char_ngrams=None, min_df=5)).fit(
        ["a", "b"]
    )
    rows = featurizer.transform(["a b", ""])
    assert rows.num_columns == 0 and rows.nnz == 0 and len(rows) == 2


def test_featurizer_threads_follow_torch_up_to_the_cap():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert featurizer_threads() == 1
        torch.set_num_threads(3)
        assert featurizer_threads() == 3
        torch.set_num_threads(64)  # each chunk at work holds many times its text: never 64 at once
        assert featurizer_threads() == featurizer_module._MAX_THREADS == 8
    finally:
        torch.set_num_threads(before)
