"""The trainer's step with ``train.cuda_graph`` off and auto (the default), beside the head's captured step.

    python benchmarks/trainer_step.py              # C = 670,091, D 768, B 128, 300 steps a run (a GPU)
    python benchmarks/trainer_step.py --quick      # small sizes, runs on CPU as a smoke test (graph off)
    python benchmarks/trainer_step.py --heads selected --store host --classes 10000000 --dim 256
    python benchmarks/trainer_step.py --heads selected --store ps --classes 1000000 --dim 512 --batch 512
    python benchmarks/trainer_step.py --heads sparse --steps 160 --profile   # where a step's GPU time goes

For each head (dense, sparse, selected with the GPU index) the script writes a synthetic multi-class task
(:func:`megaclass.data.synthetic.synthesize`, one label a document), trains ``--steps`` steps through
:class:`~megaclass.train.Trainer` (an MLP encoder over the BoW features, the head, AdamW, one epoch with no
evaluation) and reads ``steps_per_s`` from the run's log: the median over the log windows after the first
(which holds compilation and capture). Beside it, the head's step alone replayed from a CUDA graph, built by
``benchmarks/sparse.py``'s and ``benchmarks/selected.py``'s case builders for the same shape (dense: the same
head and a fused AdamW step captured with the harness's ``cuda_graph``): the rest of a trainer step is the
encoder's forward and backward, its optimizer's step and the host's work between them. With ``auto`` the
trainer captures the MLP encoder's forward and backward with the head's
(:class:`~megaclass.train.graphs.StepGraph`) where the head's step can be captured, and runs eagerly where it
cannot (the opening line of the run says which). After the epoch, the same steps without the trainer's loader
and log, and the captured step replayed with only the GPU work a step adds to it (:func:`same_work_ms`): what
the trainer's own host work costs. ``--store ps`` keeps the selected head's rows in 4 parameter-server shard
processes on this machine, started afresh for each run (the index stays on the trainer, the default): its step
is not captured, so it has no head graph step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selected as selected_bench  # noqa: E402
import sparse as sparse_bench  # noqa: E402
from _harness import cuda_graph, shard_processes, synchronize, time_fn  # noqa: E402
from megaclass.data.synthetic import SynthConfig, synthesize  # noqa: E402
from megaclass.heads import HeadContext, build_head, head_config  # noqa: E402
from megaclass.train import Trainer, load_config  # noqa: E402

HEADS = ("dense", "sparse", "selected")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, runs on CPU as a smoke test")
    parser.add_argument(
        "--heads", default=",".join(HEADS), help="comma-separated subset of dense,sparse,selected"
    )
    parser.add_argument("--classes", type=int, default=670_091, help="C")
    parser.add_argument("--dim", type=int, default=768, help="D, the encoder's output width")
    parser.add_argument("--batch", type=int, default=128, help="B")
    parser.add_argument("--steps", type=int, default=300, help="trainer steps per run")
    parser.add_argument("--log-every", type=int, default=25, help="steps per log window (one steps/s each)")
    parser.add_argument("--features", type=int, default=50_000, help="BoW vocabulary of the synthetic task")
    parser.add_argument("--fan-in", type=int, default=32, help="sparse head: K")
    parser.add_argument("--group", type=int, default=16, help="sparse head: G")
    parser.add_argument("--sample-num", type=int, default=1000, help="selected head: active classes a step")
    parser.add_argument(
        "--store",
        default="gpu",
        choices=["gpu", "host", "ps"],
        help="selected head: where its rows live (ps: 4 local shard processes)",
    )
    parser.add_argument(
        "--store-dtype",
        default="float32",
        choices=["float32", "bf16_sr"],
        help="selected head: its rows and row-optimizer state in float32 or bf16 (head.store_dtype)",
    )
    parser.add_argument("--reps", type=int, default=50, help="timed replays of the head-only graph step")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each auto run, a second epoch under torch.profiler: the GPU's busy time a step and the "
        "kernels that fill it",
    )
    return parser.parse_args()


def head_overrides(head: str, args: argparse.Namespace, store: str) -> list[str]:
    """The trainer's head settings, the shapes the head benchmarks use; ``store`` the selected head's."""
    if head == "sparse":
        return [f"head.fan_in={args.fan_in}", f"head.group={args.group}", "head.aux_clusters=0"]
    if head == "selected":
        return [
            "head.index=gpu",
            f"head.sample_num={args.sample_num}",
            f"head.store={store}",
            f"head.store_dtype={args.store_dtype}",
        ]
    return ["head.loss=softmax"]


def write_task(folder: str, args: argparse.Namespace) -> tuple[str, str]:
    """A multi-class task of exactly ``steps`` full batches, and a small test file the trainer opens."""
    paths = (os.path.join(folder, "train.txt"), os.path.join(folder, "test.txt"))
    for stream, (path, docs) in enumerate(zip(paths, (args.steps * args.batch, 64), strict=True)):
        synthesize(
            path,
            num_docs=docs,
            num_labels=args.classes,
            num_features=args.features,
            seed=0,
            stream=stream,
            config=SynthConfig(labels_per_doc=1),
        )
    return paths


def trainer_steps_per_s(
    task: tuple[str, str], out: str, head: str, graph: str, args
) -> tuple[float, float, float, float]:
    """Median steps/s of the log windows after the first, over one epoch of ``steps`` steps, the first
    window's seconds (it holds the first step: an index's cold build, compilation, capture), and after the
    epoch the ms a step of :func:`same_work_ms`'s two loops (with ``--store ps``, against fresh shards)."""
    if head != "selected" or args.store != "ps":
        return trainer_run(task, out, head, graph, args, args.store)
    with shard_processes(4, classes=args.classes, dim=args.dim, root=os.path.dirname(out)) as addresses:
        return trainer_run(task, out, head, graph, args, "ps://" + ",".join(addresses))


