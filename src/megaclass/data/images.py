"""Face image data sets: an InsightFace ``.rec``, an image folder (``<label>/<file>``) or a list file.

``megaclass train --train faces/train.rec ...`` (or ``--train faces/images/`` or ``faces/train_list.txt``)

Images are decoded with Pillow to RGB ``uint8`` and batched as ``(B, 3, H, W)`` uint8 tensors; the encoder
scales them to ``[-1, 1]`` on its device (:func:`normalize_images`), so a quarter of the bytes cross to the
GPU, and mirrors a random half of each training batch there (the face backbones' ``flip`` option). A
dataset can also flip on the host (``flip=True``), seeded by each batch's rows so a resumed run sees the same
flips. ``decode_rec`` unpacks a ``.rec`` into a folder plus list files; ``make_rec`` packs a folder or list
into a ``.rec``, ``.idx`` and ``property`` as InsightFace lays them out.
"""

from __future__ import annotations

import io
import math
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from megaclass.data.batch import Batch, InputSpec
from megaclass.data.recordio import IRHeader, RecordReader, RecordWriter, pack, read_face_index, unpack
from megaclass.errors import DataFormatError

__all__ = [
    "DecodeSummary",
    "FaceImageDataset",
    "FileSource",
    "RecordSource",
    "decode_image",
    "decode_rec",
    "flip_images",
    "images_to_tensor",
    "is_image_list",
    "make_rec",
    "normalize_images",
    "open_face_dataset",
    "read_image_list",
    "scan_image_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_LIST_LINE = re.compile(r"^\s*(\S.*?)\s+(-?\d+)\s*$")
_MAX_LABEL = (1 << 31) - 2  # the label space (largest label + 1) must fit int32, as other formats' does


def normalize_images(images: Tensor) -> Tensor:
    """uint8 ``(B, 3, H, W)`` in ``[0, 255]`` to float32 in ``[-1, 1]``: ``(x - 127.5) / 127.5``."""
    return images.float().sub_(127.5).div_(127.5)


def flip_images(images: Tensor) -> Tensor:
    """Mirror ``(B, 3, H, W)`` images left to right."""
    return torch.flip(images, dims=(-1,))


def decode_image(data: bytes, *, size: int | None = None, where: str = "<image>") -> np.ndarray:
    """Decode JPEG/PNG/... bytes to RGB ``(H, W, 3)`` uint8, resized to ``size x size`` when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataFormatError(where, f"cannot decode image ({len(data)} bytes): {error}") from None


def images_to_tensor(images: Sequence[np.ndarray]) -> Tensor:
    """Stack ``(H, W, 3)`` uint8 arrays into a ``(B, 3, H, W)`` uint8 tensor."""
    stacked = np.stack(images)  # (B, H, W, 3)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def _image_extension(data: bytes) -> str | None:
    """The file extension of encoded image bytes by their signature; None when they are no known image."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:2] == b"BM":
        return ".bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


class RecordSource:
    """Encoded images and labels of an InsightFace ``.rec`` (with ``.idx`` beside it)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.reader = RecordReader(self.path)
        index = read_face_index(self.reader)
        self.keys, self.labels, self.num_classes = index.keys, index.labels, index.num_classes

    def __len__(self) -> int:
        return int(self.keys.size)

    def read(self, position: int) -> bytes:
        key = int(self.keys[position])
        _, payload = unpack(self.reader.read(key), where=f"{self.path} key {key}")
        return payload

    def name(self, position: int) -> str:
        return f"{self.path} key {int(self.keys[position])}"


class FileSource:
    """Encoded images read from files ``root/relpath`` with their labels."""

    def __init__(self, root: str, relpaths: Sequence[str], labels: np.ndarray, *, path: str) -> None:
        self.root = root
        self.relpaths = list(relpaths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.path = path
        self.num_classes = int(self.labels.max()) + 1 if self.labels.size else 0

    def __len__(self) -> int:
        return len(self.relpaths)

    def read(self, position: int) -> bytes:
        with open(os.path.join(self.root, self.relpaths[position]), "rb") as handle:
            return handle.read()

    def name(self, position: int) -> str:
        return os.path.join(self.root, self.relpaths[position])


def _class_order(names: Sequence[str]) -> list[str]:
    """Class folder names in label order: numerically when all are integers, else by name."""
    if all(name.isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _natural(name: str) -> list[int | str]:
    """Sort key putting ``9.jpg`` before ``10.jpg``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """``(relpaths, labels, class_names)`` of ``root/<class>/<image>``; classes numbered in sorted order."""
    root = os.fspath(root)
    classes = _class_order([entry.name for entry in os.scandir(root) if entry.is_dir()])
    relpaths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            (f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS)),
            key=_natural,
        )
        relpaths += [f"{name}/{file}" for file in files]
        labels += [label] * len(files)
    if not relpaths:
        raise DataFormatError(
            root, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders <label>/<file>"
        )
    return relpaths, np.asarray(labels, dtype=np.int64), classes


