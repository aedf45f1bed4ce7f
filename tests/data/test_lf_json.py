"""The XMC repository's LF JSON lines data: reading, format sniffing, label names and space, errors, and a
``megaclass train`` / ``eval --filter`` run on a tiny generated set."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from megaclass.cli import main
from megaclass.data.lf_json import is_lf_json_line, read_lf_json
from megaclass.data.loaders import detect_format, open_dataset
from megaclass.data.xmc import read_label_names
from megaclass.errors import DataFormatError

_RECORDS = [
    {"uid": "a", "title": "python http library", "content": "", "target_ind": [0, 2], "target_rel": [1, 1]},
    {"uid": "b", "title": "ruby web server", "target_ind": [1]},
    {"uid": "c", "title": "fonts for kde", "content": "a font package", "target_ind": [3]},
    {"uid": "d", "title": "no labels here", "content": None, "target_ind": []},
]


def _write_lines(path, lines: list[str]) -> str:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as file:
        file.write("".join(line + "\n" for line in lines))
    return str(path)


def _write_records(path, records) -> str:
    return _write_lines(path, [json.dumps(record) for record in records])


def _write_label_file(folder, titles: list[str], name: str = "lbl.json.gz") -> None:
    _write_records(folder / name, [{"uid": f"L{i}", "title": title} for i, title in enumerate(titles)])


def test_reads_texts_labels_and_label_space_from_lbl_json(tmp_path) -> None:
    path = _write_records(tmp_path / "trn.json.gz", _RECORDS)
    _write_label_file(tmp_path, ["python", "ruby", "http", "fonts", "unused"])
    data = read_lf_json(path)
    assert data.texts == [
        "python http library",
        "ruby web server",
        "fonts for kde a font package",
        "no labels here",
    ]
    assert data.labels.to_lists() == [[0, 2], [1], [3], []]
    assert data.num_labels == 5 and data.format == "text" and data.features is None
    assert read_label_names(path) == ["python", "ruby", "http", "fonts", "unused"]
    assert read_lf_json(path, num_labels=7).num_labels == 7


def test_a_run_of_label_names_refuses_lf_json_ids(tmp_path) -> None:
    """LF JSON labels are ids: a file of a run whose training file named its labels is refused."""
    path = _write_records(tmp_path / "tst.json", _RECORDS)
    with pytest.raises(DataFormatError, match="its labels are ids .'target_ind'., the run's are names"):
        read_lf_json(path, num_labels=4, label_names=["a", "b", "c", "d"])


def test_label_space_without_lbl_json_spans_both_splits(tmp_path) -> None:
    train = _write_records(tmp_path / "trn.json", _RECORDS)
    assert read_lf_json(train).num_labels == 4  # largest id + 1 of the file alone
    test = _write_records(tmp_path / "tst.json.gz", [{"title": "x", "target_ind": [6]}])
    assert read_lf_json(train).num_labels == 7 and read_lf_json(test).num_labels == 7
    other = _write_records(tmp_path / "other.json", _RECORDS)
    assert read_lf_json(other).num_labels == 4  # no split names: the file alone


def test_repeated_label_counts_once_with_a_warning(tmp_path) -> None:
    path = _write_records(tmp_path / "data.json", [{"title": "t", "target_ind": [2, 1, 2]}])
    with pytest.warns(UserWarning, match=r"data.json:1: label 2 repeated"):
        assert read_lf_json(path).labels.to_lists() == [[2, 1]]


def test_format_is_sniffed(tmp_path) -> None:
    path = _write_records(tmp_path / "trn.json.gz", _RECORDS)
    assert detect_format(path) == "lf-json"
    assert is_lf_json_line(b'  {"target_ind": []}\r\n')
    assert not is_lf_json_line(b'{"title": "no labels key"}\n') and not is_lf_json_line(b"{broken\n")
    other = _write_lines(tmp_path / "other.json", ['{"title": "x", "labels": [1]}'])
    with pytest.raises(DataFormatError, match=r"other.json:1: unknown format"):
        detect_format(other)


def _learnable_records(rng: np.random.Generator, count: int, vocabulary: list[list[str]]) -> list[dict]:
    """Documents whose words come from their labels' own words: a model can learn the labels."""
    records = []
    for index in range(count):
        labels = sorted(rng.choice(len(vocabulary), size=int(rng.integers(1, 3)), replace=False).tolist())
        words = [str(rng.choice(vocabulary[label])) for label in labels for _ in range(3)]
        content = " ".join(rng.choice(["the", "a", "of", "and"], size=2)) if index % 2 else ""
        records.append(
            {"uid": f"d{index}", "title": " ".join(words), "content": content, "target_ind": labels}
        )
    return records


