"""A Python client of the sharded parameter server: fans each request out to the shards in parallel.

>>> client = ParamServerClient(["127.0.0.1:50051", "127.0.0.1:50052"], trainer=0)  # doctest: +SKIP
>>> rows = client.pull(torch.tensor([3, 17, 900_000]))  # (3, D) float32
>>> client.push(torch.tensor([3, 17, 900_000]), grads, step=1, lr=0.1)

Every call runs under a deadline (``timeout_s``; the first contact under ``connect_timeout_s``). A shard that
does not answer is retried until the deadline and then reported as a :class:`ParamServerError` naming its
address, as is a refused token or a call over the shard's limits. Pulls, reads, writes and queries larger
than a shard takes in one call (``Health`` tells its limits) are split into calls it takes. Pushes are
idempotent per
``(trainer, step)``: the client keeps each push until the shard reports it applied, and when a shard restarts
(its incarnation changes) it pushes again whatever the restarted shard had not applied, so a killed shard
loses no update.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megaclass.ops import run_split
from megaclass.paramserver import wire
from megaclass.paramserver.config import MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD_BYTES, TOKEN_ENV, resolve_token
from megaclass.paramserver.local_socket import LocalCallError, LocalChannel
from megaclass.paramserver.shared_memory import ALIGN, ClientBuffer

# a response's bytes to its message, by method (a pull's rows stay a view into the received bytes)
_RESPONSE_PARSERS = {
    m.name: wire.parse_pull_response if m.name == "PullRows" else wire.MESSAGES[m.response].FromString
    for m in wire.METHODS
}


class ParamServerError(ValueError):
    """A shard could not be reached, refused the token or a call, or did not answer within the deadline.

    The message is one line naming the shard's address and what failed. A ``ValueError``: the address, the
    token and the size of a call are the caller's to fix, and the command line prints it without a traceback.
    """

    def __init__(self, address: str, message: str, *, code: str = "") -> None:
        super().__init__(f"parameter server {address}: {message}")
        self.address = address
        self.code = code


@dataclass
class _Shard:
    address: str
    stubs: dict[str, Any]
    row_start: int = 0
    row_stop: int = 0
    incarnation: int = 0
    max_rows: int = 1 << 62  # per call, from Health (servers that do not say: no limit)
    max_queries: int = 1 << 62
    max_bytes: int = MAX_MESSAGE_BYTES
    unapplied: list[_Push] = field(default_factory=list)  # pushes not yet applied
    # shared memory with the shard (same machine), else None; kept once made (its ranges are freed by
    # callbacks, and a push in it is re-sent inline after a restart), used for new transfers while attached
    buffer: ClientBuffer | None = None
    buffer_id: int = 0  # the shard's id of ``buffer``; 0: not attached
    local: LocalChannel | None = None  # the shard's Unix socket once a buffer is attached; None: gRPC alone
    mapped: Tensor | None = None  # ``buffer``'s bytes page-locked and mapped for a CUDA device, else None

    def forget_applied(self, applied: int) -> None:
        """Drop the pushes of steps up to ``applied``, freeing their buffer ranges."""
        keep = []
        for push in self.unapplied:
            if push.step > applied:
                keep.append(push)
            elif push.offset is not None:
                self.buffer.release(push.offset)
        self.unapplied = keep


@dataclass
class _Push:
    """A push kept until its step is applied: its request, and its gradients' buffer range (None: inline)."""

    step: int
    request: Any
    offset: int | None = None


@dataclass
class PendingPull:
    """Rows being pulled; :meth:`result` waits for them."""

    client: ParamServerClient
    ids: np.ndarray
    parts: list[tuple[int, np.ndarray | slice, Any, Any]]  # (shard, positions, request, future)
    versions: dict[int, int] = field(default_factory=dict)
    _rows: Tensor | None = None

    def __post_init__(self) -> None:
        # buffer ranges of parts never read (a prefetch dropped) are freed once their calls are done
        self._release = weakref.finalize(self, _release_parts, self.client, list(self.parts))

    def result(self, *, device: torch.device | str = "cpu") -> Tensor:
        """The ``(S, D)`` float32 rows, in the order of the ids, on ``device``: on a CUDA device straight from
        the shards' buffers where they are mapped for it (:meth:`ParamServerClient.map_buffers`), else
        through page-locked memory (the copy to the device runs asynchronously); read once, the same tensor
        on later calls."""
        if self._rows is not None:
            return self._rows
        device = torch.device(device)
        on_device = self.client.buffers_mapped_for(device)  # else gathered on the host, then copied over
        pin = device.type == "cuda" and not on_device
        out = torch.empty(
            len(self.ids), self.client.dim, device=device if on_device else "cpu", pin_memory=pin
        )
        try:
            copies = []
            for shard, positions, request, future in self.parts:
                response = self.client._wait(shard, "PullRows", request, future)
                rows = self.client._received(shard, request, response.rows, what="rows")
                mapped = self.client._mapped_rows(shard, request, rows, out.device)
                copies.append(_rows_copy(out, positions, rows, count=_count(positions), mapped=mapped))
                # pieces of one shard's rows may be read at different versions: the oldest bounds them all
                self.versions[shard] = min(self.versions.get(shard, response.version), response.version)
            _copy_blocks(copies)
        finally:
            if out.is_cuda:  # the GPU's copies out of the buffers are done before their ranges are reused
                torch.cuda.current_stream(out.device).synchronize()
            self._release()
        self._rows = out.to(device, non_blocking=True)  # where the rows already are: the same tensor
        return self._rows


