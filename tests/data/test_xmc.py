"""XMC readers and writers against a plain-Python parser; bad input names its line; caches; PIFA features."""

from __future__ import annotations

import gzip
import os
import stat
import warnings

import numpy as np
import pytest
import torch

from megaclass.data import xmc
from megaclass.data.xmc import (
    CSR,
    XMCData,
    label_features,
    load_xmc,
    read_bow,
    read_label_names,
    read_rows,
    read_text,
    write_bow,
    write_text,
)
from megaclass.errors import DataFormatError, LabelOutOfRange


def _python_bow(text: str) -> tuple[list[list[int]], list[dict[int, float]], tuple[int, int, int]]:
    """Reference parser: one line at a time, with str.split."""
    lines = text.split("\n")
    header = tuple(int(field) for field in lines[0].split())
    body = lines[1 : 1 + header[0]]
    labels, features = [], []
    for line in body:
        fields = line.replace("\t", " ").split(" ")
        first = fields[0] if fields and ":" not in fields[0] else ""
        labels.append([int(label) for label in first.split(",")] if first else [])
        pairs = [field.split(":") for field in fields[1 if first or not fields[0] else 0 :] if field]
        features.append({int(key): float(value) for key, value in pairs})
    return labels, features, header


def _random_data(rng: np.random.Generator, rows: int, num_labels: int, num_features: int) -> XMCData:
    label_rows = [
        sorted(rng.choice(num_labels, rng.integers(0, 4), replace=False).tolist()) for _ in range(rows)
    ]
    feature_rows = [np.sort(rng.choice(num_features, rng.integers(0, 6), replace=False)) for _ in range(rows)]
    values = [rng.random(row.size).astype(np.float32) * rng.choice([1, 100, 1e-3]) for row in feature_rows]
    values = [np.round(v, 6).astype(np.float32) for v in values]

    def csr(rows_: list, data: list | None, width: int) -> CSR:
        indptr = np.concatenate([[0], np.cumsum([len(row) for row in rows_])]).astype(np.int64)
        flat = np.concatenate([np.asarray(row, dtype=np.int32) for row in rows_]) if rows_ else np.zeros(0)
        values_ = None if data is None else np.concatenate(data).astype(np.float32)
        return CSR(indptr, flat.astype(np.int32), values_, width)

    texts = [
        " ".join(f"w{i}" for i in row) + (" Ünï" if i % 3 == 0 else "") for i, row in enumerate(feature_rows)
    ]
    return XMCData(
        "memory", csr(label_rows, None, num_labels), csr(feature_rows, values, num_features), texts
    )


@pytest.mark.parametrize("rows", [1, 7, 130])
@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_bow_round_trip_matches_python_parser(tmp_path, rows: int, suffix: str) -> None:
    data = _random_data(np.random.default_rng(rows), rows, num_labels=11, num_features=29)
    path = tmp_path / f"data{suffix}"
    write_bow(path, data)
    read = read_bow(path, cache=False)
    raw = gzip.open(path, "rt").read() if suffix.endswith(".gz") else path.read_text()
    labels, features, header = _python_bow(raw)
    assert header == (rows, 29, 11)
    assert read.labels.to_lists() == labels == data.labels.to_lists()
    assert read.features.to_lists() == [list(row) for row in features]
    expected_values = np.array([value for row in features for value in row.values()], dtype=np.float32)
    np.testing.assert_array_equal(read.features.data, expected_values)
    np.testing.assert_allclose(read.features.data, data.features.data, rtol=1e-6, atol=5e-7)
    assert read.labels.indices.dtype == np.int32 and read.labels.indptr.dtype == np.int64
    assert read.features.data.dtype == np.float32


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_text_round_trip(tmp_path, suffix: str) -> None:
    data = _random_data(np.random.default_rng(0), 50, num_labels=9, num_features=13)
    path = tmp_path / f"data{suffix}"
    write_text(path, data)
    read = read_text(path, num_labels=9, cache=False)
    assert read.texts == data.texts
    assert read.labels.to_lists() == data.labels.to_lists()
    assert read.num_features == 0 and read.format == "text" and read.features is None


