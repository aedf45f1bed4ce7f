"""Checkpoints a kill cannot corrupt: tensors in safetensors, everything else in JSON, renamed into place.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding ``tensors.safetensors`` and ``state.json``.
Any nested state (module and optimizer state dicts, RNG states, loop counters) is split by :func:`flatten`
into a JSON tree whose tensors are replaced by ``{"__tensor__": key}`` references into the safetensors file.
The folder is written under a temporary name and renamed; then ``checkpoints/latest.json`` (itself written
to a temporary file and renamed) points at it. A reader follows ``latest.json``, so it sees the previous
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "flatten",
    "latest_checkpoint",
    "load_checkpoint",
    "read_state",
    "save_checkpoint",
    "unflatten",
    "write_json_atomic",
    "write_state",
]

_TENSORS = "tensors.safetensors"
_STATE = "state.json"
_LATEST = "latest.json"


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


def write_state(folder: str, state: Any) -> str:
    """Write ``state`` to ``folder`` (tensors + JSON) under a temporary name, then rename it into place."""
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
            file.flush()
            os.fsync(file.fileno())
        previous = None
        if os.path.exists(folder):  # a folder cannot be renamed over a full one: move the old one aside first
            previous = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
            os.replace(folder, os.path.join(previous, name))
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return folder


def read_state(folder: str) -> Any:
    """The state written by :func:`write_state` (or :func:`save_checkpoint`) in ``folder``."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(folder, _TENSORS))
    with open(os.path.join(folder, _STATE), encoding="utf-8") as file:
        tree = json.load(file)
    return unflatten(tree, tensors)


def save_checkpoint(folder: str, step: int, state: dict[str, Any], *, keep: int = 2) -> str:
    """Write ``state`` as checkpoint ``folder/step_<step>`` atomically; keep the ``keep`` newest.

    Returns:
        The checkpoint's folder.
    """
    name = f"step_{step:09d}"
    final = write_state(os.path.join(folder, name), state)
    write_json_atomic(os.path.join(folder, _LATEST), {"checkpoint": name, "step": step})
    _prune(folder, keep=keep, current=name)
    return final


def _prune(folder: str, *, keep: int, current: str) -> None:
    names = sorted(entry for entry in os.listdir(folder) if entry.startswith("step_"))
    for name in names[:-keep]:
        if name != current:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def latest_checkpoint(folder: str) -> str | None:
    """The folder of the newest complete checkpoint under ``folder``, or None when there is none."""
    pointer = os.path.join(folder, _LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as file:
        name = json.load(file)["checkpoint"]
    path = os.path.join(folder, name)
    return path if os.path.isdir(path) else None


def load_checkpoint(path: str) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint` in checkpoint folder ``path``."""
    return read_state(path)
