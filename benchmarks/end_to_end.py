"""A run end to end through the command line at one or more class counts: synthesise, plan, train, kill and
resume, evaluate, predict, export; each phase's wall time and peak host memory, the run's GPU peak and speed.

    python benchmarks/end_to_end.py --classes 10000000 100000000 --docs 300000 --out /dev/shm/e2e \\
        --set model.hidden=[32] head.store=gpu head.store_dtype=bf16_sr train.keep_checkpoints=1
    python benchmarks/end_to_end.py --quick                        # 10^4 classes on the CPU, a smoke run

Each phase is a ``python -m megaclass`` child process; its peak resident set is read from ``VmHWM`` while it
runs. Training uses ``--head selected`` for one epoch (the ``--set`` overrides are added) with
``train.checkpoint_every`` steps: the first run is killed (``SIGKILL``) once its first checkpoint is whole,
and ``--resume`` finishes it. Prints one markdown table a class count and appends its rows to ``--csv``.
``--phases`` runs some of the phases (``synthesise plan train resume epoch eval predict export``), each on
what the earlier ones left in ``--out``: a sequence too long for one sitting is split over several
invocations. ``epoch`` (not run by default) trains a fresh run to its end without a kill: the largest class
counts, where the question is whether an epoch trains at all.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

_GIB = 1 << 30
_COLUMNS = ["classes", "phase", "wall_s", "host_peak_gib", "notes"]


def _peak_rss_bytes(pid: int) -> int:
    """``VmHWM`` of a live process; 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run(argv: list[str], *, kill_when: Any = None, timeout_s: float) -> dict[str, Any]:
    """Run ``python -m megaclass argv``; its wall time, peak resident set and output. ``kill_when()``,
    polled, sends ``SIGKILL`` once true."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "megaclass", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak, killed = [0], [False]

    def watch() -> None:
        while child.poll() is None:
            peak[0] = max(peak[0], _peak_rss_bytes(child.pid))
            if kill_when is not None and not killed[0] and kill_when():
                killed[0] = True
                child.send_signal(signal.SIGKILL)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        output, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        raise SystemExit(
            f"megaclass {' '.join(argv)} took over {timeout_s:.0f} s (--timeout): stopped"
        ) from None
    watcher.join()
    wall = time.perf_counter() - started
    if child.returncode != 0 and not killed[0]:
        raise SystemExit(f"megaclass {' '.join(argv)} failed ({child.returncode}):\n{output[-3000:]}")
    return {"wall_s": wall, "host_peak_gib": peak[0] / _GIB, "output": output, "killed": killed[0]}


def _log_facts(run: str) -> str:
    """Steps a second (median of the logged windows), the longest index build and the checkpoint count."""
    with open(os.path.join(run, "log.jsonl")) as log:
        rows = [json.loads(line) for line in log]
    train = [row for row in rows if row.get("kind") == "train"]
    speeds = [row["steps_per_s"] for row in train if "steps_per_s" in row]
    builds = [row["head/index_build_ms"] for row in train if "head/index_build_ms" in row]
    facts = [f"{statistics.median(speeds):.1f} steps/s"] if speeds else []
    if builds:
        facts.append(f"index build up to {max(builds) / 1000:.1f} s")
    return ", ".join(facts)


def _run_folder_sizes(run: str) -> str:
    """GiB on disk of the run folder's checkpoints, kept weights and final weights (a file linked from two
    of them counted in the first)."""
    seen: set[int] = set()
    sizes = []
    for part in ("checkpoints", "best", "model"):
        total = 0
        for folder, _, files in os.walk(os.path.join(run, part)):
            for name in files:
                status = os.stat(os.path.join(folder, name))
                if status.st_ino not in seen:
                    seen.add(status.st_ino)
                    total += status.st_size
        sizes.append(f"{part}/ {total / _GIB:.2f}")
    return "GiB on disk: " + ", ".join(sizes)


def _finished_run(run: str) -> str:
    """What a finished run's ``metrics.json``, log and folder say: P@1, the device's peak, train time, speed,
    index builds, the folder's sizes."""
    with open(os.path.join(run, "metrics.json")) as file:
        metrics = json.load(file)
    where = "GPU" if str(metrics["device"]).startswith("cuda") else "host"
    return (
        f"P@1 {metrics['P@1']:.4f}, {where} peak {metrics['peak_memory_bytes'] / _GIB:.2f} GiB, "
        f"train {metrics['train_seconds']:.1f} s, {_log_facts(run)}, {_run_folder_sizes(run)}"
    )


_PHASES = ("synthesise", "plan", "train", "resume", "epoch", "eval", "predict", "export")


