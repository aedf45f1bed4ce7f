"""Checkpoints that a kill cannot corrupt and a damaged file cannot pass for good.

A checkpoint is a folder ``checkpoints/step_<N>/`` whose files a manifest checksums, written under a
temporary name and renamed into place: by :func:`save_checkpoint` (one state folder,
:func:`megaclass.state_io.write_state`) or, for a class-sharded run, by
:func:`megaclass.distributed.checkpoint.save_sharded` followed by :func:`commit_checkpoint`. ``latest.json``
names the newest for other readers; resuming does not rely on it: :func:`load_newest` scans the folder and
loads the newest checkpoint whose files match their manifest, skipping a damaged one with a
:class:`CheckpointWarning` that names it and why.

A kill in the middle of a save leaves ``.tmp-*`` leftovers (never read) or, when the step was saved twice
(epoch end on a multiple of ``train.checkpoint_every``), the previous ``step_<N>`` moved aside to
``.old-step_<N>-*/step_<N>``: that one is a whole checkpoint and is read where it lies; :func:`recover`
puts it back and removes the leftovers. Pruning only removes whole checkpoints older than the ``keep`` newest.

A run of one process whose state is all in tensors writes its saves behind its steps
(:func:`saves_in_background`, :class:`BackgroundSaves`): each from a copy of its tensors in host memory taken
when the save is due, in a thread, while training goes on; the next save, the run's end and the run's close
wait for it. A kill while it writes loses that save alone (the newest whole checkpoint is the one before).

Otherwise saving and loading take one block of host memory, not a copy of the rows: tensors are written
straight from where they live (:func:`megaclass.state_io.write_tensors`), and a head's row-store entries
(``head.store.*``) come back from :func:`load_checkpoint` (and a weights folder's from
:func:`~megaclass.train.export.load_run_weights`) as :class:`~megaclass.state_io.SavedTensor` handles that the
store streams into its own rows.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from megaclass.heads import is_streamed_entry
from megaclass.state_io import (
    MANIFEST,
    DamagedStateError,
    flatten,
    folder_bytes,
    format_bytes,
    free_bytes,
    read_state,
    unflatten,
    verify_manifest,
    write_json_atomic,
    write_state,
)

__all__ = [
    "BackgroundSaves",
    "CheckpointWarning",
    "checkpoint_folders",
    "commit_checkpoint",
    "is_row_store_entry",
    "latest_checkpoint",
    "load_checkpoint",
    "load_newest",
    "recover",
    "run_weights_folder",
    "save_checkpoint",
    "saves_in_background",
    "short_of_room",
    "tensor_bytes",
    "to_host",
]

_LATEST = "latest.json"
_STEP = re.compile(r"step_(\d+)")
_MOVED_ASIDE = ".old-"
_LEFTOVERS = (".tmp-", _MOVED_ASIDE)


# a save behind the steps holds a copy of at most 1 / _HOST_SHARE of the available host memory: larger
# states (rows of 10^8 classes) stream from where they live, never copied whole
_HOST_SHARE = 8


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (damaged) or ``latest.json`` was missing or wrong; the run goes on."""


def tensor_bytes(state: Any) -> int | None:
    """Bytes of ``state``'s tensors; None where a part of it is no tensor (a row store's
    :class:`~megaclass.state_io.RowSource`, streamed from where its rows live)."""
    _, tensors = flatten(state)
    if not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        return None
    return sum(value.numel() * value.element_size() for value in tensors.values())


def to_host(state: Any) -> Any:
    """``state`` with each tensor copied into host memory (a GPU's copied out, a host one cloned): what the
    steps after it change, the copy keeps as it was. Every part of it must be a tensor
    (:func:`tensor_bytes`)."""
    tree, tensors = flatten(state)
    return unflatten(tree, {key: value.detach().to("cpu", copy=True) for key, value in tensors.items()})


def saves_in_background(
    enabled: bool,
    copy_bytes: Callable[[], int | None],
    host_available: int,
    *,
    processes: int,
    sharded: bool,
) -> bool:
    """Whether a run writes its saves behind its steps: ``train.background_saves`` (``enabled``), one
    process, a head that is not sharded, and a state all in tensors whose host copy (``copy_bytes()``, a
    checkpoint and the kept weights; None where a part is no tensor) takes at most an eighth of the
    ``host_available`` bytes. ``copy_bytes`` is called only for a run the rest allows."""
    if not enabled or processes != 1 or sharded:
        return False
    copy = copy_bytes()
    return copy is not None and copy * _HOST_SHARE <= host_available


