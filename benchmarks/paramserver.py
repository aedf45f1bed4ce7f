"""Parameter-server benchmark: rows moved per second over loopback, and a SelectedHead step per row store.

    python benchmarks/paramserver.py            # 1/2/4 shards, D 256/512, 1k-20k rows; step at C = 10^6
    python benchmarks/paramserver.py --quick    # small sizes, runs on CPU as a smoke test
    python benchmarks/paramserver.py --parts update --shards 1 --dims 256 --rows 5000  # one shard's update

Part 1 starts ``N`` shard processes (``megaclass paramserver serve``, sync SGD with momentum) on this machine
and times one client pulling ``R`` random rows (``pull``), pushing their gradients (``push``: the shards apply
SGD with momentum before answering) and both in turn (``step``), each call on the next of 8 sets of rows (rows
the previous call moved would still be in the CPU's cache), each set pushed once before any is timed (a
shard's first write of a page faults it in, which a run pays once, in its first steps); on a GPU host rows
are pulled to the GPU and gradients pushed from it, as a trainer's are. ``bandwidth_gbs`` counts row bytes
moved: ``R * D * 4`` for a pull or a push, twice that for a step. Provider ``ps`` moves the row blocks through
shared memory (on a GPU host mapped for the GPU, whose own copies cross the bus) and makes its calls over the
shards' Unix sockets (the client's default with shards on its machine), ``ps-inline`` makes them over gRPC,
the rows in the messages. ``--row-dtypes float32 bf16_sr`` runs it for shards holding rows and momentum as
float32 and as bfloat16 (``--dtype``; the wire stays float32). ``--average-decays 0 0.999`` runs it for
shards without and with the rows' weight average (``--average-decay``; held ``+ average``), which every push
brings up to date for the rows it changes.

Part 2 times one training step of :class:`~megaclass.heads.selected.SelectedHead` (forward, backward, row
update) with its rows in each store: ``gpu``, ``host`` (host memory: on a GPU mapped for it, and ``host,
rows gathered on the host`` as where CUDA will not lock them) and ``ps`` (4 shard processes on this
machine; rows pulled and gradients pushed through shared memory, the calls over the shards' Unix sockets),
the last with its index in two places, and with the shared memory not mapped for the GPU (``ps, rows through
the host``: copied through page-locked host memory).
``gpu``, ``host`` and ``ps`` query a GPU cluster index on the trainer built once before timing (``ps``: from
the servers' rows, read a block at a time; the default, ``head.index_on``). With ``ps, index on shards``
the head never reads the matrix: every step it asks the shards for each sample's nearest classes
(``QueryNearest``), each answering from a cluster index over its own rows (on the GPU where there is one,
``--index-device``), built at the first query; the shards split the head's ``probes`` between them, so as
many clusters are searched per sample as a local index. All start from the same matrix (the shards draw
the in-process stores' initial rows). The ``ps-part`` rows time the parts of a ``ps`` step alone: the
selection (with its query), the pull of the active rows, and the push of their gradients until applied.

Part 3 (``--parts update``, not run by default) times a shard's update alone, in this process: one
:meth:`~megaclass.paramserver.state.ShardState.apply` of ``R`` random rows' gradients (the record gathered,
updated in place, written into the maps and committed), with SGD with momentum and with Adam, for each of
``--row-dtypes``; the shard holds ``--classes / N`` rows of the smallest ``--shards`` count ``N`` (one
shard's share). ``bandwidth_gbs`` counts the gradients' bytes, ``R * D * 4``, as a push's does.

Without a GPU the client keeps the host blocks it frees for reuse, as a CPU trainer's process does
(:mod:`megaclass.host_allocator`; ``MEGACLASS_HOST_MALLOC=system`` leaves the allocator as it is, here and
in the shards).

Shard files go to ``/dev/shm`` when it has room: a disk-backed memory map is written back by the kernel,
and each row write after a write-back takes a page fault (several times the write itself).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    Case,
    Result,
    add_common_arguments,
    markdown_table,
    run_cases,
    shard_processes,
    unwind_on_terminate,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument("--shards", type=int, nargs="+", help="shard counts (default 1 2 4)")
    parser.add_argument("--dims", type=int, nargs="+", help="row widths D (default 256 512)")
    parser.add_argument("--rows", type=int, nargs="+", help="rows per request (default 1000 5000 20000)")
    parser.add_argument("--classes", type=int, help="C of the throughput servers (default 10^6)")
    parser.add_argument(
        "--row-dtypes",
        nargs="+",
        default=["float32"],
        choices=["float32", "bf16_sr"],
        help="how the throughput servers hold rows and state (their --dtype; default float32)",
    )
    parser.add_argument(
        "--average-decays",
        nargs="+",
        type=float,
        default=[0.0],
        help="the throughput servers' --average-decay (0: no weight average kept; default 0)",
    )
    parser.add_argument(
        "--shard-threads",
        type=int,
        default=0,
        help="each shard's torch threads (its --torch-threads; default 0: the server's own rule)",
    )
    parser.add_argument("--step-classes", type=int, help="C of the SelectedHead step (default 10^6)")
    parser.add_argument("--batch", type=int, help="B of the SelectedHead step (default 512)")
    parser.add_argument("--step-dim", type=int, help="D of the SelectedHead step (default 512)")
    parser.add_argument(
        "--parts", default="throughput,step", help="comma-separated subset of throughput,step,update"
    )
    parser.add_argument(
        "--index-device",
        choices=["cpu", "cuda"],
        help="where the step's shards keep their nearest-class indexes (default: cuda where there is one)",
    )
    parser.add_argument(
        "--data-dir",
        help="where shards keep their files (default: a folder on /dev/shm when it has room, else a "
        "temporary folder; a disk-backed map adds page-writeback faults to every row write)",
    )
    args = parser.parse_args()
    quick = args.quick
    args.shards = args.shards or ([1, 2] if quick else [1, 2, 4])
    args.dims = args.dims or ([64] if quick else [256, 512])
    args.rows = args.rows or ([500, 2000] if quick else [1000, 5000, 20000])
    args.classes = args.classes or (20_000 if quick else 1_000_000)
    args.step_classes = args.step_classes or (20_000 if quick else 1_000_000)
    args.batch = args.batch or (64 if quick else 512)
    args.step_dim = args.step_dim or (64 if quick else 512)
    if quick:
        args.reps = min(args.reps, 5)
    return args


def memory_folder(args: argparse.Namespace) -> str | None:
    """``/dev/shm`` when it can hold the largest run's rows and optimizer state twice over, else None."""
    largest = max(args.classes * max(args.dims), args.step_classes * args.step_dim) * 4 * 2  # rows + momentum
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return None
    return "/dev/shm" if free > 2 * largest and os.access("/dev/shm", os.W_OK) else None