def trainer_run(
    task: tuple[str, str], out: str, head: str, graph: str, args, store: str
) -> tuple[float, float, float, float]:
    """:func:`trainer_steps_per_s` of one run, the selected head's rows in ``store``."""
    overrides = [
        f"model.hidden=[{args.dim}]",
        f"train.batch_size={args.batch}",
        f"train.log_every={args.log_every}",
        f"train.cuda_graph={graph}",
        "train.epochs=1",
        "train.valid_fraction=0",
        "train.progress=false",
        "data.label_feature_dim=0",
        *head_overrides(head, args, store),
    ]
    config = load_config(head=head, overrides=overrides)
    trainer = Trainer(config, train_path=task[0], test_path=task[1], out_dir=out, overwrite=True)
    trainer.setup()
    try:
        trainer.train_epoch(0)  # the steps only: no evaluation, no checkpoint
        with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as file:
            rates = [record["steps_per_s"] for record in map(json.loads, file) if record["kind"] == "train"]
        step_ms, replay_ms = same_work_ms(trainer, args.steps)
        if args.profile and graph == "auto":
            print(profile_epoch(trainer, args.steps), flush=True)
    finally:
        trainer.close()
    return statistics.median(rates[1:] or rates), args.log_every / rates[0], step_ms, replay_ms


def same_work_ms(trainer: Trainer, steps: int) -> tuple[float, float]:
    """Ms a step over ``steps`` steps on the epoch's first batches, already on the device and taken in
    turn: of the trainer's ``train_step`` (a step without the loader and the log), and of its captured whole
    step replayed with what else a step runs on the GPU (the optimizers' steps, the head's ``after_step``: a
    sampled head's row updates and index rebuilds) and almost no host work between the steps (NaN where the
    whole step was not captured). Both run past the run's last step, where a sparse head no longer rewires."""
    batches = [batch.to(trainer.device) for batch in itertools.islice(trainer.loader.epoch(0), 50)]
    graph, optimizers = trainer.step_graph, [opt for opt in trainer.optimizers.values() if opt is not None]
    head_optimizer = trainer.optimizers["head"]
    head_lr = head_optimizer.param_groups[0]["lr"] if head_optimizer else trainer.config.optim.head.lr
    step = trainer.state.global_step

    def replay(batch) -> None:
        nonlocal step
        graph.run(batch.inputs, batch.targets)
        for optimizer in optimizers:
            optimizer.step()
        step += 1
        trainer.head.after_step(step, 1.0, lr=head_lr)

    loops = [(trainer.train_step, batches)]
    if graph is not None and graph.encoder is not None and graph.replays:
        loops.append((replay, [batch for batch in batches if graph.fits(batch.targets, batch.inputs)]))
    times = []
    for run, taken in loops:
        for batch in taken[:3]:
            run(batch)
        synchronize()
        start = time.perf_counter()
        for i in range(steps):
            run(taken[i % len(taken)])
        synchronize()
        times.append((time.perf_counter() - start) * 1e3 / steps)
    return times[0], times[1] if len(times) > 1 else float("nan")


