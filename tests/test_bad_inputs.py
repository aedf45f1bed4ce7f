"""Bad input of every kind through the real CLI: each case must fail with one line naming the file and line
(or the key), with no traceback, and leave the run folder it was given byte for byte as it was.

The bad files are a few lines of the embedded deb-tags data with one corruption each; the run folders are
two tiny runs (BoW and TF-IDF text, 1 epoch on 200 rows) shared by the module and copied where a case
damages one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from megaclass.cli import main

pytestmark = pytest.mark.integration

_TINY = [
    "--epochs",
    "1",
    "--set",
    "model.hidden=[16]",
    "train.batch_size=64",
    "train.progress=false",
    "eval.batch_size=64",
]


@dataclass(frozen=True)
class Context:
    """What a case builds its command from: the shared runs and data, and a fresh folder of its own."""

    tmp: str
    bow_run: str
    text_run: str
    bow_test: str  # BoW: header + 40 rows
    text_test: str  # text: 40 rows
    bow_lines: list[str]
    text_lines: list[str]
    fixtures: str  # tests/faces/fixtures
    images: str  # the fixture .rec decoded to <label>/<key>.jpg

    def write(self, name: str, content: str | bytes) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as file:
            file.write(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def copy_run(self, kind: str = "bow") -> str:
        target = os.path.join(self.tmp, f"run-{kind}")
        shutil.copytree(self.bow_run if kind == "bow" else self.text_run, target)
        return target


def _head(path: str, rows: int, *, header: bool) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as file:
        first = file.readline() if header else None
        lines = [file.readline() for _ in range(rows)]
    if header:
        fields = first.split()
        lines.insert(0, f"{rows} {fields[1]} {fields[2]}\n")
    return lines


@pytest.fixture(scope="module")
def shared(repo_root, tmp_path_factory):
    """The two tiny runs, their test data, and the fixture .rec decoded to images."""
    folder = str(tmp_path_factory.mktemp("bad_inputs"))
    data = os.path.join(repo_root, "data", "deb-tags")
    paths = {}
    for name, source, rows, header in (
        ("bow_train", "train_bow.txt.gz", 200, True),
        ("bow_test", "test_bow.txt.gz", 40, True),
        ("text_train", "train.txt.gz", 200, False),
        ("text_test", "test.txt.gz", 40, False),
    ):
        paths[name] = os.path.join(folder, f"{name}.txt")
        with open(paths[name], "w", encoding="utf-8") as file:
            file.writelines(_head(os.path.join(data, source), rows, header=header))
    shutil.copy(os.path.join(data, "labels.txt.gz"), folder)  # the text files' label space
    runs = {}
    for kind in ("bow", "text"):
        runs[kind] = os.path.join(folder, f"run-{kind}")
        argv = ["train", "--train", paths[f"{kind}_train"], "--test", paths[f"{kind}_test"]]
        assert main([*argv, "--out", runs[kind], *_TINY]) == 0
    fixtures = os.path.join(repo_root, "tests", "faces", "fixtures")
    images = os.path.join(folder, "images")
    assert main(["data", "decode-rec", fixtures, images, "--val-fraction", "0"]) == 0
    with open(paths["bow_test"], encoding="utf-8") as file:
        bow_lines = file.readlines()
    with open(paths["text_test"], encoding="utf-8") as file:
        text_lines = file.readlines()
    return runs, paths, bow_lines, text_lines, fixtures, images


@pytest.fixture
def context(shared, tmp_path) -> Context:
    runs, paths, bow_lines, text_lines, fixtures, images = shared
    return Context(
        str(tmp_path),
        runs["bow"],
        runs["text"],
        paths["bow_test"],
        paths["text_test"],
        bow_lines,
        text_lines,
        fixtures,
        images,
    )


@dataclass(frozen=True)
class Case:
    """``build(context) -> (argv, expected)``: the command line and the substrings its error line holds."""

    name: str
    build: Callable[[Context], tuple[list[str], list[str]]]


def _tree_digest(folder: str) -> dict[str, str]:
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(file.read()).hexdigest()
    return digests


def _run_folder(argv: list[str]) -> str | None:
    for flag in ("--run",):
        if flag in argv:
            path = argv[argv.index(flag) + 1]
            return path if os.path.isdir(path) else None
    return None


# ------------------------------------------------------------------------------------------------ data files

_LAST = -1  # the last data line


def _replace_line(lines: list[str], line: int, text: str) -> tuple[str, int]:
    """The file with 1-based line ``line`` (or the last) replaced by ``text``; returns content and line."""
    lines = list(lines)
    index = len(lines) - 1 if line == _LAST else line - 1
    lines[index] = text + "\n"
    return "".join(lines), index + 1


BOW_ROWS = {
    "label past 2^63": ("18446744073709551616 1:1", "too large"),
    "label past int32": ("3000000000 1:1", "too large"),
    "label out of range": ("99999 1:1", "label id 99999 out of range"),
    "feature out of range": ("3 999999:1", "feature id 999999 out of range"),
    "feature past int32": ("3 99999999999:1", "too large"),
    "negative feature id": ("3 -3:1", "expected an id"),
    "negative label": ("-1 3:1", "expected an id"),
    "missing colon": ("3 5 1.0", "malformed"),
    "empty value": ("3 5:", "malformed"),
    "infinite value": ("3 5:1e400", "not finite"),
    "nan value": ("3 5:nan", "expected a value"),
    "word value": ("3 5:abc", "expected a value"),
    "double comma": ("1,,2 5:1", "malformed"),
    "letter label": ("x 5:1", "expected an id"),
    "two colons": ("3 5:1:2", "malformed"),
}


def _bow_case(command: str, corruption: str, line: int) -> Case:
    text, problem = BOW_ROWS[corruption]

    def build(c: Context) -> tuple[list[str], list[str]]:
        content, number = _replace_line(c.bow_lines, line, text)
        path = c.write("bad_bow.txt", content)
        if command == "eval":
            return ["eval", "--run", c.bow_run, "--test", path], [f"{path}:{number}:", problem]
        if command == "train":  # the memory plan reads the file before its reader does
            argv = ["train", "--train", path, "--test", c.bow_test, "--out", os.path.join(c.tmp, "r"), *_TINY]
            return argv, [f"{path}:{number}:", problem]
        out = os.path.join(c.tmp, "predictions.txt")
        return ["predict", "--run", c.bow_run, "--input", path, "--out", out], [f"{path}:{number}:", problem]

    return Case(f"bow-{command}-{corruption}-line{line}", build)


HEADERS = {
    "infinite count": ("inf 7472 595", "inf"),
    "count 10^11 labels": ("40 7472 100000000000", "100000000000"),
    "count 10^11 features": ("40 100000000000 595", "100000000000"),
    "count 10^11 documents": ("1000000000000000 7472 595", "1000000000000000"),
    "exponent count": ("1e11 7472 595", "1e11"),
    "two fields": ("40 7472", "40 7472"),
    "four fields": ("40 7472 595 1", "40 7472 595 1"),
    "negative count": ("-40 7472 595", "-40"),
    "fewer documents": ("39 7472 595", "39"),
    "more documents": ("41 7472 595", "41"),
    "zero labels": ("40 7472 0", "0"),
}


def _header_case(command: str, corruption: str) -> Case:
    header, seen = HEADERS[corruption]

    def build(c: Context) -> tuple[list[str], list[str]]:
        path = c.write("bad_header.txt", header + "\n" + "".join(c.bow_lines[1:]))
        line = {"fewer documents": 41, "more documents": 41}.get(corruption, 1)
        if command == "eval":
            argv = ["eval", "--run", c.bow_run, "--test", path]
        elif command == "train":  # a damaged test file: named before training starts
            argv = ["train", "--train", c.bow_test, "--test", path, "--out", os.path.join(c.tmp, "r"), *_TINY]
        else:
            argv = ["train", "--train", path, "--test", c.bow_test, "--out", os.path.join(c.tmp, "o"), *_TINY]
        return argv, [f"{path}:{line}:", seen]

    return Case(f"header-{command}-{corruption}", build)


TEXT_ROWS = {
    "letter label": ("x\tsome text", "expected label ids"),
    "label names": ("python,devel\tsome text", "before the tab, as on the file's first labelled line"),
    "double comma": ("1,,2\tsome text", "stray comma"),
    "leading comma": (",1\tsome text", "stray comma"),
    "label past int32": ("99999999999\tsome text", "too large"),
    "label past 2^63": ("18446744073709551616\tsome text", "too large"),
    "label out of range": ("5000\tsome text", "label id 5000 out of range"),
    "negative label": ("-1\tsome text", "expected label ids"),
}


# rows whose labels read as names: on a file's first line they make it a file of names
NAMED_ROWS = ("letter label", "label names", "negative label")


def _text_case(command: str, corruption: str, line: int) -> Case:
    text, problem = TEXT_ROWS[corruption]

    def build(c: Context) -> tuple[list[str], list[str]]:
        content, number = _replace_line(c.text_lines, line, text)
        path = c.write("bad_text.txt", content)
        if number == 1 and corruption in NAMED_ROWS:
            if command == "train":  # a training file of names; its test file gives ids
                argv = ["train", "--train", path, "--test", c.text_test, "--out", os.path.join(c.tmp, "r")]
                return [*argv, *_TINY], [f"{c.text_test}:1:", "labels are ids, but the run's are names"]
            run = ["eval", "--run", c.text_run, "--test", path] if command == "eval" else None
            run = run or ["predict", "--run", c.text_run, "--input", path, "--out", os.path.join(c.tmp, "p")]
            return run, [f"{path}:1:", "labels are names, but the run's are ids: give ids"]
        if command == "eval":
            return ["eval", "--run", c.text_run, "--test", path], [f"{path}:{number}:", problem]
        if command == "train":  # the memory plan reads the file before its reader does
            argv = ["train", "--train", path, "--test", c.text_test, "--out", os.path.join(c.tmp, "r")]
            return [*argv, *_TINY], [f"{path}:{number}:", problem]
        out = os.path.join(c.tmp, "predictions.txt")
        return ["predict", "--run", c.text_run, "--input", path, "--out", out], [f"{path}:{number}:", problem]

    return Case(f"text-{command}-{corruption}-line{line}", build)


def _unseen_label_case(flag: str) -> Case:
    """A ``--test`` or ``--valid`` file with a label the training file lacks: the way to make room named."""

    def build(c: Context) -> tuple[list[str], list[str]]:
        content, number = _replace_line(c.text_lines, 20, "5000\tsome text")
        path = c.write("unseen_label.txt", content)
        files = ["--test", c.text_test, "--valid", path] if flag == "--valid" else ["--test", path]
        argv = ["train", "--train", c.text_test, *files, "--out", os.path.join(c.tmp, "r"), *_TINY]
        return argv, [f"{path}:{number}:", "label id 5000 out of range", "data.num_classes=N"]

    return Case(f"text-train-unseen-label-in{flag[1:]}", build)


def _text_bytes_case(command: str, line: int) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        lines = [text.encode("utf-8") for text in c.text_lines]
        index = len(lines) - 1 if line == _LAST else line - 1
        lines[index] = b"1\tbroken \xff\xfe text\n"
        path = c.write("bad_utf8.txt", b"".join(lines))
        if command == "eval":
            argv = ["eval", "--run", c.text_run, "--test", path]
        else:
            argv = ["predict", "--run", c.text_run, "--input", path, "--out", os.path.join(c.tmp, "p.txt")]
        return argv, [f"{path}:{index + 1}:", "invalid UTF-8"]

    return Case(f"text-{command}-utf8-line{line}", build)


def _no_tab_case(line: int) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        content, number = _replace_line(c.text_lines, line, "a line without labels")
        path = c.write("no_tab.txt", content)
        return ["eval", "--run", c.text_run, "--test", path], [f"{path}:{number}:", "<TAB>text"]

    return Case(f"text-eval-no-tab-line{line}", build)


def _gzip_case(command: str, how: str) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        packed = gzip.compress("".join(c.bow_lines).encode())
        if how == "truncated":
            packed = packed[: len(packed) // 2]
        elif how == "flipped":
            packed = packed[:12] + bytes(b ^ 0xFF for b in packed[12:40]) + packed[40:]
        elif how == "one byte":  # the deflate stream damaged inside its first block
            packed = packed[:30] + bytes([packed[30] ^ 0xFF]) + packed[31:]
        else:  # crc
            packed = packed[:-8] + b"\0\0\0\0" + packed[-4:]
        path = c.write("bad.txt.gz", packed)
        if command == "eval":
            argv = ["eval", "--run", c.bow_run, "--test", path]
        else:
            argv = ["predict", "--run", c.bow_run, "--input", path, "--out", os.path.join(c.tmp, "p.txt")]
        return argv, [path, "gzip"]

    return Case(f"gzip-{command}-{how}", build)


# ------------------------------------------------------------------------------------------ configs, --set

SETS = {
    "train=5": "train",
    "eval=3": "eval",
    "optim=adam": "optim",
    "data=1": "data",
    "train.epochs=1e400": "train.epochs",
    "train.seed=1000000000000000000000": "train.seed",
    "train.seed=1.0e30": "train.seed",
    "optim.head.lr=1e400": "lr",
    "optim.head.lr=.nan": "lr",
    "train.batch_size=abc": "train.batch_size",
    "train.batch_size=0": "train.batch_size",
    "train.nonsense=1": "nonsense",
    "head.type=nope": "nope",
    "model.hidden=[a]": "model.hidden",
    "eval.ks=[0]": "eval.ks",
    "eval.ks=[1,1e400]": "eval.ks[1]",
    "train.epochs=-1": "train.epochs",
    "train.device=tpu": "train.device",
    "noequals": "noequals",
    "=5": "=5",
    "train.epochs.x=3": "train.epochs",
}


def _set_case(text: str) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        out = os.path.join(c.tmp, "out")
        argv = ["train", "--train", c.bow_test, "--test", c.bow_test, "--out", out, "--set", text]
        return argv, [SETS[text]]

    return Case(f"set-{text}", build)


CONFIG_FILES = {
    "invalid yaml": ("train: [1, 2\n", "invalid YAML"),
    "a list": ("- 1\n- 2\n", "expected a mapping"),
    "section scalar": ("train: 5\n", "train"),
    "unknown section": ("trian:\n  epochs: 2\n", "trian"),
    "wrong type": ("train:\n  epochs: many\n", "train.epochs"),
}


def _config_case(kind: str) -> Case:
    content, expected = CONFIG_FILES[kind]

    def build(c: Context) -> tuple[list[str], list[str]]:
        path = c.write("config.yaml", content)
        out = os.path.join(c.tmp, "out")
        return ["train", "--train", c.bow_test, "--test", c.bow_test, "--out", out, "--config", path], [
            expected
        ]

    return Case(f"config-{kind}", build)


# ---------------------------------------------------------------------------------------------- run folders


def _damage(run: str, how: str) -> str:
    """Damage the copied run folder ``run``; returns the path the error must name."""
    model = os.path.join(run, "model")
    if how == "garbage tensors":
        with open(os.path.join(model, "tensors.safetensors"), "wb") as file:
            file.write(b"garbage" * 10)
        return model
    if how == "truncated tensors":
        path = os.path.join(model, "tensors.safetensors")
        with open(path, "rb") as file:
            data = file.read()
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
        return model
    if how == "garbage state":
        with open(os.path.join(model, "state.json"), "w") as file:
            file.write("{not json")
        return model
    if how == "garbage run.json":
        with open(os.path.join(run, "run.json"), "w") as file:
            file.write("[1, 2")
        return os.path.join(run, "run.json")
    if how == "garbage label counts":
        with open(os.path.join(run, "label_counts.npy"), "wb") as file:
            file.write(b"not an array")
        return "label_counts.npy"
    if how == "no weights":
        shutil.rmtree(model)
        shutil.rmtree(os.path.join(run, "checkpoints"))
        return "neither final weights"
    raise AssertionError(how)


RUN_DAMAGE = (
    "garbage tensors",
    "truncated tensors",
    "garbage state",
    "garbage run.json",
    "garbage label counts",
    "no weights",
)


def _run_case(command: str, how: str) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        run = c.copy_run()
        named = _damage(run, how)
        if command == "eval":
            argv = ["eval", "--run", run, "--test", c.bow_test]
        elif command == "predict":
            argv = ["predict", "--run", run, "--input", c.bow_test, "--out", os.path.join(c.tmp, "p.txt")]
        else:
            argv = ["export", "--run", run, "--out", os.path.join(c.tmp, "model.safetensors")]
        return argv, [named]

    return Case(f"run-{command}-{how}", build)


def _config_damage_case(command: str, how: str) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        run = c.copy_run()
        path = os.path.join(run, "config.yaml")
        if how == "missing":
            os.remove(path)
            expected = ["config.yaml"]
        else:
            with open(path, "w") as file:
                file.write("train: [1, 2\n" if how == "invalid yaml" else "train:\n  epochs: many\n")
            expected = [path, "invalid YAML" if how == "invalid yaml" else "train.epochs"]
        if command == "eval":
            return ["eval", "--run", run, "--test", c.bow_test], expected
        return [
            "predict",
            "--run",
            run,
            "--input",
            c.bow_test,
            "--out",
            os.path.join(c.tmp, "p.txt"),
        ], expected

    return Case(f"run-{command}-config-{how}", build)


# ----------------------------------------------------------------------------------------- RecordIO, images


def _rec_copy(c: Context) -> str:
    folder = os.path.join(c.tmp, "rec")
    os.makedirs(folder)
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(os.path.join(c.fixtures, name), folder)
    return folder


def _idx(folder: str) -> dict[int, int]:
    with open(os.path.join(folder, "train.idx")) as file:
        return {int(k): int(v) for k, v in (line.split() for line in file if line.strip())}


def _set_header_label(folder: str, first: float, end: float) -> None:
    """Overwrite record 0's two label floats (frame 8 bytes + IRHeader 24 bytes in)."""
    with open(os.path.join(folder, "train.rec"), "r+b") as file:
        file.seek(_idx(folder)[0] + 8 + 24)
        file.write(struct.pack("<ff", first, end))


