"""Sparse head accuracy ablation: plain sparse / + intermediate / + auxiliary / grouped, at two fan-ins,
vs the dense head with the same encoder, optimizer and epochs, through the trainer's Python API.

    python benchmarks/sparse_accuracy.py --train data/deb-tags/train_bow.txt.gz \
        --test data/deb-tags/test_bow.txt.gz --out runs/sparse_accuracy
    python benchmarks/sparse_accuracy.py ... --quick        # one epoch, one fan-in: a smoke run on CPU

Every run starts from the ``xmc-mlp`` preset (an MLP over TF-IDF rows); the sparse runs replace its head. The
trainer is given the optimizer binding that rewiring needs (``head.bind_optimizer``) before training. Prints a
markdown table (P@1, P@3, P@5, sparsity, head + optimizer memory beside the dense head's, train time) and
appends it as CSV rows.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import environment  # noqa: E402
from megaclass.train import Trainer, load_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True, help="training data (xmc bag-of-words or text)")
    parser.add_argument("--test", required=True, help="test data")
    parser.add_argument("--out", required=True, help="folder for the run folders")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every run")
    parser.add_argument("--hidden", type=int, default=512, help="encoder width D")
    parser.add_argument("--intermediate", type=int, default=1024, help="intermediate width H for the + runs")
    parser.add_argument(
        "--fan-in", type=int, nargs="+", default=[32, 8], help="K values: two sparsity levels"
    )
    parser.add_argument("--group", type=int, default=16, help="G of the grouped runs")
    parser.add_argument("--quick", action="store_true", help="one epoch, the first fan-in only")
    parser.add_argument("--results", default="benchmarks/results.csv", help="CSV file to append rows to")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (key=value)")
    return parser.parse_args()


def variants(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """``(name, head type, overrides)`` of every run: dense, then the ablation ladder at each fan-in."""
    runs: list[tuple[str, str, list[str]]] = [("dense", "dense", [])]
    for fan_in in args.fan_in[:1] if args.quick else args.fan_in:
        base = [f"head.fan_in={fan_in}", "head.aux_clusters=0"]
        mid = [f"head.intermediate={args.intermediate}"]
        aux = [
            "head.aux_clusters=auto",
            "data.label_feature_dim=128",
            f"head.aux_cutoff_epoch={args.epochs / 2}",
        ]
        runs += [
            (f"sparse K={fan_in}", "sparse", base),
            (f"+ intermediate K={fan_in}", "sparse", base + mid),
            (f"+ auxiliary K={fan_in}", "sparse", base + mid + aux),
            (f"grouped G={args.group} K={fan_in}", "sparse", base + mid + aux + [f"head.group={args.group}"]),
        ]
    return runs


def run_one(
    args: argparse.Namespace, name: str, head: str, overrides: list[str], epochs: int
) -> dict[str, Any]:
    common = [f"model.hidden=[{args.hidden}]", f"train.epochs={epochs}", "train.progress=false", *args.set]
    config = load_config(preset="xmc-mlp", head=head, overrides=[*common, *overrides])
    out_dir = os.path.join(args.out, name.replace(" ", "_").replace("+", "plus").replace("=", ""))
    trainer = Trainer(config, train_path=args.train, test_path=args.test, out_dir=out_dir)
    started = time.perf_counter()
    try:
        trainer.setup()
        head = trainer.head
        if hasattr(head, "bind_optimizer"):
            head.bind_optimizer(trainer.optimizers["head"], total_steps=trainer.total_steps)
        metrics = trainer.train()
        held = head.state_bytes()
    finally:
        trainer.close()
    weights = held.get("weights", 0) + held.get("structure", 0)
    optimizer = held.get("optimizer", 2 * held.get("weights", 0))
    row = {
        "run": name,
        **{k: metrics.get(k, float("nan")) for k in ("P@1", "P@3", "P@5")},
        "sparsity": getattr(head, "metrics", dict)().get("sparsity", 0.0),
        "head_mib": (weights + optimizer) / 2**20,
        "dense_head_mib": (held.get("dense_weights", 0) + held.get("dense_optimizer", 0)) / 2**20,
        "train_s": metrics.get("train_seconds", time.perf_counter() - started),
    }
    return row


def main() -> None:
    args = parse_args()
    epochs = 1 if args.quick else args.epochs
    rows = []
    for name, head, overrides in variants(args):
        rows.append(run_one(args, name, head, overrides, epochs))
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    columns = list(rows[0])
    print(f"\n{epochs} epochs, encoder MLP [{args.hidden}]\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print(
            "| "
            + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
            + " |"
        )
    env = environment()
    new_file = not os.path.exists(args.results)
    with open(args.results, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["benchmark", *env, "epochs", *columns])
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({"benchmark": "sparse_accuracy", **env, "epochs": epochs, **row})


if __name__ == "__main__":
    main()
