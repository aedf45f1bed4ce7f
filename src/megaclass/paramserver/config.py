"""Settings of one parameter-server shard, and the options of ``megaclass paramserver serve``.

Kept apart from the server so the CLI can list the options without loading gRPC or protobuf.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from megaclass.ops.held_rows import RowDtype
from megaclass.paramserver.updaters import OPTIMIZERS, HyperParams

TOKEN_ENV = "MEGACLASS_PS_TOKEN"
ROW_DTYPES = tuple(dtype.value for dtype in RowDtype)  # how a shard holds its rows and row-shaped state
MAX_MESSAGE_BYTES = 2**31 - 1  # protobuf's own limit on one message
MESSAGE_OVERHEAD_BYTES = 4096  # a message's fields besides its ids and arrays, with room to spare
DEFAULT_MESSAGE_BYTES = 256 * 2**20  # a 64k x 1024 float32 row block: few calls, bounded server memory


def resolve_token(
    token: str | None,
    token_file: str | None,
    *,
    environ: Mapping[str, str] = os.environ,
    names: tuple[str, str] = ("token", "token_file"),
) -> str | None:
    """The shared secret given by ``token``, by the file ``token_file`` (its text, surrounding whitespace
    stripped) or by the ``MEGACLASS_PS_TOKEN`` environment variable (empty: unset); None when none is given.

    Precedence is value, then file, then environment; sources given together must hold the same secret.
    ``names`` are what the first two are called in messages (``--token``, ``--token-file`` on a command line).

    Raises:
        ValueError: the file cannot be read or is empty, a value is empty, or two sources differ.
    """
    sources: list[tuple[str, str]] = []
    if token is not None:
        if not token.strip():
            raise ValueError(f"{names[0]}: the token is empty")
        sources.append((names[0], token))
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as file:
                text = file.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{names[1]} {token_file}: cannot read the token: {error}") from None
        if not text:
            raise ValueError(f"{names[1]} {token_file}: the file is empty, expected the token")
        sources.append((f"{names[1]} {token_file}", text))
    if environ.get(TOKEN_ENV):
        sources.append((TOKEN_ENV, environ[TOKEN_ENV]))
    for name, secret in sources[1:]:
        if secret != sources[0][1]:
            raise ValueError(
                f"{sources[0][0]} and {name} give different tokens; give one, or the same in both"
            )
    return sources[0][1] if sources else None


def shard_range(num_rows: int, shard: int, shards: int) -> tuple[int, int]:
    """Rows ``[shard * C // N, (shard + 1) * C // N)`` held by shard ``shard`` of ``shards``."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard}/{shards}: expected 0 <= shard < {shards}")
    return shard * num_rows // shards, (shard + 1) * num_rows // shards


@dataclass(frozen=True)
class ServerConfig:
    """How to run one shard.

    Args:
        num_rows: ``C``, rows of the whole matrix.
        dim: ``D``.
        shard: this shard's index, ``0 <= shard < shards``.
        shards: number of shards ``N``; this one holds ``[shard * C // N, (shard + 1) * C // N)``.
        data_dir: folder of the memory-mapped state (created; reused on restart).
        host: address to bind; loopback unless told otherwise.
        port: TCP port; 0 picks a free one (printed at start).
        token: shared secret every call must carry (``authorization: Bearer <token>``); None: none.
        tls_cert: PEM certificate file; with ``tls_key``, the server speaks TLS only.
        tls_key: PEM private key file.
        mode: ``"sync"`` (barrier over ``trainers``) or ``"async"``.
        trainers: trainers in the sync barrier; in async mode, the number of trainer ranks accepted.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"adagrad"``.
        dtype: ``"float32"``, or ``"bf16_sr"``: rows and their row-shaped optimizer state in bfloat16 (half
            the memory and half the bytes an update moves), updated in float32 and stochastically rounded.
        hyper: initial hyper-parameters (a restarted server keeps the ones it had).
        average_decay: keep each row's weight average (``train.ema_decay`` of a trainer, the same value)
            beside it, brought up to date as the row changes: float32, and a step count a row; 0: none.
        threads: request threads; None: ``8 + 4 * trainers`` (waiting pulls hold a thread each).
        init_bound: rows of a new shard start as ``U(-init_bound, init_bound)``, the matrix an in-process
            store with the same seed starts from; None: ``1 / sqrt(D)``; 0: zeros.
        seed: seed of the initial rows (the same for every shard: each draws its part of one matrix).
        durable: fsync every step (survives power loss, slower); without it a killed process loses nothing.
        index_device: where the shard's nearest-class index (``QueryNearest`` with ``max_index_age``) lives:
            ``cpu``, or ``cuda`` on a machine whose accelerator can serve it (ms queries at 10^6 rows).
        max_message_bytes: the largest message sent; received messages are capped at the largest valid
            request under the limits below, so an oversized one is refused before it is read.
        max_rows_per_request: rows (ids) in one ``PullRows``, ``PushGradients``, ``SetRows`` or ``GetRows``;
            None: as many as fit in ``max_message_bytes`` (the client splits pulls, reads and writes).
        max_queries_per_request: feature rows in one ``QueryNearest``; None: as many as fit in
            ``max_message_bytes`` (the client splits larger queries).
        max_shared_buffers: clients on this machine attached to move row blocks through shared memory at once
            (one per client and shard); 0: every row block travels in the messages.
        max_step_jump: a push's step may exceed the last step seen (sync: applied; async: the trainer's) by
            at most this: a wild step would otherwise make every later push look like a retry.
    """

    num_rows: int
    dim: int
    shard: int = 0
    shards: int = 1
    data_dir: str = "paramserver-data"
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    mode: str = "sync"
    trainers: int = 1
    optimizer: str = "sgd"
    dtype: str = "float32"
    hyper: HyperParams = field(default_factory=HyperParams)
    average_decay: float = 0.0
    threads: int | None = None
    init_bound: float | None = None
    seed: int = 0
    durable: bool = False
    index_device: str = "cpu"
    max_message_bytes: int = DEFAULT_MESSAGE_BYTES
    max_rows_per_request: int | None = None
    max_queries_per_request: int | None = None
    max_step_jump: int = 1_000_000
    max_shared_buffers: int = 64

    def __post_init__(self) -> None:
        if self.num_rows < 1 or self.dim < 1:
            raise ValueError(f"--rows {self.num_rows} --dim {self.dim}: both must be >= 1")
        shard_range(self.num_rows, self.shard, self.shards)
        if self.mode not in ("sync", "async"):
            raise ValueError(f"--mode {self.mode!r}: expected 'sync' or 'async'")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}: expected one of {list(OPTIMIZERS)}")
        if self.dtype not in ROW_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected one of {list(ROW_DTYPES)}")
        if self.trainers < 1:
            raise ValueError(f"--trainers {self.trainers}: expected >= 1")
        if not 0.0 <= self.average_decay < 1.0:
            raise ValueError(f"--average-decay {self.average_decay}: expected 0 (none) or a value in (0, 1)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.index_device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"--index-device {self.index_device!r}: expected 'cpu' or 'cuda[:i]'")
        self.hyper.row_optimizer(self.optimizer)  # raises ConfigError on settings the optimizer rejects
        smallest = MESSAGE_OVERHEAD_BYTES + 4 * self.dim + 8
        if not smallest <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(
                f"--max-message-mib {self.max_message_bytes / 2**20:g}: expected room for one row "
                f"({smallest} bytes) and at most 2 GiB"
            )
        for name, value in [
            ("--max-rows-per-request", self.max_rows_per_request),
            ("--max-queries-per-request", self.max_queries_per_request),
            ("--max-step-jump", self.max_step_jump),
        ]:
            if value is not None and value < 1:
                raise ValueError(f"{name} {value}: expected >= 1")
        if self.max_shared_buffers < 0:
            raise ValueError(f"--max-shared-buffers {self.max_shared_buffers}: expected >= 0")
        limits = self.limits()
        if limits.rows * (4 * self.dim + 8) + MESSAGE_OVERHEAD_BYTES > self.max_message_bytes:
            raise ValueError(
                f"--max-rows-per-request {limits.rows}: {limits.rows} rows of {self.dim} float32 do not fit "
                f"in --max-message-mib {self.max_message_bytes / 2**20:g}"
            )
        if limits.queries * 4 * self.dim + MESSAGE_OVERHEAD_BYTES > self.max_message_bytes:
            raise ValueError(
                f"--max-queries-per-request {limits.queries}: {limits.queries} features of {self.dim} "
                f"float32 do not fit in --max-message-mib {self.max_message_bytes / 2**20:g}"
            )

    def limits(self) -> RequestLimits:
        """The per-request limits, with the defaults derived from ``max_message_bytes`` resolved."""
        room = self.max_message_bytes - MESSAGE_OVERHEAD_BYTES
        row_bytes = 4 * self.dim
        rows = self.max_rows_per_request or max(1, room // (row_bytes + 8))
        queries = self.max_queries_per_request or max(1, room // row_bytes)
        start, stop = shard_range(self.num_rows, self.shard, self.shards)
        largest = max(  # ids of a pull may repeat; those of a push or a write are unique rows of the shard
            rows * 8, min(rows, stop - start) * (row_bytes + 8), queries * row_bytes
        )
        receive = min(self.max_message_bytes, largest + MESSAGE_OVERHEAD_BYTES)
        return RequestLimits(self.max_message_bytes, receive, rows, queries)


@dataclass(frozen=True)
class RequestLimits:
    """What one call to a shard may carry (:meth:`ServerConfig.limits`).

    Args:
        send_bytes: the largest message the shard sends.
        receive_bytes: the largest message it reads; larger ones are refused unread.
        rows: ids (rows) in one pull, push, write or read.
        queries: feature rows in one nearest-row query.
    """

    send_bytes: int
    receive_bytes: int
    rows: int
    queries: int


def add_serve_arguments(parser: Any) -> None:
    """The options of ``megaclass paramserver serve`` (an ``argparse`` parser)."""
    parser.add_argument("--rows", type=int, required=True, help="C, rows of the whole matrix")
    parser.add_argument("--dim", type=int, required=True, help="D, row width")
    parser.add_argument("--shard", default="0/1", help="i/N: this process holds rows [i*C/N, (i+1)*C/N)")
    parser.add_argument("--data-dir", required=True, help="folder of the memory-mapped rows and state")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one and prints it")
    parser.add_argument(
        "--token",
        default=None,
        help=f"shared secret required on every call (visible in ps: prefer --token-file or ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--token-file", default=None, metavar="PATH", help="file holding the shared secret (one line)"
    )
    parser.add_argument("--tls-cert", default=None, help="PEM certificate (TLS with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument(
        "--trainers", type=int, default=1, help="trainers in the sync barrier / ranks accepted"
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    parser.add_argument(
        "--dtype",
        choices=ROW_DTYPES,
        default="float32",
        help="rows and row-shaped optimizer state: float32, or bf16_sr (bfloat16, stochastic rounding)",
    )
    parser.add_argument(
        "--average-decay",
        type=float,
        default=0.0,
        help="keep the rows' weight average with this decay (a trainer's train.ema_decay); 0: none",
    )
    parser.add_argument("--lr", type=float, default=0.01, help="lr when a push carries none")
    parser.add_argument("--momentum", type=float, default=0.9, help="sgd momentum; 0 keeps no momentum state")
    parser.add_argument("--nesterov", action="store_true")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("BETA1", "BETA2"))
    parser.add_argument("--eps", type=float, default=1e-8)
    parser.add_argument(
        "--barrier-timeout", type=float, default=60.0, help="seconds before a silent trainer is dropped"
    )
    parser.add_argument("--threads", type=int, default=None, help="request threads (8 + 4 * trainers)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="default: cores / 2N of --shard i/N (room for a trainer)",
    )
    parser.add_argument(
        "--init-bound", type=float, default=None, help="U(-b, b) initial rows (default 1/sqrt(D))"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--durable", action="store_true", help="fsync every step (survives power loss)")
    parser.add_argument(
        "--index-device", default="cpu", help="device of the nearest-class index: cpu (default) or cuda"
    )
    parser.add_argument(
        "--max-message-mib",
        type=float,
        default=DEFAULT_MESSAGE_BYTES / 2**20,
        help="largest message sent; received ones are capped at the largest valid request (default 256)",
    )
    parser.add_argument(
        "--max-rows-per-request",
        type=int,
        default=None,
        help="ids in one pull, push, write or read (default: as many as fit in --max-message-mib)",
    )
    parser.add_argument(
        "--max-queries-per-request",
        type=int,
        default=None,
        help="features in one nearest-row query (default: as many as fit in --max-message-mib)",
    )
    parser.add_argument(
        "--max-step-jump",
        type=int,
        default=1_000_000,
        help="a push's step may exceed the last step seen by at most this (default 10^6)",
    )
    parser.add_argument(
        "--max-shared-buffers",
        type=int,
        default=64,
        help="clients on this machine moving rows through shared memory at once (default 64; 0: none)",
    )


def config_from_arguments(args: Any) -> ServerConfig:
    """The :class:`ServerConfig` of parsed ``serve`` arguments."""
    index, sep, count = str(args.shard).partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise ValueError(f"--shard {args.shard!r}: expected i/N, for example 0/4")
    hyper = HyperParams(
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        beta1=args.betas[0],
        beta2=args.betas[1],
        eps=args.eps,
        barrier_timeout_s=args.barrier_timeout,
    )
    return ServerConfig(
        num_rows=args.rows,
        dim=args.dim,
        shard=int(index),
        shards=int(count),
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        token=resolve_token(args.token, args.token_file, names=("--token", "--token-file")),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        mode=args.mode,
        trainers=args.trainers,
        optimizer=args.optimizer,
        dtype=args.dtype,
        hyper=hyper,
        average_decay=args.average_decay,
        threads=args.threads,
        init_bound=args.init_bound,
        seed=args.seed,
        durable=args.durable,
        index_device=args.index_device,
        max_message_bytes=int(args.max_message_mib * 2**20),
        max_rows_per_request=args.max_rows_per_request,
        max_queries_per_request=args.max_queries_per_request,
        max_step_jump=args.max_step_jump,
        max_shared_buffers=args.max_shared_buffers,
    )