REC_DAMAGE = {
    "header past the records": (lambda f: _set_header_label(f, 400, 441), "header record 0"),
    "header nan": (lambda f: _set_header_label(f, float("nan"), 5), "header record 0"),
    "header zero": (lambda f: _set_header_label(f, 0, 41), "header record 0"),
    "header huge": (lambda f: _set_header_label(f, 1e9, 1e9 + 5), "header record 0"),
    "header shifted": (lambda f: _set_header_label(f, 330, 361), "identit"),
    "header fractional": (lambda f: _set_header_label(f, 320.5, 361), "header record 0"),
}


def _rec_case(corruption: str) -> Case:
    damage, expected = REC_DAMAGE[corruption]

    def build(c: Context) -> tuple[list[str], list[str]]:
        folder = _rec_copy(c)
        damage(folder)
        out = os.path.join(c.tmp, "decoded")
        return ["data", "decode-rec", folder, out], [os.path.join(folder, "train.rec"), expected]

    return Case(f"rec-{corruption}", build)


def _empty_idx_case() -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        folder = _rec_copy(c)
        idx_path = os.path.join(folder, "train.idx")
        with open(idx_path, "w"):
            pass
        return ["data", "decode-rec", folder, os.path.join(c.tmp, "decoded")], [idx_path, "no records"]

    return Case("idx-empty", build)


