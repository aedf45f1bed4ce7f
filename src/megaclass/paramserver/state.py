"""One shard's rows and optimizer state in memory-mapped files, updated crash-consistently.

Files under the data folder::

    meta.json          shape, range, optimizer, row dtype, slots (checked on restart)
    hyper.json         current hyper-parameters (written to a temporary file, then renamed)
    rows.f32           (n, D) float32 rows, n = row_stop - row_start (rows.bf16 with dtype bf16_sr)
    <slot>.f32         (n, D) or (n,) float32 optimizer state per slot (momentum_buffer, exp_avg, step, ...);
                       with dtype bf16_sr the (n, D) slots are <slot>.bf16, per-row counts stay float32
    average.f32        with an average decay: (n, D) float32 weight average of each row as of its step in
    average_step.f32   (n,) (the step it was last brought up to; :mod:`megaclass.ops.row_average`)
    versions.i64       (n,) state version of each row's last update (clients revalidate prefetched rows)
    header.i64         committed version, last applied step, journal marker, per-trainer steps
    journal.bin        the record of the update in progress: the touched rows as the update leaves them
    checksums.json     CRC-32 of every state file, written at a clean close and into snapshots; checked and
                       removed at the next start (the state changes from then on)

Every update is applied as: (1) gather the touched rows and their state straight into a record in
``journal.bin`` (memory-mapped, grown to the largest record) and update them there, in place (bfloat16 ones
in float32 buffers, rounded back into the record), beside their new version and the header as the update
leaves it; (2) set the header's journal marker to the new version: the record is complete; (3) write the
record into the memory maps; (4) write the header's applied step and trainer steps, then its committed
version last. A process killed before (2) leaves the maps as they were (a partial record is never read);
killed after it, the restart writes the record again (writing it twice gives what writing it once does), so
no half-applied step survives and no completed one is lost. The gathered rows are updated where they lie,
with no copy between the record and the maps. A journal left by a shard of an earlier release holds the
touched rows' old values and the old header in the same layout: written the same way, it restores the state
before that update. With ``durable=True`` the record is synced before (2) and the header after it, and the
maps flushed after (4), which extends the guarantee to power loss.
:meth:`ShardState.snapshot` copies a committed state to its own fsync'd folder.

With an average decay the shard keeps each row's weight average (a trainer's ``train.ema_decay``) lazily:
an update first brings the touched rows' averages up to the step before it from their old values (in the same
journalled update), and a read of the average (:meth:`ShardState.average_at`) brings the rows it reads up to
the step asked, without writing: the same numbers as averaging every row after every step.

With ``dtype="bf16_sr"`` the rows and their row-shaped optimizer state are bfloat16 (half the memory, and
half the bytes a push's update moves): an update works in float32 and writes back stochastically rounded
(``E[stored] == float32 result``), seeded by ``(seed, shard, step, trainers, tensor)``, so shards restored
from a checkpoint repeat the same bits; the record keeps the rounded bits, so writing it again is exact.

At start every state file must have the size the shard's shape needs, and match its checksum when the last
close left one: a truncated or damaged state is refused rather than served as zeros.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from megaclass.ops.held_rows import RowDtype, put_held_
from megaclass.ops.row_average import fold_rows_
from megaclass.ops.row_optimizers import init_rows_, put_rows_  # the same initial matrix as every store
from megaclass.ops.stochastic_rounding import rounding_seed
from megaclass.paramserver.config import ROW_DTYPES
from megaclass.paramserver.updaters import HyperParams, apply_update, state_shapes
from megaclass.state_io import fsync_path

FORMAT = 1
MAGIC = 0x4D43505331  # "MCPS1"
# header.i64 layout
_MAGIC, _COMMITTED, _STEP, _JOURNAL, _TRAINERS0 = 0, 1, 2, 3, 8
# a held dtype's file suffix and numpy storage (bfloat16 as its int16 bit pattern, viewed by torch)
_STORAGE = {
    torch.float32: ("f32", np.float32),
    torch.bfloat16: ("bf16", np.int16),
    torch.int64: ("i64", np.int64),
}


@dataclass(frozen=True)
class ShardSpec:
    """What a shard holds: rows ``[row_start, row_stop)`` of a ``(num_rows, dim)`` matrix."""

    num_rows: int
    dim: int
    row_start: int
    row_stop: int
    optimizer: str
    trainers: int
    dtype: str = "float32"  # one of ROW_DTYPES
    average_decay: float = 0.0  # the rows' weight average is kept with this decay; 0: none

    @property
    def size(self) -> int:
        return self.row_stop - self.row_start

    @property
    def held(self) -> torch.dtype:
        """The dtype of the rows and the row-shaped optimizer state."""
        return RowDtype(self.dtype).held


class ShardState:
    """The persistent state of one shard; callers serialise writes (the server's write lock)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        spec: ShardSpec,
        hyper: HyperParams,
        *,
        init_bound: float | None = None,
        seed: int = 0,
        durable: bool = False,
    ) -> None:
        if spec.dtype not in ROW_DTYPES:
            raise ValueError(f"--dtype {spec.dtype!r}: expected one of {list(ROW_DTYPES)}")
        self.dir = os.fspath(data_dir)
        self.spec = spec
        self.durable = durable
        self.seed = seed
        self._arrays: dict[str, np.memmap] = {}
        self._buffers: dict[str, Tensor] = {}  # rows and state of the update in progress
        os.makedirs(self.dir, exist_ok=True)
        # the weight average's slots: journalled and saved as the optimizer's are, never given to it
        self.average_slots = {"average": (spec.dim,), "average_step": ()} if spec.average_decay else {}
        meta_path = os.path.join(self.dir, "meta.json")
        fresh = not os.path.exists(meta_path)
        if fresh:
            self.slots = state_shapes(spec.optimizer, hyper, spec.dim)
            self.hyper = hyper
        else:
            self.slots = self._check_meta(meta_path)
            self.hyper = self._load_hyper(hyper)
            self._check_file_sizes()
        self.rows = self._map("rows", (spec.size, spec.dim), spec.held, fresh)
        self.state = {
            slot: self._map(slot, (spec.size, *shape), self._slot_dtype(slot, shape), fresh)
            for slot, shape in {**self.slots, **self.average_slots}.items()
        }
        self.versions = self._map("versions", (spec.size,), torch.int64, fresh)
        self.header = self._map("header", (_TRAINERS0 + spec.trainers,), torch.int64, fresh)
        self._journal_fd = os.open(os.path.join(self.dir, "journal.bin"), os.O_RDWR | os.O_CREAT, 0o644)
        self._journal_map: mmap.mmap | None = None  # mapped at the first record
        if fresh:
            self._initialise(init_bound, seed)
            self._write_json("hyper.json", asdict(self.hyper))
            self._write_json("meta.json", {"format": FORMAT, **asdict(spec), "slots": self.slots})
        else:
            self._check_checksums()
            if self.header[_JOURNAL] > self.header[_COMMITTED]:
                self._replay()

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.header[_COMMITTED])

    @property
    def applied_step(self) -> int:
        return int(self.header[_STEP])

    def trainer_steps(self) -> list[int]:
        return [int(s) for s in self.header[_TRAINERS0:]]

    def field(self, name: str) -> Tensor:
        """The ``(n, D)`` (or ``(n,)``) tensor view of ``"rows"``, an optimizer slot or an average slot (the
        average as kept, each row as of its step)."""
        if name in ("", "rows"):
            return self.rows
        if name not in self.state:
            raise ValueError(f"field {name!r} is not one of {['rows', *self.state]}")
        return self.state[name]

    def average_at(self, local: Tensor | slice, step: int) -> Tensor:
        """The weight average of rows ``local`` (ids ``(S,)`` or a range) at optimizer step ``step``, float32
        ``(S, D)``: each brought up to ``step`` from the rows as they are (a row averaged as of a later step
        stays as kept); nothing is written."""
        if not self.average_slots:
            raise ValueError("this shard keeps no weight average (start it with --average-decay)")
        if isinstance(local, slice):  # copies of the range's averages, the rows read where they are
            average, last = (self.state[slot][local].clone() for slot in ("average", "average_step"))
            rows = self.rows[local]
        else:
            average, last = (self.state[slot].index_select(0, local) for slot in ("average", "average_step"))
            rows = self.rows.index_select(0, local)
        fold_rows_(average, last, rows, decay=self.spec.average_decay, step=step)
        return average

    # -- writing ---------------------------------------------------------------------------------------
    def apply(
        self, local: Tensor, grads: Tensor, *, lr: float, step: int, trainers: Sequence[int] = ()
    ) -> int:
        """Apply one optimizer step to local rows ``local (S,)`` (unique) given ``grads (S, D)`` float32.

        Records ``step`` as the applied step and as the last step of each of ``trainers`` (who pushed it);
        returns the new version. The touched rows and their state are gathered straight into the journal's
        record and updated there: float32 ones in place, bfloat16 ones in float32 buffers kept between steps
        (fresh pages every step cost more than the update) and rounded back into the record, which is then
        written into the maps.
        """
        new_version = self.version + 1
        record = self._record(
            local, new_version, step=max(step, self.applied_step), trainers=trainers, trainer_step=step
        )
        names = ["rows", *self.state]
        held = {name: record[name] for name in names}
        work = {name: v if v.dtype == torch.float32 else self._work(name, v) for name, v in held.items()}
        rows, state = work["rows"], {slot: work[slot] for slot in self.slots}
        if self.average_slots:  # brought up to the step before this one, from the rows this update changes
            decay = self.spec.average_decay
            fold_rows_(work["average"], work["average_step"], rows, decay=decay, step=step - 1)
        apply_update(self.spec.optimizer, rows, state, grads, self.hyper, lr=lr)
        self._refuse_non_finite(local, rows, state)
        seed = rounding_seed(self.seed, self.spec.row_start, step, *trainers)
        put_held_([(held[name], work[name]) for name in names], seed=seed)
        self._write(record, names)
        return new_version

    def set_field(self, name: str, local: Tensor, values: Tensor) -> int:
        """Overwrite rows ``local`` of field ``name`` by ``values`` (``(S, D)`` or ``(S,)``); new version."""
        name = "rows" if name in ("", "rows") else name
        target = self.field(name)
        new_version = self.version + 1
        record = self._record(local, new_version, step=self.applied_step)
        record[name].copy_(values.to(target.dtype))  # a write, not an update: rounded to nearest
        self._write(record, [name])
        return new_version

    def set_hyper(self, hyper: HyperParams) -> None:
        missing = set(state_shapes(self.spec.optimizer, hyper, self.spec.dim)) - set(self.slots)
        if missing:
            raise ValueError(
                f"these settings need optimizer state {sorted(missing)} this shard was started without"
            )
        self.hyper = hyper
        self._write_json("hyper.json", asdict(hyper))

    def snapshot(self) -> str:
        """Copy the committed state to ``snapshots/step-<step>-v<version>``; returns that folder."""
        root = os.path.join(self.dir, "snapshots")
        final = os.path.join(root, f"step-{self.applied_step:09d}-v{self.version:09d}")
        if os.path.isdir(final):
            return final
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for name in self._state_files():
            self._mapped(name).flush()
            _copy_synced(os.path.join(self.dir, name), os.path.join(partial, name))
        for name in ("meta.json", "hyper.json"):
            _copy_synced(os.path.join(self.dir, name), os.path.join(partial, name))
        self._write_checksums(partial)
        os.rename(partial, final)
        fsync_path(root)
        return final

    def close(self) -> None:
        for array in self._arrays.values():
            array.flush()
        if self._journal_fd >= 0:
            self._write_checksums(self.dir)
            if self._journal_map is not None:
                with contextlib.suppress(BufferError):  # a record's view still held: the map goes with it
                    self._journal_map.close()
                self._journal_map = None
            os.close(self._journal_fd)
            self._journal_fd = -1

    # -- integrity -------------------------------------------------------------------------------------
    def _state_files(self) -> dict[str, int]:
        """Each state file's name and the bytes the shard's shape needs in it."""
        n, d = self.spec.size, self.spec.dim
        held = self.spec.held
        sizes = {_file_name("rows", held): held.itemsize * n * d}
        for slot, shape in {**self.slots, **self.average_slots}.items():
            dtype = self._slot_dtype(slot, shape)
            sizes[_file_name(slot, dtype)] = dtype.itemsize * n * math.prod(shape)
        sizes["versions.i64"] = 8 * n
        sizes["header.i64"] = 8 * (_TRAINERS0 + self.spec.trainers)
        return sizes

    def _slot_dtype(self, slot: str, shape: tuple[int, ...]) -> torch.dtype:
        """Row-shaped optimizer slots are held as the rows are; per-row counts (``step``) and the weight
        average (whose steps are small moves) stay float32."""
        return self.spec.held if shape and slot not in self.average_slots else torch.float32

    def _check_file_sizes(self) -> None:
        """Refuse a restart on a missing, truncated or extended state file (it would be served as zeros)."""
        for name, expected in self._state_files().items():
            path = os.path.join(self.dir, name)
            if not os.path.exists(path):
                raise ValueError(
                    f"{path}: missing; this --data-dir holds a partial state (restore it from a snapshot "
                    "or start with a new --data-dir)"
                )
            size = os.path.getsize(path)
            if size != expected:
                raise ValueError(
                    f"{path}: {size} bytes but {self.spec.size} rows of this shard need {expected}; the file "
                    "was truncated or belongs to another shard (restore it from a snapshot)"
                )

    def _write_checksums(self, folder: str) -> None:
        """Record the CRC-32 of every state file, as the maps hold it now, in ``folder/checksums.json``."""
        sums = {name: _crc32(self._mapped(name)) for name in self._state_files()}
        path = os.path.join(folder, "checksums.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"version": self.version, "crc32": sums}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def _check_checksums(self) -> None:
        """Check the files against the checksums of the last clean close or snapshot, then drop those."""
        path = os.path.join(self.dir, "checksums.json")
        if not os.path.exists(path):
            return  # a killed process wrote none: the journal covers it
        with open(path) as f:
            recorded = json.load(f)["crc32"]
        for name, expected in recorded.items():
            if _crc32(self._mapped(name)) != expected:
                raise ValueError(
                    f"{os.path.join(self.dir, name)}: its checksum differs from the one written when the "
                    "shard last stopped; the file was changed or damaged since (restore it from a snapshot)"
                )
        os.remove(path)

    def _refuse_non_finite(self, local: Tensor, rows: Tensor, state: dict[str, Tensor]) -> None:
        """Refuse an update whose rows or state came out NaN or infinite; nothing of it is written (its
        record is incomplete: the journal marker was not moved)."""
        for name, values in (("rows", rows), *state.items()):
            if all_finite(values):
                continue
            flat = values.reshape(len(local), -1)  # (S, D) or (S, 1)
            bad = ~torch.isfinite(flat)
            where = int(torch.nonzero(bad.any(dim=1))[0])
            value = float(flat[where][bad[where]][0])
            raise ValueError(
                f"the update would make {name} of row {int(local[where]) + self.spec.row_start} "
                f"non-finite ({value}); nothing was applied (lower the lr or clip the gradients)"
            )

    # -- internals -------------------------------------------------------------------------------------
    def _map(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, fresh: bool) -> Tensor:
        """The file of ``name`` (its suffix from ``dtype``) mapped as a ``dtype`` tensor of ``shape``."""
        file = _file_name(name, dtype)
        path = os.path.join(self.dir, file)
        mode = "w+" if fresh or not os.path.exists(path) else "r+"
        storage = _STORAGE[dtype][1]
        mapped = np.memmap(path, dtype=storage, mode=mode, shape=shape)  # raw little-endian, no header
        self._arrays[file] = mapped
        return torch.from_numpy(mapped).view(dtype)

    def _mapped(self, name: str) -> np.memmap:
        return self._arrays[name]

    def _work(self, name: str, values: Tensor) -> Tensor:
        """A copy of ``values`` in this state's buffer ``name``, kept and grown between calls (the write lock
        serialises the callers, and nothing holds a buffer past the update)."""
        buffer = self._buffers.get(name)
        if buffer is None or len(buffer) < len(values):
            buffer = torch.empty(
                max(len(values), 2 * len(buffer) if buffer is not None else 0), *values.shape[1:]
            )
            self._buffers[name] = buffer
        return buffer[: len(values)].copy_(values)

    def _initialise(self, bound: float | None, seed: int) -> None:
        """This shard's rows of the matrix that :func:`~megaclass.ops.row_optimizers.init_rows_` draws."""
        if bound is None or bound > 0:  # fresh maps hold zeros already
            spec = self.spec
            init_rows_(self.rows, seed=seed, bound=bound, row_start=spec.row_start, num_rows=spec.num_rows)
        if self.average_slots:  # the average starts from the initial rows, at step 0
            self.state["average"].copy_(self.rows)
        self.header[_MAGIC] = MAGIC
        for array in self._arrays.values():
            array.flush()

    def _check_meta(self, path: str) -> dict[str, tuple[int, ...]]:
        with open(path) as f:
            meta = json.load(f)
        expected = {"format": FORMAT, **asdict(self.spec)}
        meta.setdefault("dtype", "float32")  # a shard written before rows could be held in bfloat16
        meta.setdefault("average_decay", 0.0)  # or before shards kept a weight average
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ValueError(
                    f"{path}: {key} is {meta.get(key)!r} but the server was started with {value!r}; "
                    "use a new --data-dir or the original settings"
                )
        return {slot: tuple(shape) for slot, shape in meta["slots"].items()}

    def _load_hyper(self, default: HyperParams) -> HyperParams:
        path = os.path.join(self.dir, "hyper.json")
        if not os.path.exists(path):
            return default
        with open(path) as f:
            return HyperParams(**json.load(f))

    def _write_json(self, name: str, data: dict) -> None:
        path = os.path.join(self.dir, name)
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def _layout(self, count: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """A record of ``count`` rows, from the file's start: ``head`` (count, version, the header),
        ``ids``, ``rows``, each state slot, ``versions``; a stale tail past it is never read (its count
        rules)."""
        parts = {"head": (torch.int64, (2 + len(self.header),)), "ids": (torch.int64, (count,))}
        parts["rows"] = (self.rows.dtype, (count, self.spec.dim))
        for slot, tensor in self.state.items():
            parts[slot] = (tensor.dtype, (count, *tensor.shape[1:]))
        parts["versions"] = (torch.int64, (count,))
        return parts

    def _record_views(self, count: int) -> dict[str, Tensor]:
        """Views of the journal's mapped bytes laid out as a record of ``count`` rows (:meth:`_layout`)."""
        parts = self._layout(count)
        journal = self._journal_of(_nbytes(parts))
        views, offset = {}, 0
        for name, (dtype, shape) in parts.items():
            views[name] = _view(journal, dtype, shape, offset)
            offset += views[name].nbytes
        return views

    def _record(
        self,
        local: Tensor,
        new_version: int,
        *,
        step: int,
        trainers: Sequence[int] = (),
        trainer_step: int = 0,
    ) -> dict[str, Tensor]:
        """Step 1 of the update protocol, begun: the record of rows ``local`` at ``new_version``, holding the
        header as the commit will leave it and the rows' and their state's current values, gathered straight
        into the mapped file (the record's one copy), for the caller to update there."""
        views = self._record_views(len(local))
        header = self.header.clone()
        header[_STEP] = step
        for trainer in trainers:
            header[_TRAINERS0 + trainer] = max(trainer_step, int(header[_TRAINERS0 + trainer]))
        header[_COMMITTED] = header[_JOURNAL] = new_version
        views["head"][:2] = torch.tensor([len(local), new_version])
        views["head"][2:] = header
        views["ids"].copy_(local)
        torch.index_select(self.rows, 0, local, out=views["rows"])
        for slot, tensor in self.state.items():
            torch.index_select(tensor, 0, local, out=views[slot])
        views["versions"].fill_(new_version)
        return views

    def _journal_of(self, nbytes: int) -> mmap.mmap:
        """The journal file mapped over at least ``nbytes`` (grown by doubling; never shrunk)."""
        journal = self._journal_map
        if journal is None or len(journal) < nbytes:
            size = max(nbytes, os.fstat(self._journal_fd).st_size, 2 * len(journal) if journal else 0)
            if os.fstat(self._journal_fd).st_size < size:
                os.ftruncate(self._journal_fd, size)
                if self.durable:
                    os.fsync(self._journal_fd)
            journal = self._journal_map = mmap.mmap(self._journal_fd, size)
        return journal

    def _write(self, record: dict[str, Tensor], names: Sequence[str]) -> None:
        """Steps 2-4 of the update protocol: mark the record complete, write its fields ``names``, the
        rows' versions and its header into the maps, the committed version last."""
        if self.durable:
            self._journal_map.flush()
        self.header[_JOURNAL] = record["head"][1]
        if self.durable:
            self._mapped(_file_name("header", torch.int64)).flush()
        local = record["ids"]
        for name in names:
            put_rows_(self.field(name), local, record[name])
        put_rows_(self.versions, local, record["versions"])
        header = record["head"][2:]
        self.header[_STEP:] = header[_STEP:]  # the applied step, the journal marker, the trainers' steps
        self.header[_COMMITTED] = header[_COMMITTED]  # the commit point
        self.header[_JOURNAL] = self.header[_COMMITTED]
        if self.durable:
            for array in self._arrays.values():
                array.flush()

    def _replay(self) -> None:
        """Write the journal's complete record into the maps again: the update it holds, completed."""
        path = os.path.join(self.dir, "journal.bin")
        count, version = (int(v) for v in np.fromfile(path, np.int64, 2))
        if version != self.header[_JOURNAL]:
            raise RuntimeError(f"{path}: holds version {version}, header expects {self.header[_JOURNAL]}")
        needed = _nbytes(self._layout(count))
        if os.path.getsize(path) < needed:
            raise RuntimeError(
                f"{path}: {os.path.getsize(path)} bytes, but its record of {count} rows needs {needed}; the "
                "journal was truncated (restore the shard from a snapshot)"
            )
        record = self._record_views(count)
        local = record["ids"]
        assert bool(((local >= 0) & (local < self.spec.size)).all()), "journal row ids outside the shard"
        self._write(record, ["rows", *self.state])
        for array in self._arrays.values():
            array.flush()


def _nbytes(parts: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """The bytes of a record laid out as ``parts`` (:meth:`ShardState._layout`)."""
    return sum(dtype.itemsize * math.prod(shape) for dtype, shape in parts.values())


def _file_name(name: str, dtype: torch.dtype) -> str:
    """``rows.f32``, ``exp_avg.bf16``, ``versions.i64``: a state file's name, its suffix from its dtype."""
    return f"{name}.{_STORAGE[dtype][0]}"


def _view(buffer: mmap.mmap | bytearray, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> Tensor:
    """A ``dtype`` tensor of ``shape`` over ``buffer``'s bytes from ``offset`` (no copy)."""
    array = np.frombuffer(buffer, _STORAGE[dtype][1], math.prod(shape), offset).reshape(shape)
    return torch.from_numpy(array).view(dtype)


def all_finite(values: Tensor) -> bool:
    """Whether ``values`` hold no NaN or infinity: one pass of ``sum`` (a NaN or an infinity makes it
    non-finite; twice as fast as ``aminmax``, many times ``isfinite(...).all()`` and its temporaries), and
    where the sum is not finite (finite values may overflow it) one pass of ``aminmax``, which decides."""
    if not values.numel() or bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(values))).all())


def _crc32(array: np.memmap) -> int:
    """CRC-32 of an array's bytes, read in 64 MiB pieces."""
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    crc = 0
    for start in range(0, len(data), 1 << 26):
        crc = zlib.crc32(data[start : start + (1 << 26)], crc)
    return crc


def _copy_synced(source: str, target: str) -> None:
    shutil.copyfile(source, target)
    fsync_path(target)
