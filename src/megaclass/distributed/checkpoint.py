"""Checkpoints of class-sharded runs that any number of ranks can resume, and their export to one file.

A sharded checkpoint is a folder ``checkpoints/step_<N>/``:

- ``layout.json``: the world size that wrote it, the head's rows over all ranks, each rank's global row
  range ``[start, stop)`` (classes; the sparse head's tail positions, whose index rows go by label group)
  and the names of the head's weights (what an export keeps);
- ``rows_<r>.safetensors``: rank ``r``'s class rows (head weights, row optimizer state, store rows) under
  their state-dict names, ``optim.<param>.<state>`` for the head optimizer's per-row state;
- ``rank_<r>/``: what is private to rank ``r`` (its RNG states, its index over its rows);
- ``common/``: the rest, written by rank 0: encoder and its optimizer, the head's replicated entries, loop
  state, the config.

- ``manifest.json``: the size and checksum of every other file (:func:`megaclass.state_io.write_manifest`).

A weight average (``train.ema_decay``) of the head's ``rows`` parameters goes with the rows
(``average.<param>``), that of its other parameters into ``common/``. :func:`save_sharded_weights` writes the
same layout holding weights alone (no optimizer state): the kept epoch's weights of a sharded run
(``best/epoch-N``).

Ranks write into ``.tmp-step_<N>-shards/``; after a barrier rank 0 writes the layout and the manifest and
renames the folder into place (:func:`megaclass.state_io.replace_folder`), so a kill never leaves half a
checkpoint and a step saved twice keeps a whole one at every moment. Pointing ``latest.json`` at it and
pruning are the caller's (:func:`megaclass.train.checkpoint.commit_checkpoint`). Every reader verifies the
manifest first (:class:`~megaclass.state_io.DamagedStateError`). A run on ``M`` ranks reads, for its own row
range, the slices of every file that overlaps it (safetensors reads slices without loading whole files);
rank-private state is kept when the world size and the rank's rows are unchanged and rebuilt otherwise (an
index is rebuilt from the rows). An unsharded head reads a sharded checkpoint the same way (its row range is
all rows), and a sharded head on any number of ranks reads a single-process checkpoint
(:func:`megaclass.train.checkpoint.save_checkpoint`) with :func:`load_whole_head`. Every rank writes into the
run folder: on several hosts it must be on a shared file system.

    megaclass export --run runs/two --out model.safetensors
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from megaclass.heads import Head, is_streamed_entry
from megaclass.state_io import (
    SavedTensor,
    StackedRows,
    read_state,
    read_tensors,
    replace_folder,
    verify_manifest,
    write_json_atomic,
    write_manifest,
    write_state,
    write_tensors,
)

__all__ = [
    "export_head_state",
    "is_sharded_checkpoint",
    "load_sharded",
    "load_whole_head",
    "read_sharded_head_state",
    "save_sharded",
    "save_sharded_weights",
    "shard_head_entries",
]

_LAYOUT = "layout.json"
_AVERAGE = "average."  # row entries of the head's weight average


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def is_sharded_checkpoint(path: str) -> bool:
    """Whether the checkpoint folder ``path`` was written by :func:`save_sharded`."""
    return os.path.exists(os.path.join(path, _LAYOUT))


def _param_names(head: Head, optimizer: torch.optim.Optimizer | None) -> list[str]:
    """The head parameter names in the optimizer's state-dict order (its parameter indices)."""
    if optimizer is None:
        return []
    names = {id(param): name for name, param in head.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _split_head(
    head: Head,
    optimizer: torch.optim.Optimizer | None,
    *,
    average: Mapping[str, Tensor] | None = None,
    weights_only: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """``(rows, rank_private, replicated)`` of the head's state (``weights_only``: its
    :meth:`~megaclass.heads.Head.weights_state_dict`), its optimizer's and the weight ``average`` of its
    parameters (by name), by ``head.state_layout()`` (row entries of kind ``groups`` are named
    ``groups.<key>``)."""
    layout = head.state_layout()
    rows: dict[str, Tensor] = {}
    private: dict[str, Any] = {}
    replicated: dict[str, Any] = {"head": {}, "optimizer": None}
    state = head.weights_state_dict() if weights_only else head.state_dict()
    for key, value in state.items():
        kind = layout.get(key)
        if kind == "groups":
            rows[f"groups.{key}"] = value.detach()
        elif kind == "rows":
            rows[key] = value.detach()
        elif kind == "rank":
            private[key] = value
        else:
            replicated["head"][key] = value
    if average is not None:
        replicated["average"] = {}
        for name, value in average.items():
            if layout.get(name) == "rows":
                rows[f"{_AVERAGE}{name}"] = value.detach()
            else:
                replicated["average"][name] = value.detach()
    if optimizer is not None:
        state = optimizer.state_dict()
        names = _param_names(head, optimizer)
        kept: dict[int, dict[str, Any]] = {}
        for index, entries in state["state"].items():
            name = names[index]
            param = dict(head.named_parameters())[name]
            kept[index] = {}
            for entry, value in entries.items():
                per_row = isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == param.shape[0]
                if layout.get(name) == "rows" and per_row:
                    rows[f"optim.{name}.{entry}"] = value.detach()
                else:
                    kept[index][entry] = value
        replicated["optimizer"] = {"state": kept, "param_groups": state["param_groups"]}
    return rows, private, replicated


def _head_entries(rows: Mapping[str, Any]) -> dict[str, Any]:
    """The head's own entries of ``rows`` (not its optimizer's or its weight average's)."""
    return {key: value for key, value in rows.items() if not key.startswith(("optim.", _AVERAGE))}


def save_sharded(
    folder: str,
    step: int,
    *,
    head: Head,
    head_optimizer: torch.optim.Optimizer | None,
    common: dict[str, Any],
    private: dict[str, Any],
    rank: int,
    world_size: int,
    head_average: Mapping[str, Tensor] | None = None,
) -> str:
    """Write this rank's part of checkpoint ``folder/step_<step>``; collective over all ranks.

    Args:
        head: a class-sharded head (its ``row_range()``, ``row_group`` and ``state_layout()``).
        head_optimizer: the optimizer of the head's parameters, or None.
        common: replicated state (encoder, its optimizer, loop state, config); written by rank 0 only.
        private: this rank's own state (RNG states).
        head_average: the weight average of the head's parameters, by parameter name (this rank's rows), or
            None; :func:`load_sharded` gives it back as ``common["head_average"]``.

    Returns:
        The checkpoint's folder.
    """
    return _save_shards(
        os.path.join(folder, f"step_{step:09d}"),
        head=head,
        head_optimizer=head_optimizer,
        common=common,
        private=private,
        rank=rank,
        world_size=world_size,
        head_average=head_average,
    )


def save_sharded_weights(
    path: str, *, head: Head, encoder: dict[str, Any], rank: int, world_size: int
) -> str:
    """Write this rank's part of the head's weights (:meth:`~megaclass.heads.Head.weights_state_dict`: no
    optimizer state) and, from rank 0, the ``encoder`` state as the folder ``path``, in the layout of a
    checkpoint; collective over all ranks. :func:`load_sharded` (as ``common["encoder"]``) and
    :func:`export_head_state` read it, on any number of ranks.

    Returns:
        The folder.
    """
    return _save_shards(
        path,
        head=head,
        head_optimizer=None,
        common={"encoder": encoder},
        private={},
        rank=rank,
        world_size=world_size,
        weights_only=True,
    )


def _save_shards(
    final: str,
    *,
    head: Head,
    head_optimizer: torch.optim.Optimizer | None,
    common: dict[str, Any],
    private: dict[str, Any],
    rank: int,
    world_size: int,
    head_average: Mapping[str, Tensor] | None = None,
    weights_only: bool = False,
) -> str:
    """:func:`save_sharded` into the folder ``final``, staged beside it as ``.tmp-<name>-shards``."""
    parent, name = os.path.split(final)
    temporary = os.path.join(parent, f".tmp-{name}-shards")  # one name that every rank knows
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    _barrier(world_size)
    rows, head_private, replicated = _split_head(
        head, head_optimizer, average=head_average, weights_only=weights_only
    )
    start, stop, num_rows = head.row_range()
    metadata = {"start": str(start), "stop": str(stop), "group": str(head.row_group)}
    fingerprint = write_tensors(os.path.join(temporary, _rows_file(rank)), rows, metadata=metadata)
    # hashed while written: rank 0's manifest takes it instead of reading every rank's rows again
    write_json_atomic(os.path.join(temporary, f"{_rows_file(rank)}.fingerprint.json"), fingerprint)
    write_state(os.path.join(temporary, f"rank_{rank:05d}"), {"head": head_private, **private})
    if rank == 0:
        write_state(os.path.join(temporary, "common"), {**common, "head_replicated": replicated})
    _barrier(world_size)  # every rank's files are in place
    if rank == 0:
        ranges = [[int(x) for x in _range_of(temporary, r)] for r in range(world_size)]
        layout = {
            "world_size": world_size,
            "num_rows": num_rows,
            "ranges": ranges,
            "group": head.row_group,
            "weights_only": weights_only,
            "weights": sorted(head.weights_state_dict()),  # what inference needs: export_head_state's keys
        }
        write_json_atomic(os.path.join(temporary, _LAYOUT), layout)
        fingerprints = {}
        for other in map(_rows_file, range(world_size)):
            with open(os.path.join(temporary, f"{other}.fingerprint.json"), encoding="utf-8") as file:
                fingerprints[other] = json.load(file)
        write_manifest(temporary, fingerprints=fingerprints)
        replace_folder(temporary, final)
    _barrier(world_size)  # the folder is complete for everyone
    return final


def _rows_file(rank: int) -> str:
    return f"rows_{rank:05d}.safetensors"


def _range_of(folder: str, rank: int) -> tuple[int, int]:
    from safetensors import safe_open

    with safe_open(os.path.join(folder, _rows_file(rank)), framework="pt") as file:
        metadata = file.metadata()
    return int(metadata["start"]), int(metadata["stop"])


def _verified_layout(path: str) -> dict[str, Any]:
    """The layout of checkpoint ``path`` once every file matches the manifest (else DamagedStateError)."""
    verify_manifest(path)
    with open(os.path.join(path, _LAYOUT), encoding="utf-8") as file:
        return json.load(file)


def _row_sources(path: str, layout: Mapping[str, Any], start: int, stop: int) -> dict[str, StackedRows]:
    """Every row entry of checkpoint ``path`` for the global rows ``[start, stop)``, as the slices of the
    ranks' files that hold them, read when asked (a ``groups.`` entry by label group)."""
    parts: dict[str, list[tuple[SavedTensor, int, int]]] = {}
    size = layout["group"]  # range bounds are multiples of it, but for the last
    for rank, (first, last) in enumerate(layout["ranges"]):
        low, high = max(start, first), min(stop, last)
        if low >= high:
            continue
        saved = read_tensors(os.path.join(path, _rows_file(rank)), stream=lambda key: True)
        for key, tensor in saved.items():
            if key.startswith("groups."):
                piece = (tensor, low // size - first // size, -(-high // size) - first // size)
                parts.setdefault(key[len("groups.") :], []).append(piece)
            else:
                parts.setdefault(key, []).append((tensor, low - first, high - first))
    return {key: StackedRows(pieces) for key, pieces in parts.items()}


def read_sharded_head_state(path: str, start: int, stop: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(rows, common)``: the row entries for classes ``[start, stop)`` and the common state of ``path``."""
    layout = _verified_layout(path)
    if not 0 <= start < stop <= layout["num_rows"]:
        raise ValueError(
            f"{path}: row range [{start}, {stop}) outside the checkpoint's {layout['num_rows']} rows"
        )
    rows = {key: value.read() for key, value in _row_sources(path, layout, start, stop).items()}
    return rows, read_state(os.path.join(path, "common"), verify=False)


def load_sharded(
    path: str, *, head: Head, head_optimizer: torch.optim.Optimizer | None, rank: int, world_size: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore this rank's head (and its optimizer) from checkpoint ``path``, whatever world size wrote it.

    The head may be unsharded (its row range is all rows) or sharded over any number of ranks.

    Returns:
        ``(common, private)``: the replicated state, and this rank's private state (None when the world size
        or this rank's rows changed: RNG states and indexes then start afresh). A checkpoint holding a
        weight average gives it as ``common["head_average"]``: by parameter name, this rank's rows.

    Raises:
        DamagedStateError: a file of the checkpoint differs from its manifest (checked before any change).
    """
    layout = _verified_layout(path)
    start, stop, num_rows = head.row_range()
    if layout["num_rows"] != num_rows or layout["group"] != head.row_group:
        raise ValueError(
            f"--resume: checkpoint {path} has {layout['num_rows']} head rows in groups of {layout['group']}, "
            f"the run's head {num_rows} in groups of {head.row_group}"
        )
    rows = {  # a row store's entries (and their average) stream into it: no second copy of this rank's rows
        key: value if is_streamed_entry(key.removeprefix(_AVERAGE)) else value.read()
        for key, value in _row_sources(path, layout, start, stop).items()
    }
    common = read_state(os.path.join(path, "common"), verify=False)
    same_range = layout["world_size"] == world_size and layout["ranges"][rank] == [start, stop]
    private = read_state(os.path.join(path, f"rank_{rank:05d}"), verify=False) if same_range else None
    replicated = common.pop("head_replicated")
    fresh = head.weights_state_dict() if layout.get("weights_only") else head.state_dict()
    state = {**replicated["head"], **_head_entries(rows)}
    if private is not None:  # the same rows on the same rank: its own index, RNG states
        state.update(private["head"])
    else:
        state.update(
            {k: fresh[k] for k, kind in head.state_layout().items() if kind == "rank" and k in fresh}
        )
    head.load_state_dict(state)
    if head_optimizer is not None and replicated["optimizer"] is not None:
        names = _param_names(head, head_optimizer)
        saved = replicated["optimizer"]
        optim_state = {int(index): dict(entries) for index, entries in saved["state"].items()}
        for key, value in rows.items():
            if key.startswith("optim."):
                name, entry = key[len("optim.") :].rsplit(".", 1)
                optim_state.setdefault(names.index(name), {})[entry] = value
        head_optimizer.load_state_dict({"state": optim_state, "param_groups": saved["param_groups"]})
    if "average" in replicated:
        average = {key[len(_AVERAGE) :]: value for key, value in rows.items() if key.startswith(_AVERAGE)}
        common["head_average"] = {**replicated["average"], **average}
    return common, private


def _rows_slice(head: Head, key: str, value: Tensor, kind: str) -> Tensor:
    """This rank's part of the whole head's row entry ``key`` of ``kind`` (``rows`` or ``groups``)."""
    start, stop, num_rows = head.row_range()
    size = head.row_group if kind == "groups" else 1
    expected = -(-num_rows // size)
    if value.dim() == 0 or value.shape[0] != expected:
        raise ValueError(
            f"--resume: the checkpoint's head entry {key} has shape {tuple(value.shape)}, expected "
            f"{expected} {kind} first (the run's head has {num_rows} rows)"
        )
    return value[start // size : -(-stop // size)]


def load_whole_head(
    head: Head,
    head_optimizer: torch.optim.Optimizer | None,
    *,
    state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None,
    weights_only: bool = False,
) -> None:
    """Load an unsharded head's ``state`` (and its optimizer's ``optimizer_state``, as
    ``optimizer.state_dict()`` gives it) into ``head``, sharded or not: a single-process checkpoint resumed on
    any number of ranks. ``weights_only``: ``state`` is a :meth:`~megaclass.heads.Head.weights_state_dict`
    (kept weights).

    Each ``rows`` / ``groups`` entry of ``head.state_layout()`` and each per-row state of the optimizer of a
    ``rows`` parameter is cut to the head's :meth:`~megaclass.heads.Head.row_range`; replicated entries load
    as they are; rank-private entries (index, RNG states) are kept only when the head holds every row, and
    otherwise start as the head was built.

    Raises:
        ValueError: a row entry's length is not the head's number of rows.
    """
    start, stop, num_rows = head.row_range()
    whole = (start, stop) == (0, num_rows)
    layout = head.state_layout()
    loaded = dict(state)
    if not whole:  # the entries of the head as built: rank-private ones as they are, the others from state
        loaded = {}
        own = head.weights_state_dict() if weights_only else head.state_dict()
        for key, value in own.items():
            kind = layout.get(key)
            if kind != "rank" and key not in state:
                raise ValueError(f"--resume: the checkpoint's head has no entry {key}")
            if kind in ("rows", "groups"):
                value = _rows_slice(head, key, state[key], kind)
            elif kind != "rank":
                value = state[key]
            loaded[key] = value
    head.load_state_dict(loaded)
    if head_optimizer is None or optimizer_state is None:
        return
    names = _param_names(head, head_optimizer)
    optim_state: dict[int, dict[str, Any]] = {}
    for index, entries in optimizer_state["state"].items():
        name = names[int(index)]
        cut = not whole and layout.get(name) == "rows"
        optim_state[int(index)] = {
            entry: _rows_slice(head, f"optim.{name}.{entry}", value, "rows")
            if cut and _per_row(value, num_rows)
            else value
            for entry, value in entries.items()
        }
    head_optimizer.load_state_dict({"state": optim_state, "param_groups": optimizer_state["param_groups"]})


def _per_row(value: Any, num_rows: int) -> bool:
    """Whether an optimizer state entry holds one row per head row (moments; not a step count)."""
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == num_rows


def export_head_state(path: str, *, averaged: bool = False) -> dict[str, Tensor | StackedRows]:
    """The whole head's state from sharded checkpoint ``path``, as the unsharded head stores it.

    The head's weights alone (:meth:`~megaclass.heads.Head.weights_state_dict`'s entries: no optimizer state,
    index or RNG). Row entries are :class:`~megaclass.state_io.StackedRows` over all classes, left in the
    ranks' files: :func:`~megaclass.state_io.write_state` or :func:`~megaclass.state_io.write_tensors` copy
    them a block at a time, so a head of any size is written whole in the host memory of one block
    (``.read()`` gives a tensor). ``averaged``: the checkpoint's weight average takes its parameters' places.
    """
    layout = _verified_layout(path)
    rows = _row_sources(path, layout, 0, layout["num_rows"])
    common = read_state(os.path.join(path, "common"), verify=False, stream=lambda key: True)
    replicated = common["head_replicated"]  # its tensors, like the rest, left in the file until written
    first = read_state(os.path.join(path, "rank_00000"), verify=False, stream=lambda key: True)["head"]
    state = {**replicated["head"]}
    state.update({key: value for key, value in first.items() if ".index." not in f".{key}"})
    state.update(_head_entries(rows))
    if averaged:
        if "average" not in replicated:
            raise ValueError(f"{path}: the checkpoint holds no weight average")
        state.update(replicated["average"])
        state.update({key[len(_AVERAGE) :]: value for key, value in rows.items() if key.startswith(_AVERAGE)})
    if "weights" in layout:  # a checkpoint written before the layout named them exports all it holds
        state = {key: value for key, value in state.items() if key in layout["weights"]}
    return state


def shard_head_entries(head: Head, entries: Mapping[str, Any]) -> dict[str, Any]:
    """``entries`` of the whole head by state-dict name (a weight average's), with those of ``rows`` and
    ``groups`` kind cut to the head's :meth:`~megaclass.heads.Head.row_range`; the others as they are.

    Raises:
        ValueError: a row entry's length is not the head's number of rows.
    """
    layout = head.state_layout()
    return {
        key: _rows_slice(head, key, value, layout[key]) if layout.get(key) in ("rows", "groups") else value
        for key, value in entries.items()
    }