def test_odd_but_valid_lines(tmp_path) -> None:
    path = tmp_path / "odd.txt"
    path.write_bytes(b"5 6 4\r\n0,3 1:0.5 5:2e-1\r\n 2:1\n\n3\n2:-0.25\t4:1.\n")
    data = load_xmc(path, cache=False)
    assert data.format == "bow" and data.multilabel
    assert data.labels.to_lists() == [[0, 3], [], [], [3], []]
    assert data.features.to_lists() == [[1, 5], [2], [], [], [2, 4]]
    np.testing.assert_allclose(data.features.data, [0.5, 0.2, 1, -0.25, 1])
    text = tmp_path / "odd_text.txt"
    text.write_bytes(b"1\tA b\r\n\tno labels\n2,0\t\n3\ttabs\tinside")
    data = load_xmc(text, cache=False)
    assert data.texts == ["A b", "no labels", "", "tabs\tinside"]
    assert data.labels.to_lists() == [[1], [], [2, 0], [3]]
    assert data.num_labels == 4


BAD_BOW = [
    ("3 5\n0 1:1\n", 1, "header"),
    ("x 5 4\n0 1:1\n", 1, "header"),
    ("3 5 4\n0 1:1\n1 2:1\n", 3, "3 documents"),
    ("1 5 4\n0 1:1\n1 2:1\n", 3, "1 documents"),
    ("2 5 4\n0 1:1\n4 2:1\n", 3, "label id 4 out of range"),
    ("2 5 4\n0 1:1\n3 5:1\n", 3, "feature id 5 out of range"),
    ("2 5 4\n0 1:1\n3 2:\n", 3, "malformed"),
    ("2 5 4\n0 1:1\n3 :2\n", 3, "malformed"),
    ("2 5 4\n0 1:1\n3 2:0.5:1\n", 3, "malformed"),
    ("2 5 4\n0 1:1\n3 2\n", 3, "malformed"),
    ("2 5 4\n0 1:1\n1:1 3\n", 3, "malformed"),
    ("2 5 4\n0 1:1\n3 a:1\n", 3, "'a'"),
    ("2 5 4\n0 1:1\n3 1:x\n", 3, "'x'"),
    ("2 5 4\n0 1:1\n3 1:1.2.3\n", 3, "'1.2.3'"),
    ("2 5 4\n0 1:1\n3 1:nan\n", 3, "'nan'"),
    ("2 5 4\n0 1:1\nx 1:1\n", 3, "'x'"),
    ("2 5 4\n0 1:1\n1,,2 1:1\n", 3, "malformed"),
    ("2 5 4\n0 1:1\n1.5 1:1\n", 3, "'1.5'"),
    ("2 5 4\n0 1:1\n-1 1:1\n", 3, "'-1'"),
    ("2 5 4\n0 1:1\n18446744073709551616 1:1\n", 3, "label id 18446744073709551616 too large"),
    ("2 5 4\n0 1:1\n1 9223372036854775808:1\n", 3, "feature id 9223372036854775808 too large"),
    ("2 5 4\n0 1:1e400\n1 1:1\n", 2, "'1e400' is not finite"),
    ("2 5 4\n0 1:1\n1 1:-1e309\n", 3, "'-1e309' is not finite"),
    ("2 5 4\n0 1:1e40\n1 1:1\n", 2, "feature value '1e40' is not finite as float32"),
    ("2 5 4\n0 1:1\n1 0:2 1:-3.5e38\n", 3, "'-3.5e38' is not finite as float32"),
    ("inf 5 4\n0 1:1\n", 1, "num_docs 'inf'"),
    ("2 inf 4\n0 1:1\n", 1, "num_features 'inf'"),
    ("2 5 100000000000\n0 1:1\n", 1, "num_labels 100000000000 out of range"),
    ("2 100000000000 4\n0 1:1\n", 1, "num_features 100000000000 out of range"),
    ("2 5 0\n0 1:1\n", 1, "num_labels 0 out of range"),
    ("10000000000000 5 4\n0 1:1\n", 1, "num_docs 10000000000000 out of range"),
]


