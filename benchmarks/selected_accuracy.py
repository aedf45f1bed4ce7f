"""Accuracy of dynamic class selection on deb-files (16,760 classes, one package per file path).

    python benchmarks/selected_accuracy.py --train DEB_FILES/train.txt.gz --test DEB_FILES/test.txt.gz \\
        --out runs/selected-accuracy --train-lines 100000 --test-lines 100000
    python benchmarks/selected_accuracy.py --train ... --test ... --out ... --quick   # CPU smoke run

Trains the same encoder (an MLP over character n-gram TF-IDF of the path) with the same optimizer and schedule
three times through the trainer's Python API, changing only the head:

- ``dense``: the exact softmax over all classes;
- ``selected``: HF-Softmax with ``--active`` of the classes active per step (GPU index, rebuilt every
  ``--interval`` steps; the row-sparse Adam gets the head's scheduled lr);
- ``partial_fc``: the same number of active classes drawn at random (Partial FC's rule).

Prints one markdown table: top-1 / top-5 accuracy on the test subsample, the sampled heads' last measured
coverage and wall time per run.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import time

from megaclass.index.kmeans import DEFAULT_LEAF_SIZE, DEFAULT_PROBES
from megaclass.train import config_from_dict, train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True, help="deb-files train.txt(.gz): label<TAB>path lines")
    parser.add_argument("--test", required=True, help="deb-files test.txt(.gz)")
    parser.add_argument("--out", required=True, help="folder for the subsampled data and the three runs")
    parser.add_argument("--train-lines", type=int, default=100_000, help="first N training lines (0: all)")
    parser.add_argument("--test-lines", type=int, default=100_000, help="first N test lines (0: all)")
    parser.add_argument("--active", type=float, default=0.05, help="share of the classes active per step")
    parser.add_argument(
        "--interval", type=int, default=50, help="SelectedHead index rebuild interval (steps)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.002, help="peak lr of encoder and head")
    parser.add_argument("--head-lr", type=float, help="peak lr of the head (default: --lr)")
    parser.add_argument(
        "--head-optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="the head's optimizer, for every head alike (sgd: momentum 0.9, HF-Softmax's)",
    )
    parser.add_argument(
        "--init-bound", type=float, help="sampled heads: rows start U(-b, b) (default: 1 / sqrt(D))"
    )
    parser.add_argument(
        "--init-scale", type=float, help="dense head: rows start N(0, (s / sqrt(D))^2) (default: 1)"
    )
    parser.add_argument(
        "--heads",
        default="dense,selected,partial_fc",
        help="comma-separated subset of dense, dense_nobias, selected, selected_dot, selected_half, "
        "selected_dot_half, selected_half_warm, partial_fc, selected_logq, partial_fc_logq",
    )
    parser.add_argument(
        "--leaf-size", type=int, default=DEFAULT_LEAF_SIZE, help="SelectedHead index: most rows per cluster"
    )
    parser.add_argument(
        "--probes", type=int, default=DEFAULT_PROBES, help="SelectedHead index: clusters searched per query"
    )
    parser.add_argument("--seed", type=int, default=0, help="train.seed: initialisation, shuffling, dropout")
    parser.add_argument("--quick", action="store_true", help="tiny subsample, one epoch, CPU-friendly")
    return parser.parse_args()


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def subsample(source: str, target: str, lines: int) -> int:
    """Copy the first ``lines`` lines (all when 0) of ``source`` to ``target``; the largest label + 1."""
    largest = -1
    with _open(source) as reader, open(target, "w", encoding="utf-8") as writer:
        for number, line in enumerate(reader):
            if lines and number >= lines:
                break
            writer.write(line)
            label = line.split("\t", 1)[0]
            if label.strip().isdigit():
                largest = max(largest, int(label))
    return largest + 1


def run_config(head: dict, *, args: argparse.Namespace, num_classes: int) -> dict:
    """The shared recipe with ``head`` swapped in."""
    return config_from_dict(
        {
            "data": {
                "num_classes": num_classes,
                "featurizer": {
                    "word_ngrams": None,
                    "char_ngrams": [3, 4],
                    "min_df": 3,
                    "max_features": 300_000,
                },
            },
            "model": {"type": "mlp", "hidden": [512], "dropout": 0.1},
            "head": head,
            "optim": {
                "encoder": {"name": "adamw", "lr": args.lr},
                "head": {"name": args.head_optimizer, "lr": args.head_lr or args.lr, "momentum": 0.9},
                "warmup_fraction": 0.05,
                "decay": "cosine",
            },
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seed": args.seed,
                "progress": False,
            },
            "eval": {"ks": [1, 5]},
        }
    )


def heads(args: argparse.Namespace, num_classes: int) -> dict[str, dict]:
    active = max(1, math.ceil(args.active * num_classes))
    # the dense head's optimizer, applied to the active rows (catching up on the skipped steps)
    row_optimizer = {
        "kind": args.head_optimizer,
        "weight_decay": 0.0,
        **({"momentum": 0.9} if args.head_optimizer == "sgd" else {}),
    }
    variants = {
        "dense": {"type": "dense"},
        "dense_nobias": {"type": "dense", "bias": False},  # the sampled heads have no bias
        "selected": {
            "type": "selected",
            "sample_num": active,
            "index": {"type": "gpu", "leaf_size": args.leaf_size, "probes": args.probes},
            "interval": args.interval,
            "optimizer": row_optimizer,
            "coverage_every": 200,
        },
        "partial_fc": {"type": "partial_fc", "sample_num": args.active, "optimizer": row_optimizer},
    }
    for name in ("dense", "dense_nobias"):
        if args.init_scale is not None:
            variants[name]["init_scale"] = args.init_scale
    for name in ("selected", "partial_fc"):
        if args.init_bound is not None:
            variants[name]["init_bound"] = args.init_bound
    # selection variants: the index ranks by the logit (dot), half the active set from the index
    variants["selected_dot"] = {**variants["selected"], "metric": "dot"}
    variants["selected_half"] = {**variants["selected"], "neighbour_share": 0.5}
    variants["selected_dot_half"] = {**variants["selected_dot"], "neighbour_share": 0.5}
    # random classes only for the first ~10% of a 3-epoch run's steps, while the rows are immature
    variants["selected_half_warm"] = {**variants["selected_half"], "warmup_random_steps": 120}
    # the same heads with the sampled-softmax correction log(1/q) on the random classes' logits
    variants.update(
        {f"{name}_logq": {**variants[name], "logq_correction": True} for name in ("selected", "partial_fc")}
    )
    return variants


def main() -> None:
    args = parse_args()
    if args.quick:
        args.train_lines, args.test_lines, args.epochs = 5000, 2000, 1
    os.makedirs(args.out, exist_ok=True)
    train_path, test_path = os.path.join(args.out, "train.txt"), os.path.join(args.out, "test.txt")
    num_classes = max(
        subsample(args.train, train_path, args.train_lines), subsample(args.test, test_path, args.test_lines)
    )
    rows = []
    for name, head in heads(args, num_classes).items():
        if name not in args.heads.split(","):
            continue
        started = time.perf_counter()
        metrics = train(
            run_config(head, args=args, num_classes=num_classes),
            train_path=train_path,
            test_path=test_path,
            out_dir=os.path.join(args.out, name),
        )
        rows.append(
            (
                name,
                metrics.get("P@1", math.nan),
                metrics.get("P@5", math.nan) * 5,
                metrics.get("head/coverage", math.nan),
                time.perf_counter() - started,
            )
        )
    print(
        f"\ndeb-files, {num_classes} classes, {args.active:.0%} active, first {args.train_lines} train / "
        f"{args.test_lines} test lines, {args.epochs} epochs, lr {args.lr} (head {args.head_optimizer}, "
        f"{args.head_lr or args.lr}), seed {args.seed}\n"
    )
    print("| head | top-1 | top-5 | coverage | wall s |")
    print("|---|---|---|---|---|")
    for name, top1, top5, coverage, seconds in rows:
        print(f"| {name} | {top1:.4f} | {top5:.4f} | {coverage:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
