"""Settings of one parameter-server shard, and the options of ``megaclass paramserver serve``.

Kept apart from the server so the CLI can list the options without loading gRPC or protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megaclass.paramserver.updaters import OPTIMIZERS, HyperParams


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
        hyper: initial hyper-parameters (a restarted server keeps the ones it had).
        threads: request threads; None: ``8 + 4 * trainers`` (waiting pulls hold a thread each).
        init_bound: rows of a new shard start as ``U(-init_bound, init_bound)``, the matrix an in-process
            store with the same seed starts from; None: ``1 / sqrt(D)``; 0: zeros.
        seed: seed of the initial rows (the same for every shard: each draws its part of one matrix).
        durable: fsync every step (survives power loss, slower); without it a killed process loses nothing.
        index_device: where the shard's nearest-class index (``QueryNearest`` with ``max_index_age``) lives:
            ``cpu``, or ``cuda`` on a machine whose accelerator can serve it (ms queries at 10^6 rows).
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
    hyper: HyperParams = field(default_factory=HyperParams)
    threads: int | None = None
    init_bound: float | None = None
    seed: int = 0
    durable: bool = False
    index_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_rows < 1 or self.dim < 1:
            raise ValueError(f"--rows {self.num_rows} --dim {self.dim}: both must be >= 1")
        shard_range(self.num_rows, self.shard, self.shards)
        if self.mode not in ("sync", "async"):
            raise ValueError(f"--mode {self.mode!r}: expected 'sync' or 'async'")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}: expected one of {list(OPTIMIZERS)}")
        if self.trainers < 1:
            raise ValueError(f"--trainers {self.trainers}: expected >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.index_device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"--index-device {self.index_device!r}: expected 'cpu' or 'cuda[:i]'")
        self.hyper.row_optimizer(self.optimizer)  # raises ConfigError on settings the optimizer rejects


def add_serve_arguments(parser: Any) -> None:
    """The options of ``megaclass paramserver serve`` (an ``argparse`` parser)."""
    parser.add_argument("--rows", type=int, required=True, help="C, rows of the whole matrix")
    parser.add_argument("--dim", type=int, required=True, help="D, row width")
    parser.add_argument("--shard", default="0/1", help="i/N: this process holds rows [i*C/N, (i+1)*C/N)")
    parser.add_argument("--data-dir", required=True, help="folder of the memory-mapped rows and state")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one and prints it")
    parser.add_argument("--token", default=None, help="shared secret required on every call")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate (TLS with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument(
        "--trainers", type=int, default=1, help="trainers in the sync barrier / ranks accepted"
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
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
    parser.add_argument("--torch-threads", type=int, default=None, help="default: cores / N of --shard i/N")
    parser.add_argument(
        "--init-bound", type=float, default=None, help="U(-b, b) initial rows (default 1/sqrt(D))"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--durable", action="store_true", help="fsync every step (survives power loss)")
    parser.add_argument(
        "--index-device", default="cpu", help="device of the nearest-class index: cpu (default) or cuda"
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
        token=args.token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        mode=args.mode,
        trainers=args.trainers,
        optimizer=args.optimizer,
        hyper=hyper,
        threads=args.threads,
        init_bound=args.init_bound,
        seed=args.seed,
        durable=args.durable,
        index_device=args.index_device,
    )
