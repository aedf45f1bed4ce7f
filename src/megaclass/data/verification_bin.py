"""InsightFace verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

Each file is a pickle of ``(bins, issame_list)``: ``2 P`` encoded images (pair ``i`` is images ``2i`` and
``2i + 1``) and ``P`` booleans. They were written by Python 2, so strings are read as bytes. Pickles can run
code when loaded; these are loaded with a restricted unpickler that builds only lists, tuples, bytes, strings,
booleans and numbers and refuses any global (class or function) with a :class:`DataFormatError`.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "tiny.bin")
>>> save_verification_bin(path, [b"a", b"b"], [True])
>>> load_verification_bin(path).num_pairs
1
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megaclass.errors import DataFormatError

__all__ = [
    "VerificationSet",
    "check_verification_bin",
    "load_verification_bin",
    "restricted_loads",
    "save_verification_bin",
]

_HEAD_BYTES = 64  # PROTO (2 bytes), FRAME (9) and the pair's first opcode fit
# A pickled (list, list) starts with one of these after PROTO / FRAME: a list (protocol 1+) or a MARK
# (protocol 0's lists and protocol 0 / 1 tuples)
_PAIR_OPENINGS = ("EMPTY_LIST", "MARK")


@dataclass(frozen=True)
class VerificationSet:
    """A face verification set.

    Attributes:
        name: the file's stem (``lfw``).
        images: ``2 P`` encoded images (JPEG/PNG bytes); pair ``i`` is ``images[2i], images[2i + 1]``.
        issame: ``(P,)`` bool, whether pair ``i`` shows one person.
    """

    name: str
    images: list[bytes]
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The one callable allowed: how Python 3 pickles ``bytes`` at protocol <= 2 (``_codecs.encode``)."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode("latin-1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds plain containers, bytes and numbers only; every global lookup except bytes' encoder fails."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only plain data is allowed)")

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("refusing persistent id (only plain data is allowed)")


def restricted_loads(data: bytes, *, where: str = "<bytes>") -> object:
    """Unpickle ``data`` allowing only lists, tuples, dicts, bytes, str, bool, numbers and None.

    Raises:
        DataFormatError: naming ``where`` when the pickle asks for anything else or is malformed.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise DataFormatError(where, f"not a plain-data pickle: {error}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as error:
        raise DataFormatError(where, f"malformed pickle: {type(error).__name__}: {error}") from None


def load_verification_bin(path: str | os.PathLike) -> VerificationSet:
    """Load an InsightFace ``.bin`` verification set without running any code it may contain.

    Raises:
        DataFormatError: the file is not a pickle of ``(2P encoded images, P booleans)``.
    """
    path = os.fspath(path)
    with open(path, "rb") as handle:
        loaded = restricted_loads(handle.read(), where=path)
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise DataFormatError(
            path, f"expected a pickled pair (bins, issame_list), got {type(loaded).__name__}"
        )
    bins, issame = loaded
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise DataFormatError(path, "expected (list of encoded images, list of booleans)")
    images = []
    for position, item in enumerate(bins):
        if not isinstance(item, (bytes, bytearray)):
            raise DataFormatError(
                path, f"image {position} is a {type(item).__name__}, expected encoded bytes"
            )
        images.append(bytes(item))
    for position, item in enumerate(issame):
        if not isinstance(item, (bool, int)) or item not in (0, 1):
            raise DataFormatError(path, f"issame[{position}] is {item!r}, expected a boolean")
    if len(images) != 2 * len(issame):
        raise DataFormatError(
            path, f"{len(images)} images for {len(issame)} pairs, expected {2 * len(issame)}"
        )
    name = os.path.splitext(os.path.basename(path))[0]
    return VerificationSet(name, images, np.asarray(issame, dtype=bool))


def check_verification_bin(path: str | os.PathLike) -> None:
    """Check cheaply that ``path`` is a readable file that opens as a pickled pair: its first opcodes only.

    For the checks made before a run starts; :func:`load_verification_bin` reads and checks the whole file.

    Raises:
        DataFormatError: the file is missing, unreadable, empty, or does not start as a pickled pair.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataFormatError(path, "is a folder: expected a .bin file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError as error:
        raise DataFormatError(path, f"cannot read ({error.strerror or error})") from None
    pair = "a pickle of (encoded images, issame booleans), as InsightFace's .bin sets are"
    if not head:
        raise DataFormatError(path, f"empty file: expected {pair}")
    first = None
    try:
        for opcode, _, _ in pickletools.genops(io.BytesIO(head)):
            if opcode.name not in ("PROTO", "FRAME"):
                first = opcode.name
                break
    except (ValueError, OverflowError, EOFError):  # an unknown opcode, or an argument cut short
        pass
    if first not in _PAIR_OPENINGS:
        raise DataFormatError(path, f"not {pair}")


def save_verification_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a ``.bin`` verification set that InsightFace's and this loader read."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"images: {len(images)} given for {len(issame)} pairs, expected {2 * len(issame)}")
    with open(path, "wb") as handle:
        pickle.dump(
            ([bytes(image) for image in images], [bool(value) for value in issame]), handle, protocol=4
        )
