import io
import os
import pickle

import numpy as np
import pytest

from megaclass.data.images import decode_image
from megaclass.data.verification_bin import (
    check_verification_bin,
    load_verification_bin,
    restricted_loads,
    save_verification_bin,
)
from megaclass.errors import DataFormatError


def test_fixture_loads_as_python2_pickle(fixture_bin):
    with open(fixture_bin, "rb") as handle:
        with pytest.raises(UnicodeDecodeError):
            pickle.load(handle)  # what plain pickle.load does on Python 2 strings
    with open(fixture_bin, "rb") as handle:
        bins, issame = pickle.load(handle, encoding="bytes")
    data = load_verification_bin(fixture_bin)
    assert data.name == "verify" and data.num_pairs == 60
    assert data.images == list(bins)
    assert data.issame.dtype == bool and data.issame.tolist() == list(issame)
    assert decode_image(data.images[0]).shape == (112, 112, 3)


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class _Plain:
    pass


def _hand_written_global_reduce(marker: str) -> bytes:
    """Protocol 0 bytes a Python 2 attacker would write: ``os.system(touch marker)`` via GLOBAL + REDUCE."""
    return b"cos\nsystem\n(S'touch " + marker.encode() + b"'\ntR."


@pytest.mark.parametrize(
    "make",
    [
        lambda marker: _hand_written_global_reduce(marker),
        lambda marker: pickle.dumps(([_System(f"touch {marker}")], [True]), protocol=2),
        lambda marker: pickle.dumps(_System(f"touch {marker}"), protocol=4),
        lambda marker: pickle.dumps([_Eval()], protocol=0),
        lambda marker: pickle.dumps(_Plain(), protocol=2),
        lambda marker: pickle.dumps(np.zeros(3), protocol=2),
        lambda marker: b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00utf-8\x86R.",
    ],
    ids=[
        "global-reduce-p0",
        "reduce-p2",
        "stack-global-p4",
        "eval",
        "instance",
        "numpy",
        "codecs-not-latin1",
    ],
)
def test_crafted_pickles_are_refused_without_running_code(tmp_path, make):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.bin"
    path.write_bytes(make(marker))
    with pytest.raises(DataFormatError, match="not a plain-data pickle") as error:
        load_verification_bin(path)
    assert "evil.bin" in str(error.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    "payload, message",
    [
        (pickle.dumps({"a": 1}, protocol=2), "expected a pickled pair"),
        (pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=2), "3 images for 1 pairs"),
        (pickle.dumps(([b"a", b"b"], [2]), protocol=2), r"issame\[0\] is 2"),
        (pickle.dumps((["text", b"b"], [True]), protocol=4), "image 0 is a str"),
        (pickle.dumps(([b"a", b"b"], [True]), protocol=2)[:-5], "malformed pickle"),
        (b"", "malformed pickle"),
    ],
    ids=["dict", "count", "not-bool", "str-image", "truncated", "empty"],
)
def test_malformed_sets(tmp_path, payload, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(payload)
    with pytest.raises(DataFormatError, match=message):
        load_verification_bin(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_python3_pickles_of_plain_data_load(protocol):
    data = ([b"\x00\xff", b"ab" * 300], (True, False), 1.5, -3, 2**70, None, "s")
    assert restricted_loads(pickle.dumps(data, protocol=protocol)) == data


def test_save_load_round_trip(tmp_path, fixture_bin):
    data = load_verification_bin(fixture_bin)
    save_verification_bin(tmp_path / "copy.bin", data.images[:10], data.issame[:5])
    copy = load_verification_bin(tmp_path / "copy.bin")
    assert copy.images == data.images[:10] and copy.issame.tolist() == data.issame[:5].tolist()
    with pytest.raises(ValueError, match="3 given for 5 pairs"):
        save_verification_bin(io.BytesIO(), data.images[:3], data.issame[:5])


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_header_check_passes_pickled_pairs(tmp_path, fixture_bin, protocol):
    check_verification_bin(fixture_bin)
    path = tmp_path / "pair.bin"
    path.write_bytes(pickle.dumps(([b"a" * 100_000, b"b"], [True]), protocol=protocol))
    check_verification_bin(path)


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones(3))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda path: None, "cannot read (No such file or directory)"),
        (lambda path: path.mkdir(), "is a folder"),
        (lambda path: path.write_bytes(b""), "empty file: expected a pickle of (encoded images"),
        (lambda path: path.write_text("hello world\n"), "not a pickle of (encoded images"),
        (lambda path: path.write_bytes(_npy_bytes()), "not a pickle of (encoded images"),
        (lambda path: path.write_bytes(pickle.dumps({"a": 1}, protocol=2)), "not a pickle of"),
        (lambda path: path.write_bytes(b"\x80"), "not a pickle of"),
    ],
    ids=["missing", "folder", "empty", "text", "npy", "dict", "cut-short"],
)
def test_header_check_names_the_file_and_problem(tmp_path, make, problem):
    path = tmp_path / "set.bin"
    make(path)
    with pytest.raises(DataFormatError) as error:
        check_verification_bin(path)
    assert str(error.value).startswith(f"{path}: {problem}")