def _release_parts(client: ParamServerClient, parts: list[tuple[int, Any, Any, Any]]) -> None:
    """Free the buffer ranges of pulls, each once its call is done (the shard may still be writing)."""
    for shard, _, request, future in parts:
        if request.buffer_bytes:  # a range was reserved
            buffer, offset = client._shards[shard].buffer, request.buffer_offset
            future.add_done_callback(lambda _, buffer=buffer, offset=offset: buffer.release(offset))


_COPY_PIECE_BYTES = 1 << 20  # a block copy is split over threads in pieces of at least this


def _rows_copy(
    out: Tensor,
    positions: np.ndarray | slice,
    rows: wire.ArrayView,
    *,
    count: int,
    mapped: Tensor | None = None,
) -> tuple[Callable[[int, int], None], int, int]:
    """The copy ``out[positions] = rows`` straight from the received bytes (one copy), for
    :func:`_copy_blocks`; the shape the server sent is checked here, before anything is copied. ``out`` on
    a CUDA device: from ``mapped``, the same bytes mapped for it, where given (the GPU's own copy across
    the bus), else from the host bytes."""
    view = rows.numpy(what="rows")
    if view.shape != (count, out.shape[1]):
        raise ValueError(
            f"rows: the server sent shape {list(view.shape)}, expected [{count}, {out.shape[1]}]"
        )
    if out.is_cuda:
        source = torch.from_numpy(view.copy()) if mapped is None else mapped.view(view.shape)
        if rows.dtype == "bfloat16":
            source = source.view(torch.bfloat16)

        def to_device(a: int, b: int) -> None:
            out[_index(_part(positions, a, b), out.device)] = source[a:b].to(out.device, torch.float32)

        return to_device, count, 0  # one piece: a copy the GPU runs
    target = out.numpy()

    def copy(a: int, b: int) -> None:
        where = _part(positions, a, b)
        if rows.dtype == "bfloat16":
            out[_index(where)] = torch.from_numpy(view[a:b].copy()).view(torch.bfloat16).float()
        else:
            target[where] = view[a:b]

    return copy, count, out.shape[1] * view.itemsize


def _block_copy(out: Tensor, values: Tensor) -> tuple[Callable[[int, int], None], int, int]:
    """The copy ``out[:] = values`` (rows of the same shape, ``values`` in float32 or bfloat16), for
    :func:`_copy_blocks`."""

    def copy(a: int, b: int) -> None:
        out[a:b] = values[a:b]

    return copy, len(values), max(1, values[:1].numel() * values.element_size())