class BackgroundSaves:
    """Saves run one at a time by a thread while training goes on. A save's error is raised by the next call
    (:meth:`check` at each log window, :meth:`submit` at the next save, :meth:`wait` at the run's end)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def submit(self, save: Callable[[], object]) -> None:
        """Run ``save`` in the thread once the save before it has ended (its error raised here)."""
        self.wait()
        self._pending = self._pool.submit(save)

    def check(self) -> None:
        """Raise the error of a save that ended in one; never waits."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Wait for the save in flight, if any; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the save in flight and stop the thread; raise the save's error."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def save_checkpoint(folder: str, step: int, state: dict[str, Any], *, keep: int = 2) -> str:
    """Write ``state`` as checkpoint ``folder/step_<step>`` atomically, then :func:`commit_checkpoint` it.

    Returns:
        The checkpoint's folder.
    """
    target = os.path.join(folder, f"step_{step:09d}")
    try:
        path = write_state(target, state)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        newest = latest_checkpoint(folder)
        kept = f"the newest whole checkpoint ({newest}) is kept" if newest else "no checkpoint is written yet"
        raise OSError(
            errno.ENOSPC,
            f"no space left on the device writing checkpoint {target} "
            f"({format_bytes(free_bytes(folder))} free); {kept}: make room (a lower "
            f"train.keep_checkpoints, now {keep}, keeps fewer) and continue with --resume",
        ) from error
    commit_checkpoint(folder, path, keep=keep)
    return path


def short_of_room(folder: str, path: str) -> str | None:
    """A line saying that the next checkpoint will not fit beside checkpoint ``path`` in ``folder``'s file
    system (a new one is written whole before the oldest is removed); None when it fits."""
    size, free = folder_bytes(path), free_bytes(folder)
    if free >= size:
        return None
    return (
        f"disk: checkpoint {os.path.basename(path)} takes {format_bytes(size)} and {format_bytes(free)} are "
        f"free in {folder}: the next one will not fit; make room or lower train.keep_checkpoints (a failed "
        "save loses nothing: --resume continues from the newest whole checkpoint)"
    )


def commit_checkpoint(folder: str, path: str, *, keep: int) -> None:
    """Point ``latest.json`` at the checkpoint just written at ``path`` and keep the ``keep`` newest whole
    checkpoints up to it; newer ones (left by a run resumed before them) are written again, not removed."""
    name = os.path.basename(path)
    step = int(_STEP.fullmatch(name).group(1))
    write_json_atomic(os.path.join(folder, _LATEST), {"checkpoint": name, "step": step})
    whole = [
        (int(match.group(1)), entry)
        for entry in os.listdir(folder)
        if (match := _STEP.fullmatch(entry)) and os.path.exists(os.path.join(folder, entry, MANIFEST))
    ]
    older = sorted(entry for entry_step, entry in whole if entry_step <= step)
    for entry in older[:-keep]:
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def checkpoint_folders(folder: str) -> list[str]:
    """The checkpoint folders under ``folder``, newest step first: each ``step_<N>``, and a ``step_<N>`` that
    an interrupted save moved aside (``.old-step_<N>-*/step_<N>``) where ``step_<N>`` itself is missing."""
    if not os.path.isdir(folder):
        return []
    found: dict[int, str] = {}
    moved: dict[int, str] = {}
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if (match := _STEP.fullmatch(entry)) and os.path.isdir(path):
            found[int(match.group(1))] = path
        elif entry.startswith(_MOVED_ASIDE) and os.path.isdir(path):
            for inner in os.listdir(path):
                if match := _STEP.fullmatch(inner):
                    moved[int(match.group(1))] = os.path.join(path, inner)
    for step, path in moved.items():
        found.setdefault(step, path)
    return [found[step] for step in sorted(found, reverse=True)]


def latest_checkpoint(folder: str) -> str | None:
    """The newest checkpoint under ``folder`` that has a manifest (not verified: see :func:`load_newest`),
    or None when there is none."""
    return next(
        (path for path in checkpoint_folders(folder) if os.path.exists(os.path.join(path, MANIFEST))), None
    )


