"""Parsed-data caches: NumPy ``.npz`` archives stamped with what they were made from, written atomically.

A cache may live in several places (beside the data first, then the cache directory ``$MEGACLASS_CACHE``,
default ``~/.cache/megaclass``); a reader takes the first archive whose stamp matches, a writer the first
writable folder. A cache that cannot be read or written is no error: the data is parsed again.

>>> import tempfile
>>> from pathlib import Path
>>> candidates = [Path(tempfile.mkdtemp()) / "rows.npz"]
>>> write_cache(candidates, {"stamp": np.array([1, 2]), "ids": np.arange(3)}) == candidates[0]
True
>>> read_cache(candidates, "stamp", np.array([1, 2]))["ids"]
array([0, 1, 2])
>>> read_cache(candidates, "stamp", np.array([1, 3])) is None
True
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "read_cache", "write_cache"]


def cache_dir() -> Path:
    """``$MEGACLASS_CACHE``, else ``~/.cache/megaclass``: caches of data in read-only folders."""
    return Path(os.environ.get("MEGACLASS_CACHE") or Path.home() / ".cache" / "megaclass")


def read_cache(
    candidates: Sequence[Path], stamp_name: str, stamp: np.ndarray
) -> dict[str, np.ndarray] | None:
    """The arrays of the first candidate whose array ``stamp_name`` equals ``stamp``; None when none does."""
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            with np.load(candidate, allow_pickle=False) as archive:
                if np.array_equal(archive[stamp_name], stamp):
                    return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, KeyError):
            continue
    return None


def write_cache(candidates: Sequence[Path], arrays: Mapping[str, np.ndarray]) -> Path | None:
    """Write ``arrays`` (a temporary file, then a rename) to the first candidate whose folder is writable;
    the candidate written, or None when none is."""
    for candidate in candidates:
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            if not _writable(candidate.parent):
                continue
            handle, temporary = tempfile.mkstemp(dir=candidate.parent, suffix=".tmp.npz")
        except OSError:
            continue
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, **arrays)
            os.chmod(temporary, 0o644)
            os.replace(temporary, candidate)
            return candidate
        except OSError:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return None


def _writable(folder: Path) -> bool:
    """Whether ``folder`` is writable: by permission and by its mode bits (a superuser ignores the former)."""
    return os.access(folder, os.W_OK) and bool(
        folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    )