ROW_SETS = 8  # random row sets a case cycles through


def row_sets(num_rows: int, rows: int) -> Iterator[torch.Tensor]:
    """:data:`ROW_SETS` sets of ``rows`` random row ids (sorted, as a selection gives them), taken in turn:
    one set over and over would find its rows in the CPU's cache, where a training step's rows are cold."""
    return itertools.cycle([torch.randperm(num_rows)[:rows].sort().values for _ in range(ROW_SETS)])


def transfer_cases(
    client, provider: str, count: int, dim: int, rows: int, counter: list[int], held: str
) -> list[Case]:
    """``pull``, ``push`` and ``step`` of ``rows`` random rows (sorted ids, as a selection gives them), from
    shards holding their rows as ``held``."""
    params = {"shards": count, "D": dim, "rows": rows, "held": held}
    id_sets = row_sets(client.num_rows, rows)
    # rows pulled to the GPU and gradients pushed from it on a GPU host, as a trainer's
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grads = torch.randn(rows, dim, device=device) * 1e-3
    row_bytes = rows * dim * 4

    def pull() -> None:
        client.pull(next(id_sets), device=device)

    def push(ids: torch.Tensor | None = None) -> None:
        counter[0] += 1
        client.push(next(id_sets) if ids is None else ids, grads, step=counter[0], lr=0.01)

    def step() -> None:
        ids = next(id_sets)
        client.pull(ids, device=device)
        push(ids)

    def warmed() -> Callable[[], None]:
        """``pull``, once every set's rows were pushed (a first push of a set's rows took three times a
        warm one at 20,000 rows of D 256 on 2 CPU cores: its pages faulted in)."""
        for _ in range(ROW_SETS):
            push()
        return pull

    return [
        Case(provider, "pull", params, warmed, bytes_moved=row_bytes),
        Case(provider, "push", params, lambda: push, bytes_moved=row_bytes),
        Case(provider, "step", params, lambda: step, bytes_moved=2 * row_bytes),
    ]


