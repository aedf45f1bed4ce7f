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
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from megaclass.ops.row_optimizers import RowOptimizerConfig, RowOptimizerKind
from megaclass.store.base import RowStore

SCHEME = "ps://"
URL_OPTIONS = ("token_file", "connect_timeout_s", "timeout_s")


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

    Raises:
        ParamServerError: a shard is unreachable or refuses the token (one line naming its address).

    >>> store = ParamServerStore("ps://127.0.0.1:50051", device="cuda")  # doctest: +SKIP
    >>> rows = store.pull(ids)  # (S, D) on cuda
    >>> store.push(ids, grads, step=1, lr=0.1)
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
        self._prefetched: tuple[Tensor, object] | None = None  # (ids, PendingPull)
        health = self.client.health()[0]
        self.optimizer_kind, self.slots = health.optimizer, tuple(health.slots)

    def configure(self, optimizer: RowOptimizerConfig) -> None:
        """Make the servers' optimizer settings those of ``optimizer`` (its kind must be the servers').

        Raises:
            ValueError: the servers run another optimizer, or lack the state ``optimizer`` needs.
        """
        kind = RowOptimizerKind(optimizer.kind).value
        if kind != self.optimizer_kind:
            raise ValueError(
                f"optimizer.kind {kind!r}: the parameter servers run {self.optimizer_kind!r} "
                "(start them with --optimizer to match)"
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
        pin = self.device.type == "cuda"  # rows land in page-locked memory: the copy below is asynchronous
        if prefetched is not None and torch.equal(prefetched[0], ids_cpu):
            pending = prefetched[1]
            rows = self.client.refresh(pending, pending.result(pin_memory=pin))  # re-pull only changed rows
        else:
            rows = self.client.pull(ids_cpu, pin_memory=pin)
        return rows.to(self.device, non_blocking=True) if self.device.type != "cpu" else rows

    def prefetch(self, ids: Tensor) -> None:
        ids_cpu = ids.detach().to("cpu", torch.int64).clone()
        self._prefetched = (ids_cpu, self.client.pull_async(ids_cpu))

    def push(self, ids: Tensor, grads: Tensor, *, step: int, lr: float) -> None:
        self.client.push(ids.detach().to("cpu", torch.int64), grads, step=step, lr=lr, wait=False)

    def read(self, start: int, stop: int) -> Tensor:
        self.flush()
        return self.client.get_rows(start, stop).to(self.device)

    def flush(self) -> None:
        self.client.flush()

    def held_bytes(self) -> tuple[int, int]:
        """On the servers: fp32 rows and one row-shaped fp32 slot per optimizer state entry."""
        rows = 4 * self.num_rows * self.dim
        return rows, rows * len(self.slots)

    def state_dict(self) -> dict[str, Tensor]:
        self.flush()
        state = {"weight": self.client.get_rows(0, self.num_rows)}
        for slot in self.slots:
            state[f"optim.{slot}"] = self.client.get_rows(0, self.num_rows, field=slot)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = {"weight", *(f"optim.{slot}" for slot in self.slots)}
        if set(state) != expected:
            raise ValueError(f"state dict keys {sorted(state)}: the servers keep {sorted(expected)}")
        self.flush()
        all_ids = torch.arange(self.num_rows)
        block = max(1, (1 << 26) // (4 * self.dim))  # 64 MiB a request
        for key, values in state.items():
            field = "rows" if key == "weight" else key.removeprefix("optim.")
            for start in range(0, self.num_rows, block):
                self.client.set_rows(
                    all_ids[start : start + block], values[start : start + block], field=field
                )

    def close(self) -> None:
        self.client.close()
