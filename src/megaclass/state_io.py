"""Nested state on disk: tensors in safetensors, the rest in JSON, every file checksummed, renamed into place.

A state folder holds ``tensors.safetensors``, ``state.json`` and ``manifest.json``. Any nested state (module
and optimizer state dicts, RNG states, counters) is split by :func:`flatten` into a JSON tree whose tensors
are replaced by ``{"__tensor__": key}`` references into the safetensors file. ``manifest.json`` gives the
size and SHA-256 of every other file under the folder (:func:`write_manifest`), so a reader tells a whole
folder from a truncated or altered one (:func:`verify_manifest`). The folder is written under a temporary
name and renamed (:func:`replace_folder`), so a kill leaves the old folder or the new one, never half of one.

>>> import tempfile, torch
>>> folder = write_state(tempfile.mkdtemp() + "/model", {"w": torch.ones(2), "step": 3})
>>> read_state(folder)["step"]
3
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MANIFEST",
    "DamagedStateError",
    "file_fingerprint",
    "flatten",
    "fsync_path",
    "path_fingerprint",
    "read_state",
    "replace_folder",
    "unflatten",
    "verify_manifest",
    "write_json_atomic",
    "write_manifest",
    "write_state",
]

MANIFEST = "manifest.json"
_TENSORS = "tensors.safetensors"
_STATE = "state.json"
_CHUNK_BYTES = 1 << 20


class DamagedStateError(ValueError):
    """A state folder's files do not match its manifest (or it has none): truncated, altered or unfinished.

    The message names the folder, the file and what differs.
    """


# ------------------------------------------------------------------------------------------ nested state


def flatten(state: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split ``state`` into a JSON-able tree and the tensors it references.

    Dicts (any hashable keys), lists, tuples, numbers, strings, None, numpy arrays and tensors are allowed.
    Non-string dict keys and tuples are tagged so that :func:`unflatten` gives back the same Python values.
    """
    tensors: dict[str, Tensor] = {}
    tree = _flatten(state, prefix, tensors)
    return tree, tensors


def _child(key: str, name: Any, index: int) -> str:
    part = name if isinstance(name, str) else f"#{index}"
    return f"{key}.{part}" if key else part


def _store(tensors: dict[str, Tensor], key: str, tensor: Tensor) -> str:
    if key in tensors:  # two paths spelled alike ("a.b" inside "x" vs "b" inside "x.a"): keep both
        key = f"{key}~{len(tensors)}"
    tensors[key] = tensor
    return key


def _flatten(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        return {"__tensor__": _store(tensors, key, value.detach().cpu().contiguous().clone())}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _store(tensors, key, torch.from_numpy(np.ascontiguousarray(value).copy()))}
    if isinstance(value, dict):
        items = [
            [
                _flatten(name, _child(key, f"#key{i}", i), tensors),
                _flatten(item, _child(key, name, i), tensors),
            ]
            for i, (name, item) in enumerate(value.items())
        ]
        return {"__dict__": items}
    if isinstance(value, (list, tuple)):
        items = [_flatten(item, _child(key, i, i), tensors) for i, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"checkpoint state at {key!r}: cannot store a {type(value).__name__}")


def unflatten(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy()
        if "__tuple__" in tree:
            return tuple(unflatten(item, tensors) for item in tree["__tuple__"])
        if "__dict__" in tree:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in tree["__dict__"]}
        raise ValueError(f"checkpoint state: unexpected mapping {sorted(tree)!r}")
    if isinstance(tree, list):
        return [unflatten(item, tensors) for item in tree]
    return tree


# ------------------------------------------------------------------------------------------- checksums