def throughput(args: argparse.Namespace, root: str) -> list[Result]:
    from megaclass.paramserver import ParamServerClient

    results = []
    for dtype, decay, dim, count in itertools.product(
        args.row_dtypes, args.average_decays, args.dims, args.shards
    ):
        held = f"{dtype} + average" if decay else dtype
        with shard_processes(
            count,
            classes=args.classes,
            dim=dim,
            root=root,
            dtype=dtype,
            average_decay=decay,
            threads=args.shard_threads,
        ) as addresses:
            counter = [0]  # steps of the shards, over both clients
            for provider, shared_mib in (("ps", 128), ("ps-inline", 0)):
                client = ParamServerClient(addresses, timeout_s=120, shared_memory_mib=shared_mib)
                if torch.cuda.is_available():
                    client.map_buffers("cuda")  # as a trainer's store does (no buffers: nothing to map)
                attached = all(shard.buffer_id and shard.local for shard in client._shards)
                if attached != (shared_mib > 0):  # a row labelled shared memory moved through it
                    raise RuntimeError(f"{provider}: shared memory and local sockets attached: {attached}")
                cases = [
                    case
                    for rows in args.rows
                    for case in transfer_cases(client, provider, count, dim, rows, counter, held)
                ]
                results += run_cases(
                    cases,
                    benchmark="paramserver",
                    results_path=args.results,
                    reps=args.reps,
                    warmup=args.warmup,
                )
                client.close()
    return results


_GATHERED = "host, rows gathered on the host"  # the host store's way where CUDA will not lock its rows
_PS_THROUGH_HOST = "ps, rows through the host"  # the shards' buffers not mapped for the GPU


def step_case(make_head: Callable[[], torch.nn.Module], store: str, args: argparse.Namespace) -> Case:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = {"C": args.step_classes, "D": args.step_dim, "B": args.batch, "store": store}

    def setup() -> Callable[[], None]:
        head = make_head().to(device)
        head.materialize()
        if store == _PS_THROUGH_HOST and device.type == "cuda":
            from megaclass.store.paramserver import ParamServerStore

            head.store.close()
            head.store = ParamServerStore(head.config.store, device=device, mapped=False)
        if store == _GATHERED and head.store.mapped:
            from megaclass.store.host import HostStore

            mapped = head.store
            mapped.close()  # its rows unlocked, then gathered on the host each step
            head.store = HostStore(mapped.local, device=mapped.device, mapped=False)
        features = torch.randn(args.batch, args.step_dim, device=device, requires_grad=True)
        targets = torch.randint(args.step_classes, (args.batch,), device=device)
        counter = [0]

        def step() -> None:
            counter[0] += 1
            loss = head(features, targets)
            loss.backward()
            features.grad = None
            head.after_step(counter[0], 0.0, lr=0.01)

        if head.selector is not None:  # once, before timing (from the servers: a block at a time)
            head.selector.build(head.store.rows())
        else:  # the index on the shards: each builds its own at the first query
            step()
        return step

    return Case("selected", "step", params, setup)