@pytest.fixture(scope="module")
def lf_set(tmp_path_factory):
    """A tiny LF data set: trn/tst JSON lines, lbl.json.gz (9 labels, the last never used), filter file."""
    folder = tmp_path_factory.mktemp("lf-set")
    rng = np.random.default_rng(0)
    vocabulary = [[f"w{label}x{word}" for word in range(4)] for label in range(8)]
    train = _write_records(folder / "trn.json.gz", _learnable_records(rng, 240, vocabulary))
    test_records = _learnable_records(rng, 60, vocabulary)
    test = _write_records(folder / "tst.json.gz", test_records)
    _write_label_file(folder, [f"label {label}" for label in range(9)])
    pairs = [f"{doc} {label}" for doc, record in enumerate(test_records) for label in record["target_ind"]]
    (folder / "filter_labels_test.txt").write_text("\n".join(pairs) + "\n")
    return folder, train, test


_TINY = [
    "--set",
    "model.hidden=[32]",
    "model.dropout=0.0",
    "optim.encoder.lr=0.01",
    "optim.head.lr=0.01",
    "optim.warmup_steps=2",
    "train.batch_size=16",
    "train.progress=false",
    "data.featurizer={min_df: 1, char_ngrams: null}",
]


@pytest.mark.integration
def test_train_eval_and_filter_on_lf_json(lf_set, tmp_path, capsys) -> None:
    folder, train, test = lf_set
    out = tmp_path / "run"
    args = ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "6", *_TINY]
    assert main(args) == 0
    facts = json.loads((out / "run.json").read_text())
    assert facts["num_classes"] == 9  # from lbl.json.gz, beyond the largest id used (7)
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["P@1"] > 0.8  # label words planted: far above the best constant guess (about 0.2)
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--test", test]) == 0
    assert json.loads(capsys.readouterr().out)["P@1"] == pytest.approx(trained["P@1"], abs=1e-12)
    # Every test pair filtered out: nothing is left to hit, in eval and in training-time evaluation alike.
    filter_file = str(folder / "filter_labels_test.txt")
    assert main(["eval", "--run", str(out), "--test", test, "--filter", filter_file]) == 0
    assert json.loads(capsys.readouterr().out)["P@1"] == 0.0
    filtered = tmp_path / "filtered"
    args = ["train", "--train", train, "--test", test, "--out", str(filtered), "--epochs", "1", *_TINY]
    assert main([*args, f"eval.filter_labels={filter_file}"]) == 0
    assert json.loads((filtered / "metrics.json").read_text())["P@1"] == 0.0


def test_token_ids_for_a_transformer(lf_set, tmp_path) -> None:
    from transformers import BertTokenizerFast

    _, train, _ = lf_set
    words = sorted({word for text in read_lf_json(train).texts for word in text.split()})
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    dataset = open_dataset(train, tokenizer=tokenizer, max_length=16)
    data = read_lf_json(train)
    assert dataset.num_classes == 9 and dataset.input_spec.kind == "tokens"
    expected = tokenizer(data.texts[:5], truncation=True, max_length=16)["input_ids"]
    got = [
        dataset.tokens.ids[dataset.tokens.indptr[i] : dataset.tokens.indptr[i + 1]].tolist() for i in range(5)
    ]
    assert got == expected
    assert dataset.labels.to_lists() == data.labels.to_lists()


