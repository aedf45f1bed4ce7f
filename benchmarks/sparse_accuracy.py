"""Sparse head accuracy ablation: plain sparse / + intermediate / + auxiliary / grouped, at two sparsity
levels, vs the dense head with the same encoder, optimizer and epochs (the demo recipe), through the trainer.

    python benchmarks/sparse_accuracy.py --train data/deb-tags/train_bow.txt.gz \
        --test data/deb-tags/test_bow.txt.gz --out runs/sparse_accuracy
    python benchmarks/sparse_accuracy.py ... --quick        # one epoch, one sparsity level: a CPU smoke run
    python benchmarks/sparse_accuracy.py ... --runs 0 2 4   # a subset (indices as listed by --list)

Every run starts from ``--config`` (default: the demo's recipe, an MLP over TF-IDF rows) and replaces its
head. The fan-in is ``(1 - sparsity)`` times the sparse layer's input width: the encoder's ``D``, or the
intermediate width ``H`` in the ``+ intermediate`` runs, so each sparsity level is the same for every run.
The trainer binds the head's optimizer (rewiring resets the state of new connections and anneals to the stop
point) and computes the PIFA label features the auxiliary loss clusters. Prints a markdown table (P@1, P@3,
P@5, sparsity, head + gradients + optimizer state beside the dense head's, train time) and appends CSV rows.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import environment  # noqa: E402
from megaclass.train import load_config, train  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True, help="training data (xmc bag-of-words or text)")
    parser.add_argument("--test", required=True, help="test data")
    parser.add_argument("--out", required=True, help="folder for the run folders")
    parser.add_argument("--config", default="configs/demo.yaml", help="encoder, optimizer and epochs of all")
    parser.add_argument("--intermediate", type=int, default=2048, help="intermediate width H for the + runs")
    parser.add_argument(
        "--sparsity", type=float, nargs="+", default=[0.9, 0.95], help="sparsity levels (fan-in / width)"
    )
    parser.add_argument("--group", type=int, default=16, help="G of the grouped runs")
    parser.add_argument(
        "--loss", help="the sparse head's loss (default: the --config head's, for a fair match)"
    )
    parser.add_argument("--quick", action="store_true", help="one epoch, the first sparsity level only")
    parser.add_argument("--runs", type=int, nargs="*", help="run only these variants (indices, see --list)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--results", default="benchmarks/results.csv", help="CSV file to append rows to")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (key=value)")
    return parser.parse_args()


def _fan_in(sparsity: float, width: int) -> int:
    return max(1, round((1.0 - sparsity) * width))


def variants(args: argparse.Namespace, width: int) -> list[tuple[str, str, list[str]]]:
    """``(name, head type, overrides)`` of every run: dense, then the ablation ladder at each sparsity."""
    runs: list[tuple[str, str, list[str]]] = [("dense", "dense", [])]
    for sparsity in args.sparsity[:1] if args.quick else args.sparsity:
        plain = [f"head.fan_in={_fan_in(sparsity, width)}", "head.aux_clusters=0", f"head.loss={args.loss}"]
        mid = [
            f"head.fan_in={_fan_in(sparsity, args.intermediate)}",
            f"head.intermediate={args.intermediate}",
        ]
        aux = ["head.aux_clusters=auto"]
        level = f"{100 * sparsity:g}%"
        runs += [
            (f"sparse {level}", "sparse", plain),
            (f"+ intermediate {level}", "sparse", [*plain, *mid]),
            (f"+ auxiliary {level}", "sparse", [*plain, *mid, *aux]),
            (f"grouped G={args.group} {level}", "sparse", [*plain, *mid, *aux, f"head.group={args.group}"]),
        ]
    return runs


def run_one(args: argparse.Namespace, name: str, head: str, overrides: list[str]) -> dict[str, Any]:
    """Train one variant; its row of the table."""
    common = ["train.progress=false", *(["train.epochs=1"] if args.quick else []), *args.set]
    config = load_config(args.config, [*common, *overrides], head=head)
    safe = name.replace(" ", "_").replace("+", "plus").replace("=", "").replace("%", "pct")
    metrics = train(config, train_path=args.train, test_path=args.test, out_dir=os.path.join(args.out, safe))
    return {
        "run": name,
        **{k: metrics[k] for k in ("P@1", "P@3", "P@5")},
        "fan_in": getattr(config.head, "fan_in", 0),
        "sparsity": metrics.get("head/sparsity", 0.0),
        "head_mib": metrics["head_total_bytes"] / 2**20,
        "dense_head_mib": metrics["dense_head_total_bytes"] / 2**20,
        "train_s": metrics["train_seconds"],
        "epochs": config.train.epochs,
    }


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> None:
    args = parse_args()
    base = load_config(args.config)
    width = base.model.hidden[-1]  # the encoder's D
    args.loss = args.loss or getattr(base.head, "loss", "auto")
    runs = variants(args, width)
    if args.list:
        for number, (name, head, overrides) in enumerate(runs):
            print(number, name, head, " ".join(overrides))
        return
    chosen = runs if args.runs is None else [runs[i] for i in args.runs]
    rows = []
    for name, head, overrides in chosen:
        rows.append(run_one(args, name, head, overrides))
        print(", ".join(f"{k}={_format(v)}" for k, v in rows[-1].items()), flush=True)
    columns = list(rows[0])
    print(f"\n{args.config}, encoder D = {width}\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_format(row[c]) for c in columns) + " |")
    env = environment()
    new_file = not os.path.exists(args.results)
    with open(args.results, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["benchmark", *env, *columns])
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({"benchmark": "sparse_accuracy", **env, **row})


if __name__ == "__main__":
    main()