def profile_epoch(trainer: Trainer, steps: int) -> str:
    """The epoch's steps again under ``torch.profiler`` (steady state: captured, compiled, built): the GPU's
    busy time a step (its kernels' time summed) and the kernels that take most of it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    trainer.state.step_in_epoch = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        trainer.train_epoch(0)
        torch.cuda.synchronize()
    events = profiler.key_averages()
    kernels = [  # the GPU's own events: not the host ops that launched them, nor annotated ranges
        event for event in events if event.device_type == DeviceType.CUDA and not event.is_user_annotation
    ]
    busy_ms = sum(event.self_device_time_total for event in kernels) / 1e3 / steps
    table = events.table(sort_by="self_cuda_time_total", row_limit=12)
    return f"GPU busy {busy_ms:.2f} ms a step (kernels' time summed)\n{table}"


def dense_graph_step(args: argparse.Namespace) -> Callable[[], None]:
    """The dense head's step on one batch (forward, backward and a fused AdamW step, what the trainer runs for
    it), captured with the harness's ``cuda_graph``."""
    config = head_config({"type": "dense", "loss": "softmax"})
    head = build_head(config, HeadContext(args.dim, args.classes, multilabel=False)).to("cuda")
    features = torch.randn(args.batch, args.dim, device="cuda", requires_grad=True)
    targets = torch.randint(args.classes, (args.batch,), device="cuda")
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, fused=True, capturable=True)

    def step() -> None:
        features.grad = None
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = head(features, targets)
        loss.backward()
        optimizer.step()

    return cuda_graph(step)


def head_graph_ms(head: str, args: argparse.Namespace) -> float:
    """Median ms of the head's step alone, replayed from a CUDA graph (the head benchmarks' graph rows)."""
    if head == "dense":
        replay = dense_graph_step(args)
    elif head == "sparse":
        setup, _ = sparse_bench.megaclass_case(
            "step", args.batch, args.classes, args.dim, args.fan_in, args.group, 1, "softmax", graph=True
        )
        replay = setup()
    elif args.store == "ps":
        print("selected head's step not captured: its rows are pulled from parameter servers", flush=True)
        return float("nan")
    else:
        built = selected_bench.make_head(
            "selected", args.classes, args.dim, sample_num=args.sample_num, store=args.store
        )
        blocker = built.capture_blocker(targets_static=True)
        if blocker is not None:  # e.g. host rows CUDA would not lock: they are gathered on the host
            print(f"selected head's step not captured: {blocker}", flush=True)
            return float("nan")
        replay = selected_bench.head_step_case({}, lambda: built, args.batch, graph=True)()
    return time_fn(replay, reps=args.reps, warmup=3)[0]


def main() -> None:
    args = parse_args()
    if args.quick:
        args.classes, args.dim, args.batch, args.steps, args.log_every = 5_003, 64, 32, 40, 10
        args.features, args.fan_in, args.group, args.sample_num = 2_000, 8, 1, 256
    cuda = torch.cuda.is_available()
    graphs = ("off", "auto") if cuda else ("off",)  # auto: what a run gets by default
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"C {args.classes}, D {args.dim}, B {args.batch}, {args.steps} steps a run, {args.log_every} a log "
        f"window, selected head's rows: {args.store} store, {device}\n"
    )
    print(
        "| head | train.cuda_graph | trainer steps/s | trainer ms/step | first log window s "
        "| train_step on device batches ms | captured step replayed ms | head graph step ms |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        task = write_task(folder, args)
        for head in args.heads.split(","):
            graph_ms = head_graph_ms(head, args) if cuda else float("nan")
            for graph in graphs:
                out = os.path.join(folder, f"{head}-{graph}")
                rate, first_s, step_ms, replay_ms = trainer_steps_per_s(task, out, head, graph, args)
                print(
                    f"| {head} | {graph} | {rate:.1f} | {1e3 / rate:.2f} | {first_s:.2f} | {step_ms:.2f} "
                    f"| {replay_ms:.2f} | {graph_ms:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
