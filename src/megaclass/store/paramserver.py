"""Rows held by a sharded parameter server (``store=ps://host:port,host:port``).

The server applies the row-sparse optimizer; this store pulls the rows a step needs, pushes their gradients
with the step number and the trainer's learning rate, and overlaps the pull of the next step's rows with the
current step (:meth:`ParamServerStore.prefetch`): rows pulled early are revalidated at :meth:`pull` time and
only the rows a later update changed travel again, so prefetching never returns a stale row.

The URL may end in options: ``ps://host:port,host:port?token_file=/run/secrets/ps&connect_timeout_s=2``
(``token_file``, ``connect_timeout_s``, ``timeout_s``). The shared secret comes from ``token=``, a token file
(``token_file=`` or the URL's) or the ``MEGACLASS_PS_TOKEN`` environment variable (given by several, they must
agree); a TLS root certificate from ``tls_ca=`` or ``MEGACLASS_PS_TLS_CA`` (a PEM file path), read when the
store is built.

Shards started with ``--average-decay`` keep the rows' weight average (``train.ema_decay``, the same decay)
beside them, each row's brought up to date as an update changes it: :meth:`ParamServerStore.start_average`
gives it (:class:`ServerRowAverage`); while it is swapped in for an evaluation every read gives the average.

A checkpoint streams the servers' rows and optimizer state a block at a time (:class:`ServerRows`), never
a whole copy in this process's memory. It is one state of the servers: :meth:`ParamServerStore.state_dict`
waits until this trainer's pushes are applied (sync mode: every trainer's, through the barrier), records each
shard's version, and every block read is checked against it, raising where an update came in between. The
trainer writes after its step's push while its other ranks wait at a barrier; with several async-mode
trainers, every rank's :meth:`~ParamServerStore.flush` must come before rank 0 writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megaclass.ops.held_rows import RowDtype
from megaclass.ops.row_optimizers import RowOptimizerConfig, RowOptimizerKind
from megaclass.state_io import RowSource, row_blocks
from megaclass.store.average import RowAverage
from megaclass.store.base import RowStore

if TYPE_CHECKING:
    from megaclass.paramserver.client import ParamServerClient

SCHEME = "ps://"
URL_OPTIONS = ("token_file", "connect_timeout_s", "timeout_s")
LOAD_BLOCK_BYTES = 1 << 26  # rows written to the servers in one request by load_state_dict: 64 MiB


def parse_ps_url(url: str) -> list[str]:
    """The ``host:port`` addresses of ``ps://host:port,host:port[?options]``.

    >>> parse_ps_url("ps://127.0.0.1:50051,127.0.0.1:50052?connect_timeout_s=2")
    ['127.0.0.1:50051', '127.0.0.1:50052']
    """
    if not url.startswith(SCHEME):
        raise ValueError(f"store {url!r}: expected ps://host:port[,host:port...]")
    hosts = url[len(SCHEME) :].partition("?")[0]
    addresses = [part.strip() for part in hosts.split(",") if part.strip()]
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"store {url!r}: {address!r} is not host:port")
    if not addresses:
        raise ValueError(f"store {url!r}: no server address after ps://")
    return addresses


def ps_url_options(url: str) -> dict[str, str]:
    """The options after ``?`` in a ``ps://`` URL (``token_file``, ``connect_timeout_s``, ``timeout_s``).

    >>> ps_url_options("ps://127.0.0.1:50051?token_file=/run/secrets/ps&timeout_s=60")
    {'token_file': '/run/secrets/ps', 'timeout_s': '60'}
    """
    from urllib.parse import parse_qsl

    query = url.partition("?")[2]
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"store {url!r}: options after '?' must be name=value&name=value") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in URL_OPTIONS:
            raise ValueError(f"store {url!r}: unknown option {name!r}; expected one of {list(URL_OPTIONS)}")
        if name in options or not value:
            raise ValueError(f"store {url!r}: option {name!r} given twice or empty")
        options[name] = value
    return options


def _seconds(url: str, options: dict[str, str], name: str, default: float) -> float:
    if name not in options:
        return default
    try:
        value = float(options[name])
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"store {url!r}: {name}={options[name]!r}, expected a number of seconds > 0")
    return value


class ParamServerStore(RowStore):
    """A :class:`RowStore` whose rows and optimizer live in parameter-server shards.

    Args:
        addresses: ``host:port`` of every shard (or a ``ps://`` URL).
        device: where pulled rows are delivered.
        trainer: this trainer's rank; None: the ``torch.distributed`` rank, or 0.
        token: shared secret; None: from ``token_file`` or ``MEGACLASS_PS_TOKEN`` if set.
        token_file: a file holding the shared secret; None: the URL's ``token_file`` option, if any.
        tls_ca: PEM root certificate file for TLS; None: ``MEGACLASS_PS_TLS_CA`` if set, else plaintext.
        timeout_s: deadline of every call (retries included); None: the URL's, else 120.
        connect_timeout_s: deadline of the first contact with each shard; None: the URL's, else 5.
        wire_dtype: ``"float32"`` or ``"bfloat16"`` on the wire.
        mapped: with a CUDA ``device`` and shards on this machine, whether to map the shared buffers rows
            move through for the device (:meth:`~megaclass.paramserver.ParamServerClient.map_buffers`: the
            GPU's own copies across the bus), else move rows through page-locked host memory.

    Raises:
        ParamServerError: a shard is unreachable or refuses the token (one line naming its address).

    >>> store = ParamServerStore("ps://127.0.0.1:50051", device="cuda")  # doctest: +SKIP
    >>> rows = store.pull(ids)  # (S, D) on cuda  # doctest: +SKIP
    >>> store.push(ids, grads, step=1, lr=0.1)  # doctest: +SKIP
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        device: torch.device | str = "cpu",
        trainer: int | None = None,
        token: str | None = None,
        token_file: str | None = None,
        tls_ca: str | None = None,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
        wire_dtype: str = "float32",
        mapped: bool = True,
    ) -> None:
        from megaclass.paramserver.client import ParamServerClient

        options: dict[str, str] = {}
        if isinstance(addresses, str):
            url, addresses, options = addresses, parse_ps_url(addresses), ps_url_options(addresses)
            if token_file is not None and options.get("token_file", token_file) != token_file:
                raise ValueError(f"store {url!r}: its token_file differs from token_file={token_file!r}")
            token_file = options.get("token_file", token_file)
            timeout_s = timeout_s or _seconds(url, options, "timeout_s", 120.0)
            connect_timeout_s = connect_timeout_s or _seconds(url, options, "connect_timeout_s", 5.0)
        if trainer is None:
            trainer = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.client = ParamServerClient(
            addresses,
            trainer=trainer,
            token=token,
            token_file=token_file,
            tls_ca=tls_ca if tls_ca is not None else os.environ.get("MEGACLASS_PS_TLS_CA"),
            timeout_s=timeout_s or 120.0,
            connect_timeout_s=connect_timeout_s or 5.0,
            wire_dtype=wire_dtype,
        )
        self.num_rows, self.dim = self.client.num_rows, self.client.dim
        self.device = torch.device(device)
        if mapped:
            self.client.map_buffers(self.device)
        self._prefetched: tuple[Tensor, object] | None = None  # (ids, PendingPull)
        self._field_shapes: dict[str, tuple[int, ...]] = {}  # field -> its shape on the servers
        healths = self.client.health()
        self.optimizer_kind, self.slots = healths[0].optimizer, tuple(healths[0].slots)
        decays = {float(health.average_decay) for health in healths}
        if len(decays) > 1:
            raise ValueError(
                f"the parameter servers keep weight averages of decays {sorted(decays)}: one is needed"
            )
        self.average_decay = decays.pop()  # 0: the shards keep no weight average
        self.average: ServerRowAverage | None = None  # once started
        self.average_step: int | None = None  # while the average is swapped in: the step every read gives

    def configure(self, optimizer: RowOptimizerConfig) -> None:
        """Make the servers' optimizer settings those of ``optimizer`` (its kind must be the servers').

        Raises:
            ValueError: the servers run another optimizer, or lack the state ``optimizer`` needs.
        """
        kind = RowOptimizerKind(optimizer.kind).value
        if kind != self.optimizer_kind:
            raise ValueError(
                f"head.optimizer.kind {kind!r} (optim.head's, unless set): the parameter servers run "
                f"{self.optimizer_kind!r}; start them with --optimizer {kind}, or train the head with theirs "
                f"(optim.head.name={self.optimizer_kind} with a learning rate for it)"
            )
        self.client.set_hyper_params(
            momentum=optimizer.momentum,
            weight_decay=optimizer.weight_decay,
            beta1=optimizer.betas[0],
            beta2=optimizer.betas[1],
            eps=optimizer.eps,
        )

    def query_nearest(
        self, features: Tensor, n: int, *, metric: str = "dot", max_index_age: int = 0, probes: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Top-``n`` ``(scores, ids)`` rows for ``features (B, D)``, computed by the shards, merged here.

        ``max_index_age``: 0 for an exact scan; ``N > 0`` for the shards' cluster indexes, refreshed when
        built over ``N`` versions ago (ids ``-1`` where they found fewer than ``n``), searching ``probes``
        clusters per feature over all shards together (0: each shard's default).
        """
        scores, ids = self.client.query_nearest(
            features.detach().cpu(), n, metric=metric, max_index_age=max_index_age, probes=probes
        )
        return scores.to(features.device), ids.to(features.device)

    def pull(self, ids: Tensor) -> Tensor:
        ids_cpu = ids.detach().to("cpu", torch.int64)
        prefetched, self._prefetched = self._prefetched, None
        if self.average_step is not None:
            return self.client.pull(ids_cpu, device=self.device, average_step=self.average_step)
        if prefetched is not None and torch.equal(prefetched[0], ids_cpu):
            pending = prefetched[1]
            return self.client.refresh(pending, pending.result(device=self.device))  # only changed rows again
        return self.client.pull(ids_cpu, device=self.device)

    def prefetch(self, ids: Tensor) -> None:
        ids_cpu = ids.detach().to("cpu", torch.int64).clone()
        self._prefetched = (ids_cpu, self.client.pull_async(ids_cpu))

    def push(self, ids: Tensor, grads: Tensor, *, step: int, lr: float) -> None:
        if self.average is not None:
            self.average.check_update(step)
        self.client.push(ids.detach().to("cpu", torch.int64), grads, step=step, lr=lr, wait=False)

    def read(self, start: int, stop: int) -> Tensor:
        self.flush()
        return self._rows_source(None)[start:stop].to(self.device)

    def rows(self) -> ServerRows:
        """The servers' rows as they are when read, a block or a set of ids at a time (an index's builds
        read them so: a copy of them all is never made)."""
        self.flush()
        return self._rows_source(None)

    def _rows_source(self, versions: Sequence[int] | None) -> ServerRows:
        """The rows, or while the average is swapped in, the average at its step."""
        if self.average_step is None:
            return ServerRows(self.client, "rows", self._field_shape("rows"), versions)
        return ServerRows(
            self.client, "average", self._field_shape("rows"), versions, average_step=self.average_step
        )

    def start_average(
        self, decay: float, *, before_swap: Callable[[], None] = lambda: None
    ) -> ServerRowAverage | None:
        """The servers' weight average of the rows, where they keep one (``--average-decay``); None where
        they keep none.

        Raises:
            ValueError: they keep one of another decay.
        """
        if not self.average_decay:
            return None
        if not math.isclose(decay, self.average_decay, rel_tol=1e-9):
            raise ValueError(
                f"train.ema_decay={decay:g}: the parameter servers average the rows with decay "
                f"{self.average_decay:g} (--average-decay); start them with --average-decay {decay:g}, or "
                f"set train.ema_decay={self.average_decay:g}"
            )
        applied = max(int(health.applied_step) for health in self.client.health())
        self.average = ServerRowAverage(self, before_swap=before_swap, stale=applied > 0)
        return self.average

    def flush(self) -> None:
        self.client.flush()

    def held_bytes(self) -> tuple[int, int]:
        """On the servers: the rows and their optimizer slots (row-shaped ones as the rows are held: 4 or,
        with ``bf16_sr`` shards, 2 bytes a value; per-row counts 4 bytes a row)."""
        element = RowDtype(self.client.row_dtype).held.itemsize
        state = sum(
            self.num_rows * (element * self.dim if len(self._field_shape(slot)) > 1 else 4)
            for slot in self.slots
        )
        return element * self.num_rows * self.dim, state

    def state_dict(self) -> dict[str, ServerRows]:
        """Rows (``weight``) and each optimizer slot (``optim.<slot>``) as :class:`ServerRows`: nothing is
        pulled here; a checkpoint writer reads them a block at a time, each block checked to come from the
        servers' state as it is now, after every push of this trainer was applied.

        Write them before the servers' rows change: a block read after an update (another trainer's push, a
        load) raises :class:`~megaclass.paramserver.ParamServerError` rather than mix two states.
        """
        versions = self.versions()
        state = {
            _key(field): ServerRows(self.client, field, self._field_shape(field), versions)
            for field in self.slots
        }
        return {"weight": self._rows_source(versions), **state}

    def versions(self) -> tuple[int, ...]:
        """Each shard's state version once every push of this trainer is applied."""
        self.flush()
        return tuple(int(health.version) for health in self.client.health())

    def load_rows(self, rows: Tensor | RowSource) -> None:
        """Overwrite the servers' rows alone, a block of rows at a time; their optimizer state stays."""
        shape = self._field_shape("rows")
        if tuple(rows.shape) != shape:
            raise ValueError(f"store rows: expected shape {shape}, got {tuple(rows.shape)}")
        self._check_not_swapped()
        self.flush()
        self._write_field("rows", rows)

    def load_state_dict(self, state: Mapping[str, Tensor | RowSource]) -> None:
        """Overwrite the servers' rows and optimizer state with ``state``'s, a block of rows at a time (a
        :class:`~megaclass.state_io.SavedTensor` is read from its file block by block).

        Raises:
            ValueError: a key is missing or unknown, or an entry's shape is not the servers'.
        """
        expected = {_key(field): field for field in ("rows", *self.slots)}
        if set(state) != set(expected):
            raise ValueError(f"state dict keys {sorted(state)}: the servers keep {sorted(expected)}")
        shapes = {key: self._field_shape(field) for key, field in expected.items()}
        for key, values in state.items():
            if tuple(values.shape) != shapes[key]:
                raise ValueError(
                    f"state dict entry {key!r}: shape {tuple(values.shape)}, the servers keep {shapes[key]}"
                )
        self._check_not_swapped()
        self.flush()
        for key, values in state.items():
            self._write_field(expected[key], values)

    def _check_not_swapped(self) -> None:
        if self.average_step is not None:
            raise RuntimeError("the servers' rows are written while their average is swapped in")

    def _write_field(self, field: str, values: Tensor | RowSource | float) -> None:
        """Overwrite the servers' ``field`` of every row with ``values`` (a number: that value everywhere), a
        block of rows at a time."""
        shape = self._field_shape(field)
        for start, stop in row_blocks(self.num_rows, 4 * math.prod(shape[1:]), LOAD_BLOCK_BYTES):
            if isinstance(values, (int, float)):
                block = torch.full((stop - start, *shape[1:]), float(values))
            else:
                block = values[start:stop]
            self.client.set_rows(torch.arange(start, stop), block, field=field)

    def _field_shape(self, field: str) -> tuple[int, ...]:
        """``(num_rows, ...)``: the servers' shape of ``field`` (a per-row scalar slot is ``(num_rows,)``)."""
        if field not in self._field_shapes:
            first = self.client.get_rows(0, 1, field=field)  # one row tells the row's shape
            self._field_shapes[field] = (self.num_rows, *first.shape[1:])
        return self._field_shapes[field]

    def close(self, *, wait: bool = True) -> None:
        self.client.close(wait=wait)


def _key(field: str) -> str:
    """The state dict key of a server field: ``weight`` for the rows, ``optim.<slot>`` for a slot."""
    return "weight" if field == "rows" else f"optim.{field}"


class ServerRows(RowSource):
    """One field of the servers' rows (``"rows"``, an optimizer slot, or the weight average ``"average"`` at
    optimizer step ``average_step``), read when asked: ``source[a:b]`` pulls rows ``[a, b)`` as a float32 CPU
    tensor (:class:`~megaclass.state_io.RowSource`), and :meth:`take` the rows of some ids.

    Every read is checked against the shards' ``versions`` (their state when the source was made): rows
    updated since raise :class:`~megaclass.paramserver.ParamServerError`, so what is read in blocks is one
    state of the servers. ``versions`` None: the rows as they are at each read.
    """

    def __init__(
        self,
        client: ParamServerClient,
        field: str,
        shape: tuple[int, ...],
        versions: Sequence[int] | None,
        *,
        average_step: int | None = None,
    ) -> None:
        self.client, self.field, self.average_step = client, field, average_step
        self.versions = None if versions is None else tuple(versions)
        self.shape, self.dtype = torch.Size(shape), torch.float32

    def __repr__(self) -> str:
        versions = "live" if self.versions is None else list(self.versions)
        step = "" if self.average_step is None else f", average_step={self.average_step}"
        return f"ServerRows({self.field!r}, shape={tuple(self.shape)}, versions={versions}{step})"

    def take(self, ids: Tensor) -> Tensor:
        """The rows ``ids (n,)`` as they are now, ``(n, D)`` float32 on the CPU (the rows, or their average,
        of a live source: pulled as a step pulls them)."""
        if self.field not in ("rows", "average") or self.versions is not None:
            raise ValueError(f"{self!r}: only a live source of the rows or their average is read by ids")
        return self.client.pull(ids.to("cpu", torch.int64), average_step=self.average_step)

    def read_rows(self, start: int, stop: int) -> Tensor:
        if start == stop:  # no call: an empty range has no rows to tell a slot's shape
            return torch.empty((0, *self.shape[1:]))
        return self.client.get_rows(
            start, stop, field=self.field, versions=self.versions, average_step=self.average_step or 0
        )


class ServerRowAverage(RowAverage):
    """The weight average the parameter servers keep of their rows (shards started with ``--average-decay``),
    as :class:`~megaclass.store.average.RowAverage` asks: read, swapped in and loaded through ``store``.

    An average the servers kept before this run (they had applied steps: another run's, or this one's before
    a checkpoint that is loaded next) is ``stale``: unless loaded, it starts over from the rows before the
    first update, read or swap.
    """

    def __init__(self, store: ParamServerStore, *, before_swap: Callable[[], None], stale: bool) -> None:
        self.store, self.before_swap, self.stale = store, before_swap, stale
        self.decay = store.average_decay

    def _current(self, step: int) -> None:
        if self.stale:
            self.restart_(step=step)

    def check_update(self, step: int) -> None:
        """Before the rows' update of optimizer step ``step``: none while the average is swapped in."""
        if self.store.average_step is not None:
            raise RuntimeError("rows updated while they hold their average (an evaluation's swap)")
        self._current(step - 1)

    def exact(self, *, step: int) -> ServerRows:
        self._current(step)
        store = self.store
        if store.average_step is not None:
            raise RuntimeError("the row average is swapped in: read the rows")
        return ServerRows(
            store.client, "average", store._field_shape("rows"), store.versions(), average_step=step
        )

    def swap_(self, *, step: int) -> None:
        store = self.store
        if store.average_step is None:
            self.before_swap()
            self._current(step)
            store.flush()
            store.average_step = step
        else:
            store.average_step = None

    def load_(self, value: Tensor | RowSource, *, step: int) -> None:
        store = self.store
        store._check_not_swapped()
        if tuple(value.shape) != store._field_shape("rows"):
            raise ValueError(
                f"row average: expected shape {store._field_shape('rows')}, got {tuple(value.shape)}"
            )
        store.flush()
        store._write_field("average", value)
        store._write_field("average_step", step)
        self.stale = False

    def restart_(self, *, step: int) -> None:
        self.stale = False
        self.load_(ServerRows(self.store.client, "rows", self.store._field_shape("rows"), None), step=step)