def _idx_case(how: str) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        folder = _rec_copy(c)
        index = _idx(folder)
        idx_path = os.path.join(folder, "train.idx")
        expected = [idx_path]
        if how == "missing key":
            del index[5]
            expected.append("no record with key 5")
        elif how == "past the end":
            index[5] = os.path.getsize(os.path.join(folder, "train.rec")) + 64
            expected.append("past the end")
        lines = [f"{key}\t{offset}\n" for key, offset in index.items()]
        if how == "bad line":
            lines[7] = "seven\teight\n"
            expected.append(f"{idx_path}:8:")
        elif how == "negative offset":
            lines[3] = "3\t-8\n"
            expected.append(f"{idx_path}:4:")
        with open(idx_path, "w") as file:
            file.writelines(lines)
        return ["data", "decode-rec", folder, os.path.join(c.tmp, "decoded")], expected

    return Case(f"idx-{how}", build)


def _payload_case(key: int) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        folder = _rec_copy(c)
        with open(os.path.join(folder, "train.rec"), "r+b") as file:
            file.seek(_idx(folder)[key] + 8 + 24)
            file.write(b"\0\0\0\0")
        return ["data", "decode-rec", folder, os.path.join(c.tmp, "decoded")], [
            f"record {key}",
            "not an image",
        ]

    return Case(f"rec-payload-key{key}", build)


