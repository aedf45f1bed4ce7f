"""Class-sharded heads over the GPUs of one host: samples/s and peak memory per GPU, one command.

    torchrun --nproc-per-node 2 benchmarks/distributed.py            # face, XMC and largest-C runs
    torchrun --nproc-per-node 1 benchmarks/distributed.py --runs single   # world size 1 vs the plain head
    python benchmarks/distributed.py --quick                          # CPU smoke run (also under torchrun)

Runs (``--runs``, comma separated):

- ``face``: D 512, B 512 per GPU, IResNet-50 on synthetic 112x112 images, bf16 autocast; the class-sharded
  dense head and the sharded selected head (sample_num 10% of C) at C = 10^6 and 10^7, beside DDP with a
  replicated ``nn.Linear`` + cross-entropy (``OOM`` where it does not fit);
- ``xmc``: D 768, B 128 per GPU of random features (the encoder is left out: the head is measured), the
  sharded dense head and the sharded sparse head (fan-in 32, groups of 16) at C = 2,812,281;
- ``largest``: the selected head with host-memory rows at ``--largest-classes`` classes (D 512; by default
  2 x 10^7 per rank: rows and their momentum take ~82 GB of host memory per rank);
- ``single``: the sharded dense head with world size 1 against the plain dense head, same shapes (their step
  times should be within 3%).

Rank 0 prints a markdown table and appends CSV rows (``--csv``). Times: median and 20/80% quantiles of the
step over ``--steps`` steps after warm-up; memory: ``torch.cuda.max_memory_allocated`` on each rank, max.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megaclass.distributed.info import DistInfo, init_distributed, shutdown_distributed
from megaclass.heads import head_config
from megaclass.heads.base import ClassShard, HeadContext
from megaclass.heads.dense import DenseHead, DenseHeadConfig
from megaclass.heads.selected import SelectedHead
from megaclass.ops.collectives import all_reduce_max
from megaclass.targets import as_ragged


@dataclass
class Row:
    run: str
    head: str
    classes: int
    world: int
    batch_per_rank: int
    step_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    samples_per_s: float = float("nan")
    peak_mem_gib: float = float("nan")
    head_state_gib: float = float(
        "nan"
    )  # the rank's head: weights and structure (ShardedSelected: local head)
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        torch.distributed.barrier()


def _max_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.distributed:
        return value
    return float(all_reduce_max(torch.tensor([value], dtype=torch.float64, device=device)))


def _time_steps(
    step: Callable[[], None], *, steps: int, warmup: int, info: DistInfo, device: torch.device
) -> list:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _barrier(info)
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        times.append(_max_over_ranks(time.perf_counter() - started, info, device))  # the slowest rank's step
    return times


def _encoder(kind: str, dim: int, device: torch.device, info: DistInfo) -> tuple[nn.Module, Callable]:
    """The encoder (DDP-wrapped on several ranks) and a function making one per-rank input batch."""
    if kind == "iresnet50":
        from megaclass.models.iresnet import IResNet, IResNetConfig

        module = IResNet(IResNetConfig(embedding_size=dim, flip=False)).to(device)
        make = lambda batch: torch.randn(batch, 3, 112, 112, device=device)  # noqa: E731
    elif kind == "tiny":
        module = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, dim)).to(device)
        make = lambda batch: torch.randn(batch, 3, 8, 8, device=device)  # noqa: E731
    else:  # features straight into the head
        module = nn.Identity()
        make = lambda batch: torch.randn(batch, dim, device=device, requires_grad=True)  # noqa: E731
    if info.distributed and any(True for _ in module.parameters()):
        device_ids = [device.index] if device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    return module, make


class _ReplicatedLinear(nn.Module):
    """The baseline a user writes: a replicated ``nn.Linear`` and cross-entropy, under DDP."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.fc(features).float(), targets)


def _head(name: str, dim: int, classes: int, device: torch.device, info: DistInfo) -> nn.Module:
    if name == "sharded-sparse":  # its topology is drawn by CPU generators
        from megaclass.heads.sparse import SparseHead, SparseHeadConfig

        context = HeadContext(in_features=dim, num_classes=classes, multilabel=True)
        shard = ClassShard.for_rank(classes, info.rank, info.world_size)
        return SparseHead(SparseHeadConfig(fan_in=32, group=16), context, shard).to(device)
    with torch.device(device):  # rows drawn where they live
        return _build_head(name, dim, classes, device, info)


def _build_head(name: str, dim: int, classes: int, device: torch.device, info: DistInfo) -> nn.Module:
    context = HeadContext(in_features=dim, num_classes=classes, multilabel=False)
    shard = ClassShard.for_rank(classes, info.rank, info.world_size)
    if name == "sharded-dense":
        return DenseHead(DenseHeadConfig(bias=False), context, shard).to(device)
    if name == "plain-dense":
        return DenseHead(DenseHeadConfig(bias=False), context).to(device)
    if name.startswith("sharded-selected"):
        store = "host" if name.endswith("host") else "gpu"
        index = "gpu" if device.type == "cuda" else "exact"
        config = head_config(
            {"type": "selected", "sample_num": max(classes // 10, 1), "index": index, "store": store,
             "coverage_every": 0}
        )  # fmt: skip
        return SelectedHead(config, context, shard).to(device)
    head = _ReplicatedLinear(dim, classes).to(device)
    if info.distributed:
        head = nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None
        )
    return head


