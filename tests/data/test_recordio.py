import multiprocessing
import os
import pickle
import re
import shutil
import struct

import numpy as np
import pytest
from _records import reference_header, reference_records

from megaclass.data.recordio import (
    MAGIC,
    IRHeader,
    RecordReader,
    RecordWriter,
    pack,
    read_face_index,
    read_idx,
    unpack,
)
from megaclass.errors import DataFormatError

MAGIC_BYTES = struct.pack("<I", MAGIC)


def test_fixture_records_match_reference_parser(fixture_rec):
    reader = RecordReader(fixture_rec)
    reference = reference_records(fixture_rec)
    assert len(reader) == len(reference) == 362
    index = read_idx(reader.idx_path)
    for key, (offset, record, _) in enumerate(reference):
        assert index[key] == offset, f"key {key}"
        assert reader.read(key) == record, f"key {key}"
    assert list(reader) == [record for _, record, _ in reference]


def test_split_record_is_rejoined_with_magic(fixture_rec):
    reader = RecordReader(fixture_rec)
    parts = {key: count for key, (_, _, count) in enumerate(reference_records(fixture_rec))}
    assert parts[361] == 2, "the fixture's last record is stored in two parts"
    header, payload = unpack(reader.read(361))
    assert header.id == 361
    assert payload == b"ABCD" + MAGIC_BYTES + b"tail-bytes"


def test_insightface_layout(fixture_rec):
    reader = RecordReader(fixture_rec)
    header, _ = unpack(reader.read(0))
    assert header.flag == 2 and header.label.tolist() == [321.0, 361.0]
    index = read_face_index(reader)
    assert index.num_classes == 40
    assert index.keys.tolist() == list(range(1, 321))
    expected = [int(reference_header(reader.read(key))[1]) for key in range(1, 321)]
    assert index.labels.tolist() == expected
    assert np.bincount(index.labels).tolist() == [8] * 40


def test_face_index_without_header_reads_image_labels(tmp_path):
    with RecordWriter(tmp_path / "x.rec") as writer:
        for key, label in enumerate([2, 0, 1, 2]):
            writer.write(key + 5, pack(IRHeader(0, float(label), key, 0), b"img"))
    index = read_face_index(RecordReader(tmp_path / "x.rec"))
    assert index.keys.tolist() == [5, 6, 7, 8]
    assert index.labels.tolist() == [2, 0, 1, 2]
    assert index.num_classes == 3


@pytest.mark.parametrize(
    "label",
    [0.0, 3.0, -1.5, np.array([1.0, 9.0]), np.array([7.0]), np.arange(5, dtype=np.float64)],
    ids=["zero", "int", "negative", "range", "one", "five"],
)
@pytest.mark.parametrize("payload", [b"", b"x", b"\xff\xd8" * 33])
def test_pack_unpack_match_struct_layout(label, payload):
    record = pack(IRHeader(0, label, 123456789012, 7), payload)
    flag, ref_label, ident, ident2, rest = reference_header(record)
    assert (ident, ident2, rest) == (123456789012, 7, payload)
    if np.ndim(label) == 0:
        assert flag == 0 and ref_label == pytest.approx(float(label))
    else:
        assert flag == len(label) and ref_label == pytest.approx(list(label))
    header, out = unpack(record)
    assert out == payload and header.flag == flag
    np.testing.assert_allclose(header.label, label)


def test_unpack_rejects_short_records():
    with pytest.raises(DataFormatError, match="shorter than the 24-byte IRHeader"):
        unpack(b"\0" * 10, where="r")
    with pytest.raises(DataFormatError, match="flag 9"):
        unpack(struct.pack("<IfQQ", 9, 0, 0, 0) + b"\0" * 8, where="r")


@pytest.mark.parametrize(
    "payload, parts",
    [
        (b"", 1),
        (b"abc", 1),
        (b"abcde", 1),
        (MAGIC_BYTES, 2),
        (b"ABCD" + MAGIC_BYTES + b"tail-bytes", 2),
        (b"A" + MAGIC_BYTES + b"unaligned", 1),
        (MAGIC_BYTES + MAGIC_BYTES, 3),
        (b"12345678" + MAGIC_BYTES, 2),
        (b"xy" + MAGIC_BYTES + b"zw" + MAGIC_BYTES + b"q", 2),
    ],
    ids=["empty", "3", "5", "magic", "middle", "unaligned", "twice", "end", "mixed"],
)
def test_writer_splits_at_aligned_magic(tmp_path, payload, parts):
    path = tmp_path / "s.rec"
    with RecordWriter(path) as writer:
        writer.write(0, payload)
        writer.write(1, b"next")
    reference = reference_records(str(path))
    assert [record for _, record, _ in reference] == [payload, b"next"]
    assert reference[0][2] == parts
    assert os.path.getsize(path) % 4 == 0
    reader = RecordReader(path)
    assert reader.read(0) == payload and reader.read(1) == b"next"