@pytest.mark.parametrize(("content", "line", "words"), BAD_BOW)
def test_bad_bow_names_file_and_line(tmp_path, content: str, line: int, words: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DataFormatError) as caught:
        load_xmc(path, cache=False)
    assert caught.value.line == line and caught.value.path == str(path)
    assert words in caught.value.problem
    # a label past the space is its own kind, which the trainer words for --test files
    assert isinstance(caught.value, LabelOutOfRange) == ("label id" in words and "out of range" in words)


BAD_TEXT = [
    ("0,1\thello\nabc\n", 2, "no tab"),
    ("0,1\thello\n\n1\tagain\n", 2, "an empty line"),
    ("0,1\thello\n1,a\tabc\n", 2, "'1,a'"),
    ("0,1\thello\n1,\tabc\n", 2, "stray comma"),
    ("0\thello\n,1\tabc\n", 2, "stray comma"),
    ("0\thello\n-1\tabc\n", 2, "'-1'"),
    ("0\tok\n1\tok\n5\tabc\n", 3, "label id 5 out of range [0, 4)"),
    ("0\tok\n\xff\tbad\n", 2, "label ids"),
    ("0\tok\n18446744073709551616\tbad\n", 2, "label id 18446744073709551616 too large"),
]


@pytest.mark.parametrize(("content", "line", "words"), BAD_TEXT)
def test_bad_text_names_file_and_line(tmp_path, content: str, line: int, words: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataFormatError) as caught:
        read_text(path, num_labels=4, cache=False)
    assert caught.value.line == line and words in caught.value.problem


def test_invalid_utf8_text_names_line(tmp_path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"0\tok\n1\tok\n1\tbad \xff byte\n")
    with pytest.raises(DataFormatError) as caught:
        read_text(path, cache=False)
    assert caught.value.line == 3 and "UTF-8" in caught.value.problem


@pytest.mark.parametrize("content", [b"", b"\n\n", b"a b c d\n"])
def test_empty_or_unknown_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataFormatError) as caught:
        load_xmc(path, cache=False)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b"0 5 3\n", b"0 5 3"])
def test_header_only_file_has_no_rows(tmp_path, content: bytes) -> None:
    path = tmp_path / "none.txt"
    path.write_bytes(content)
    data = load_xmc(path, cache=False)
    assert len(data) == 0 and data.num_labels == 3 and data.num_features == 5 and data.features.nnz == 0


def test_corrupt_gzip_and_missing_file(tmp_path) -> None:
    path = tmp_path / "bad.txt.gz"
    path.write_bytes(gzip.compress(b"1 2 3\n0 1:1\n")[:-12])
    with pytest.raises(DataFormatError):
        read_bow(path, cache=False)
    with pytest.raises(FileNotFoundError):
        load_xmc(tmp_path / "missing.txt")