def ps_part_cases(
    make_head: Callable[[], torch.nn.Module], store: str, args: argparse.Namespace
) -> list[Case]:
    """The parts of a ``store=ps`` step on their own: the selection (the nearest-class query and the active
    set around it), the pull of the active rows and the push of their gradients (acknowledged: applied by
    the shards)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = {"C": args.step_classes, "D": args.step_dim, "B": args.batch, "store": store}
    shared: dict = {}

    def prepared() -> dict:
        if not shared:  # one head for the three parts; its first step builds the shards' indexes
            head = make_head().to(device)
            head.materialize()
            features = torch.randn(args.batch, args.step_dim, device=device)
            targets = torch.randint(args.step_classes, (args.batch,), device=device)
            step = max(int(health.applied_step) for health in head.store.client.health()) + 1
            if head.selector is not None:
                head.selector.build(head.store.rows())
            head(features, targets).backward()  # steps after those the step case pushed: each one applied
            head.after_step(step, 0.0, lr=0.01)
            ids = head.select(features, targets).ids
            shared.update(head=head, features=features, targets=targets, ids=ids, step=[step])
            shared["grads"] = torch.randn(len(ids), args.step_dim, device=device) * 1e-3
        return shared

    def query() -> Callable[[], None]:
        state = prepared()
        return lambda: state["head"].select(state["features"], state["targets"])  # the shards' query

    def pull() -> Callable[[], None]:
        state = prepared()
        return lambda: state["head"].store.pull(state["ids"])

    def push() -> Callable[[], None]:
        state = prepared()
        store = state["head"].store

        def run() -> None:
            state["step"][0] += 1
            store.push(state["ids"], state["grads"], step=state["step"][0], lr=0.01)
            store.client.drain()

        return run

    return [
        Case("ps-part", mode, params, setup)
        for mode, setup in (("query", query), ("pull", pull), ("push", push))
    ]


def head_steps(args: argparse.Namespace, root: str) -> list[Result]:
    from megaclass.heads import HeadContext, build_head, head_config

    context = HeadContext(in_features=args.step_dim, num_classes=args.step_classes, multilabel=False)
    results = []
    # the shards' nearest-class indexes live on the accelerator where there is one (as the other stores' do)
    index_device = args.index_device or ("cuda" if torch.cuda.is_available() else "cpu")
    with shard_processes(
        4,
        classes=args.step_classes,
        dim=args.step_dim,
        root=root,
        index_device=index_device,
        threads=args.shard_threads,
    ) as addresses:
        url = "ps://" + ",".join(addresses)
        stores = {
            "gpu": {"store": "gpu"},
            "host": {"store": "host"},
            _GATHERED: {"store": "host"},
            "ps": {"store": url, "index_on": "trainer"},
            _PS_THROUGH_HOST: {"store": url, "index_on": "trainer"},
            "ps, index on shards": {"store": url, "index_on": "shards"},
        }
        for store, placement in stores.items():
            options = {"type": "selected", "index": "gpu", "interval": 10**9, "coverage_every": 0}
            options.update(placement)

            def make(options=options) -> torch.nn.Module:
                return build_head(head_config(options), context)

            parts = ps_part_cases(make, store, args) if store in ("ps", "ps, index on shards") else []
            results += run_cases(
                [step_case(make, store, args), *parts],
                benchmark="paramserver",
                results_path=args.results,
                reps=args.reps,
                warmup=args.warmup,
            )
    return results


def shard_updates(args: argparse.Namespace, root: str) -> list[Result]:
    """One shard's ``ShardState.apply`` of ``R`` random rows, in this process (part 3)."""
    from megaclass.paramserver import HyperParams
    from megaclass.paramserver.state import ShardSpec, ShardState

    size = args.classes // min(args.shards)
    cases, states = [], []
    for dtype, optimizer, dim in itertools.product(args.row_dtypes, ("sgd", "adam"), args.dims):
        spec = ShardSpec(size, dim, 0, size, optimizer, trainers=1, dtype=dtype)
        state = ShardState(tempfile.mkdtemp(dir=root), spec, HyperParams(lr=0.01, momentum=0.9))
        states.append(state)
        for tensor in state.state.values():  # resident, as a shard's state is after its first steps
            tensor.zero_()
        for rows in args.rows:
            id_sets = row_sets(size, rows)
            grads = torch.randn(rows, dim) * 1e-3
            steps = itertools.count(1)

            def update(state=state, id_sets=id_sets, grads=grads, steps=steps) -> None:
                state.apply(next(id_sets), grads, lr=0.01, step=next(steps))

            params = {"optimizer": optimizer, "D": dim, "rows": rows, "held": dtype}
            cases.append(
                Case("shard", "update", params, lambda update=update: update, bytes_moved=rows * dim * 4)
            )
    try:
        return run_cases(
            cases, benchmark="paramserver", results_path=args.results, reps=args.reps, warmup=args.warmup
        )
    finally:
        for state in states:
            state.close()


