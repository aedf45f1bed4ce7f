"""The parameter-server process: one shard of the classifier behind the gRPC service of ``megaclass.proto``.

    megaclass paramserver serve --rows 1000000 --dim 512 --shard 0/4 --data-dir ps0 --port 50051

Requests are served by a thread pool, and those of clients on the shard's machine by a thread per connection
to its Unix socket (:mod:`~megaclass.paramserver.local_socket`). Reads (pull, get, query) share a read-write
lock; updates (a step, set rows, a snapshot) hold it alone, so a reader never sees half a step. In sync mode a
step is applied once every trainer in the barrier has pushed for it; the applied gradient is the mean over the
trainers that pushed (the same average DistributedDataParallel takes over the backbone's gradients, so one
learning rate serves both).
A trainer missing for ``barrier_timeout_s`` after the first push of a step is dropped from the barrier with a
warning and rejoins when it pushes again. In async mode each push is applied as it arrives.

Untrusted input is bounded before it costs memory: with a token, a call's metadata is checked before its body
is read (a refused call's body is never received); a received message is capped at the largest valid request
(:meth:`ServerConfig.limits`); rows and queries per call are limited, and the refusals name the setting.
An update whose result would not be finite is refused whole, as is a step far past the last one seen.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megaclass.host_allocator import reuse_freed_blocks
from megaclass.index.kmeans import DEFAULT_PROBES
from megaclass.paramserver import local_socket, wire
from megaclass.paramserver.config import (
    MESSAGE_OVERHEAD_BYTES,
    ServerConfig,
    add_serve_arguments,
    config_from_arguments,
    shard_range,
)
from megaclass.paramserver.shared_memory import AttachedBuffer
from megaclass.paramserver.state import ShardSpec, ShardState, all_finite

logger = logging.getLogger("megaclass.paramserver")

_QUERY_BLOCK_ROWS = 65536  # rows scored at once by QueryNearest: (B, 65536) float32 scores ...
_QUERY_SCRATCH_BYTES = 1 << 28  # ... or fewer, so that a block's scores or gathered rows stay under 256 MiB
SHARED_BUFFER_MAX_BYTES = 1 << 32  # a client's shared buffer is its memory: a bound on the server's map only
_ORPHAN_CHECK_TICKS = 8  # every 2 s: the shared buffers of clients that exited are detached
_CPU_QUERY_BYTES = 1 << 24  # a CPU index query's candidate rows (features x probes x leaf x D) at once


class _Refusal(Exception):
    """A request refused with a specific gRPC status (name of ``grpc.StatusCode``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Garbage:
    """Stands for a request whose bytes are not a valid message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def read(self) -> _Guard:
        return _Guard(self._acquire_read, self._release_read)

    def write(self) -> _Guard:
        return _Guard(self._acquire_write, self._release_write)

    def _acquire_read(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def _acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._writers_waiting -= 1
            self._writer = True

    def _release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Guard:
    def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
        self._acquire, self._release = acquire, release

    def __enter__(self) -> None:
        self._acquire()

    def __exit__(self, *exc: object) -> None:
        self._release()


@dataclass
class _Pending:
    """Pushes received for one sync step."""

    first_push: float
    lr: float
    parts: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # trainer -> (local ids, grads)


class ShardService:
    """The request handlers of one shard (transport-independent; :func:`serve` wires them to gRPC)."""

    def __init__(self, config: ServerConfig) -> None:
        if config.index_device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--index-device {config.index_device!r}: this machine has no CUDA device")
        self.config = config
        start, stop = shard_range(config.num_rows, config.shard, config.shards)
        spec = ShardSpec(
            config.num_rows,
            config.dim,
            start,
            stop,
            config.optimizer,
            config.trainers,
            config.dtype,
            config.average_decay,
        )
        self.state = ShardState(
            config.data_dir,
            spec,
            config.hyper,
            init_bound=config.init_bound,
            seed=config.seed,
            durable=config.durable,
        )
        self.limits = config.limits()
        self.incarnation = secrets.randbits(63) + 1
        self.lock = ReadWriteLock()
        self._applied = threading.Condition()  # notified after every committed step
        self._barrier = threading.Lock()  # guards _pending, _applying and _dropped
        self._apply_order = threading.Lock()  # sync steps are popped and applied one at a time, in order
        self._pending: dict[int, _Pending] = {}
        self._applying: dict[int, set[int]] = {}  # a sync step popped and not yet committed -> its trainers
        self._dropped: set[int] = set()
        self._refused: dict[int, str] = {}  # sync steps not applied, their result not finite -> why
        self._index_lock = threading.Lock()  # one index build or query at a time
        self._index: tuple[Any, int] | None = None  # the cluster index, the version it was built at
        self._shared: dict[int, AttachedBuffer] = {}  # clients' shared memory buffers by id
        self.local_socket = ""  # the name of the shard's Unix socket, told to clients that attach a buffer
        self._shared_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------------------
    def _local(self, data: bytes, what: str, *, unique: bool = False) -> Tensor:
        ids = wire.decode_ids(data, what=what)
        spec = self.state.spec
        bad = (ids < spec.row_start) | (ids >= spec.row_stop)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{what}[{first}] = {int(ids[first])} is outside this shard's rows "
                f"[{spec.row_start}, {spec.row_stop})"
            )
        if unique and not _strictly_increasing(ids) and len(np.unique(ids)) != len(ids):
            raise ValueError(f"{what}: ids must be unique within one request")
        return torch.from_numpy(ids - spec.row_start)

    def _check_rows(self, count: int, what: str) -> None:
        if count > self.limits.rows:
            raise _Refusal(
                "RESOURCE_EXHAUSTED",
                f"{count} {what} in one request; this shard takes at most {self.limits.rows} "
                "(--max-rows-per-request, --max-message-mib); split the request",
            )

    def _check_incarnation(self, incarnation: int) -> None:
        if incarnation and incarnation != self.incarnation:
            raise _Refusal(
                "FAILED_PRECONDITION",
                f"server restarted: incarnation {self.incarnation}, request expected {incarnation}",
            )

    def _dtype(self, dtype: str) -> str:
        if dtype not in ("", *wire.DTYPES):
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(wire.DTYPES)}")
        return dtype or "float32"

    def _decode_block(self, array: Any, what: str, shape: tuple[int, ...], *, copy: bool = True) -> Tensor:
        values = wire.decode_array(array, what=what, copy=copy)
        if tuple(values.shape) != shape:
            raise ValueError(f"{what}: shape {list(values.shape)} but expected {list(shape)}")
        return _finite(values.to(torch.float32), what)

    # -- handlers --------------------------------------------------------------------------------------
    def pull_rows(self, request: Any, time_left: float | None) -> Any:
        self._check_incarnation(request.incarnation)
        self._check_rows(len(request.ids) // 8, "ids")
        local = self._local(request.ids, "ids")
        dtype = self._dtype(request.dtype)
        if request.min_step > 0:
            self._wait_applied(request.min_step, time_left)
        with self.lock.read():
            version = self.state.version
            if request.only_changed and len(local):
                local = local[self.state.versions.index_select(0, local) > request.changed_after]
            rows = None  # gathered straight into the client's shared memory, or here
            if request.field not in ("", "rows"):  # the weight average: a pull reads no optimizer slot
                rows = self._average(request.field, request.average_step, local)  # (S, D)
            if request.buffer:
                self._gather_into_buffer(request, local, dtype, rows)
            elif rows is None:
                rows = self.state.rows.index_select(0, local)  # (S, D)
        response = wire.message(
            "PullRowsResponse",
            ids=wire.encode_ids(local.numpy() + self.state.spec.row_start) if request.only_changed else b"",
            version=version,
            incarnation=self.incarnation,
        )
        if request.buffer:
            response.rows.dtype = dtype
            response.rows.shape[:] = [len(local), self.state.spec.dim]
            return response
        return wire.Prepared(response, 1, rows, dtype)  # rows appended at serialization

    def _average(self, field: str, step: int, local: Tensor | slice) -> Tensor:
        """Rows ``local`` of the weight average at optimizer step ``step`` (PullRows, GetRows)."""
        if field != "average":
            raise ValueError(f"field {field!r} with average_step {step}: expected field 'average'")
        if step < 0:
            raise ValueError(f"average_step {step}: expected >= 0")
        return self.state.average_at(local, step)

    def _buffer_range(self, request: Any, shape: tuple[int, ...], dtype: str) -> Tensor:
        """The range of the client's buffer ``request`` names, as a ``dtype`` tensor of ``shape``."""
        nbytes = wire.array_nbytes(dtype, shape)
        if nbytes > request.buffer_bytes:
            raise ValueError(
                f"buffer_bytes {request.buffer_bytes}: {shape[0]} rows of {dtype} need {nbytes} bytes"
            )
        target = self._buffer(request.buffer).array(request.buffer_offset, nbytes, what="rows")
        if dtype == "float32":
            return torch.from_numpy(target.view(np.float32).reshape(shape))
        return torch.from_numpy(target.view(np.int16).reshape(shape)).view(torch.bfloat16)

    def _gather_into_buffer(self, request: Any, local: Tensor, dtype: str, rows: Tensor | None) -> None:
        """Rows ``local`` of the shard (``rows``: those values instead), as ``dtype``, into the buffer range
        ``request`` names."""
        out = self._buffer_range(request, (len(local), self.state.spec.dim), dtype)
        if rows is not None:
            out.copy_(rows)
        elif out.dtype == self.state.rows.dtype:
            torch.index_select(self.state.rows, 0, local, out=out)
        else:
            out.copy_(self.state.rows.index_select(0, local))

    def _buffer(self, buffer: int) -> AttachedBuffer:
        with self._shared_lock:
            attached = self._shared.get(buffer)
        if attached is None:
            raise _Refusal(
                "FAILED_PRECONDITION",
                f"buffer {buffer} is not attached here (detached, or another process's)",
            )
        return attached

    def _grads_in_buffer(self, request: Any) -> Any:
        """The push's ``grads`` with their bytes read from the buffer the request names."""
        grads = request.grads
        if len(grads.data):
            raise ValueError("grads: bytes given both inline and in a buffer")
        if grads.dtype not in wire.DTYPES or len(grads.shape) != 2 or min(grads.shape, default=0) < 0:
            return grads  # decoding names the problem
        nbytes = wire.array_nbytes(grads.dtype, grads.shape)
        data = self._buffer(request.buffer).array(request.buffer_offset, nbytes, what="grads")
        return wire.ArrayView(grads.dtype, tuple(grads.shape), memoryview(data))

    def push_gradients(self, request: Any, time_left: float | None) -> Any:
        self._check_incarnation(request.incarnation)
        if not 0 <= request.trainer < self.config.trainers:
            raise ValueError(f"trainer {request.trainer}: expected 0 <= trainer < {self.config.trainers}")
        if request.step < 1:
            raise ValueError(f"step {request.step}: expected >= 1")
        async_mode = self.config.mode == "async"
        last = self.state.trainer_steps()[request.trainer] if async_mode else self.state.applied_step
        if request.step - last > self.config.max_step_jump:
            raise ValueError(
                f"step {request.step} of trainer {request.trainer} is {request.step - last} past the last "
                f"step seen ({last}); at most {self.config.max_step_jump} is allowed (--max-step-jump)"
            )
        self._check_rows(len(request.ids) // 8, "ids")
        local = self._local(request.ids, "ids", unique=True)
        array = self._grads_in_buffer(request) if request.buffer else request.grads
        # gradients in shared memory are read where they are when their step is applied before the answer
        # (async, or one sync trainer); a barrier keeps them past it, and the client may reuse the range
        applied_here = async_mode or self.config.trainers == 1
        shape = (len(local), self.state.spec.dim)
        grads = self._decode_block(array, "grads", shape, copy=not (request.buffer and applied_here))
        lr = self.state.hyper.lr if request.lr is None else request.lr
        if not (lr >= 0 and np.isfinite(lr)):
            raise ValueError(f"lr {lr}: expected a finite number >= 0")
        if async_mode:
            with self.lock.write():
                if self.state.trainer_steps()[request.trainer] < request.step:
                    self.state.apply(local, grads, lr=lr, step=request.step, trainers=[request.trainer])
                applied = self.state.trainer_steps()[request.trainer]
            self._notify()
        else:
            self._add_to_barrier(request.trainer, request.step, local, grads, lr)
            self.apply_ready_steps()
            with self._barrier:
                refused = self._refused.get(request.step)
            if refused is not None:
                raise ValueError(f"step {request.step}: {refused}")
            applied = self.state.applied_step
        return wire.message(
            "PushGradientsResponse",
            applied_step=applied,
            version=self.state.version,
            incarnation=self.incarnation,
        )

    def set_rows(self, request: Any, time_left: float | None) -> Any:
        self._check_rows(len(request.ids) // 8, "ids")
        local = self._local(request.ids, "ids", unique=True)
        target = self.state.field(request.field)
        values = self._decode_block(request.values, "values", (len(local), *target.shape[1:]))
        with self.lock.write():
            version = self.state.set_field(request.field, local, values)
        self._notify()
        return wire.message("SetRowsResponse", version=version)

    def get_rows(self, request: Any, time_left: float | None) -> Any:
        spec = self.state.spec
        if not spec.row_start <= request.start <= request.stop <= spec.row_stop:
            raise ValueError(
                f"range [{request.start}, {request.stop}) is not inside this shard's rows "
                f"[{spec.row_start}, {spec.row_stop})"
            )
        self._check_rows(request.stop - request.start, "rows")
        dtype = self._dtype(request.dtype)
        local = slice(request.start - spec.row_start, request.stop - spec.row_start)
        with self.lock.read():
            if request.average_step:
                values = self._average(request.field, request.average_step, local).to(wire.DTYPES[dtype])
            elif request.buffer:  # copied into the client's shared memory below, under the lock
                values = self.state.field(request.field)[local]
            else:  # a copy: the rows may change after the lock
                values = self.state.field(request.field)[local].to(wire.DTYPES[dtype], copy=True)
            if request.buffer:
                self._buffer_range(request, tuple(values.shape), dtype).copy_(values)
            version = self.state.version
        response = wire.message("GetRowsResponse", version=version)
        if not request.buffer:
            return wire.Prepared(response, 1, values, dtype)
        response.values.dtype = dtype
        response.values.shape[:] = list(values.shape)
        return response

    def query_nearest(self, request: Any, time_left: float | None) -> Any:
        queries = request.features.shape[0] if len(request.features.shape) else 0
        if queries > self.limits.queries:
            raise _Refusal(
                "RESOURCE_EXHAUSTED",
                f"{queries} features in one request; this shard takes at most {self.limits.queries} "
                "(--max-queries-per-request, --max-message-mib); split the request",
            )
        if request.n < 1:
            raise ValueError(f"n {request.n}: expected >= 1")
        answer_bytes = queries * min(request.n, self.state.spec.size) * 12 + MESSAGE_OVERHEAD_BYTES
        if answer_bytes > self.limits.send_bytes:
            raise _Refusal(
                "RESOURCE_EXHAUSTED",
                f"{queries} features x {request.n} neighbours is a {answer_bytes} byte answer, over this "
                f"shard's {self.limits.send_bytes} (--max-message-mib); ask for fewer at once",
            )
        features = wire.decode_array(request.features, what="features", ndim=2).to(torch.float32)
        if features.shape[1] != self.state.spec.dim:
            raise ValueError(
                f"features: shape {list(features.shape)} but expected [B, {self.state.spec.dim}]"
            )
        features = _finite(features, "features")
        if request.metric not in ("", "dot", "cosine"):
            raise ValueError(f"metric {request.metric!r}: expected 'dot' or 'cosine'")
        if request.max_index_age < 0:
            raise ValueError(f"max_index_age {request.max_index_age}: expected >= 0")
        if request.probes < 0:
            raise ValueError(f"probes {request.probes}: expected >= 0 (0: the shard's default)")
        cosine = request.metric == "cosine"
        if cosine:
            features = torch.nn.functional.normalize(features, dim=1)
        if request.max_index_age:
            scores, ids = self._query_index(
                features,
                request.n,
                cosine=cosine,
                max_age=request.max_index_age,
                probes=request.probes or DEFAULT_PROBES,
            )
        else:
            with self.lock.read():
                scores, ids = _top_rows(features, self.state.rows, request.n, cosine=cosine)
        ids = torch.where(ids >= 0, ids + self.state.spec.row_start, ids)  # global ids; -1 stays
        return wire.message(
            "QueryNearestResponse", scores=wire.encode_array(scores), ids=wire.encode_ids(ids.numpy())
        )

    def _query_index(
        self, features: Tensor, n: int, *, cosine: bool, max_age: int, probes: int
    ) -> tuple[Tensor, Tensor]:
        """Top-``n`` local ``(scores, ids)``, each ``(B, n')``, of ``features (B, D)`` by the shard's index,
        searching ``probes`` of its clusters per feature.

        The index is built at the first query and refreshed (a warm build over the rows updated since, see
        :class:`~megaclass.index.kmeans.ClusterIndex`) when its build is over ``max_age`` versions old. One
        index answers both metrics: its clusters are the nearest by angle, their rows ranked by the metric.
        Scores are exact, from the current rows; ids are ``-1`` (score ``-inf``) where it found fewer.
        """
        from megaclass.index import build_selector

        metric = "cosine" if cosine else "dot"
        with self._index_lock:
            index, built = self._index or (None, -1)
            if index is None or self.state.version - built > max_age:
                if index is None:  # its own metric: the first query's (its calibration's truth)
                    index = build_selector(
                        "gpu", metric=metric, device=self.config.index_device, seed=self.config.seed
                    )
                with self.lock.read():  # a build reads a consistent state: no step half-applied
                    changed = None
                    if index.is_built:  # (n,) rows updated since the last build
                        changed = torch.nonzero(self.state.versions > built).squeeze(1)
                    built = self.state.version
                    if changed is None or len(changed):
                        index.build(self.state.rows, changed=changed)
                self._index = (index, built)
            index.probes = probes  # the query's cost is linear in it: a client splits its probes over shards
            block = len(features)
            if torch.device(self.config.index_device).type == "cpu":
                # candidate rows gathered in cache-sized blocks: one (B, probes * leaf, D) block is slower
                # (hundreds of MB of fresh pages for B 512) than several small ones
                block = max(1, _CPU_QUERY_BYTES // (probes * index.leaf_size * features.shape[1] * 4))
            size = min(n, self.state.spec.size)
            local = torch.cat(
                [
                    index.query(features[i : i + block], size, metric=metric).cpu()
                    for i in range(0, max(len(features), 1), block)
                ]
            )  # (B, n')
        scores = torch.empty(local.shape)  # (B, n')
        block = max(1, _QUERY_SCRATCH_BYTES // (4 * features.shape[1] * max(local.shape[1], 1)))
        with self.lock.read():
            for i in range(0, len(local), block):
                rows = self.state.rows[local[i : i + block].clamp_min(0)].float()  # (b, n', D)
                scores[i : i + block] = torch.einsum("bnd,bd->bn", rows, features[i : i + block])
                if cosine:
                    scores[i : i + block] /= rows.norm(dim=2).clamp_min(1e-12)
        scores = scores.masked_fill(local < 0, float("-inf"))
        scores, order = scores.sort(dim=1, descending=True)
        return scores, local.gather(1, order)

    def set_hyper_params(self, request: Any, time_left: float | None) -> Any:
        changes = {}
        for name in request.params.DESCRIPTOR.fields_by_name:
            if request.params.HasField(name):
                changes[name] = getattr(request.params, name).value
        with self.lock.write():
            self.state.set_hyper(dataclasses.replace(self.state.hyper, **changes))
            hyper = self.state.hyper
        logger.info("hyper-parameters now %s", hyper)
        params = wire.message("HyperParams")
        for name in params.DESCRIPTOR.fields_by_name:
            getattr(params, name).value = getattr(hyper, name)
        return wire.message("SetHyperParamsResponse", params=params)

    def snapshot(self, request: Any, time_left: float | None) -> Any:
        with self.lock.write():
            path = self.state.snapshot()
            step, version = self.state.applied_step, self.state.version
        logger.info("snapshot of step %d (version %d) in %s", step, version, path)
        return wire.message("SnapshotResponse", path=path, step=step, version=version)

    def attach_buffer(self, request: Any, time_left: float | None) -> Any:
        if not self.config.max_shared_buffers:
            raise _Refusal("FAILED_PRECONDITION", "shared buffers are off here (--max-shared-buffers 0)")
        buffer = AttachedBuffer(request.path, request.nonce, max_bytes=SHARED_BUFFER_MAX_BYTES)
        self.drop_orphaned_buffers()
        with self._shared_lock:
            if len(self._shared) >= self.config.max_shared_buffers:
                raise _Refusal(
                    "RESOURCE_EXHAUSTED",
                    f"{len(self._shared)} buffers attached already (--max-shared-buffers); send rows inline",
                )
            key = secrets.randbits(63) + 1
            self._shared[key] = buffer
        return wire.message(
            "AttachBufferResponse", buffer=key, bytes=buffer.size, local_socket=self.local_socket
        )

    def drop_orphaned_buffers(self) -> int:
        """Detach the buffers of clients that exited or dropped them without detaching (their memory goes
        with the last map); how many."""
        with self._shared_lock:
            orphaned = [key for key, buffer in self._shared.items() if not buffer.owner_holds_it()]
            for key in orphaned:
                del self._shared[key]  # unmapped once no request in flight uses it
        if orphaned:
            logger.info("detached %d shared buffers of clients that exited or dropped them", len(orphaned))
        return len(orphaned)

    def close(self) -> None:
        """Close the state and detach every client's buffer: a stopped shard maps no client's memory."""
        with self.lock.write():
            self.state.close()
        with self._shared_lock:
            self._shared.clear()

    def detach_buffer(self, request: Any, time_left: float | None) -> Any:
        with self._shared_lock:
            self._shared.pop(request.buffer, None)  # unmapped once no request in flight uses it
        return wire.message("DetachBufferResponse")

    def health(self, request: Any, time_left: float | None) -> Any:
        spec = self.state.spec
        with self._barrier:
            dropped = sorted(self._dropped)
        return wire.message(
            "HealthResponse",
            num_rows=spec.num_rows,
            dim=spec.dim,
            row_start=spec.row_start,
            row_stop=spec.row_stop,
            optimizer=spec.optimizer,
            mode=self.config.mode,
            trainers=self.config.trainers,
            applied_step=self.state.applied_step,
            version=self.state.version,
            incarnation=self.incarnation,
            trainer_steps=self.state.trainer_steps(),
            dropped_trainers=dropped,
            slots=list(self.state.slots),
            max_rows_per_request=self.limits.rows,
            max_queries_per_request=self.limits.queries,
            max_message_bytes=self.limits.send_bytes,
            row_dtype=spec.dtype,
            average_decay=spec.average_decay,
        )

    # -- sync barrier ----------------------------------------------------------------------------------
    def _add_to_barrier(self, trainer: int, step: int, local: Tensor, grads: Tensor, lr: float) -> None:
        with self._barrier:
            if step in self._refused:
                raise ValueError(f"step {step}: {self._refused[step]}")
            if step in self._applying:  # popped from the barrier, its update under way
                if trainer in self._applying[step]:
                    return  # a retried push of the step being applied with this trainer's gradients
                raise _Refusal(
                    "FAILED_PRECONDITION",
                    f"step {step} of trainer {trainer}: the shard is applying step {step} without it; a "
                    "trainer dropped from the barrier rejoins at a later step",
                )
            if step <= self.state.applied_step:
                if step <= self.state.trainer_steps()[trainer]:
                    return  # a retried push of a step applied with this trainer's gradients
                raise _Refusal(
                    "FAILED_PRECONDITION",
                    f"step {step} of trainer {trainer}: the shard applied step {self.state.applied_step} "
                    f"without it (its last step here: {self.state.trainer_steps()[trainer]}); a trainer "
                    "dropped from the barrier rejoins at a later step, a new run needs a new --data-dir",
                )
            if trainer in self._dropped:
                self._dropped.discard(trainer)
                logger.warning("trainer %d rejoins the barrier at step %d", trainer, step)
            pending = self._pending.setdefault(step, _Pending(time.monotonic(), lr))
            if trainer in pending.parts:
                return  # a retried push
            if not np.isclose(pending.lr, lr, rtol=1e-6, atol=0.0):
                raise ValueError(
                    f"lr {lr} for step {step} differs from the lr {pending.lr} another trainer sent"
                )
            pending.parts[trainer] = (local, grads)

    def apply_ready_steps(self) -> None:
        """Apply, in step order, every pending sync step all trainers pushed (or whose wait timed out)."""
        with self._apply_order:
            while (ready := self._pop_ready()) is not None:
                step, pending = ready
                unique, total = _mean_over_trainers(list(pending.parts.values()), self.state.spec.dim)
                try:
                    with self.lock.write():
                        self.state.apply(
                            unique, total, lr=pending.lr, step=step, trainers=list(pending.parts)
                        )
                except ValueError as error:  # the result would not be finite: the step is not applied
                    logger.warning("step %d refused: %s", step, error)
                    with self._barrier:
                        self._refused[step] = str(error)
                finally:
                    with self._barrier:
                        del self._applying[step]
                self._notify()

    def _pop_ready(self) -> tuple[int, _Pending] | None:
        with self._barrier:
            if not self._pending:
                return None
            step = min(self._pending)
            pending = self._pending[step]
            missing = set(range(self.config.trainers)) - self._dropped - set(pending.parts)
            if missing:
                waited = time.monotonic() - pending.first_push
                if waited < self.state.hyper.barrier_timeout_s:
                    return None
                logger.warning(
                    "step %d: trainer(s) %s sent nothing for %.1f s; dropping them from the barrier",
                    step,
                    sorted(missing),
                    waited,
                )
                self._dropped |= missing
            self._applying[step] = set(pending.parts)  # a retry now finds it here, not in _pending
            return step, self._pending.pop(step)

    def _notify(self) -> None:
        with self._applied:
            self._applied.notify_all()

    def _wait_applied(self, step: int, time_left: float | None) -> None:
        deadline = time.monotonic() + (3600.0 if time_left is None else time_left)
        with self._applied:
            while self.state.applied_step < step:
                with self._barrier:
                    refused = self._refused.get(step)
                if refused is not None:
                    raise ValueError(f"step {step} was refused: {refused}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    with self._barrier:
                        pending = self._pending.get(step)
                        have = sorted(pending.parts) if pending else []
                    raise _Refusal(
                        "DEADLINE_EXCEEDED",
                        f"step {step} not applied in time (applied: {self.state.applied_step}; "
                        f"trainers that pushed it: {have} of {self.config.trainers})",
                    )
                self._applied.wait(min(remaining, 0.5))


def _strictly_increasing(ids: np.ndarray) -> bool:
    """Whether ``ids`` are sorted without repeats (then unique without a sort; selections come sorted)."""
    return len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())


def _mean_over_trainers(parts: list[tuple[Tensor, Tensor]], dim: int) -> tuple[Tensor, Tensor]:
    """Rows ``(U,)`` any trainer pushed and their mean gradient ``(U, D)`` over the trainers.

    A trainer that did not push a row counts as a zero gradient for it, as DDP averages the backbone's.
    """
    if len(parts) == 1:
        return parts[0]  # ids are unique within a push
    unique, inverse = torch.unique(torch.cat([ids for ids, _ in parts]), return_inverse=True)
    total = torch.zeros(len(unique), dim)
    start = 0
    for ids, grads in parts:
        where = inverse[start : start + len(ids)]  # unique within one part: a gather-add-scatter is exact
        total[where] += grads
        start += len(ids)
    return unique, total.div_(len(parts))


def _finite(values: Tensor, what: str) -> Tensor:
    """``values``, refused when they hold NaN or infinity."""
    if not all_finite(values):
        raise ValueError(f"{what}: contains NaN or infinity")
    return values


def _top_rows(features: Tensor, rows: Tensor, n: int, *, cosine: bool) -> tuple[Tensor, Tensor]:
    """Top-``n`` rows of ``rows (R, D)`` for each of ``features (B, D)`` by dot product, in row blocks."""
    best_scores = torch.empty(features.shape[0], 0)
    best_ids = torch.empty(features.shape[0], 0, dtype=torch.int64)
    size = max(1024, min(_QUERY_BLOCK_ROWS, _QUERY_SCRATCH_BYTES // (4 * max(features.shape[0], 1))))
    for start in range(0, rows.shape[0], size):
        block = rows[start : start + size].float()
        if cosine:
            block = torch.nn.functional.normalize(block, dim=1)
        scores = features @ block.T  # (B, block)
        k = min(n, scores.shape[1])
        top, where = scores.topk(k, dim=1)
        merged = torch.cat([best_scores, top], dim=1)  # (B, n + k)
        merged_ids = torch.cat([best_ids, where + start], dim=1)
        keep = merged.topk(min(n, merged.shape[1]), dim=1).indices
        best_scores, best_ids = merged.gather(1, keep), merged_ids.gather(1, keep)
    return best_scores, best_ids


def _authorised(metadata: Any, expected: bytes) -> bool:
    for key, value in metadata or ():
        if key == "authorization":
            given = value.encode() if isinstance(value, str) else value
            return hmac.compare_digest(given, expected)
    return False


def _token_check(token: str) -> Any:
    """A server interceptor refusing calls without ``authorization: Bearer <token>`` from their metadata
    alone: the refusal is a request-streaming handler that never reads the request, so no body is received."""
    import grpc

    expected = f"Bearer {token}".encode()

    def refuse(requests: Any, context: Any) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (authorization: Bearer ...)")

    refusal = grpc.stream_unary_rpc_method_handler(refuse)

    class TokenCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            if _authorised(details.invocation_metadata, expected):
                return continuation(details)
            return refusal

    return TokenCheck()


def _runner(
    service: ShardService, method: wire.Method
) -> Callable[[Any, float | None], tuple[Any, str, str]]:
    """``run(request, time_left)``: ``method`` of ``service`` with input validation and error mapping, for
    either transport; ``(response, "OK", "")`` or ``(None, status code name, message)``."""
    name = "".join("_" + c.lower() if c.isupper() else c for c in method.name).lstrip("_")
    handler = getattr(service, name)

    def run(request: Any, time_left: float | None) -> tuple[Any, str, str]:
        if isinstance(request, _Garbage):
            return None, "INVALID_ARGUMENT", f"{method.request}: not a valid message: {request.error}"
        try:
            return handler(request, time_left), "OK", ""
        except ValueError as error:
            return None, "INVALID_ARGUMENT", f"{method.name}: {error}"
        except _Refusal as refusal:
            return None, refusal.code, f"{method.name}: {refusal}"
        except Exception as error:  # a bug must not take the shard down: log it, answer INTERNAL
            logger.exception("%s failed", method.name)
            return None, "INTERNAL", f"{method.name}: {type(error).__name__}: {error}"

    return run


def _parser(method: wire.Method) -> Callable[[bytes | memoryview], Any]:
    """A request's bytes to its message, or a :class:`_Garbage` naming why they are not one."""
    # pushes carry most of the bytes: read them without copying the gradients (same encoding, same checks)
    read = (
        wire.parse_push_request
        if method.name == "PushGradients"
        else wire.MESSAGES[method.request].FromString
    )

    def parse(data: bytes | memoryview) -> Any:
        try:
            return read(data)
        except Exception as error:  # protobuf's DecodeError, our ValueError: an answer, never a crash
            return _Garbage(error)

    return parse


def _handler(service: ShardService, method: wire.Method) -> Any:
    """A gRPC unary handler running ``method`` (:func:`_runner`)."""
    import grpc

    run = _runner(service, method)

    def handle(request: Any, context: Any) -> Any:
        response, code, message = run(request, context.time_remaining())
        if code != "OK":
            context.abort(getattr(grpc.StatusCode, code), message)
        return response

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=_parser(method), response_serializer=wire.serialize
    )


def _local_handler(service: ShardService, method: wire.Method) -> local_socket.Handler:
    """A :class:`~megaclass.paramserver.local_socket.LocalListener` handler running ``method``."""
    run, parse = _runner(service, method), _parser(method)

    def handle(data: memoryview, time_left: float | None) -> tuple[str, bytes]:
        response, code, message = run(parse(data), time_left)
        return code, wire.serialize(response) if code == "OK" else message.encode()

    return handle


class RunningServer:
    """A started shard: its bound port, and :meth:`stop`."""

    def __init__(
        self, server: Any, service: ShardService, port: int, local: local_socket.LocalListener | None
    ) -> None:
        self.server, self.service, self.port, self.local = server, service, port, local
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="barrier-timeout", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        """Apply sync steps whose missing trainers timed out, and detach the buffers of clients that exited
        (nobody else would trigger either)."""
        ticks = 0
        while not self._stop.wait(0.25):
            if self.service.config.mode == "sync":
                self.service.apply_ready_steps()
            ticks += 1
            if ticks % _ORPHAN_CHECK_TICKS == 0:
                self.service.drop_orphaned_buffers()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        if self.local is not None:
            self.local.close()
        self.server.stop(grace).wait()
        self.service.close()


def serve(config: ServerConfig) -> RunningServer:
    """Start one shard (non-blocking); state is opened or created under ``config.data_dir``."""
    from concurrent import futures

    import grpc

    service = ShardService(config)
    threads = config.threads or 8 + 4 * config.trainers
    limits = service.limits
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ps"),
        interceptors=[_token_check(config.token)] if config.token is not None else [],
        options=[
            ("grpc.max_receive_message_length", limits.receive_bytes),  # larger: refused, never buffered
            ("grpc.max_send_message_length", limits.send_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    handlers = {method.name: _handler(service, method) for method in wire.METHODS}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(f"{wire.PACKAGE}.{wire.SERVICE}", handlers),)
    )
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert:
            with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if port == 0:
        raise OSError(f"--port: could not bind {address}: the port is in use or the address is not here")
    server.start()
    local = None
    if config.max_shared_buffers and local_socket.available():  # clients that attach a buffer are local
        local = local_socket.LocalListener(
            {method.name: _local_handler(service, method) for method in wire.METHODS},
            token=config.token,
            max_bytes=limits.receive_bytes,
            max_connections=threads,
        )
        service.local_socket = local.name
    spec = service.state.spec
    logger.info(
        "shard %d/%d rows [%d, %d) of %d x %d (%s), %s %s, step %d, listening on %s:%d",
        config.shard,
        config.shards,
        spec.row_start,
        spec.row_stop,
        spec.num_rows,
        spec.dim,
        spec.dtype,
        config.mode,
        config.optimizer,
        service.state.applied_step,
        config.host,
        port,
    )
    return RunningServer(server, service, port, local)


def run_serve(args: Any) -> int:
    """Run ``megaclass paramserver serve`` until SIGINT/SIGTERM; prints ``listening on HOST:PORT``."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_arguments(args)
    # shards often share a machine with each other and a trainer: half its cores split between the shards
    # (a row update is memory-bound; threads beyond the cores spin against the trainer's and each other's)
    torch.set_num_threads(args.torch_threads or max(1, _usable_cores() // (2 * config.shards)))
    reuse_freed_blocks()  # answers and inline gradients: blocks of each call's size, made every call
    running = serve(config)
    print(f"megaclass paramserver: listening on {config.host}:{running.port}", flush=True)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    running.stop()
    return 0


def _usable_cores() -> int:
    """Cores this process may run on: a container's or a ``taskset``'s share, not the host's count (threads
    sized by the host's count oversubscribe the share and spin)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    """``python -m megaclass.paramserver serve ...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="megaclass paramserver")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="run one shard"))
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except ValueError as error:
        parser.error(str(error))
    return 2
