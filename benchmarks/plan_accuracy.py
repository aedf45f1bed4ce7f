"""The memory plan (``megaclass train --dry-run``) against what the run then holds, at several scales.

    python benchmarks/plan_accuracy.py                                  # a GPU: 10^5, 10^6, 4x10^6 classes
    python benchmarks/plan_accuracy.py --classes 100000 1000000 --head dense
    python benchmarks/plan_accuracy.py --quick                          # small sizes, CPU, a smoke test
    python benchmarks/plan_accuracy.py --rewiring --classes 1000000     # a sparse head's rewiring alone
    python benchmarks/plan_accuracy.py --head sparse --classes 100000 --holders   # who holds the GPU peak

For each class count the script writes a synthetic multi-class task
(:func:`megaclass.data.synthetic.synthesize`) and runs, in a child process of its own, first the plan of
``megaclass train --head H`` on it (:func:`~megaclass.train.plan.plan_for`, resolved as the command resolves
it), then the run itself (one epoch: training, evaluation, the checkpoint). The child reports:

- GPU: the plan's peak against the allocator's peak (``torch.cuda.max_memory_allocated``) plus the CUDA
  context (the device memory in use once CUDA is initialised, before any tensor); the allocator's reserved
  peak beside it;
- host: the plan's peak, every part, against the process's peak resident set (``VmHWM``), with the resident
  set once PyTorch (and CUDA) are loaded beside it (the measured start of what the plan counts as the
  interpreter, PyTorch and the CUDA runtime); and the plan's peak less the process's libraries (and the CUDA
  runtime) against the peak of the C heap's bytes in use
  (:class:`~_harness.HeapPeak`, CPU runs: on a GPU its reading after every op would stand in the way of the
  step's CUDA graph): the resident set holds, beside those, the freed memory the C allocator keeps for its
  next allocations (the more so with a build in a thread of its own);
- the host peak within each of the trainer's phases (setup, the epoch's steps, evaluation, checkpoint, the
  best weights, the run's end), to find where a peak comes from, and on a GPU the page-locked memory held
  at the phases' edges;
- with ``--holders`` (a GPU), the blocks live at the allocator's peak before the first evaluation and over
  the whole run, summed by the line of this project's code that allocated them, or the autograd node for
  the backward's (the allocator's trace, ``torch.cuda.memory._record_memory_history``, replayed).

Each run's log goes to stderr as it comes, each line stamped with its class count and the seconds since the
run started; each class count's details go to stderr as soon as its run ends, and all of them under the table
at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import HeapPeak, process_memory, reset_peak_memory, unwind_on_terminate  # noqa: E402
from megaclass.data.synthetic import SynthConfig, synthesize  # noqa: E402

_GIB = 1 << 30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, runs on CPU as a smoke test")
    parser.add_argument("--classes", type=int, nargs="+", help="class counts (default 10^5 10^6 4x10^6)")
    parser.add_argument("--head", default="selected", choices=["dense", "sparse", "selected"])
    parser.add_argument("--docs", type=int, default=50_000, help="training documents of each task")
    parser.add_argument("--features", type=int, default=50_000, help="BoW vocabulary of each task")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more train settings")
    parser.add_argument(
        "--rewiring",
        action="store_true",
        help="instead: a sparse head's rewiring alone, its scratch against the plan's part, at K 8 to 64 and "
        "G 1 and 16 (the first class count)",
    )
    parser.add_argument(
        "--holders",
        action="store_true",
        help="on a GPU: the blocks live at the peaks by the line that allocated them (slower runs)",
    )
    parser.add_argument("--child", nargs=3, metavar=("TRAIN", "TEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.holders and not torch.cuda.is_available():
        parser.error("--holders reads the GPU allocator's trace: it needs a GPU")
    if args.quick:
        args.classes = args.classes or [500, 2_000]
        args.docs, args.features = 2_000, 2_000
    args.classes = args.classes or [100_000, 1_000_000, 4_000_000]
    return args


# the trainer's methods whose resident peaks are told apart (nested ones count in their callers too)
_PHASES = ("setup", "train_epoch", "evaluate", "save_checkpoint", "_save_best", "_finish_run")


class PhasePeaks:
    """The process's peak resident set within each of the trainer's :data:`_PHASES` and over the whole run:
    ``VmHWM`` read and started again at every edge of a phase, each reading given to the phases open since
    the last edge; on a GPU also the page-locked host memory torch holds (its pinned-memory cache included)
    at the phases' edges, and the allocator's peak within each phase (plus ``context``, the CUDA context)."""

    def __init__(self, context: int = 0) -> None:
        self.peaks: dict[str, int] = {}
        self.pinned: dict[str, int] = {}
        self.gpu: dict[str, int] = {}
        self.gpu_overall = self.gpu_reserved = 0
        self._context = context
        self.overall = 0
        self._open: list[str] = []

    def watch(self, cls: type) -> None:
        """Wrap ``cls``'s methods of :data:`_PHASES`."""
        for name in _PHASES:
            setattr(cls, name, self._wrapped(name, getattr(cls, name)))

    def edge(self) -> None:
        peak = process_memory("VmHWM")
        pinned = _pinned_bytes()
        gpu = self._context + torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        self.overall = max(self.overall, peak)
        for name in self._open:
            self.peaks[name] = max(self.peaks.get(name, 0), peak)
            if pinned is not None:
                self.pinned[name] = max(self.pinned.get(name, 0), pinned)
            if gpu is not None:
                self.gpu[name] = max(self.gpu.get(name, 0), gpu)
        reset_peak_memory()
        if gpu is not None:
            self.gpu_overall = max(self.gpu_overall, gpu)
            self.gpu_reserved = max(self.gpu_reserved, self._context + torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()

    def _wrapped(self, name: str, method: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.edge()
            self._open.append(name)
            try:
                return method(*args, **kwargs)
            finally:
                self.edge()
                self._open.pop()

        return wrapped


def _pinned_bytes() -> int | None:
    """Page-locked host bytes torch's allocator holds, in use or cached; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.memory.host_memory_stats().get("allocated_bytes.current")


def run_child(command: list[str], name: str) -> tuple[int, str, str]:
    """Run a child, its stderr (the run's log) passed to ours as it comes, each line stamped with ``name`` and
    the seconds since the start (a run cut off by a time limit still says where it was); returns its exit
    code, its last stderr line and its stdout."""
    started = time.perf_counter()
    last = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None and process.stdout is not None
        try:
            for line in process.stderr:  # the child's stdout is one JSON line: its pipe never fills meanwhile
                if line.strip():
                    last = line.strip()
                    stamp = f"[{name}, {time.perf_counter() - started:.0f} s]"
                    print(f"{stamp} {last}", file=sys.stderr, flush=True)
            output = process.stdout.read()
        except BaseException:  # interrupted or terminated: the run stops with us, not holding the GPU on
            process.kill()
            raise
    return process.returncode, last, output


def child(args: argparse.Namespace) -> None:
    """Plan, then run, one task; prints one JSON line of planned and measured peaks."""
    from megaclass.train.config import load_config_and_keys
    from megaclass.train.loop import Trainer, train
    from megaclass.train.plan import plan_for
    from megaclass.train.recipes import resolve_recipe

    train_path, test_path, out = args.child
    cuda = torch.cuda.is_available()
    context = 0
    if cuda:
        torch.zeros(1, device="cuda")  # initialises CUDA: the context, cuBLAS is loaded later by the run
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
    overrides = ["train.epochs=1", "train.progress=false", *args.overrides]
    config, keys = load_config_and_keys(None, overrides, head=args.head)
    plan = plan_for(
        config,
        train_path,
        other_paths=(test_path,),
        resolve=lambda config, facts: resolve_recipe(config, keys, facts)[0],
    )
    allocations = plan_without(plan, "interpreter and PyTorch", "libraries a run loads", "CUDA runtime")
    gpu_line = f"GPU {plan.peak(0)[0] / _GIB:.2f} GiB, " if cuda else ""
    print(f"planned: {gpu_line}host {plan.peak(1)[0] / _GIB:.2f} GiB; the run starts", file=sys.stderr)
    phases = PhasePeaks(context)
    phases.watch(Trainer)
    reset_peak_memory()  # the peak resident set from here on
    start = process_memory("VmRSS")
    heap = None if cuda else HeapPeak()
    if cuda and args.holders:
        # C++ frames too: autograd's backward allocates on a thread without Python frames
        torch.cuda.memory._record_memory_history(stacks="all", max_entries=_TRACE_ENTRIES)
    with heap or contextlib.nullcontext(), contextlib.redirect_stdout(sys.stderr):  # stdout: the row alone
        train(
            config,
            train_path=train_path,
            test_path=test_path,
            out_dir=out,
            overwrite=True,
            explicit_keys=keys,
        )
    phases.edge()
    holders = {}
    if cuda and args.holders:
        holders = peak_holders(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
        torch.cuda.memory._record_memory_history(enabled=None)
    row = {
        "planned_gpu": plan.peak(0)[0] if cuda else 0,
        "planned_gpu_phase": plan.peak(0)[1] if cuda else "",
        "planned_host": plan.peak(1)[0],
        "planned_host_phase": plan.peak(1)[1],
        "planned_host_allocated": allocations.peak(1)[0],
        "gpu": phases.gpu_overall,
        "gpu_reserved": phases.gpu_reserved,
        "host": phases.overall,
        "host_phases": phases.peaks,
        "pinned_phases": phases.pinned,
        "gpu_phases": phases.gpu,
        "gpu_plan_parts": {f"{p.name} ({p.phase})": p.device_bytes for p in plan.parts if cuda},
        "host_start": start,
        "host_allocated": heap.peak if heap is not None else None,
        "holders": holders,
    }
    print(json.dumps(row), flush=True)


_TRACE_ENTRIES = 4_000_000  # allocator events kept (an epoch of a captured step makes some tens of thousands)
_HOLDERS_SHOWN = 25


def peak_holders(events: list[dict]) -> dict[str, list[str]]:
    """The blocks live at the largest sum of traced allocations before the first one made within the
    trainer's ``evaluate`` (``training``) and over all ``events`` (``overall``): a line each of the most
    bytes, by the innermost frame in this project's code (and its two callers there)."""
    live: dict[int, tuple[int, str]] = {}
    current, peaks, training = 0, {"training": (0, {}), "overall": (0, {})}, True
    for event in events:
        if event["action"] == "alloc":
            frames = event.get("frames", [])
            training = training and not any(frame["name"] == "evaluate" for frame in frames)
            live[event["addr"]] = (event["size"], _allocated_at(frames))
            current += event["size"]
            for name in ("training", "overall") if training else ("overall",):
                if current > peaks[name][0]:
                    peaks[name] = (current, dict(live))
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    shown = {}
    for name, (peak, blocks) in peaks.items():
        sizes: dict[str, list[int]] = {}
        for size, where in blocks.values():
            sizes.setdefault(where, []).append(size)
        ranked = sorted(sizes.items(), key=lambda item: -sum(item[1]))[:_HOLDERS_SHOWN]
        shown[name] = [f"{peak / _GIB:.3f} GiB traced at the peak"] + [
            f"{sum(found) / (1 << 20):10.1f} MiB in {len(found):5d} blocks: {where}"
            for where, found in ranked
        ]
    return shown


def _allocated_at(frames: list[dict]) -> str:
    """The innermost frame of this project's code, and its two callers there, as one line; without one,
    the autograd node that allocated (the backward's thread has no Python frames) or the innermost Python
    frame."""
    own = [frame for frame in frames if f"{os.sep}megaclass{os.sep}" in frame["filename"]]
    if not own:
        for frame in frames:
            node = re.search(r"\w+Backward\w*", frame["name"])
            if node:
                return f"backward: {node.group(0)}"
        python = [frame for frame in frames if frame["filename"].endswith(".py")]
        return f"{python[0]['filename']}:{python[0]['line']}" if python else "(no Python frame)"
    where = own[0]
    place = where["filename"].rsplit(f"{os.sep}megaclass{os.sep}", 1)[-1]
    callers = " < ".join(frame["name"] for frame in own[1:3])
    return f"{place}:{where['line']} {where['name']}" + (f" < {callers}" if callers else "")


def plan_without(plan: Any, *names: str) -> Any:
    """``plan`` without the parts ``names`` (its peaks computed again)."""
    return dataclasses.replace(plan, parts=tuple(part for part in plan.parts if part.name not in names))


def rewiring(classes: int) -> None:
    """A sparse head's rewiring (the first one's count of connections a row, and one), its peak beside the
    head and its optimizer state (the allocator's on a GPU, the C heap's on a CPU) against the plan's
    ``head rewiring`` part."""
    from megaclass.dst import rewiring_scratch_bytes
    from megaclass.heads import HeadContext, build_head, head_config

    cuda = torch.cuda.is_available()
    print(f"sparse head's rewiring, {classes:,} labels, {torch.cuda.get_device_name() if cuda else 'cpu'}\n")
    print("| K | G | connections a row | planned MiB | measured MiB | plan / measured |")
    print("|---|---|---|---|---|---|", flush=True)
    for fan_in, group in ((8, 1), (8, 16), (32, 1), (32, 16), (64, 1), (64, 16)):
        config = head_config(
            {"type": "sparse", "fan_in": fan_in, "group": group, "intermediate": 1024, "aux_clusters": 0}
        )
        head = build_head(config, HeadContext(1024, classes, multilabel=True)).to("cuda" if cuda else "cpu")
        optimizer = torch.optim.AdamW(head.parameters())
        head.bind_optimizer(optimizer, total_steps=10_000)
        for parameter in head.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()  # the moments the rewiring resets
        for count in (round(config.dst.fraction * fan_in), 1):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                head.rewire(count)
                torch.cuda.synchronize()
                measured = torch.cuda.max_memory_allocated() - before
            else:
                with HeapPeak() as heap:
                    head.rewire(count)
                measured = heap.peak or 0
            planned = rewiring_scratch_bytes(classes, fan_in, group, count)
            ratio = f"{planned / measured:.2f}" if measured else "-"
            sizes = f"{planned / 2**20:.1f} | {measured / 2**20:.1f}"
            print(f"| {fan_in} | {group} | {count} | {sizes} | {ratio} |", flush=True)
        del head, optimizer


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    unwind_on_terminate()  # a killed run stops its child run and removes its task files
    if args.rewiring:
        rewiring(args.classes[0])
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{args.head} head, {args.docs:,} documents, {args.features:,} features, one epoch, {device}\n")
    print(
        "| classes | GPU planned GiB | GPU measured GiB (reserved) | plan / measured "
        "| host planned GiB | host measured GiB (at start) | plan / measured | host allocated GiB "
        "| plan / allocated |"
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    by_phase = []
    with tempfile.TemporaryDirectory() as folder:
        for classes in args.classes:
            paths = [os.path.join(folder, f"{classes}-{part}.txt") for part in ("train", "test")]
            for stream, (path, docs) in enumerate(zip(paths, (args.docs, 1_000), strict=True)):
                synthesize(
                    path,
                    num_docs=docs,
                    num_labels=classes,
                    num_features=args.features,
                    stream=stream,
                    config=SynthConfig(labels_per_doc=1),
                )
            command = [sys.executable, __file__, "--head", args.head, "--child", *paths, f"{folder}/run"]
            command += ["--holders"] if args.holders else []
            command += [item for setting in args.overrides for item in ("--set", setting)]
            returncode, last_line, output = run_child(command, f"{classes:,} classes")
            if returncode != 0:
                print(f"| {classes:,} | failed: {last_line} |||||||", flush=True)
                continue
            row = json.loads(output.strip().splitlines()[-1])

            def ratio(planned: int, measured: int) -> str:
                return f"{planned / measured:.2f}" if measured else "-"

            allocated = "-" if row["host_allocated"] is None else f"{row['host_allocated'] / _GIB:.2f}"

            print(
                f"| {classes:,} | {row['planned_gpu'] / _GIB:.2f} ({row['planned_gpu_phase'] or '-'}) "
                f"| {row['gpu'] / _GIB:.2f} ({row['gpu_reserved'] / _GIB:.2f}) "
                f"| {ratio(row['planned_gpu'], row['gpu'])} "
                f"| {row['planned_host'] / _GIB:.2f} ({row['planned_host_phase']}) "
                f"| {row['host'] / _GIB:.2f} ({row['host_start'] / _GIB:.2f}) "
                f"| {ratio(row['planned_host'], row['host'])} "
                f"| {allocated} | {ratio(row['planned_host_allocated'], row['host_allocated'] or 0)} |",
                flush=True,
            )
            details = [
                f"{classes:,} classes: "
                + ", ".join(f"{name} {peak / _GIB:.2f}" for name, peak in row["host_phases"].items())
            ]
            if row["gpu_phases"]:
                details.append(
                    "  GPU peak by phase: "
                    + ", ".join(f"{name} {size / _GIB:.2f}" for name, size in row["gpu_phases"].items())
                )
                details.append(
                    "  GPU plan by part: "
                    + ", ".join(f"{name} {size / _GIB:.3f}" for name, size in row["gpu_plan_parts"].items())
                )
            if row["pinned_phases"]:
                details.append(
                    "  of it page-locked at the phase's edges: "
                    + ", ".join(f"{name} {size / _GIB:.2f}" for name, size in row["pinned_phases"].items())
                )
            for name, lines in row["holders"].items():
                details.append(
                    f"  GPU blocks live at the {name} peak by where they were allocated: {lines[0]}"
                )
                details += [f"    {line}" for line in lines[1:]]
            print("\n".join(details), file=sys.stderr, flush=True)  # kept if a later class count is cut off
            by_phase += details
    print("\nmeasured host peak GiB by the trainer's phase (a phase's callees in it too):")
    print("\n".join(by_phase))


if __name__ == "__main__":
    main()