def test_num_labels_sources(tmp_path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("0\ta\n2\tb\n")
    assert read_text(path, cache=False).num_labels == 3  # max id + 1
    (tmp_path / "labels.txt").write_text("x\ny\nz\nw\n")
    assert read_text(path, cache=False).num_labels == 4
    assert read_label_names(path) == ["x", "y", "z", "w"]
    assert read_text(path, num_labels=7, cache=False).num_labels == 7
    with pytest.raises(ValueError, match="num_labels"):
        read_text(path, num_labels=0, cache=False)
    bow = tmp_path / "bow.txt"
    bow.write_text("1 3 2\n1 0:1\n")
    assert read_bow(bow, num_labels=5, cache=False).num_labels == 5
    assert read_label_names(tmp_path / "sub" / "x.txt") is None


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "data.txt"
    path.write_text("2 4 3\n0 1:0.5\n1,2 3:1\n")
    first = read_bow(path)
    cache = tmp_path / "data.txt.megaclass.npz"
    assert cache.is_file()
    assert read_bow(path).labels.to_lists() == first.labels.to_lists()
    path.write_text("2 4 3\n2 1:0.5\n0 3:1\n")  # same size, new content and mtime
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert read_bow(path).labels.to_lists() == [[2], [0]]


def test_a_cached_file_changed_to_overflow_float32_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "data.txt"
    path.write_text("2 4 3\n0 1:0.5\n1,2 3:1\n")
    assert read_bow(path).features.data.tolist() == [0.5, 1.0]
    assert (tmp_path / "data.txt.megaclass.npz").is_file()
    path.write_text("2 4 3\n0 1:1e40\n1,2 3:1\n")
    with pytest.raises(DataFormatError) as caught:
        read_bow(path)
    assert str(caught.value) == (
        f"{path}:2: feature value '1e40' is not finite as float32: expected a number of magnitude at most "
        "3.403e+38"
    )


def test_cache_falls_back_when_folder_is_read_only(tmp_path, monkeypatch) -> None:
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("MEGACLASS_CACHE", str(cache_dir))
    folder = tmp_path / "readonly"
    folder.mkdir()
    path = folder / "data.txt"
    path.write_text("0\tx y\n1\tz\n")
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert read_text(path).texts == ["x y", "z"]
        assert list(folder.iterdir()) == [path]
        assert len(list(cache_dir.glob("*.megaclass.npz"))) == 1
        assert read_text(path).texts == ["x y", "z"]
    finally:
        folder.chmod(stat.S_IRWXU)


def test_csr_take_row_lengths_and_counts() -> None:
    rng = np.random.default_rng(3)
    data = _random_data(rng, 40, num_labels=7, num_features=17)
    rows = np.array([5, 0, 39, 5, 12, 0])
    taken = data.features.take(rows)
    reference = [data.features.to_lists()[row] for row in rows]
    assert taken.to_lists() == reference
    bounds = data.features.indptr
    expected = np.concatenate([data.features.data[bounds[r] : bounds[r + 1]] for r in rows])
    np.testing.assert_array_equal(taken.data, expected)
    assert data.features.take(np.array([], dtype=np.int64)).nnz == 0
    counts = np.zeros(7, dtype=np.int64)
    for row in data.labels.to_lists():
        for label in row:
            counts[label] += 1
    np.testing.assert_array_equal(data.labels.column_counts(), counts)
    assert data.labels.row_lengths().tolist() == [len(row) for row in data.labels.to_lists()]
    assert len(data.labels.take(rows)) == rows.size


@pytest.mark.parametrize(
    "rows",
    [
        np.delete(np.arange(400), [3, 200, 201, 399]),  # a split's kept rows: long runs, copied as slices
        np.arange(0, 400, 2),  # no runs: gathered entry by entry
        np.arange(100, 300),  # one run
        np.concatenate([np.arange(50, 200), np.arange(0, 100)]),  # runs that repeat rows
    ],
    ids=["split", "no-runs", "one-run", "overlapping-runs"],
)
def test_csr_take_of_runs_of_rows_is_the_gather(rows) -> None:
    data = _random_data(np.random.default_rng(5), 400, num_labels=7, num_features=17)
    for matrix in (data.features, data.labels):
        taken = matrix.take(rows)
        bounds = matrix.indptr
        assert taken.to_lists() == [matrix.to_lists()[row] for row in rows]
        np.testing.assert_array_equal(taken.indptr[1:], np.cumsum(bounds[rows + 1] - bounds[rows]))
        if matrix.data is not None:
            expected = np.concatenate([matrix.data[bounds[r] : bounds[r + 1]] for r in rows])
            np.testing.assert_array_equal(taken.data, expected)
        else:
            assert taken.data is None


def test_multilabel_flag() -> None:
    one = CSR(np.arange(4, dtype=np.int64), np.array([2, 0, 1], dtype=np.int32), None, 3)
    assert not XMCData("x", one, None, ["a", "b", "c"]).multilabel
    two = CSR(np.array([0, 1, 1, 2]), np.array([2, 0], dtype=np.int32), None, 3)
    assert XMCData("x", two, None, ["a", "b", "c"]).multilabel


def _pifa_reference(features: CSR, labels: CSR) -> np.ndarray:
    dense = np.zeros((len(features), features.num_columns))
    for row, (columns, start) in enumerate(zip(features.to_lists(), features.indptr[:-1], strict=True)):
        for offset, column in enumerate(columns):
            dense[row, column] += features.data[start + offset]
    norms = np.linalg.norm(dense, axis=1, keepdims=True)
    dense = np.divide(dense, norms, out=np.zeros_like(dense), where=norms > 0)
    out = np.zeros((labels.num_columns, features.num_columns))
    for row, row_labels in enumerate(labels.to_lists()):
        for label in row_labels:
            out[label] += dense[row]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


@pytest.mark.parametrize("rows", [1, 33])
def test_label_features_exact_when_small(rows: int) -> None:
    data = _random_data(np.random.default_rng(rows), rows, num_labels=6, num_features=10)
    got = label_features(data.features, data.labels, dim=16)
    assert got.shape == (6, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, _pifa_reference(data.features, data.labels), atol=1e-6)
    unused = np.setdiff1d(np.arange(6), data.labels.indices)
    assert np.all(got[unused] == 0)


@pytest.mark.parametrize("dim", [None, 256])
def test_label_features_warn_of_nothing(dim) -> None:
    """The sparse products behind PIFA opt out of torch's invariant checks explicitly: torch versions that
    warn when the choice is left implicit (once a process, made "always" here) print nothing in a run."""
    data = _random_data(np.random.default_rng(4), 40, num_labels=6, num_features=500)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            label_features(data.features, data.labels, dim=dim)
    finally:
        torch.set_warn_always(warn_always)


def test_label_features_projection_preserves_geometry() -> None:
    data = _random_data(np.random.default_rng(9), 300, num_labels=20, num_features=500)
    exact = _pifa_reference(data.features, data.labels)
    projected = label_features(data.features, data.labels, dim=256, seed=1)
    assert projected.shape == (20, 256)
    np.testing.assert_array_equal(projected, label_features(data.features, data.labels, dim=256, seed=1))
    assert not np.array_equal(projected, label_features(data.features, data.labels, dim=256, seed=2))
    used = np.linalg.norm(exact, axis=1) > 0
    np.testing.assert_allclose(np.linalg.norm(projected[used], axis=1), 1, atol=1e-5)
    # Johnson-Lindenstrauss: cosines survive the projection up to ~ 3 / sqrt(dim).
    error = np.abs(projected[used] @ projected[used].T - exact[used] @ exact[used].T)
    assert error.max() < 0.25, error.max()
    assert error.mean() < 0.06, error.mean()


def test_label_features_bit_path_matches_dense_path(monkeypatch) -> None:
    data = _random_data(np.random.default_rng(4), 60, num_labels=9, num_features=300)
    dense = label_features(data.features, data.labels, dim=32, seed=5)
    monkeypatch.setattr(xmc, "_DENSE_PROJECTION_BYTES", 0)
    bits = label_features(data.features, data.labels, dim=32, seed=5)
    np.testing.assert_allclose(bits, dense, atol=1e-5)


def test_real_data_round_trip(repo_root, tmp_path) -> None:
    source = os.path.join(repo_root, "data", "deb-tags", "test_bow.txt.gz")
    data = read_bow(source, cache=False)
    assert (len(data), data.num_features, data.num_labels) == (5957, 7472, 595)
    write_bow(tmp_path / "copy.txt", data)
    again = read_bow(tmp_path / "copy.txt", cache=False)
    np.testing.assert_array_equal(again.features.indices, data.features.indices)
    np.testing.assert_array_equal(again.features.data, data.features.data)
    text = read_text(os.path.join(repo_root, "data", "deb-tags", "test.txt.gz"), cache=False)
    assert len(text) == 5957 and text.num_labels == 595
    np.testing.assert_array_equal(text.labels.indices, data.labels.indices)


@pytest.mark.parametrize("kind", ["bow", "text"])
def test_repeated_labels_are_dropped_with_one_warning(tmp_path, kind: str) -> None:
    """A label repeated on a line counts once (label counts, metric denominators); one warning per file."""
    if kind == "bow":
        content, first_line = "4 5 4\n0,2 1:1\n1,3,1,3 2:1\n2,2 0:1\n3 4:1\n", 3
    else:
        content, first_line = "0,2\ta\n1,3,1,3\tb\n2,2\tc\n3\td\n", 2
    path = tmp_path / "dup.txt"
    path.write_text(content)
    for cache in (False, True, True):  # parsed, cached, read from the cache: the same rows and warning
        with pytest.warns(UserWarning) as caught:
            data = load_xmc(path, num_labels=4, cache=cache)
        assert len(caught) == 1
        assert f"{path}:{first_line}: label 1 repeated" in str(caught[0].message)
        assert "2 line(s)" in str(caught[0].message)
        assert data.labels.to_lists() == [[0, 2], [1, 3], [2], [3]]
        assert data.labels.column_counts().tolist() == [1, 1, 2, 2]


def test_read_rows_takes_unlabelled_bow_and_text() -> None:
    bow = read_rows(b"3:0.5\n 1:2\n2,0 0:1 4:1\n", "<stdin>", num_labels=3, num_features=5)
    assert bow.labels.to_lists() == [[], [], [2, 0]] and bow.features.to_lists() == [[3], [1], [0, 4]]
    assert bow.features.data.tolist() == [0.5, 2.0, 1.0, 1.0]
    with_header = read_rows(b"2 5 3\n3:0.5\n1 0:1\n", "x.txt", num_labels=3, num_features=5)
    assert with_header.labels.to_lists() == [[], [1]] and with_header.features.to_lists() == [[3], [0]]
    text = read_rows(gzip.compress(b"bare words\n1,2\tlabelled\n\nlast"), "<stdin>", num_labels=3)
    assert text.texts == ["bare words", "labelled", "", "last"]
    assert text.labels.to_lists() == [[], [1, 2], [], []]


@pytest.mark.parametrize(
    ("raw", "features", "message"),
    [
        (b"3:0.5\n1 9:1\n", 5, "<stdin>:2: feature id 9 out of range [0, 5)"),
        (b"3:0.5\n7 1:1\n", 5, "<stdin>:2: label id 7 out of range [0, 3)"),
        (b"2 6 3\n3:0.5\n1 0:1\n", 5, "<stdin>:1: header says 6 features, expected the run's 5"),
        (b"ok\n9\ttext\n", None, "<stdin>:2: label id 9 out of range [0, 3)"),
        (b"3:0.5\n1 0:1 2:1e39\n", 5, "<stdin>:2: feature value '1e39' is not finite as float32"),
        (b"\n\n", None, "<stdin>: no rows"),
        (b"\x1f\x8bnot gzip", None, "<stdin>: corrupt gzip data"),
    ],
)
def test_read_rows_errors_name_the_line(raw: bytes, features, message: str) -> None:
    with pytest.raises(DataFormatError) as caught:
        read_rows(raw, "<stdin>", num_labels=3, num_features=features)
    assert str(caught.value).startswith(message)


def test_text_labels_given_by_name(tmp_path) -> None:
    """A file whose first labelled line names its labels is read by names: sorted into ids, spaces around a
    name dropped; its test files are read by its names."""
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("python,devel\ta library\n\tno labels\nweb\ta server\n python , web\tdjango\n")
    data = read_text(train, cache=False)
    assert data.label_names == ["devel", "python", "web"] and data.num_labels == 3
    assert data.labels.to_lists() == [[1, 0], [], [2], [1, 2]]
    test.write_text("web\tnginx\n2019\tdigits are a name here\n")
    with pytest.raises(DataFormatError) as caught:
        read_text(test, num_labels=3, label_names=data.label_names, cache=False)
    assert caught.value.line == 2
    assert "'2019' is not one of the 3 label names of the run" in caught.value.problem
    test.write_text("web\tnginx\npython,web\tflask\n")
    read = read_text(test, num_labels=3, label_names=data.label_names, cache=False)
    assert read.labels.to_lists() == [[2], [1, 2]] and read.label_names == data.label_names
    (tmp_path / "labels.txt").write_text("web\npython\ndevel\nperl\n")  # names beside the file: their ids
    beside = read_text(train, cache=False)
    assert beside.labels.to_lists() == [[1, 2], [], [0], [1, 0]] and beside.num_labels == 4
    for cached in range(2):  # parsed, then read back from the cache
        assert read_text(train).labels.to_lists() == beside.labels.to_lists(), cached


@pytest.mark.parametrize(
    ("content", "names", "line", "words"),
    [
        ("a,,b\tx\n", None, 1, "an empty label name in 'a,,b'"),
        ("a\tx\nb,\ty\n", None, 2, "an empty label name in 'b,'"),
        ("a\tx\nb \xff\ty\n", None, 2, "invalid UTF-8 in the label names"),
        ("a\tx\n", ["b"], 1, "'a' is not one of the 1 label names of the run"),
        ("0,1\tx\n", ["a", "b"], 1, "labels are ids, but the run's are names"),
    ],
)
def test_bad_label_names_name_file_and_line(tmp_path, content, names, line, words) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataFormatError) as caught:
        read_text(path, num_labels=None if names is None else len(names), label_names=names, cache=False)
    assert caught.value.line == line and words in caught.value.problem