_OK = '{"title": "ok", "target_ind": [0]}'


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"title": "x", "target_ind": [1', r"invalid JSON \("),
        ('["title", "x"]', "expected a JSON object with 'target_ind', got list"),
        ('{"title": "x", "target_rel": [1]}', "no 'target_ind'"),
        ('{"title": "x", "target_ind": 3}', "'target_ind' must be a list"),
        ('{"title": "x", "target_ind": [1, "2"]}', "'target_ind' holds '2'"),
        ('{"title": "x", "target_ind": [1.5]}', "'target_ind' holds 1.5"),
        ('{"title": "x", "target_ind": [true]}', "'target_ind' holds True"),
        ('{"title": "x", "target_ind": [-1]}', "'target_ind' holds -1"),
        ('{"title": "x", "target_ind": [4294967296]}', "label id 4294967296 too large"),
        ('{"title": 5, "target_ind": [1]}', "'title' must be a string, got int"),
        ('{"title": "x", "content": ["y"], "target_ind": [1]}', "'content' must be a string"),
        (
            '{"title": "x", "target_ind": [3]}',
            r"label id 3 out of range \[0, 3\): the label names beside it \(labels.txt or lbl.json\) hold 3",
        ),
        ("", r"invalid JSON"),
    ],
)
def test_errors_name_file_and_line(tmp_path, line: str, problem: str) -> None:
    _write_label_file(tmp_path, ["a", "b", "c"])
    path = _write_lines(tmp_path / "trn.json.gz", [_OK, line, _OK])
    with pytest.raises(DataFormatError, match=rf"trn.json.gz:2: {problem}"):
        read_lf_json(path)


def test_empty_and_unreadable_files(tmp_path) -> None:
    empty = _write_lines(tmp_path / "empty.json", ["", ""])
    with pytest.raises(DataFormatError, match=r"empty.json: empty file"):
        read_lf_json(empty)
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'{"title": "\xff", "target_ind": [0]}\n')
    with pytest.raises(DataFormatError, match=r"broken.json:1: invalid UTF-8"):
        read_lf_json(broken)
    with pytest.raises(FileNotFoundError):
        read_lf_json(tmp_path / "missing.json")


def test_bad_label_file_names_its_line(tmp_path) -> None:
    _write_lines(tmp_path / "lbl.json", ['{"uid": "a", "title": "x"}', '{"uid": "b"}'])
    path = _write_records(tmp_path / "trn.json", _RECORDS)
    with pytest.raises(DataFormatError, match=r"lbl.json:2: expected a JSON object with a string 'title'"):
        read_lf_json(path)


def test_memory_plan_reads_the_shape_of_lf_json(tmp_path, capsys) -> None:
    from megaclass.train.plan import read_data_shape

    train = _write_records(tmp_path / "trn.json.gz", _RECORDS)
    test = _write_records(tmp_path / "tst.json.gz", _RECORDS[:2])
    _write_label_file(tmp_path, ["python", "ruby", "http", "fonts", "unused"])
    shape = read_data_shape(train)
    assert (shape.inputs, shape.num_rows, shape.num_labels) == ("text", 4, 5)
    assert shape.labels_per_row == pytest.approx(4 / 4) and shape.multilabel
    code = main(["train", "--train", train, "--test", test, "--out", str(tmp_path / "run"), "--dry-run"])
    assert code == 0 and "the run fits" in capsys.readouterr().out


def test_memory_plan_names_the_line_of_a_bad_lf_json_record(tmp_path) -> None:
    from megaclass.train.plan import read_data_shape

    path = _write_lines(tmp_path / "trn.json", [json.dumps(_RECORDS[0]), '{"title": "x", "target_ind": "3"}'])
    with pytest.raises(DataFormatError, match=r"trn\.json:2: 'target_ind' must be a list"):
        read_data_shape(path)