def file_fingerprint(path: str) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of the file at ``path``, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def path_fingerprint(path: str) -> dict[str, Any]:
    """:func:`file_fingerprint` of a file; of a folder (an image folder may hold millions of files), the total
    size of its files and the SHA-256 of its listing: each file's relative path and size."""
    if not os.path.isdir(path):
        return file_fingerprint(path)
    digest = hashlib.sha256()
    total = 0
    for relative in _files_under(path, skip_manifest=False):
        size = os.path.getsize(os.path.join(path, relative))
        digest.update(f"{relative}\t{size}\n".encode())
        total += size
    return {"size": total, "sha256": digest.hexdigest()}


def _files_under(folder: str, *, skip_manifest: bool = True) -> list[str]:
    """Every file under ``folder`` (but its manifest), relative to it (``/``-separated, sorted)."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST or not skip_manifest:
                found.append(relative)
    return sorted(found)


def write_manifest(folder: str) -> None:
    """Write ``folder/manifest.json``: the size and SHA-256 of every file under ``folder``, after syncing each
    to disk (a manifest never vouches for bytes still in the page cache only)."""
    files = {}
    for relative in _files_under(folder):
        path = os.path.join(folder, relative)
        fsync_path(path)
        files[relative] = file_fingerprint(path)
    write_json_atomic(os.path.join(folder, MANIFEST), {"files": files})


def verify_manifest(folder: str) -> None:
    """Check every file that ``folder/manifest.json`` lists against its size and SHA-256.

    Raises:
        DamagedStateError: the manifest is missing or unreadable, or a file is missing, of another size
            (truncated) or of other content.
    """
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as file:
            files = json.load(file)["files"]
    except FileNotFoundError:
        raise DamagedStateError(
            f"{folder}: no {MANIFEST} (unfinished, or written before manifests)"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedStateError(f"{folder}/{MANIFEST}: unreadable ({error})") from None
    for relative, expected in files.items():
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            raise DamagedStateError(f"{folder}: {relative} is missing")
        size = os.path.getsize(path)
        if size != expected["size"]:
            raise DamagedStateError(
                f"{folder}: {relative} has {size} bytes, the manifest says {expected['size']} (truncated?)"
            )
        if file_fingerprint(path)["sha256"] != expected["sha256"]:
            raise DamagedStateError(f"{folder}: {relative} differs from its SHA-256 in the manifest")


# -------------------------------------------------------------------------------------- atomic writes


def fsync_path(path: str) -> None:
    """Flush the file or folder at ``path`` to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def replace_folder(temporary: str, final: str) -> None:
    """Rename the finished folder ``temporary`` to ``final``.

    A folder cannot be renamed over a full one: a previous ``final`` is first moved to
    ``.old-<name>-*/<name>`` beside it and removed once the new one is in place. A kill between the two
    renames leaves it whole there, where a reader that knows this layout finds it.
    """
    parent, name = os.path.split(os.path.abspath(final))
    previous = None
    if os.path.exists(final):
        previous = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
        os.replace(final, os.path.join(previous, name))
    os.replace(temporary, final)
    fsync_path(parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def write_state(folder: str, state: Any) -> str:
    """Write ``state`` to ``folder`` (tensors, JSON, manifest) under a temporary name, then rename it into
    place; returns the folder's absolute path."""
    from safetensors.torch import save_file

    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        tree, tensors = flatten(state)
        save_file(tensors, os.path.join(temporary, _TENSORS))
        with open(os.path.join(temporary, _STATE), "w", encoding="utf-8") as file:
            json.dump(tree, file)
        write_manifest(temporary)
        replace_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


def read_state(folder: str, *, verify: bool = True) -> Any:
    """The state written by :func:`write_state` in ``folder``.

    Args:
        verify: check the files against the folder's manifest first (a folder without one is read as is).

    Raises:
        DamagedStateError: ``verify`` and a file differs from the manifest.
    """
    from safetensors.torch import load_file

    if verify and os.path.exists(os.path.join(folder, MANIFEST)):
        verify_manifest(folder)
    tensors = load_file(os.path.join(folder, _TENSORS))
    with open(os.path.join(folder, _STATE), encoding="utf-8") as file:
        tree = json.load(file)
    return unflatten(tree, tensors)