def read_image_list(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(relpaths, labels)`` of a list file of ``relpath label`` lines (paths relative to the file).

    Every image it names must exist (one ``stat`` a line), so a missing one is found when the list is read,
    not when a batch first asks for it.
    """
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    relpaths, labels = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            match = _LIST_LINE.match(line)
            if match is None:
                raise DataFormatError(path, f"expected 'relpath label', got {line.rstrip()!r}", line=number)
            label = int(match.group(2))
            if label < 0:
                raise DataFormatError(path, f"label {label} is negative, expected >= 0", line=number)
            if label > _MAX_LABEL:
                raise DataFormatError(
                    path, f"label {label} too large: expected at most {_MAX_LABEL}", line=number
                )
            image = os.path.join(root, match.group(1))
            if not os.path.isfile(image):
                problem = "is not a file" if os.path.exists(image) else "does not exist"
                raise DataFormatError(
                    path,
                    f"image {match.group(1)} ({image}) {problem}: paths are relative to the list's folder",
                    line=number,
                )
            relpaths.append(match.group(1))
            labels.append(label)
    if not relpaths:
        raise DataFormatError(path, "no 'relpath label' lines")
    return relpaths, np.asarray(labels, dtype=np.int64)


def is_image_list(path: str | os.PathLike) -> bool:
    """Whether ``path``'s first line reads ``<image file> <integer label>``."""
    with open(path, "rb") as handle:
        first = handle.readline(1 << 16).decode("utf-8", errors="replace")
    match = _LIST_LINE.match(first)
    return match is not None and match.group(1).lower().endswith(IMAGE_EXTENSIONS)


def _open_source(path: str) -> RecordSource | FileSource:
    if os.path.isdir(path):
        rec = os.path.join(path, "train.rec")
        if os.path.isfile(rec):
            return RecordSource(rec)
        relpaths, labels, _ = scan_image_folder(path)
        return FileSource(path, relpaths, labels, path=path)
    if path.endswith(".rec"):
        return RecordSource(path)
    relpaths, labels = read_image_list(path)
    return FileSource(os.path.dirname(os.path.abspath(path)), relpaths, labels, path=path)


class FaceImageDataset:
    """Labelled face images: ``batch(rows)`` gives uint8 ``(B, 3, S, S)`` images and ``LongTensor[B]`` labels.

    Args:
        source: a :class:`RecordSource` or :class:`FileSource`.
        num_classes: ``C``; default the source's (the ``.rec`` header's, or the largest label + 1).
        image_size: decode to ``S x S`` (resizing other sizes); default the first image's side.
        flip: mirror each image with probability 1/2 (training augmentation).
        seed: seeds the flips together with each batch's rows.
    """

    multilabel = False
    featurizer = None  # images need no text featuriser
    label_names = None  # identities are ids

    def __init__(
        self,
        source: RecordSource | FileSource,
        *,
        num_classes: int | None = None,
        image_size: int | None = None,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.path = source.path
        self.num_classes = source.num_classes if num_classes is None else int(num_classes)
        if len(source) and int(source.labels.max()) >= self.num_classes:
            raise DataFormatError(
                self.path, f"label {int(source.labels.max())} out of range for num_classes={self.num_classes}"
            )
        if image_size is None and len(source):
            image_size = decode_image(source.read(0), where=source.name(0)).shape[0]
        self.image_size = image_size
        self.flip = flip
        self.seed = seed
        self.input_spec = InputSpec(kind="image")
        self._label_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source)

    def label_counts(self) -> np.ndarray:
        """``(C,)`` int64 images per class; counted once and shared (do not change it)."""
        if self._label_counts is None:
            counts = np.bincount(self.source.labels, minlength=self.num_classes)
            self._label_counts = counts.astype(np.int64, copy=False)
        return self._label_counts

    def images(self, rows: np.ndarray) -> Tensor:
        """uint8 ``(B, 3, S, S)`` of rows ``rows``, flipped as training wants when ``flip`` is on."""
        rows = np.asarray(rows, dtype=np.int64)
        decoded = [
            decode_image(self.source.read(int(row)), size=self.image_size, where=self.source.name(int(row)))
            for row in rows
        ]
        images = images_to_tensor(decoded)  # (B, 3, S, S)
        if self.flip:
            rng = np.random.default_rng([self.seed, zlib.crc32(rows.tobytes())])
            mirror = torch.from_numpy(rng.random(rows.size) < 0.5)
            images[mirror] = flip_images(images[mirror])
        return images

    def batch(self, rows: np.ndarray) -> Batch:
        """The :class:`Batch` of rows ``rows`` ``(B,)``, on the CPU."""
        rows = np.asarray(rows, dtype=np.int64)
        return Batch(self.images(rows), torch.from_numpy(self.source.labels[rows]))


def open_face_dataset(
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    flip: bool = False,
    seed: int = 0,
) -> FaceImageDataset:
    """Open a ``.rec`` (or a folder holding ``train.rec``), an image folder, or a ``relpath label`` list."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataFormatError(path, "no such file or folder")
    source = _open_source(path)
    return FaceImageDataset(source, num_classes=num_classes, image_size=image_size, flip=flip, seed=seed)


@dataclass(frozen=True)
class DecodeSummary:
    """What :func:`decode_rec` wrote."""

    images: int
    classes: int
    train: int
    val: int


def decode_rec(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, int], object] | None = None,
) -> DecodeSummary:
    """Unpack ``IN_DIR/train.rec`` to ``OUT_DIR/<label>/<key>.jpg``, ``train_list.txt`` and ``val_list.txt``.

    Payloads are written as stored, byte for byte. Each identity with two or more images puts
    ``max(1, floor(val_fraction * n))`` of them (chosen with ``seed``) in the validation list. A payload that
    is not a JPEG, PNG, BMP or WebP image (an empty one, when a bogus header makes identity records images)
    is a :class:`DataFormatError` naming the record, and the files written before it are removed.

    Args:
        in_dir: a folder holding ``train.rec`` and ``train.idx`` (or the ``.rec`` path itself).
        out_dir: created if needed.
        val_fraction: share of each identity's images for validation (0: none).
        progress: called with ``(images written since the last call, total images)``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    in_dir, out_dir = os.fspath(in_dir), os.fspath(out_dir)
    source = RecordSource(os.path.join(in_dir, "train.rec") if os.path.isdir(in_dir) else in_dir)
    created: list[str] = []  # files and folders this call made, removed again when a record is bad
    try:
        _make_folder(out_dir, created)
        relpaths = []
        for position in range(len(source)):
            payload = source.read(position)
            extension = _image_extension(payload)
            if extension is None:
                raise DataFormatError(
                    source.path,
                    f"record {int(source.keys[position])}: payload of {len(payload)} bytes starting "
                    f"{payload[:8]!r} is not an image: expected JPEG, PNG, BMP or WebP bytes",
                )
            label = int(source.labels[position])
            relpath = f"{label}/{int(source.keys[position])}{extension}"
            _make_folder(os.path.join(out_dir, str(label)), created)
            _write_new(os.path.join(out_dir, relpath), payload, created)
            relpaths.append(relpath)
            if progress is not None:
                progress(1, len(source))
        val = _validation_rows(source.labels, val_fraction, seed)
        for name, chosen in (("train_list.txt", ~val), ("val_list.txt", val)):
            lines = "".join(
                f"{relpaths[position]} {int(source.labels[position])}\n"
                for position in np.flatnonzero(chosen)
            )
            _write_new(os.path.join(out_dir, name), lines.encode("utf-8"), created)
    except BaseException:
        for path in reversed(created):
            if os.path.isdir(path):
                os.rmdir(path)  # a folder of its own files only, removed just before
            else:
                os.unlink(path)
        raise
    return DecodeSummary(len(source), source.num_classes, int((~val).sum()), int(val.sum()))


def _make_folder(path: str, created: list[str]) -> None:
    if not os.path.isdir(path):
        os.makedirs(path)
        created.append(path)


def _write_new(path: str, data: bytes, created: list[str]) -> None:
    """Write ``data`` to ``path``, recording it in ``created`` unless it existed before."""
    existed = os.path.exists(path)
    with open(path, "wb") as handle:
        if not existed:
            created.append(path)
        handle.write(data)


def _validation_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``(N,)`` bool: the images held out, ``max(1, floor(fraction * n))`` of each identity with n >= 2."""
    val = np.zeros(labels.size, dtype=bool)
    if fraction == 0:
        return val
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for group in np.split(order, bounds):
        if group.size >= 2:
            count = max(1, math.floor(fraction * group.size))
            val[rng.choice(group, size=count, replace=False)] = True
    return val


def make_rec(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str = "train",
    progress: Callable[[int, int], object] | None = None,
) -> int:
    """Pack an image folder (``<class>/<image>``) or a ``relpath label`` list into ``OUT_DIR/train.rec``.

    Writes InsightFace's layout: header record 0, image records ``1..N`` grouped by class (payloads stored
    byte for byte, label = class), one identity record per class, ``train.idx``, and ``property``
    (``classes,height,width``). Returns the number of images. ``progress`` is called as in :func:`decode_rec`.
    """
    source, out_dir = os.fspath(source), os.fspath(out_dir)
    if os.path.isdir(source):
        relpaths, labels, class_names = scan_image_folder(source)
        root = source
    else:
        relpaths, labels = read_image_list(source)
        root = os.path.dirname(os.path.abspath(source))
        class_names = None
    order = np.argsort(labels, kind="stable")
    num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    counts = np.bincount(labels, minlength=num_classes)
    if np.any(counts == 0):  # a class without images would be an identity no sample trains
        empty = int(np.argmax(counts == 0))
        if class_names is not None:
            raise DataFormatError(
                os.path.join(source, class_names[empty]),
                f"class folder has no images ({', '.join(IMAGE_EXTENSIONS)}): every class needs one",
            )
        raise DataFormatError(
            source, f"no image has label {empty}: labels must be 0..{num_classes - 1} with images for each"
        )
    first_identity = len(relpaths) + 1
    os.makedirs(out_dir, exist_ok=True)
    height = width = 0
    with RecordWriter(os.path.join(out_dir, f"{name}.rec")) as writer:
        writer.write(
            0, pack(IRHeader(0, np.array([first_identity, first_identity + num_classes]), 0, 0), b"")
        )
        for key, position in enumerate(order.tolist(), start=1):
            with open(os.path.join(root, relpaths[position]), "rb") as handle:
                payload = handle.read()
            if key == 1:
                height, width = decode_image(payload, where=relpaths[position]).shape[:2]
            writer.write(key, pack(IRHeader(0, float(labels[position]), key, 0), payload))
            if progress is not None:
                progress(1, len(relpaths))
        ends = np.cumsum(counts) + 1
        for label in range(num_classes):
            bounds = np.array([ends[label] - counts[label], ends[label]], dtype=np.float32)
            writer.write(first_identity + label, pack(IRHeader(0, bounds, 0, 0), b""))
    with open(os.path.join(out_dir, "property"), "w", encoding="ascii") as handle:
        handle.write(f"{num_classes},{height},{width}")
    return len(relpaths)