def _frame_case(how: str) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        folder = _rec_copy(c)
        rec = os.path.join(folder, "train.rec")
        offset = _idx(folder)[9]
        if how == "bad magic":
            with open(rec, "r+b") as file:
                file.seek(offset)
                file.write(b"\0\0\0\0")
            return ["data", "decode-rec", folder, os.path.join(c.tmp, "d")], [rec, "bad magic"]
        with open(rec, "r+b") as file:
            file.truncate(offset + 100)
        kept = {key: value for key, value in _idx(folder).items() if value <= offset}
        with open(os.path.join(folder, "train.idx"), "w") as file:
            file.writelines(f"{key}\t{value}\n" for key, value in kept.items())
        return ["data", "decode-rec", folder, os.path.join(c.tmp, "d")], [rec]

    return Case(f"rec-frame-{how}", build)


def _make_rec_case(how: str) -> Case:
    def build(c: Context) -> tuple[list[str], list[str]]:
        source = os.path.join(c.tmp, "images")
        shutil.copytree(c.images, source, ignore=shutil.ignore_patterns("*.txt"))
        out = os.path.join(c.tmp, "packed")
        if how == "empty class folder":
            os.makedirs(os.path.join(source, "40"))
            return ["data", "make-rec", source, out], [os.path.join(source, "40"), "no images"]
        if how == "class of other files":
            os.makedirs(os.path.join(source, "40"))
            with open(os.path.join(source, "40", "notes.txt"), "w") as file:
                file.write("x")
            return ["data", "make-rec", source, out], [os.path.join(source, "40"), "no images"]
        files = sorted(os.listdir(os.path.join(source, "0")))
        if how == "label gap":
            lines = [f"0/{files[0]} 0\n", f"0/{files[1]} 2\n"]
            expected = ["label 1"]
        elif how == "bad list line":
            lines = [f"0/{files[0]} 0\n", "just-a-name\n"]
            expected = [":2:"]
        else:  # negative label
            lines = [f"0/{files[0]} 0\n", f"0/{files[1]} -3\n"]
            expected = [":2:", "-3"]
        path = os.path.join(source, "list.txt")
        with open(path, "w") as file:
            file.writelines(lines)
        return ["data", "make-rec", path, out], [path, *expected]

    return Case(f"make-rec-{how}", build)