def test_label_names_and_ids_do_not_mix(tmp_path) -> None:
    """An ids file with a name on a later line names it; a file of names in a run of ids is refused, and
    rows to predict on follow the run's labelling."""
    path = tmp_path / "ids.txt"
    path.write_text("0\tx\nweb\ty\n")
    with pytest.raises(DataFormatError, match="as on the file's first labelled line") as caught:
        read_text(path, cache=False)
    assert caught.value.line == 2
    path.write_text("\tbare\nweb\ty\n")
    with pytest.raises(DataFormatError, match="labels are names, but the run's are ids") as caught:
        read_text(path, num_labels=3, cache=False)  # a test file of a run trained on ids
    assert caught.value.line == 2
    rows = read_rows(b"web\tx\nbare\n", "<stdin>", num_labels=2, label_names=["python", "web"])
    assert rows.labels.to_lists() == [[1], []]
    with pytest.raises(DataFormatError, match="<stdin>:1: labels are names, but the run's are ids"):
        read_rows(b"web\tx\n", "<stdin>", num_labels=2)
    with pytest.raises(DataFormatError, match="<stdin>:2: labels are ids, but the run's are names"):
        read_rows(b"bare\n1\tx\n", "<stdin>", num_labels=2, label_names=["python", "web"])


def test_a_file_of_names_reads_as_its_file_of_ids(repo_root, tmp_path) -> None:
    """deb-tags' test texts with each id written as its name (its label file is sorted): the same rows."""
    folder = os.path.join(repo_root, "data", "deb-tags")
    with gzip.open(os.path.join(folder, "labels.txt.gz"), "rt") as file:
        names = file.read().splitlines()
    with gzip.open(os.path.join(folder, "test.txt.gz"), "rt") as file:
        lines = [line.split("\t", 1) for line in file]
    named = tmp_path / "test.txt"
    named.write_text(
        "".join(",".join(names[int(i)] for i in ids.split(",")) + "\t" + text for ids, text in lines)
    )
    by_ids = read_text(os.path.join(folder, "test.txt.gz"), cache=False)
    by_names = read_text(named, num_labels=len(names), label_names=names, cache=False)
    assert by_names.labels.to_lists() == by_ids.labels.to_lists() and by_names.texts == by_ids.texts
    used = sorted({names[int(i)] for ids, _ in lines for i in ids.split(",")})
    assert read_text(named, cache=False).label_names == used  # without the run's names: the file's own
