"""A host store's rows made, read and updated on a GPU host: drawn on the GPU into host memory, read back a
block at a time (as an index's cold build reads them), and a step's rows gathered and written back at random
places (as its update does), each beside the plain way it replaces.

    python benchmarks/host_rows.py                                  # 10^7 rows of D 256 (10.24 GB), a GPU
    python benchmarks/host_rows.py --rows 100000 --dim 64 --quick   # a smoke run, CPU or GPU
    python benchmarks/host_rows.py --quick --threads 2 4 8 16       # a step's rows moved at each thread count

Rows: :class:`~megaclass.store.local.LocalRows` in host memory drawn on the GPU (copied through a page-locked
buffer, :func:`megaclass.staging.copy_rows_`); beside it the same draws copied straight into fresh pageable
memory, and into rows page-locked whole by torch's pinned allocator (what the host store did before).
Reading: the rows to the GPU in blocks of 2^16 through two page-locked buffers
(:func:`megaclass.staging.blocks_to_device`), beside each block's plain ``.to(device)``. Every variant's rows
are checked equal to the first's on a sample. Updating: ``--step-rows`` random rows a step (a new set each
time, so no step finds its rows in the CPU's cache), gathered by ``index_select``
(:func:`~megaclass.ops.row_optimizers.take_rows`) beside plain indexing, and written back by
:func:`~megaclass.ops.row_optimizers.put_rows_` (a whole row an item over torch's threads where each writes
2 MiB or more, else ``index_put_``) beside ``index_put_`` and ``index_copy_``, and (rows held as
``bf16_sr``) the updated values rounded to bfloat16 stochastically on the CPU
(:func:`~megaclass.ops.stochastic_rounding.stochastic_round`: numpy, in pieces over torch's threads) beside
the plain-torch reference it matches bit for bit; median of ``--reps`` steps, results checked. A
whole update: :meth:`~megaclass.store.local.LocalRows.update_` with AdamW of ``--step-rows`` random rows, rows
held in float32 and as ``bf16_sr``, with and without a weight average of the rows
(:class:`~megaclass.store.average.RowAverage`, ``train.ema_decay``), median of ``--reps`` steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from megaclass.ops.row_optimizers import INIT_CHUNK, RowOptimizerConfig, put_rows_, take_rows
from megaclass.ops.stochastic_rounding import reference_stochastic_round, stochastic_round
from megaclass.staging import blocks_to_device
from megaclass.store.local import LocalRows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="C")
    parser.add_argument("--dim", type=int, default=256, help="D")
    parser.add_argument("--step-rows", type=int, nargs="+", default=[5_000, 50_000], help="rows a step")
    parser.add_argument("--reps", type=int, default=20, help="steps timed for each way")
    parser.add_argument("--quick", action="store_true", help="skip the slow baselines")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[],
        help="torch threads for the rows moved (default: as set)",
    )
    return parser.parse_args()


def timed(run: Callable[[], object]) -> tuple[object, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    begin = time.perf_counter()
    value = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - begin


def plain_draw(rows: int, dim: int, device: torch.device, pinned: bool) -> torch.Tensor:
    """The store's draws (:func:`~megaclass.ops.row_optimizers.init_rows_`, chunk ``i`` seeded ``i``, bound
    ``1/sqrt(D)``), each chunk copied to host memory with a plain copy."""
    weight = torch.empty(rows, dim, pin_memory=pinned)
    bound = dim**-0.5
    for index, start in enumerate(range(0, rows, INIT_CHUNK)):
        generator = torch.Generator(device=device).manual_seed(index)
        chunk = torch.rand(min(INIT_CHUNK, rows - start), dim, generator=generator, device=device)
        weight[start : start + len(chunk)] = chunk.mul_(2 * bound).sub_(bound).cpu()
    return weight


def read(weight: torch.Tensor, device: torch.device, *, staged: bool) -> int:
    """Every block of ``weight`` on ``device``, summed there (so each copy is waited for)."""
    blocks = (
        blocks_to_device(weight, device, INIT_CHUNK)
        if staged
        else (weight[start : start + INIT_CHUNK].to(device) for start in range(0, len(weight), INIT_CHUNK))
    )
    total = torch.zeros((), device=device)
    for block in blocks:
        total += block[:, 0].sum()
    return int(total.abs() >= 0)


def main() -> None:
    args = parse_args()
    rows_made_read_and_moved(args)  # its rows freed before the updates' own
    row_updates(args.rows, args.dim, args.step_rows, args.reps)


def rows_made_read_and_moved(args: argparse.Namespace) -> None:
    """The rows drawn into host memory and read to the device each way, then a step's rows moved each way."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gigabytes = args.rows * args.dim * 4 / 1e9
    print(f"{args.rows:,} rows of D {args.dim} ({gigabytes:.2f} GB), drawn on {device}\n")
    print("| what | way | seconds | GB/s |")
    print("|---|---|---|---|")

    def row(what: str, way: str, seconds: float) -> None:
        print(f"| {what} | {way} | {seconds:.2f} | {gigabytes / seconds:.1f} |", flush=True)

    store, seconds = timed(lambda: LocalRows(args.rows, args.dim, draw_device=device, seed=0))
    row("draw into host memory", "through a page-locked buffer (the host store)", seconds)
    sample = store.weight[:: max(1, args.rows // 1000)].clone()
    if not args.quick:
        for pinned, way in ((False, "plain copy into pageable memory"), (True, "rows pinned whole")):
            if pinned and device.type != "cuda":
                continue
            weight, seconds = timed(lambda pinned=pinned: plain_draw(args.rows, args.dim, device, pinned))
            row("draw into host memory", way, seconds)
            assert torch.equal(weight[:: max(1, args.rows // 1000)], sample), "the draws differ"
            del weight
    for staged, way in ((True, "two page-locked buffers"), (False, "plain copy a block")):
        _, seconds = timed(lambda staged=staged: read(store.weight, device, staged=staged))
        row("read to the device", way, seconds)
    default = torch.get_num_threads()
    for threads in args.threads or [default]:
        torch.set_num_threads(threads)
        row_moves(store.weight, args.step_rows, args.reps)
    torch.set_num_threads(default)


def row_moves(weight: torch.Tensor, counts: list[int], reps: int) -> None:
    """A step's rows gathered and written back at random places of ``weight``, each way beside the plain."""
    print(f"\n{torch.get_num_threads()} torch threads\n")
    print("| rows a step | what | way | ms | GB/s |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    ways: dict[tuple[str, str], Callable[[torch.Tensor, torch.Tensor], object]] = {
        ("gather", "`index_select` (take_rows)"): lambda ids, values: take_rows(weight, ids),
        ("gather", "plain indexing"): lambda ids, values: weight[ids],
        ("write back", "put_rows_"): lambda ids, values: put_rows_(weight, ids, values),
        ("write back", "`index_put_` (indexing)"): lambda ids, values: weight.index_put_((ids,), values),
        ("write back", "`index_copy_`"): lambda ids, values: weight.index_copy_(0, ids, values),
        ("round to bf16", "numpy over threads (stochastic_round)"): lambda ids, values: stochastic_round(
            values.cpu(), seed=7
        ),
        ("round to bf16", "plain-torch reference"): lambda ids, values: reference_stochastic_round(
            values.cpu(), seed=7
        ),
    }
    for count in counts:
        sets = [torch.randperm(len(weight), generator=generator)[:count] for _ in range(reps + 1)]
        values = torch.randn(count, weight.shape[1], generator=generator)
        gigabytes = values.numel() * values.element_size() / 1e9
        rounded = reference_stochastic_round(values.cpu(), seed=7)
        for (what, way), move in ways.items():
            result = move(sets[0], values)  # warm-up
            if what == "round to bf16":
                assert torch.equal(result.view(torch.int16), rounded.view(torch.int16)), way
            times = []
            for ids in sets[1:]:
                begin = time.perf_counter()
                move(ids, values)
                times.append(time.perf_counter() - begin)
            if what == "write back":
                assert torch.equal(weight[sets[-1]], values), way
            seconds = statistics.median(times)
            rate = gigabytes / seconds
            print(f"| {count:,} | {what} | {way} | {1e3 * seconds:.2f} | {rate:.1f} |", flush=True)


def row_updates(num_rows: int, dim: int, counts: list[int], reps: int) -> None:
    """A step's whole update of host rows (gather, AdamW, write back), by how the rows are held and whether
    their weight average is kept."""
    print("\n| rows a step | rows held | row average | ms a step |")
    print("|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for held in ("float32", "bf16_sr"):
        for averaged in (False, True):
            rows = LocalRows(num_rows, dim, optimizer=RowOptimizerConfig(kind="adamw"), dtype=held)
            if averaged:
                rows.start_average(0.999)
            step = 0
            for count in counts:
                grads = torch.randn(count, dim, generator=generator)
                times = []
                for rep in range(reps + 1):
                    ids = torch.randperm(num_rows, generator=generator)[:count].sort().values
                    step += 1
                    begin = time.perf_counter()
                    rows.update_(ids, grads, lr=1e-3, step=step)
                    if rep:  # the first is a warm-up
                        times.append(time.perf_counter() - begin)
                median = 1e3 * statistics.median(times)
                print(f"| {count:,} | {held} | {'yes' if averaged else 'no'} | {median:.2f} |", flush=True)
            del rows


if __name__ == "__main__":
    main()
