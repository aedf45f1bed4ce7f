import io
import os

import numpy as np
import pytest
import torch
from _records import reference_header, reference_records
from PIL import Image

from megaclass.data.images import (
    decode_image,
    decode_rec,
    flip_images,
    make_rec,
    normalize_images,
    open_face_dataset,
    read_image_list,
)
from megaclass.data.loaders import BatchLoader, detect_format, open_dataset
from megaclass.data.recordio import RecordReader, read_face_index, unpack
from megaclass.errors import DataFormatError


@pytest.fixture(scope="module")
def decoded(tmp_path_factory, fixture_dir):
    out = tmp_path_factory.mktemp("decoded")
    summary = decode_rec(fixture_dir, out, val_fraction=0.25, seed=1)
    return out, summary


def _payloads(fixture_rec):
    """``{key: (label, payload)}`` of the image records, from the plain parser."""
    records = reference_records(fixture_rec)
    result = {}
    for key in range(1, 321):
        _, label, _, _, payload = reference_header(records[key][1])
        result[key] = (int(label), payload)
    return result


def test_decode_rec_reproduces_payloads_byte_for_byte(decoded, fixture_rec):
    out, summary = decoded
    payloads = _payloads(fixture_rec)
    assert (summary.images, summary.classes) == (320, 40)
    for key, (label, payload) in payloads.items():
        with open(out / str(label) / f"{key}.jpg", "rb") as handle:
            assert handle.read() == payload, f"key {key}"
    train, train_labels = read_image_list(out / "train_list.txt")
    val, val_labels = read_image_list(out / "val_list.txt")
    assert sorted(train + val) == sorted(f"{label}/{key}.jpg" for key, (label, _) in payloads.items())
    assert len(val) == summary.val == 40 * 2  # floor(0.25 * 8) images of every identity
    assert np.bincount(val_labels, minlength=40).tolist() == [2] * 40
    assert all(
        int(path.split("/")[0]) == label
        for path, label in zip(train + val, [*train_labels, *val_labels], strict=True)
    )


def test_make_rec_round_trips_to_the_fixture(decoded, tmp_path, fixture_dir):
    out, _ = decoded
    count = make_rec(out, tmp_path)
    assert count == 320
    original, rebuilt = (
        RecordReader(os.path.join(fixture_dir, "train.rec")),
        RecordReader(tmp_path / "train.rec"),
    )
    assert [rebuilt.read(key) for key in range(361)] == [original.read(key) for key in range(361)]
    assert (tmp_path / "property").read_text() == "40,112,112"


def test_make_rec_from_a_list(decoded, tmp_path):
    out, _ = decoded
    make_rec(out / "val_list.txt", tmp_path)
    index = read_face_index(RecordReader(tmp_path / "train.rec"))
    relpaths, labels = read_image_list(out / "val_list.txt")
    order = np.argsort(labels, kind="stable")
    assert index.labels.tolist() == labels[order].tolist()
    reader = RecordReader(tmp_path / "train.rec")
    for key, position in zip(index.keys.tolist(), order.tolist(), strict=True):
        with open(out / relpaths[position], "rb") as handle:
            assert unpack(reader.read(key))[1] == handle.read()


@pytest.mark.parametrize("source", ["rec", "rec-folder", "image-folder", "list"])
def test_open_face_dataset_sources_agree(decoded, fixture_dir, source):
    out, _ = decoded
    path = {
        "rec": os.path.join(fixture_dir, "train.rec"),
        "rec-folder": fixture_dir,
        "image-folder": str(out),
        "list": str(out / "train_list.txt"),
    }[source]
    assert detect_format(path) == "face-images"
    dataset = open_dataset(path)
    assert dataset.input_spec.kind == "image" and dataset.num_classes == 40 and not dataset.multilabel
    batch = dataset.batch(np.array([0, 5, 3]))
    assert batch.inputs.shape == (3, 3, 112, 112) and batch.inputs.dtype == torch.uint8
    assert batch.targets.dtype == torch.int64
    payload = dataset.source.read(5)
    expected = np.array(Image.open(io.BytesIO(payload)).convert("RGB"))
    assert torch.equal(batch.inputs[1], torch.from_numpy(expected).permute(2, 0, 1))
    assert dataset.label_counts().sum() == len(dataset)


def test_dataset_flip_is_seeded_by_rows(fixture_rec):
    plain = open_face_dataset(fixture_rec)
    flipping = open_face_dataset(fixture_rec, flip=True, seed=4)
    rows = np.arange(40)
    a, b, base = flipping.images(rows), flipping.images(rows), plain.images(rows)
    assert torch.equal(a, b)
    mirrored = (a == flip_images(base)).flatten(1).all(1)
    same = (a == base).flatten(1).all(1)
    assert torch.all(mirrored | same) and 5 < int(mirrored.sum()) < 35


def test_batch_loader_workers_read_the_rec(fixture_rec):
    dataset = open_face_dataset(fixture_rec)
    serial = BatchLoader(dataset, batch_size=64, seed=3)
    parallel = BatchLoader(dataset, batch_size=64, seed=3, num_workers=2)
    for a, b in zip(serial.epoch(1), parallel.epoch(1), strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def test_normalize_images_range():
    images = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    out = normalize_images(images)
    torch.testing.assert_close(out[0, 0].flatten(), torch.tensor([-1.0, -0.5 / 127.5, 0.5 / 127.5, 1.0]))


def test_decode_image_resizes_and_reports_bad_bytes():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 30), (10, 200, 30)).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).shape == (30, 20, 3)
    assert decode_image(buffer.getvalue(), size=16).shape == (16, 16, 3)
    with pytest.raises(DataFormatError, match="x.jpg: cannot decode image"):
        decode_image(b"not an image", where="x.jpg")


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.jpg\n", "expected 'relpath label'"),
        ("a.jpg -3\n", "label -3 is negative"),
        ("\n\n", "no 'relpath label'"),
    ],
)
def test_bad_list_files(tmp_path, text, message):
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(DataFormatError, match=message):
        read_image_list(tmp_path / "list.txt")


def test_label_beyond_num_classes(fixture_rec):
    with pytest.raises(DataFormatError, match="label 39 out of range for num_classes=10"):
        open_face_dataset(fixture_rec, num_classes=10)


def test_a_list_naming_a_missing_image_names_the_list_line_and_path(decoded, tmp_path):
    folder, _ = decoded
    first = (folder / "val_list.txt").read_text().splitlines()[0]
    listed = tmp_path / "list.txt"
    listed.write_text(f"{folder.name}/{first}\n\nmissing/1.jpg 3\n")
    (tmp_path / folder.name).symlink_to(folder)  # the first line's image is there, relative to the list
    with pytest.raises(DataFormatError) as error:
        open_dataset(str(listed))
    assert error.value.path == str(listed) and error.value.line == 3
    assert f"image missing/1.jpg ({tmp_path / 'missing' / '1.jpg'}) does not exist" in str(error.value)
    listed.write_text(f"{folder.name}/{first}\n{folder.name}/0 3\n")  # a folder, not an image file
    with pytest.raises(DataFormatError, match=r":2: image .* is not a file"):
        read_image_list(listed)
    listed.write_text(f"{folder.name}/{first}\n")
    assert read_image_list(listed)[0] == [f"{folder.name}/{first.split()[0]}"]


def test_a_list_label_past_int32_is_refused(tmp_path):
    (tmp_path / "list.txt").write_text("a.jpg 99999999999999999999999\n")
    with pytest.raises(DataFormatError, match=r"list.txt:1: label 99999999999999999999999 too large"):
        read_image_list(tmp_path / "list.txt")