def summary(results: list[Result]) -> str:
    """Rows per second and GB/s of the transfer cases, one line per (shards, D, rows)."""
    lines = [
        "| transport | held | shards | D | rows/request | pull rows/s | push rows/s "
        "| step GB/s (pulled + pushed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keyed = {
        (r.provider, r.mode, tuple(r.params.values())): r
        for r in results
        if r.provider.startswith("ps") and r.status == "ok"
    }
    for (provider, mode, key), result in keyed.items():
        if mode != "step":
            continue
        pull, push = keyed.get((provider, "pull", key)), keyed.get((provider, "push", key))
        rows = key[2]

        def rate(r: Result | None, rows: int = rows) -> str:
            return f"{rows / (r.time_ms * 1e-3):,.0f}" if r else "-"

        transport = "local socket, shared memory" if provider == "ps" else "gRPC, inline"
        lines.append(
            f"| {transport} | {key[3]} | {key[0]} | {key[1]} | {rows} | {rate(pull)} | {rate(push)} | "
            f"{result.bandwidth_gbs:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    unwind_on_terminate()  # a killed run stops its shards and removes their files
    if not torch.cuda.is_available():
        from megaclass.host_allocator import reuse_freed_blocks

        reuse_freed_blocks()  # as a CPU trainer does (pulls on a GPU host land in page-locked buffers)
    parts = set(args.parts.split(","))
    root = tempfile.mkdtemp(prefix="megaclass-ps-bench-", dir=args.data_dir or memory_folder(args))
    threads = args.shard_threads or "cores / 2N of N shards"
    print(f"shard data under {root}; each shard's torch threads: {threads}")
    started = time.perf_counter()
    try:
        transfer = throughput(args, root) if "throughput" in parts else []
        steps = head_steps(args, root) if "step" in parts else []
        updates = shard_updates(args, root) if "update" in parts else []
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if transfer:
        print("\n" + markdown_table(transfer, columns=["time_ms", "q20_ms", "q80_ms", "bandwidth_gbs"]))
        print("\n" + summary(transfer))
    if steps:
        print("\n" + markdown_table(steps, columns=["time_ms", "q20_ms", "q80_ms", "peak_mem_gib"]))
        by_store = {
            r.params["store"]: r.time_ms for r in steps if r.status == "ok" and r.provider == "selected"
        }
        for store, host in itertools.product(by_store, ("host", _GATHERED)):
            if store.startswith("ps") and host in by_store:
                print(f"\n{store} step / {host} step: {by_store[store] / by_store[host]:.2f}x (target <= 2x)")
    if updates:
        print("\n" + markdown_table(updates, columns=["time_ms", "q20_ms", "q80_ms", "bandwidth_gbs"]))
        for r in updates:
            if r.status == "ok":
                rows_per_s = r.params["rows"] / (r.time_ms * 1e-3)
                print(f"{r.params}: {rows_per_s:,.0f} rows a second")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