def measure(row: Row, *, encoder_kind: str, dim: int, args: Any, info: DistInfo, device: torch.device) -> Row:
    """Fill ``row`` with the step time and memory of one (encoder, head) training step."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        encoder, make_input = _encoder(encoder_kind, dim, device, info)
        head = _head(row.head, dim, row.classes, device, info)
        params = [p for p in (*encoder.parameters(), *head.parameters()) if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9) if params else None
        inputs = make_input(row.batch_per_rank)
        targets = torch.randint(0, row.classes, (row.batch_per_rank,), device=device)
        if row.head == "sharded-sparse":  # multi-label: one label per sample, as ragged targets
            targets = as_ragged(targets)
        after_step = getattr(head, "after_step", None)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step() -> None:
            with autocast:
                loss = head(encoder(inputs), targets)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if isinstance(head, SelectedHead):  # pushes the rows' gradients to the store
                after_step(1, 0.0, lr=0.01)

        times = _time_steps(step, steps=args.steps, warmup=args.warmup, info=info, device=device)
    except torch.OutOfMemoryError:
        row.note = "OOM"
        return row
    times.sort()
    module = getattr(head, "module", head)
    module = getattr(module, "local", module)
    store = getattr(module, "store", None)
    if store is not None:  # the selected head's rows live in its store (GPU or host memory)
        row.head_state_gib = store.rows().numel() * store.rows().element_size() / 2**30
    elif hasattr(module, "state_bytes"):
        row.head_state_gib = sum(module.state_bytes().values()) / 2**30
    else:
        row.head_state_gib = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30
    row.step_ms = statistics.median(times) * 1e3
    row.p20_ms = times[int(0.2 * (len(times) - 1))] * 1e3
    row.p80_ms = times[int(0.8 * (len(times) - 1))] * 1e3
    row.samples_per_s = row.batch_per_rank * info.world_size / statistics.median(times)
    if device.type == "cuda":
        row.peak_mem_gib = _max_over_ranks(torch.cuda.max_memory_allocated(device) / 2**30, info, device)
    return row


def plan(args: Any, info: DistInfo) -> list[tuple[Row, str, int]]:
    """``(row, encoder kind, D)`` of every measurement the chosen runs make."""
    quick, world = args.quick, info.world_size
    face_encoder = "tiny" if quick else "iresnet50"
    face_batch = 8 if quick else 512
    face_classes = [1000, 4000] if quick else [10**6, 10**7]
    out = []
    for name in args.runs.split(","):
        if name == "face":
            for classes in face_classes:
                for head in ("sharded-dense", "sharded-selected", "ddp-linear"):
                    out.append(
                        (Row("face", head, classes, world, face_batch), face_encoder, 64 if quick else 512)
                    )
        elif name == "xmc":
            classes, batch = (3001, 8) if quick else (2_812_281, 128)
            for head in ("sharded-dense", "sharded-sparse"):
                out.append((Row("xmc", head, classes, world, batch), "features", 96 if quick else 768))
        elif name == "largest":
            classes = 5000 if quick else args.largest_classes or 20_000_000 * world
            row = Row("largest", "sharded-selected-host", classes, world, 8 if quick else 512)
            out.append((row, face_encoder, 64 if quick else 512))
        elif name == "single":
            if world > 1:
                continue  # the check is the sharded path's cost at world size 1
            classes, batch = (2000, 16) if quick else (10**6, 512)
            for head in ("plain-dense", "sharded-dense"):
                out.append((Row("single", head, classes, world, batch), "features", 64 if quick else 512))
        else:
            raise SystemExit(f"--runs: unknown run {name!r}; known: face, xmc, largest, single")
    return out


def report(rows: list[Row], args: Any) -> None:
    columns = list(Row.__dataclass_fields__)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        values = [getattr(row, name) for name in columns]
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values) + " |")
    single = {row.head: row.step_ms for row in rows if row.run == "single"}
    if len(single) == 2:
        print(
            f"sharded / plain step time at world size {rows[0].world}: "
            f"{single['sharded-dense'] / single['plain-dense']:.3f}"
        )
    if args.csv:
        from _harness import environment  # benchmarks/ is on the path of a script run from it

        env = environment()
        fresh = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            if fresh:
                writer.writerow([*columns, *env])
            for row in rows:
                writer.writerow([*(getattr(row, name) for name in columns), *env.values()])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--runs", default="face,xmc,largest,single", help="comma-separated runs")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--largest-classes", type=int, default=0, help="C of the largest run (0: 2 x 10^7 per rank)"
    )
    parser.add_argument("--csv", default="", help="append CSV rows here (rank 0)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = min(args.steps, 3), 1
    info = DistInfo.from_env()
    device = init_distributed(
        info, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), timeout_s=300
    )
    rows = []
    for row, encoder_kind, dim in plan(args, info):
        rows.append(measure(row, encoder_kind=encoder_kind, dim=dim, args=args, info=info, device=device))
        if info.is_main:
            print(f"{row.run} {row.head} C={row.classes}: {row.step_ms:.1f} ms {row.note}", flush=True)
    if info.is_main:
        report(rows, args)
    shutdown_distributed()


if __name__ == "__main__":
    main()