def run_weights_folder(run_dir: str) -> str:
    """The folder of the final weights of the run in ``run_dir`` (``model/``), else of its newest checkpoint,
    with a :class:`CheckpointWarning` saying which (the run did not finish).

    Raises:
        FileNotFoundError: the run has neither.
    """
    final = os.path.join(run_dir, "model")
    if os.path.isdir(final):
        return final
    latest = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if latest is None:
        raise FileNotFoundError(f"--run: {run_dir} has neither final weights (model/) nor a checkpoint")
    warnings.warn(
        f"{run_dir} has no final weights (model/: the run did not finish); using its newest checkpoint, "
        f"{os.path.relpath(latest, run_dir)}",
        CheckpointWarning,
        stacklevel=3,
    )
    return latest


def is_row_store_entry(key: str) -> bool:
    """Whether the saved tensor ``key`` is a head's row-store entry (``head.store.weight``,
    ``head.store.optim.<name>``: :func:`~megaclass.heads.is_streamed_entry`) or the weight average of one
    (``average.head.store.weight``): a :class:`~megaclass.store.RowStore` and its
    :class:`~megaclass.store.average.RowAverage` load those from the file block by block, so they are read as
    :class:`~megaclass.state_io.SavedTensor` handles."""
    key = key.removeprefix("average.")
    return key.startswith("head.") and is_streamed_entry(key[len("head.") :])


def load_checkpoint(path: str) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint` in checkpoint folder ``path``, checked against its manifest;
    row-store entries stay in the file (:func:`is_row_store_entry`).

    Raises:
        DamagedStateError: a file is missing, truncated or altered, or the manifest is missing.
    """
    verify_manifest(path)
    return read_state(path, verify=False, stream=is_row_store_entry)


def load_newest(folder: str, *, load: Callable[[str], Any] = load_checkpoint) -> tuple[str, Any] | None:
    """``(path, load(path))`` for the newest checkpoint under ``folder`` that ``load`` reads without a
    :class:`~megaclass.state_io.DamagedStateError`; each damaged newer one is named in a
    :class:`CheckpointWarning`. None when ``folder`` holds no checkpoint.

    Args:
        load: reads a checkpoint folder; it must verify the files before it changes anything.

    Raises:
        DamagedStateError: every checkpoint is damaged (they are all left in place).
    """
    candidates = checkpoint_folders(folder)
    if candidates:
        _check_pointer(folder)
    problems = []
    for path in candidates:
        try:
            return path, load(path)
        except DamagedStateError as error:
            problems.append(str(error))
            warnings.warn(f"skipping a damaged checkpoint: {error}", CheckpointWarning, stacklevel=2)
    if problems:
        raise DamagedStateError(f"{folder}: no whole checkpoint to resume from ({'; '.join(problems)})")
    return None


def _check_pointer(folder: str) -> None:
    """Warn when ``latest.json`` is missing, unreadable or names a missing folder."""
    pointer = os.path.join(folder, _LATEST)
    try:
        with open(pointer, encoding="utf-8") as file:
            name = json.load(file)["checkpoint"]
    except FileNotFoundError:
        problem = "is missing"
    except (ValueError, KeyError, TypeError) as error:
        problem = f"is unreadable ({error})"
    else:
        if os.path.isdir(os.path.join(folder, name)):
            return
        problem = f"names {name}, which is missing"
    warnings.warn(
        f"{pointer} {problem}; resuming from the newest whole checkpoint found in the folder",
        CheckpointWarning,
        stacklevel=3,
    )


def recover(folder: str) -> None:
    """Tidy ``folder`` after a kill: a checkpoint that an interrupted save moved aside goes back to its name
    (when that is free); every other ``.tmp-*`` and ``.old-*`` leftover is removed."""
    if not os.path.isdir(folder):
        return
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not entry.startswith(_LEFTOVERS):
            continue
        if entry.startswith(_MOVED_ASIDE) and os.path.isdir(path):
            for inner in os.listdir(path):
                if _STEP.fullmatch(inner) and not os.path.exists(os.path.join(folder, inner)):
                    os.replace(os.path.join(path, inner), os.path.join(folder, inner))
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