def _one_count(args: argparse.Namespace, classes: int) -> list[dict[str, Any]]:
    """The phases of ``args.phases`` at ``classes`` classes, in order; each finds what earlier ones wrote
    under ``args.out`` (so a long sequence can be split over several invocations)."""
    folder = os.path.join(args.out, f"c{classes}")
    data, run = os.path.join(folder, "data"), os.path.join(folder, "run")
    train, test = os.path.join(data, "train_bow.txt"), os.path.join(data, "test_bow.txt")
    common = ["--train", train, "--test", test, "--out", run, "--head", "selected"]
    overrides = [
        "--set",
        "train.progress=false",
        f"train.checkpoint_every={args.checkpoint_every}",
        "train.epochs=1",  # one epoch unless --set says otherwise
        *args.set,
    ]
    rows = []

    def phase(name: str, result: dict[str, Any], notes: str = "") -> None:
        rows.append(
            {
                "classes": classes,
                "phase": name,
                "wall_s": result["wall_s"],
                "host_peak_gib": result["host_peak_gib"],
            }
            | {"notes": notes}
        )
        print(f"{classes:,} {name}: {result['wall_s']:.1f} s, host {result['host_peak_gib']:.2f} GiB {notes}")

    if "synthesise" in args.phases:
        synth = ["data", "synth", data, "--num-labels", str(classes), "--num-docs", str(args.docs)]
        synth += ["--num-features", str(args.features), "--labels-per-doc", "1", "--seed", str(args.seed)]
        phase("synthesise", _run(synth, timeout_s=args.timeout))
    if "plan" in args.phases:
        plan = _run(["train", *common, *overrides, "--dry-run"], timeout_s=args.timeout)
        lines = [line for line in plan["output"].splitlines() if line.startswith(("peak", "disk"))]
        phase("plan (--dry-run)", plan, " / ".join(lines))
    if "train" in args.phases:

        def first_checkpoint_whole() -> bool:
            return bool(glob.glob(os.path.join(run, "checkpoints", "step_*")))

        shutil.rmtree(run, ignore_errors=True)  # an earlier run's checkpoints must not end this one at once
        argv = ["train", *common, *overrides]
        killed = _run(argv, kill_when=first_checkpoint_whole, timeout_s=args.timeout)
        if not killed["killed"]:
            raise SystemExit(
                f"the run at {classes:,} classes ended before its first checkpoint: lower --checkpoint-every"
            )
        step = os.path.basename(sorted(glob.glob(os.path.join(run, "checkpoints", "step_*")))[-1])
        phase("train until killed after the first checkpoint", killed, f"killed with {step}")
    if "resume" in args.phases:
        resumed = _run(["train", *common, "--resume", *overrides], timeout_s=args.timeout)
        phase("train --resume to the end", resumed, _finished_run(run))
    if "epoch" in args.phases:
        shutil.rmtree(run, ignore_errors=True)
        whole = _run(["train", *common, *overrides], timeout_s=args.timeout)
        phase("train, not killed", whole, _finished_run(run))
    if "eval" in args.phases:
        evaluated = _run(["eval", "--run", run, "--test", test], timeout_s=args.timeout)
        scores = json.loads(evaluated["output"][evaluated["output"].index("{") :])
        shown = {key: value for key, value in scores.items() if key == "P@1" or "recall" in key}
        phase("eval", evaluated, ", ".join(f"{key} {value:.4f}" for key, value in shown.items()))
    if "predict" in args.phases:
        predictions = os.path.join(folder, "predictions.txt")
        argv = ["predict", "--run", run, "--input", test, "--out", predictions, "--k", "5"]
        phase("predict", _run(argv, timeout_s=args.timeout))
    if "export" in args.phases:
        exported = os.path.join(folder, "model.safetensors")
        result = _run(["export", "--run", run, "--out", exported], timeout_s=args.timeout)
        phase("export", result, f"{os.path.getsize(exported) / _GIB:.2f} GiB file")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--docs", type=int, default=300_000, help="training documents")
    parser.add_argument("--features", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train overrides")
    parser.add_argument("--out", default="runs/end-to-end", help="data, runs and exports go here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a phase may take")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=_PHASES,
        default=[phase for phase in _PHASES if phase != "epoch"],
        help="the phases to run (default: all but epoch)",
    )
    parser.add_argument("--csv", default="benchmarks/end_to_end.csv", help="append rows here")
    parser.add_argument("--quick", action="store_true", help="10^4 classes, 4,000 documents, on the CPU")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.docs, args.features, args.checkpoint_every = [10_000], 4_000, 2_000, 5
        args.set = ["model.hidden=[32]", *args.set]
    rows = [row for classes in args.classes for row in _one_count(args, classes)]
    print("| " + " | ".join(_COLUMNS) + " |")
    print("|" + "---|" * len(_COLUMNS))
    for row in rows:
        print(
            f"| {row['classes']:,} | {row['phase']} | {row['wall_s']:.1f} | {row['host_peak_gib']:.2f} | "
            f"{row['notes']} |"
        )
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["time", *_COLUMNS])
        if new:
            writer.writeheader()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        for row in rows:
            writer.writerow({"time": stamp, **row})


if __name__ == "__main__":
    main()