# ------------------------------------------------------------------------------------- verification .bin


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


BINS = {
    "code object": (lambda: pickle.dumps((_Evil(), [True]), protocol=2), "refusing to load global"),
    "truncated": (lambda: pickle.dumps(([b"a", b"b"], [True]), protocol=2)[:-5], "malformed pickle"),
    "not a pickle": (lambda: b"this is not a pickle at all", "pickle"),
    "a dict": (lambda: pickle.dumps({"a": 1}, protocol=2), "expected"),
    "issame not bool": (lambda: pickle.dumps(([b"a", b"b"], [3]), protocol=2), "issame[0]"),
    "count mismatch": (lambda: pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=2), "expected"),
}


def _bin_case(kind: str) -> Case:
    make, expected = BINS[kind]

    def build(c: Context) -> tuple[list[str], list[str]]:
        path = c.write("bad.bin", make())
        features = c.write("feats.npy", b"")
        return ["verify", "--data", path, "--features", features], [path, expected]

    return Case(f"bin-{kind}", build)


# ----------------------------------------------------------------------------------------- CLI arguments


def _argument_cases() -> list[Case]:
    def predict(c: Context, *extra: str, out: str | None = None) -> list[str]:
        out = out or os.path.join(c.tmp, "p.txt")
        return ["predict", "--run", c.bow_run, "--input", c.bow_test, "--out", out, *extra]

    def folder_out(c: Context) -> str:
        os.makedirs(os.path.join(c.tmp, "folder"), exist_ok=True)
        return os.path.join(c.tmp, "folder")

    def file_parent(c: Context, name: str) -> str:
        return os.path.join(c.write("plain", "x"), name)

    def unwritable(c: Context, name: str) -> str:
        return os.path.join("/proc", "megaclass-test", name)

    specs = {
        "predict k=0": lambda c: (predict(c, "--k", "0"), ["--k", "0"]),
        "predict k=-3": lambda c: (predict(c, "--k", "-3"), ["--k", "-3"]),
        "predict k=abc": lambda c: (predict(c, "--k", "abc"), ["--k", "abc"]),
        "predict device tpu": lambda c: (predict(c, "--device", "tpu"), ["--device", "tpu"]),
        "predict device cuda:x": lambda c: (predict(c, "--device", "cuda:x"), ["--device", "cuda:x"]),
        "eval device tpu": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.bow_test, "--device", "tpu"],
            ["--device", "tpu"],
        ),
        "eval device gpu0": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.bow_test, "--device", "gpu0"],
            ["--device", "gpu0"],
        ),
        "extract device tpu": lambda c: (
            ["extract", "--run", c.bow_run, "--data", c.fixtures + "/verify.bin", "--out", c.tmp + "/f.npy"]
            + ["--device", "tpu"],
            ["--device", "tpu"],
        ),
        "predict out folder": lambda c: (predict(c, out=folder_out(c)), ["folder"]),
        "predict out under a file": lambda c: (predict(c, out=file_parent(c, "p.txt")), ["plain"]),
        "predict out unwritable": lambda c: (predict(c, out=unwritable(c, "p.txt")), ["megaclass-test"]),
        "eval out folder": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.bow_test, "--out", folder_out(c)],
            ["folder"],
        ),
        "eval out under a file": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.bow_test, "--out", file_parent(c, "m.json")],
            ["plain"],
        ),
        "eval out unwritable": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.bow_test, "--out", unwritable(c, "m.json")],
            ["megaclass-test"],
        ),
        "export out folder": lambda c: (["export", "--run", c.bow_run, "--out", folder_out(c)], ["folder"]),
        "export out under a file": lambda c: (
            ["export", "--run", c.bow_run, "--out", file_parent(c, "m.safetensors")],
            ["plain"],
        ),
        "export out unwritable": lambda c: (
            ["export", "--run", c.bow_run, "--out", unwritable(c, "m.safetensors")],
            ["megaclass-test"],
        ),
        "train out under a file": lambda c: (
            ["train", "--train", c.bow_test, "--test", c.bow_test, "--out", file_parent(c, "run"), *_TINY],
            ["plain"],
        ),
        "decode-rec out under a file": lambda c: (
            ["data", "decode-rec", c.fixtures, file_parent(c, "decoded")],
            ["plain"],
        ),
        "make-rec out under a file": lambda c: (
            ["data", "make-rec", c.images, file_parent(c, "packed")],
            ["plain"],
        ),
        "predict missing input": lambda c: (
            predict(c)[:3] + ["--input", c.tmp + "/none.txt", "--out", c.tmp + "/p.txt"],
            ["none.txt"],
        ),
        "predict input folder": lambda c: (
            predict(c)[:3] + ["--input", folder_out(c), "--out", c.tmp + "/p.txt"],
            ["folder"],
        ),
        "eval missing test": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.tmp + "/none.txt"],
            ["none.txt"],
        ),
        "eval missing run": lambda c: (["eval", "--run", c.tmp + "/norun", "--test", c.bow_test], ["norun"]),
        "export missing run": lambda c: (
            ["export", "--run", c.tmp + "/norun", "--out", c.tmp + "/m"],
            ["norun"],
        ),
        "predict run is a data file": lambda c: (
            predict(c)[:2] + [c.bow_test] + predict(c)[3:],
            [c.bow_test],
        ),
        "eval empty test": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.write("e.txt", "")],
            ["e.txt"],
        ),
        "predict empty stdin-like file": lambda c: (
            predict(c)[:3] + ["--input", c.write("blank.txt", "\n\n"), "--out", c.tmp + "/p.txt"],
            ["blank.txt"],
        ),
        "decode-rec val fraction": lambda c: (
            ["data", "decode-rec", c.fixtures, c.tmp + "/d", "--val-fraction", "1.5"],
            ["val_fraction", "1.5"],
        ),
        "decode-rec missing folder": lambda c: (
            ["data", "decode-rec", c.tmp + "/nope", c.tmp + "/d"],
            ["nope"],
        ),
        "verify missing features": lambda c: (
            ["verify", "--data", c.fixtures + "/verify.bin", "--features", c.tmp + "/none.npy"],
            ["none.npy"],
        ),
        "text predict on BoW run": lambda c: (
            predict(c)[:3] + ["--input", c.text_test, "--out", c.tmp + "/p.txt"],
            [c.text_test],
        ),
        "text eval on BoW run": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.text_test],
            [c.text_test, "holds text", "trained on BoW rows"],
        ),
        "BoW eval on text run": lambda c: (
            ["eval", "--run", c.text_run, "--test", c.bow_test],
            [c.bow_test, "holds BoW rows", "trained on text"],
        ),
        "BoW eval of other features": lambda c: (
            ["eval", "--run", c.bow_run, "--test", c.write("narrow.txt", "1 100 595\n3 1:0.5\n")],
            ["narrow.txt", "sparse rows of 100 features", "feature ids"],
        ),
        "train text test for BoW": lambda c: (
            ["train", "--train", c.bow_test, "--test", c.text_test, "--out", c.tmp + "/r", *_TINY],
            ["--test", c.text_test, "holds text", "holds BoW rows"],
        ),
        "train verification set as test": lambda c: (
            ["train", "--train", c.bow_test, "--test", f"{c.fixtures}/verify.bin", "--out", c.tmp, *_TINY],
            ["verify.bin", "eval.verification"],
        ),
    }
    return [Case(f"arg-{name}", spec) for name, spec in specs.items()]