def _copy_blocks(copies: Sequence[tuple[Callable[[int, int], None], int, int]]) -> None:
    """Run each ``(copy, count, row_bytes)``'s ``copy(a, b)`` over its rows ``[0, count)``, cut into pieces of
    at least :data:`_COPY_PIECE_BYTES` that run side by side on the host's threads (``row_bytes`` 0: a copy
    the GPU runs, launched whole on this thread's current stream, which the caller synchronises).

    One thread copies a few GB/s: a step's row blocks (pulled rows out of the shards' shared memory, gradients
    into it) copied one after another took as long as the shards' answers on a 16-core GPU host."""
    threads = os.cpu_count() or 1
    pieces = []
    for copy, count, row_bytes in copies:
        if not row_bytes:
            copy(0, count)
            continue
        cuts = max(1, min(threads, count * row_bytes // _COPY_PIECE_BYTES))
        bounds = [count * i // cuts for i in range(cuts + 1)]
        pieces += [(copy, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    groups = min(len(pieces), threads)
    if groups:
        run_split(
            lambda i, j: [copy(a, b) for copy, a, b in pieces[i:j]],
            [len(pieces) * g // groups for g in range(groups + 1)],
        )


def _rows_of(array: Any, what: str) -> Tensor:
    return wire.decode_array(array, what=what, ndim=2).to(torch.float32)


class ParamServerClient:
    """One trainer's connection to every shard of a parameter server.

    Args:
        addresses: ``host:port`` of each shard, any order; their row ranges must tile ``[0, C)``.
        trainer: this trainer's rank (sync barrier member, push de-duplication key).
        token: the servers' shared secret, sent as ``authorization: Bearer <token>``; None: the file
            ``token_file``, else the ``MEGACLASS_PS_TOKEN`` environment variable (sources given together must
            agree, see :func:`~megaclass.paramserver.config.resolve_token`).
        token_file: a file holding the shared secret.
        tls_ca: PEM root certificate(s) (bytes or a file path) to speak TLS; None: plaintext.
        timeout_s: deadline of every call, retries included; keep it above the servers' barrier timeout.
        connect_timeout_s: deadline of the first contact with every shard (a shard down fails fast).
        wire_dtype: ``"float32"`` or ``"bfloat16"`` rows and gradients on the wire (rows are kept float32).
        shared_memory_mib: per shard on this machine, MiB of shared memory that row blocks move through
            instead of the socket (reserved at start; 0 or a shard elsewhere: rows travel in the messages;
            a block that finds no room in it travels in its message).

    Raises:
        ParamServerError: a shard is unreachable within ``connect_timeout_s`` or refuses the token.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        trainer: int = 0,
        token: str | None = None,
        token_file: str | None = None,
        tls_ca: bytes | str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        wire_dtype: str = "float32",
        shared_memory_mib: float = 128,
    ) -> None:
        import grpc

        if not addresses:
            raise ValueError("addresses: expected at least one host:port")
        if wire_dtype not in wire.DTYPES:
            raise ValueError(f"wire_dtype {wire_dtype!r} is not one of {sorted(wire.DTYPES)}")
        if not (timeout_s > 0 and connect_timeout_s > 0):
            raise ValueError(f"timeout_s {timeout_s}, connect_timeout_s {connect_timeout_s}: expected > 0")
        token = resolve_token(token, token_file, environ=os.environ)
        self._grpc = grpc
        self.trainer = trainer
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.wire_dtype = wire_dtype
        self._token = token
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        if isinstance(tls_ca, str):
            with open(tls_ca, "rb") as f:
                tls_ca = f.read()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self._channels = []
        # calls in flight at once: a prefetch, a pull and a push to every shard, plus retries
        self._pool = ThreadPoolExecutor(max_workers=4 * len(addresses) + 4, thread_name_prefix="ps-client")
        shards = []
        for address in addresses:
            if tls_ca is None:
                channel = grpc.insecure_channel(address, options=options)
            else:
                channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options=options)
            self._channels.append(channel)
            stubs = {
                m.name: channel.unary_unary(
                    wire.method_path(m.name),
                    request_serializer=wire.serialize,
                    response_deserializer=_RESPONSE_PARSERS[m.name],
                )
                for m in wire.METHODS
            }
            shards.append(_Shard(address, stubs))
        self.last_pushed_step = 0
        self._inflight: list[
            tuple[int, Any, Any]
        ] = []  # pushes sent with wait=False: (shard, request, future)
        self._shards = shards
        self._describe()
        if shared_memory_mib > 0:
            for shard in range(len(shards)):
                self._attach(shard, int(shared_memory_mib * 2**20))

    # -- discovery -------------------------------------------------------------------------------------
    def _describe(self) -> None:
        """Ask every shard its range; check they tile ``[0, C)`` with one ``D``, one mode."""
        healths = self.health(timeout_s=self.connect_timeout_s)
        order = sorted(range(len(self._shards)), key=lambda i: healths[i].row_start)
        self._shards = [self._shards[i] for i in order]
        healths = [healths[i] for i in order]
        first = healths[0]
        self.num_rows, self.dim, self.mode = int(first.num_rows), int(first.dim), first.mode
        self.row_dtype = first.row_dtype or "float32"  # how the shards hold rows: float32 or bf16_sr
        expected_start = 0
        for shard, health in zip(self._shards, healths, strict=True):
            held = (health.num_rows, health.dim, health.mode, health.row_dtype or "float32")
            if held != (first.num_rows, first.dim, first.mode, self.row_dtype):
                raise ValueError(
                    f"{shard.address} serves {held[0]} x {held[1]} ({held[2]}, {held[3]}) but "
                    f"{self._shards[0].address} serves {first.num_rows} x {first.dim} ({first.mode}, "
                    f"{self.row_dtype})"
                )
            if health.row_start != expected_start:
                raise ValueError(
                    f"{shard.address} holds rows [{health.row_start}, {health.row_stop}) but rows from "
                    f"{expected_start} are missing or doubled; shard ranges must tile [0, {first.num_rows})"
                )
            expected_start = health.row_stop
            shard.row_start, shard.row_stop = int(health.row_start), int(health.row_stop)
            shard.incarnation = int(health.incarnation)
            if health.max_rows_per_request:  # 0: a server that states no limits
                shard.max_rows = int(health.max_rows_per_request)
                shard.max_queries = int(health.max_queries_per_request)
                shard.max_bytes = int(health.max_message_bytes)
        if expected_start != first.num_rows:
            raise ValueError(f"rows [{expected_start}, {first.num_rows}) are held by no shard")
        if not 0 <= self.trainer < first.trainers:
            raise ValueError(f"trainer {self.trainer}: the servers accept ranks 0..{first.trainers - 1}")
        self._starts = np.asarray([shard.row_start for shard in self._shards], dtype=np.int64)

    def _attach(self, shard: int, size: int) -> None:
        """Share ``size`` bytes of memory with shard ``shard`` if it runs on this machine (else nothing)."""
        state = self._shards[shard]
        try:
            buffer = state.buffer or ClientBuffer(size)
        except OSError:
            return  # no memfd here, or no memory to reserve: rows travel in the messages
        request = wire.message("AttachBufferRequest", path=buffer.path, nonce=buffer.nonce)
        try:
            response = self._wait(shard, "AttachBuffer", *self._issue(shard, "AttachBufferRequest", request))
        except ValueError:  # another machine, an older server, or shared buffers off: inline
            if state.buffer is None:
                buffer.close()
            state.buffer_id = 0
            return
        state.buffer, state.buffer_id = buffer, int(response.buffer)
        if state.local is not None:
            state.local.close()
        state.local = (
            LocalChannel(response.local_socket, self._token, connect_timeout_s=self.connect_timeout_s)
            if response.local_socket
            else None
        )

    def _received(self, shard: int, request: Any, array: Any, *, what: str) -> wire.ArrayView:
        """An answer's ``array`` (a pull's rows, a read's values): as sent, or in the shard's buffer where the
        request had it put."""
        if not request.buffer:
            return array
        nbytes = wire.array_nbytes(array.dtype, array.shape) if array.dtype in wire.DTYPES else -1
        if nbytes < 0 or nbytes > request.buffer_bytes:
            raise ValueError(
                f"{what}: the server sent {array.dtype} of shape {list(array.shape)} for its buffer"
            )
        view = self._shards[shard].buffer.view(request.buffer_offset, nbytes)
        return wire.ArrayView(array.dtype, tuple(array.shape), view)

    def map_buffers(self, device: torch.device | str) -> bool:
        """Page-lock each shard's shared buffer in place and map it for the CUDA ``device``: rows pulled to it
        and gradients pushed from it then cross the bus by the GPU's own copies, without the host's. Whether
        every shard's buffer is mapped (else rows go through the host, as without)."""
        from megaclass.staging import map_to_device

        device = _indexed(torch.device(device))
        if device.type != "cuda":
            return False
        for state in self._shards:
            if state.buffer_id and (state.mapped is None or state.mapped.device != device):
                state.mapped = map_to_device(torch.frombuffer(state.buffer.map, dtype=torch.uint8), device)
        return self.buffers_mapped_for(device)

    def buffers_mapped_for(self, device: torch.device) -> bool:
        """Whether every shard's buffer is attached and mapped for ``device`` (:meth:`map_buffers`)."""
        device = _indexed(device)
        return device.type == "cuda" and all(
            state.buffer_id and state.mapped is not None and state.mapped.device == device
            for state in self._shards
        )

    def _mapped_rows(
        self, shard: int, request: Any, rows: wire.ArrayView, device: torch.device
    ) -> Tensor | None:
        """A pull's ``rows`` where the shard's buffer mapped for the CUDA ``device`` holds them (their
        element type: float32, or int16 for bfloat16); None where they are not in such a buffer."""
        mapped = self._shards[shard].mapped
        if device.type != "cuda" or not request.buffer or mapped is None or mapped.device != device:
            return None
        nbytes = wire.array_nbytes(rows.dtype, rows.shape)
        element = torch.float32 if rows.dtype == "float32" else torch.int16
        return mapped[request.buffer_offset : request.buffer_offset + nbytes].view(element)

    def health(self, *, timeout_s: float | None = None) -> list[Any]:
        """Each shard's ``HealthResponse`` (range, step, version, trainers, limits, ...), in shard order,
        within ``timeout_s`` (default: the client's)."""
        futures = [
            self._issue(i, "HealthRequest", wire.message("HealthRequest"), timeout=timeout_s)
            for i in range(len(self._shards))
        ]
        return [
            self._wait(i, "Health", request, future, timeout=timeout_s)
            for i, (request, future) in enumerate(futures)
        ]

    # -- calls -----------------------------------------------------------------------------------------
    def _issue(self, shard: int, kind: str, request: Any, *, timeout: float | None = None) -> tuple[Any, Any]:
        """Start a call: over the shard's Unix socket where it has one (sent now, answered when waited
        for), else over gRPC on a worker thread (blocking calls on persistent threads: no thread per call)."""
        state, method = self._shards[shard], kind.removesuffix("Request")
        timeout = self.timeout_s if timeout is None else timeout
        if state.local is not None:
            call = state.local.call(
                method, wire.serialize(request), timeout=timeout, parse=_RESPONSE_PARSERS[method]
            )
            if call is not None:
                return request, call
        return request, self._pool.submit(
            state.stubs[method], request, timeout=timeout, metadata=self._metadata
        )

    def _wait(
        self, shard: int, method: str, request: Any, future: Any, *, timeout: float | None = None
    ) -> Any:
        """The response of ``future``; on a lost or restarted shard, recover and retry until the deadline
        (``timeout`` seconds, default the client's)."""
        grpc = self._grpc
        timeout = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                return self._noted(shard, future.result())
            except (grpc.RpcError, LocalCallError) as error:
                code, details = error.code(), error.details()
            restarted = code == grpc.StatusCode.FAILED_PRECONDITION and "restarted" in (details or "")
            address = self._shards[shard].address
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(f"parameter server {address}: {details}")
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise ParamServerError(
                    address,
                    f"unauthenticated: {details}; give the servers' token (token, token_file or {TOKEN_ENV})",
                    code=code.name,
                )
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
                details += " (the server's limit is --max-message-mib)"
            if code not in (grpc.StatusCode.UNAVAILABLE,) and not restarted:
                raise ParamServerError(address, f"{method} failed: {code.name}: {details}", code=code.name)
            if time.monotonic() + delay > deadline:
                raise ParamServerError(
                    address, f"unreachable for {timeout:g} s ({method}: {details})", code=code.name
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            if method != "Health" and not self._recover(shard, deadline):
                continue
            if hasattr(request, "incarnation"):
                request.incarnation = self._shards[shard].incarnation
            if getattr(request, "buffer", 0):  # attached again after a restart (0: not: in the message)
                request.buffer = self._shards[shard].buffer_id
            _, future = self._issue(shard, method, request, timeout=max(deadline - time.monotonic(), 0.01))

    def _noted(self, shard: int, response: Any) -> Any:
        """Record what a response tells about the shard: the pushes it has applied (a push's answer only: a
        Health answer's applied_step is, in async mode, the furthest of any trainer's, not this one's)."""
        if isinstance(response, wire.MESSAGES["PushGradientsResponse"]):
            self._shards[shard].forget_applied(response.applied_step)
        return response

    def _recover(self, shard: int, deadline: float) -> bool:
        """After an error: ask the shard's health; if it restarted, re-push what it had not applied."""
        state = self._shards[shard]
        try:
            health = state.stubs["Health"](
                wire.message("HealthRequest"),
                timeout=max(deadline - time.monotonic(), 0.01),
                metadata=self._metadata,
            )
        except self._grpc.RpcError:
            return False
        if health.incarnation != state.incarnation:
            applied = health.trainer_steps[self.trainer] if health.mode == "async" else health.applied_step
            state.incarnation = int(health.incarnation)
            if state.buffer is not None:  # a new process: the buffer is attached again (same memory)
                self._attach(shard, state.buffer.size)
            state.forget_applied(applied)
            for push in state.unapplied:
                push.request.incarnation = state.incarnation
                if push.offset is not None:
                    self._inline_push(shard, push)  # the buffer may be gone there
                state.stubs["PushGradients"](
                    push.request, timeout=max(deadline - time.monotonic(), 0.01), metadata=self._metadata
                )
        return True

    def _inline_push(self, shard: int, push: _Push) -> None:
        """Move ``push``'s gradients from the buffer into its request (in place: a retry sends the same)."""
        state, request = self._shards[shard], push.request
        nbytes = wire.array_nbytes(request.grads.dtype, request.grads.shape)
        request.grads.data = bytes(state.buffer.view(push.offset, nbytes))
        request.ClearField("buffer")
        request.ClearField("buffer_offset")
        state.buffer.release(push.offset)
        push.offset = None

    def _split(self, ids: np.ndarray) -> list[tuple[int, np.ndarray | slice]]:
        """``(shard, positions)`` of the ids each shard holds; slices when the ids are sorted by shard."""
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_rows):
            bad = int(np.flatnonzero((ids < 0) | (ids >= self.num_rows))[0])
            raise ValueError(f"ids[{bad}] = {int(ids[bad])} is outside [0, {self.num_rows})")
        owner = np.searchsorted(self._starts, ids, side="right") - 1
        if len(owner) < 2 or bool((owner[1:] >= owner[:-1]).all()):
            bounds = np.searchsorted(owner, np.arange(len(self._shards) + 1))
            return [(s, slice(int(bounds[s]), int(bounds[s + 1]))) for s in range(len(self._shards))]
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(len(self._shards) + 1))
        return [(s, order[bounds[s] : bounds[s + 1]]) for s in range(len(self._shards))]

    def _pieces(self, ids: np.ndarray) -> list[tuple[int, np.ndarray | slice]]:
        """:meth:`_split` cut into pieces of at most each shard's rows per call (empty ones left out)."""
        pieces = []
        for shard, positions in self._split(ids):
            limit = self._shards[shard].max_rows
            count = _count(positions)
            pieces += [(shard, _part(positions, a, min(a + limit, count))) for a in range(0, count, limit)]
        return pieces

    # -- rows ------------------------------------------------------------------------------------------
    def pull_async(
        self, ids: Tensor | np.ndarray, *, min_step: int | None = None, average_step: int | None = None
    ) -> PendingPull:
        """Start pulling rows ``ids (S,)``; sync mode waits for step ``min_step`` (default: last pushed).
        ``average_step``: the rows' weight average at that optimizer step instead (shards that keep one)."""
        ids = _as_ids(ids)
        min_step = self.last_pushed_step if min_step is None and self.mode == "sync" else (min_step or 0)
        parts = []
        for shard, positions in self._pieces(ids):
            request = wire.message(
                "PullRowsRequest",
                ids=wire.encode_ids(ids[positions]),
                dtype=self.wire_dtype,
                min_step=min_step,
                incarnation=self._shards[shard].incarnation,
            )
            if average_step is not None:
                request.field, request.average_step = "average", average_step
            self._reserve_rows(shard, request, _count(positions))
            parts.append((shard, positions, *self._issue(shard, "PullRowsRequest", request)))
        self.drain()  # after issuing: the pull travels while the last push is acknowledged
        return PendingPull(self, ids, parts)

    def _reserve_rows(self, shard: int, request: Any, count: int, *, dtype: str | None = None) -> None:
        """Have a pull's or a read's ``count`` rows (of ``dtype``, default the wire's) written into the
        shard's buffer where it has one with room."""
        state = self._shards[shard]
        if not state.buffer_id:
            return
        nbytes = wire.array_nbytes(dtype or self.wire_dtype, (count, self.dim))
        offset = state.buffer.reserve(nbytes)
        if offset is not None:
            request.buffer, request.buffer_offset, request.buffer_bytes = state.buffer_id, offset, nbytes

    def pull(
        self,
        ids: Tensor | np.ndarray,
        *,
        min_step: int | None = None,
        device: torch.device | str = "cpu",
        average_step: int | None = None,
    ) -> Tensor:
        """Rows ``ids (S,)`` as a ``(S, D)`` float32 tensor on ``device`` (:meth:`PendingPull.result`); with
        ``average_step``, their weight average at that step (:meth:`pull_async`)."""
        pending = self.pull_async(ids, min_step=min_step, average_step=average_step)
        return pending.result(device=device)

    def refresh(self, pending: PendingPull, rows: Tensor, *, min_step: int | None = None) -> Tensor:
        """Bring rows pulled early (``pending.result()``) up to date: re-pull only rows changed since."""
        min_step = self.last_pushed_step if min_step is None and self.mode == "sync" else (min_step or 0)
        parts = []
        for shard, positions, _, _ in pending.parts:
            request = wire.message(
                "PullRowsRequest",
                ids=wire.encode_ids(pending.ids[positions]),
                dtype=self.wire_dtype,
                min_step=min_step,
                changed_after=pending.versions[shard],
                only_changed=True,
                incarnation=self._shards[shard].incarnation,
            )
            self._reserve_rows(shard, request, _count(positions))
            parts.append((shard, positions, *self._issue(shard, "PullRowsRequest", request)))
        self.drain()
        try:
            copies = []
            for shard, positions, request, future in parts:
                response = self._wait(shard, "PullRows", request, future)
                changed = wire.decode_ids(response.ids, what="ids")
                if len(changed):
                    shard_ids = pending.ids[positions]
                    where = (
                        np.searchsorted(shard_ids, changed)
                        if _is_sorted(shard_ids)
                        else _positions(shard_ids, changed)
                    )
                    target = np.arange(len(pending.ids))[positions][where]
                    received = self._received(shard, request, response.rows, what="rows")
                    mapped = self._mapped_rows(shard, request, received, rows.device)
                    copies.append(_rows_copy(rows, target, received, count=len(target), mapped=mapped))
            _copy_blocks(copies)
        finally:
            if rows.is_cuda:  # the GPU's copies out of the buffers are done before their ranges are reused
                torch.cuda.current_stream(rows.device).synchronize()
            _release_parts(self, parts)
        return rows

    def push(
        self,
        ids: Tensor | np.ndarray,
        grads: Tensor,
        *,
        step: int,
        lr: float | None = None,
        wait: bool = True,
    ) -> None:
        """Send gradients ``grads (S, D)`` of rows ``ids (S,)`` (unique) for optimizer step ``step``.

        Sync mode sends to every shard (an empty push still counts for the barrier); async only to shards
        holding some of the ids. With ``wait`` returns once every shard acknowledged (sync: received; async:
        applied); without, the acknowledgements are awaited by the next call (the transfer and the shards'
        update overlap the caller's next compute; a pull still sees the update, through ``min_step``).
        """
        self.drain()
        ids = _as_ids(ids)
        if grads.shape != (len(ids), self.dim):
            raise ValueError(f"grads: shape {list(grads.shape)} but expected [{len(ids)}, {self.dim}]")
        if step <= 0:
            raise ValueError(f"step {step}: expected >= 1")
        grads = grads.detach().float()
        if not (grads.is_cuda and self.buffers_mapped_for(grads.device)):  # else the GPU writes the buffers
            grads = grads.cpu()
        parts = self._split(ids)
        for shard, positions in parts:
            if _count(positions) > self._shards[shard].max_rows:  # checked before any shard gets a part
                raise ValueError(
                    f"push of {_count(positions)} rows to {self._shards[shard].address}: it takes at most "
                    f"{self._shards[shard].max_rows} in one call (its --max-rows-per-request or "
                    "--max-message-mib); a step's push is applied whole, so it is not split"
                )
        pushes, copies = [], []
        try:
            for shard, positions in parts:
                if _count(positions) == 0 and self.mode == "async":
                    continue
                incarnation = self._shards[shard].incarnation
                message = wire.message(
                    "PushGradientsRequest",
                    ids=wire.encode_ids(ids[positions]),
                    step=step,
                    trainer=self.trainer,
                    incarnation=incarnation,
                )
                if lr is not None:
                    message.lr.value = lr
                push = self._in_buffer(shard, message, grads, positions, step, copies)
                if push is None:  # inline: kept until applied, owning its bytes
                    block = grads[_index(positions, grads.device)].cpu()
                    data = wire.serialize_with_array(message, 2, block, self.wire_dtype)
                    push = _Push(step, wire.Encoded(data, 6, incarnation))
                pushes.append((shard, push))
            _copy_blocks(copies)  # every shard's gradients at once, before any is sent
            if grads.is_cuda:
                torch.cuda.current_stream(grads.device).synchronize()  # its writes into the buffers are done
        except BaseException:
            for shard, push in pushes:
                if push.offset is not None:
                    self._shards[shard].buffer.release(push.offset)
            raise
        for shard, push in pushes:
            self._shards[shard].unapplied.append(push)
            self._inflight.append((shard, *self._issue(shard, "PushGradientsRequest", push.request)))
        self.last_pushed_step = max(self.last_pushed_step, step)
        if wait:
            self.drain()

    def _in_buffer(
        self,
        shard: int,
        message: Any,
        grads: Tensor,
        positions: np.ndarray | slice,
        step: int,
        copies: list[tuple[Callable[[int, int], None], int, int]],
    ) -> _Push | None:
        """``message`` pointing at a range of the shard's buffer (kept until the step is applied) for the
        gradients of ``positions``, whose copy there is added to ``copies``; None where the shard has no
        buffer or it has no room."""
        state = self._shards[shard]
        if not state.buffer_id:
            return None
        shape = (_count(positions), self.dim)
        float32 = self.wire_dtype == "float32"
        nbytes = wire.array_nbytes(self.wire_dtype, shape)
        offset = state.buffer.reserve(nbytes)
        if offset is None:
            return None
        message.buffer, message.buffer_offset = state.buffer_id, offset
        message.grads.dtype = self.wire_dtype
        message.grads.shape[:] = shape
        if grads.is_cuda:  # the buffer mapped for the GPU (map_buffers): its own copy across the bus
            mapped = state.mapped[offset : offset + nbytes].view(torch.float32 if float32 else torch.bfloat16)
            mapped = mapped.view(shape)

            def to_buffer(a: int, b: int) -> None:
                mapped[a:b].copy_(grads[_index(_part(positions, a, b), grads.device)])

            copies.append((to_buffer, shape[0], 0))
            return _Push(step, message, offset)
        target = np.frombuffer(state.buffer.view(offset, nbytes), dtype=np.float32 if float32 else np.int16)
        target = target.reshape(shape)
        source = grads.numpy()

        def copy(a: int, b: int) -> None:
            where = _part(positions, a, b)
            if float32 and isinstance(where, slice):
                np.copyto(target[a:b], source[where])
            elif float32:
                np.take(source, where, axis=0, out=target[a:b])
            else:
                torch.from_numpy(target[a:b]).view(torch.bfloat16).copy_(grads[_index(where)])

        copies.append((copy, shape[0], nbytes // max(1, shape[0])))
        return _Push(step, message, offset)

    def drain(self) -> None:
        """Wait for the acknowledgements of pushes sent with ``wait=False`` (raising their errors)."""
        inflight, self._inflight = self._inflight, []
        for shard, request, future in inflight:
            try:
                self._wait(shard, "PushGradients", request, future)
            except ParamServerError:
                raise  # unreachable: kept, a restarted shard gets it again
            except ValueError:  # refused: never applied, so never pushed again (its buffer range freed)
                self._drop_push(shard, request)
                raise

    def _drop_push(self, shard: int, request: Any) -> None:
        state = self._shards[shard]
        for push in [p for p in state.unapplied if p.request is request]:
            state.unapplied.remove(push)
            if push.offset is not None:
                state.buffer.release(push.offset)

    def set_rows(self, ids: Tensor | np.ndarray, values: Tensor, *, field: str = "rows") -> None:
        """Overwrite rows ``ids (S,)`` (unique) of ``field`` (``"rows"`` or an optimizer slot)."""
        self.drain()
        ids = _as_ids(ids)
        values = values.detach().to("cpu", torch.float32)
        if values.shape[:1] != (len(ids),):
            raise ValueError(f"values: shape {list(values.shape)} but expected [{len(ids)}, ...]")
        issued = []
        for shard, positions in self._pieces(ids):
            block = values[_index(positions)]
            request = wire.message(
                "SetRowsRequest",
                ids=wire.encode_ids(ids[positions]),
                values=wire.encode_array(block),
                field=field,
            )
            issued.append((shard, *self._issue(shard, "SetRowsRequest", request)))
        for shard, request, future in issued:
            self._wait(shard, "SetRows", request, future)

    def get_rows(
        self,
        start: int,
        stop: int,
        *,
        field: str = "rows",
        block_bytes: int = 1 << 28,
        versions: Sequence[int] | None = None,
        average_step: int = 0,
    ) -> Tensor:
        """Rows ``[start, stop)`` of ``field``, fetched in blocks of at most ``block_bytes``.

        Args:
            versions: each shard's version (``health()[i].version``, in shard order) the rows must be read
                at: a snapshot read in several calls is checked to be one state of the servers.
            average_step: with ``field="average"``, the weight average brought up to that optimizer step
                (0: as kept, each row's as of its last update).

        Returns a ``(stop - start, D)`` float32 tensor (``(stop - start,)`` for a per-row scalar slot).

        Raises:
            ParamServerError: with ``versions``, a shard's rows changed since (code ``CHANGED``).
        """
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"range [{start}, {stop}) is not inside [0, {self.num_rows})")
        self.drain()
        blocks = []  # (order, shard, a, b): each shard's k-th block beside the others', so all read at once
        for shard, state in enumerate(self._shards):
            lo, hi = max(start, state.row_start), min(stop, state.row_stop)
            step = max(1, min(block_bytes // (4 * self.dim), state.max_rows))
            if state.buffer_id:  # two blocks a shard in flight through its buffer
                step = max(1, min(step, (state.buffer.size // 2 - 2 * ALIGN) // (4 * self.dim)))
            blocks += [(k, shard, a, min(a + step, hi)) for k, a in enumerate(range(lo, hi, step))]
        queue = collections.deque(sorted(blocks))
        in_flight: collections.deque = collections.deque()  # (shard, a, request, future)
        out: Tensor | None = None
        try:
            while queue or in_flight:
                while queue and len(in_flight) < 2 * len(self._shards):
                    _, shard, a, b = queue.popleft()
                    request = wire.message(
                        "GetRowsRequest",
                        start=a,
                        stop=b,
                        dtype="float32",
                        field=field,
                        average_step=average_step,
                    )
                    self._reserve_rows(shard, request, b - a, dtype="float32")
                    in_flight.append((shard, a, *self._issue(shard, "GetRowsRequest", request)))
                shard, a, request, future = in_flight[0]
                values = self._read_values(shard, request, future, versions)
                if out is None:
                    out = torch.empty(stop - start, *values.shape[1:])
                _copy_blocks([_block_copy(out[a - start : a - start + len(values)], values)])
                _release_parts(self, [(shard, None, request, future)])
                in_flight.popleft()
        finally:  # after an error: the blocks' buffer ranges, freed once their calls are done
            _release_parts(self, [(shard, None, request, future) for shard, _, request, future in in_flight])
        return torch.empty(0, self.dim) if out is None else out

    def _read_values(self, shard: int, request: Any, future: Any, versions: Sequence[int] | None) -> Tensor:
        """A ``GetRows`` call's values (in the shard's buffer: a view of it), checked to be read at the
        shard's version in ``versions`` where given."""
        response = self._wait(shard, "GetRows", request, future)
        if versions is not None and response.version != versions[shard]:
            raise ParamServerError(
                self._shards[shard].address,
                f"its rows changed while being read (version {response.version}, read from version "
                f"{versions[shard]} on): an update was applied in the middle of a snapshot",
                code="CHANGED",
            )
        received = self._received(shard, request, response.values, what="values")
        return wire.decode_array(received, what="values", copy=False)

    def query_nearest(
        self, features: Tensor, n: int, *, metric: str = "dot", max_index_age: int = 0, probes: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Top-``n`` ``(scores, ids)``, each ``(B, n)``, of all rows; each shard answers for its own rows.

        ``max_index_age`` 0 scans every row exactly; ``N > 0`` asks each shard's cluster index, refreshed
        there when built over ``N`` versions ago (approximate; ids ``-1``, scores ``-inf`` where too few).
        ``probes``: index clusters searched per feature over all shards together, split evenly between them
        (each searches at least one; a shard's query costs in proportion); 0: each shard's default.
        """
        if max_index_age < 0:
            raise ValueError(f"max_index_age {max_index_age}: expected >= 0")
        if probes < 0:
            raise ValueError(f"probes {probes}: expected >= 0")
        if features.ndim != 2:
            raise ValueError(f"features: shape {list(features.shape)} but expected [B, {self.dim}]")
        block = max(
            1,
            min(  # features per call: within every shard's query count and answer size
                min(
                    s.max_queries,
                    (s.max_bytes - MESSAGE_OVERHEAD_BYTES) // (12 * max(1, min(n, s.row_stop - s.row_start))),
                )
                for s in self._shards
            ),
        )
        issued = []
        for start in range(0, max(len(features), 1), block):
            request = wire.message(
                "QueryNearestRequest",
                features=wire.encode_array(features[start : start + block].float(), "float32"),
                n=n,
                metric=metric,
                max_index_age=max_index_age,
                probes=-(-probes // len(self._shards)),
            )
            issued.append(
                [
                    (shard, *self._issue(shard, "QueryNearestRequest", request))
                    for shard in range(len(self._shards))
                ]
            )
        tops, top_ids = [], []
        for calls in issued:
            scores, ids = [], []
            for shard, req, future in calls:
                response = self._wait(shard, "QueryNearest", req, future)
                part = _rows_of(response.scores, "scores")
                scores.append(part)
                ids.append(
                    torch.from_numpy(wire.decode_ids(response.ids, what="ids").copy()).view(part.shape)
                )
            merged, merged_ids = torch.cat(scores, dim=1), torch.cat(ids, dim=1)  # (b, shards * n)
            top, where = merged.topk(min(n, merged.shape[1]), dim=1)
            tops.append(top)
            top_ids.append(merged_ids.gather(1, where))
        return torch.cat(tops), torch.cat(top_ids)

    def set_hyper_params(self, **changes: float) -> dict[str, float]:
        """Change hyper-parameters (``lr``, ``momentum``, ...) on every shard; returns the new values."""
        params = wire.message("HyperParams")
        for name, value in changes.items():
            if name not in params.DESCRIPTOR.fields_by_name:
                raise ValueError(
                    f"hyper-parameter {name!r} is not one of {sorted(params.DESCRIPTOR.fields_by_name)}"
                )
            getattr(params, name).value = float(value)
        request = wire.message("SetHyperParamsRequest", params=params)
        issued = [
            (shard, *self._issue(shard, "SetHyperParamsRequest", request))
            for shard in range(len(self._shards))
        ]
        responses = [self._wait(shard, "SetHyperParams", req, future) for shard, req, future in issued]
        params = responses[0].params
        return {
            f.name: getattr(params, f.name).value for f in params.DESCRIPTOR.fields if params.HasField(f.name)
        }

    def snapshot(self) -> list[tuple[str, int]]:
        """Snapshot every shard; ``(path on the server, step)`` per shard."""
        request = wire.message("SnapshotRequest")
        issued = [
            (shard, *self._issue(shard, "SnapshotRequest", request)) for shard in range(len(self._shards))
        ]
        responses = [self._wait(shard, "Snapshot", req, future) for shard, req, future in issued]
        return [(response.path, int(response.step)) for response in responses]

    def flush(self, *, step: int | None = None) -> None:
        """Sync mode: wait until step ``step`` (default: the last pushed) is applied on every shard."""
        self.drain()
        step = self.last_pushed_step if step is None else step
        if self.mode != "sync" or step <= 0:
            return
        deadline = time.monotonic() + self.timeout_s
        while min(int(h.applied_step) for h in self.health()) < step:
            if time.monotonic() > deadline:
                raise ParamServerError(
                    self._shards[0].address, f"step {step} not applied within {self.timeout_s:g} s"
                )
            time.sleep(0.01)

    def close(self, *, wait: bool = True) -> None:
        """Wait for the pushes in flight to be acknowledged (unless not ``wait``: after an error, the shards
        apply them or not), detach the shared buffers and close the channels."""
        if wait:
            self.drain()
        self._inflight = []
        detaching = [  # every shard at once, each within the first-contact deadline: a dead one cannot stall
            self._issue(
                shard,
                "DetachBufferRequest",
                wire.message("DetachBufferRequest", buffer=state.buffer_id),
                timeout=self.connect_timeout_s,
            )[1]
            for shard, state in enumerate(self._shards)
            if state.buffer_id
        ]
        for future in detaching:  # a shard gone dropped the buffer with its process
            with contextlib.suppress(self._grpc.RpcError, LocalCallError):
                future.result()
        for state in self._shards:
            state.buffer_id = 0
            state.mapped = None  # unlocked once the device's work is done (before the buffer is unmapped)
            if state.buffer is not None:
                state.buffer.close()
            if state.local is not None:
                state.local.close()
                state.local = None
        self._pool.shutdown()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> ParamServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_ids(ids: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids: expected a 1-d integer array, got shape {ids.shape} of {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _indexed(device: torch.device) -> torch.device:
    """``device``, a CUDA one with its index (the current device where it names none)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _index(positions: np.ndarray | slice, device: torch.device | None = None) -> slice | Tensor:
    if isinstance(positions, slice):
        return positions
    return torch.from_numpy(positions) if device is None else torch.from_numpy(positions).to(device)


def _part(positions: np.ndarray | slice, start: int, stop: int) -> np.ndarray | slice:
    """Entries ``[start, stop)`` of ``positions``."""
    if isinstance(positions, slice):
        return slice(positions.start + start, positions.start + stop)
    return positions[start:stop]


def _count(positions: np.ndarray | slice) -> int:
    return positions.stop - positions.start if isinstance(positions, slice) else len(positions)


def _is_sorted(values: np.ndarray) -> bool:
    return len(values) < 2 or bool((values[1:] > values[:-1]).all())


def _positions(values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index in ``values`` of each of ``wanted`` (all present, ``values`` unique)."""
    order = np.argsort(values)
    return order[np.searchsorted(values[order], wanted)]