def test_writer_reproduces_fixture_byte_for_byte(tmp_path, fixture_rec, fixture_dir):
    reader = RecordReader(fixture_rec)
    with RecordWriter(tmp_path / "train.rec") as writer:
        for key in reader.keys:
            writer.write(key, reader.read(key))
    with open(fixture_rec, "rb") as a, open(tmp_path / "train.rec", "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(fixture_dir, "train.idx")) as a, open(tmp_path / "train.idx") as b:
        assert a.read() == b.read()


def _corrupt(tmp_path, fixture_dir, how):
    for name in ("train.rec", "train.idx"):
        shutil.copy(os.path.join(fixture_dir, name), tmp_path / name)
        os.chmod(tmp_path / name, 0o644)
    rec = tmp_path / "train.rec"
    if how == "magic":
        with open(rec, "r+b") as handle:
            handle.seek(read_idx(tmp_path / "train.idx")[5])
            handle.write(b"\0\0\0\0")
    elif how == "truncated":
        index = read_idx(tmp_path / "train.idx")
        with open(rec, "r+b") as handle:
            handle.truncate(index[5] + 100)
        (tmp_path / "train.idx").write_text("".join(f"{key}\t{index[key]}\n" for key in range(6)))
    elif how == "index":
        with open(tmp_path / "train.idx", "a") as handle:
            handle.write(f"999\t{os.path.getsize(rec) + 16}\n")
    return RecordReader(rec)


@pytest.mark.parametrize(
    "how, message",
    [("magic", "bad magic 0x00000000"), ("truncated", "truncated record"), ("index", "points past the end")],
)
def test_corrupt_files_raise_data_format_error(tmp_path, fixture_dir, how, message):
    reader = _corrupt(tmp_path, fixture_dir, how)
    with pytest.raises(DataFormatError, match=message) as error:
        reader.read(5)
    assert "train." in str(error.value)


def test_bad_idx_line(tmp_path):
    (tmp_path / "x.idx").write_text("0\t0\nnot-a-number\t8\n")
    with pytest.raises(DataFormatError, match=r"x.idx:2: key and offset must be integers"):
        read_idx(tmp_path / "x.idx")


def _read_in_child(reader: RecordReader, key: int) -> tuple[int, bytes]:
    return os.getpid(), reader.read(key)


def test_reader_pickles_and_reopens_per_process(fixture_rec):
    reader = RecordReader(fixture_rec)
    expected = {key: reader.read(key) for key in range(1, 41)}  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        results = pool.starmap(_read_in_child, [(reader, key) for key in expected])
    assert all(os.getpid() != pid for pid, _ in results)
    assert [record for _, record in results] == list(expected.values())


def _copy_fixture(tmp_path, fixture_dir) -> str:
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(os.path.join(fixture_dir, name), tmp_path / name)
    return str(tmp_path / "train.rec")


def test_a_key_missing_from_the_idx_names_the_idx(tmp_path, fixture_dir):
    reader = RecordReader(_copy_fixture(tmp_path, fixture_dir))
    with pytest.raises(DataFormatError, match=r"train\.idx: no record with key 9999: the index lists 362"):
        reader.read(9999)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ((400.0, 441.0), r"header record 0 has label \[400, 441\)"),
        ((float("nan"), 5.0), r"header record 0 has label \[nan, 5.0\], expected two integers"),
        ((0.0, 41.0), r"header record 0 has label \[0, 41\)"),
        ((320.5, 361.0), "expected two integers"),
        ((330.0, 361.0), "image record 1 belongs to 0 identities"),
    ],
)
def test_bogus_header_labels_are_refused(tmp_path, fixture_dir, label, message):
    rec = _copy_fixture(tmp_path, fixture_dir)
    with open(rec, "r+b") as handle:  # record 0's two label floats follow its frame and IRHeader
        handle.seek(read_idx(tmp_path / "train.idx")[0] + 8 + 24)
        handle.write(struct.pack("<ff", *label))
    with pytest.raises(DataFormatError, match=message):
        read_face_index(RecordReader(rec))


def test_decode_rec_refuses_a_non_image_payload_and_leaves_nothing(tmp_path, fixture_dir):
    from megaclass.data.images import decode_rec

    folder = tmp_path / "rec"
    folder.mkdir()
    rec = _copy_fixture(folder, fixture_dir)
    with open(rec, "r+b") as handle:
        handle.seek(read_idx(folder / "train.idx")[200] + 8 + 24)
        handle.write(b"\0\0\0\0")
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match=r"record 200: payload of \d+ bytes .* is not an image"):
        decode_rec(folder, out)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(DataFormatError):
        decode_rec(folder, existing)
    assert sorted(os.listdir(existing)) == ["keep.txt"]


@pytest.mark.parametrize(
    ("label", "shown"), [(float("nan"), "nan"), (float("inf"), "inf"), (3e9, "3e+09"), (2.5, "2.5")]
)
def test_image_labels_that_are_no_class_id_are_refused(tmp_path, label, shown):
    with RecordWriter(tmp_path / "x.rec") as writer:
        writer.write(5, pack(IRHeader(0, 1.0, 0, 0), b"img"))
        writer.write(6, pack(IRHeader(0, label, 1, 0), b"img"))
    with pytest.raises(
        DataFormatError, match=re.escape(f"x.rec: image record 6 has label {shown}: expected")
    ):
        read_face_index(RecordReader(tmp_path / "x.rec"))