# -------------------------------------------------------------------------------------------------- cases

CASES: list[Case] = [
    *(
        _bow_case(command, corruption, line)
        for command in ("eval", "predict")
        for corruption in BOW_ROWS
        for line in (2, 17, _LAST)
    ),
    *(_bow_case("train", corruption, line) for corruption in BOW_ROWS for line in (2, _LAST)),
    *(_header_case(command, corruption) for command in ("eval", "train") for corruption in HEADERS),
    *(
        _text_case(command, corruption, line)
        for command in ("eval", "predict")
        for corruption in TEXT_ROWS
        for line in (1, 20, _LAST)
    ),
    *(  # a training file's label space is its own: an id past the others' is one more label, not an error
        _text_case("train", corruption, line)
        for corruption in TEXT_ROWS
        if corruption != "label out of range"
        for line in (1, 20, _LAST)
    ),
    *(_unseen_label_case(flag) for flag in ("--test", "--valid")),
    *(_text_bytes_case(command, line) for command in ("eval", "predict") for line in (1, _LAST)),
    *(_no_tab_case(line) for line in (1, 13, _LAST)),
    *(
        _gzip_case(command, how)
        for command in ("eval", "predict", "train")
        for how in ("truncated", "flipped", "one byte", "crc")
    ),
    *(_set_case(text) for text in SETS),
    *(_config_case(kind) for kind in CONFIG_FILES),
    *(_run_case(command, how) for command in ("eval", "predict", "export") for how in RUN_DAMAGE),
    *(
        _config_damage_case(command, how)
        for command in ("eval", "predict")
        for how in ("missing", "invalid yaml", "wrong type")
    ),
    *(_rec_case(corruption) for corruption in REC_DAMAGE),
    *(_idx_case(how) for how in ("missing key", "past the end", "bad line", "negative offset")),
    _empty_idx_case(),
    *(_payload_case(key) for key in (1, 150, 320)),
    *(_frame_case(how) for how in ("bad magic", "truncated")),
    *(
        _make_rec_case(how)
        for how in ("empty class folder", "class of other files", "label gap", "bad list line", "negative")
    ),
    *(_bin_case(kind) for kind in BINS),
    *_argument_cases(),
]


def test_enough_cases() -> None:
    assert len(CASES) >= 150
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_fails_with_one_line(case: Case, context: Context, capsys) -> None:
    argv, expected = case.build(context)
    run = _run_folder(argv)
    before = _tree_digest(run) if run else None
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code not in (0, None), f"exit code {code}; stderr: {err}"
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    message = errors[0]
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    if run:
        assert _tree_digest(run) == before, "the run folder changed"
    if argv[:2] == ["data", "decode-rec"]:
        out_dir = argv[3]
        leftover = [] if not os.path.isdir(out_dir) else os.listdir(out_dir)
        assert leftover == [], f"decode-rec left {leftover[:5]}"


def test_a_scalar_sets_only_a_selector_section() -> None:
    """The rule behind the ``train=5`` cases: a scalar stands for a section only when it picks its kind."""
    from megaclass.schema import ConfigError
    from megaclass.train.config import load_config

    assert load_config(None, ["head.margin=arcface"]).head.margin.kind.value == "arcface"
    assert load_config(None, ["train.epochs=3", "train.seed=9"]).train.seed == 9
    with pytest.raises(ConfigError, match=r"^train: 5 given for a whole section"):
        load_config(None, ["train.epochs=3", "train=5"])
