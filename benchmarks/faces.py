"""Face training throughput: IResNet-50 + a margin head, one full training step, images per second.

    python benchmarks/faces.py           # IResNet-50, B 512, 112x112, bf16, C 10^5 and 10^6 (GPU, < 3 min)
    python benchmarks/faces.py --quick    # a tiny IResNet, small C, runs on CPU as a smoke test
    python benchmarks/faces.py --rec faces/train.rec   # RecordIO read rate on one core (no GPU needed)

Synthetic uint8 faces and labels live on the device, so the data path never limits the step. Each case times
one training step: backbone forward under bf16 autocast, head loss (ArcFace, s = 64, m = 0.5), backward,
SGD with momentum on the backbone (and on the head's weight where it is a parameter) and ``head.after_step``.
Providers, side by side at every C:

- ``torch``: the plain-PyTorch dense head InsightFace's single-GPU recipe uses: ``nn.Linear`` rows
  normalised, cosines ``(B, C)`` under autocast, the ArcFace margin on the target column, ``F.cross_entropy``.
- ``dense``: :class:`megaclass.heads.dense.DenseHead` (fused chunked loss, Triton on CUDA), ArcFace margin.
- ``selected``: :class:`megaclass.heads.selected.SelectedHead` (GPU index, ``--sample-num`` active classes,
  row-sparse SGD); at C = 10^6 only, unless ``--selected-everywhere``.
- ``backbone``: the backbone alone with a trivial loss, the ceiling the heads are measured against.

Columns: step time (median, 20/80% quantiles), images/s (``B / median``), peak memory over the step
(parameters, gradients, momentum and activations included).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Case, Result, add_common_arguments, run_cases  # noqa: E402
from megaclass.heads import HeadContext, build_head, head_config  # noqa: E402
from megaclass.models.iresnet import IResNet, IResNetConfig  # noqa: E402

ARC_SCALE, ARC_MARGIN = 64.0, 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.set_defaults(reps=10, warmup=3)
    parser.add_argument("--batch", type=int, default=512, help="B, images per step")
    parser.add_argument(
        "--dense-classes", type=int, nargs="+", default=[100_000], help="C for torch and dense"
    )
    parser.add_argument("--selected-classes", type=int, nargs="+", default=[1_000_000], help="C for selected")
    parser.add_argument("--model", default="iresnet50", help="iresnet18/34/50/100")
    parser.add_argument("--sample-num", type=int, default=10_000, help="selected: active classes per step")
    parser.add_argument("--providers", default="backbone,torch,dense,selected", help="comma-separated subset")
    parser.add_argument("--selected-everywhere", action="store_true", help="also run selected at dense C")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument(
        "--rec", metavar="FILE.rec", help="only measure RecordIO read rate (records/s, one core)"
    )
    return parser.parse_args()


def read_rate(path: str, *, seconds: float = 3.0) -> None:
    """Records per second of :class:`RecordReader` in random key order, one process, decode excluded."""
    import time

    import numpy as np

    from megaclass.data.recordio import RecordReader

    reader = RecordReader(path)
    keys = np.random.default_rng(0).permutation(np.asarray(reader.keys)).tolist()
    count, size, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for key in keys:
            size += len(reader.read(key))
        count += len(keys)
    elapsed = time.perf_counter() - started
    print(
        f"{path}: {count / elapsed:,.0f} records/s, {size / elapsed / 2**20:,.0f} MiB/s "
        "(random order, 1 process)"
    )


def backbone_config(args: argparse.Namespace) -> IResNetConfig:
    if args.quick:
        return IResNetConfig(type="iresnet18", layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_size=64,
                             input_size=32)  # fmt: skip
    return IResNetConfig(type=args.model)


class TorchArcFaceHead(nn.Module):
    """Plain PyTorch: normalised ``nn.Linear`` rows, full ``(B, C)`` cosines, ArcFace on the target, CE."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, classes, bias=False)
        nn.init.normal_(self.linear.weight, std=0.01)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(features), F.normalize(self.linear.weight)).float()  # (B, C)
        target = cosine.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)  # (B, 1)
        theta = torch.acos(target)
        shifted = torch.where(
            theta + ARC_MARGIN <= math.pi,
            torch.cos(theta + ARC_MARGIN),
            target - ARC_MARGIN * math.sin(ARC_MARGIN),
        )
        logits = cosine.scatter(1, labels[:, None], shifted) * ARC_SCALE  # (B, C)
        return F.cross_entropy(logits, labels)


class BackboneOnly(nn.Module):
    """No head: the mean squared feature, so the step is the backbone's own cost."""

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return features.float().square().mean()


def build_head_module(provider: str, classes: int, dim: int, args: argparse.Namespace) -> nn.Module:
    margin = {"kind": "arcface", "scale": ARC_SCALE, "margin": ARC_MARGIN}
    if provider == "torch":
        return TorchArcFaceHead(dim, classes)
    if provider == "backbone":
        return BackboneOnly()
    if provider == "dense":
        config = head_config({"type": "dense", "bias": False, "margin": margin})
    else:
        sample_num = min(args.sample_num, classes)
        config = head_config(
            {"type": "selected", "sample_num": sample_num, "margin": margin, "coverage_every": 0}
        )
    return build_head(config, HeadContext(in_features=dim, num_classes=classes, multilabel=False))


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_case(provider: str, classes: int, args: argparse.Namespace, device: torch.device) -> Case:
    """One training step of backbone + ``provider``'s head at ``classes`` classes."""
    config = backbone_config(args)
    batch = args.batch

    def setup() -> Callable[[], None]:
        backbone = IResNet(config).to(device)
        head = build_head_module(provider, classes, config.embedding_size, args).to(device)
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        backbone = backbone.to(memory_format=memory_format)
        params = [*backbone.parameters(), *head.parameters()]
        optimizer = torch.optim.SGD(
            [p for p in params if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4
        )
        images = torch.randint(0, 256, (batch, 3, config.input_size, config.input_size), dtype=torch.uint8)
        images = images.to(device).contiguous(memory_format=memory_format)  # (B, 3, S, S)
        labels = torch.randint(0, max(classes, 1), (batch,), device=device)
        counter = [0]

        def step() -> None:
            with autocast(device):
                loss = head(backbone(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            counter[0] += 1
            if hasattr(head, "after_step"):
                head.after_step(counter[0], 0.0, lr=0.1)

        return step

    params = {"model": "tiny" if args.quick else args.model, "C": classes, "B": batch}
    return Case(provider=provider, mode="step", params=params, setup=setup)


def cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    providers = [name.strip() for name in args.providers.split(",") if name.strip()]
    unknown = set(providers) - {"backbone", "torch", "dense", "selected"}
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; known: backbone, torch, dense, selected")
    dense_classes = [1_000, 5_000] if args.quick else args.dense_classes
    selected_classes = [20_000] if args.quick else args.selected_classes
    result = []
    if "backbone" in providers:
        result.append(step_case("backbone", 0, args, device))
    for classes in dense_classes:
        result += [step_case(name, classes, args, device) for name in ("torch", "dense") if name in providers]
        if "selected" in providers and args.selected_everywhere:
            result.append(step_case("selected", classes, args, device))
    for classes in selected_classes:
        result += [
            step_case(name, classes, args, device) for name in ("torch", "selected") if name in providers
        ]
    return result


def table(results: list[Result]) -> str:
    lines = [
        "| model | C | B | provider | step ms | q20 ms | q80 ms | images/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        p = result.params
        classes = f"{p['C']:,}" if p["C"] else "-"  # the backbone alone has no head
        if result.status != "ok":
            lines.append(
                f"| {p['model']} | {classes} | {p['B']} | {result.provider} | {result.status} | | | | |"
            )
            continue
        rate = p["B"] / (result.time_ms * 1e-3)
        memory = "-" if math.isnan(result.peak_mem_gib) else f"{result.peak_mem_gib:.2f}"
        lines.append(
            f"| {p['model']} | {classes} | {p['B']} | {result.provider} | {result.time_ms:.1f} | "
            f"{result.q20_ms:.1f} | {result.q80_ms:.1f} | {rate:,.0f} | {memory} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.rec:
        read_rate(args.rec)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.batch, args.reps, args.warmup, args.sample_num = 16, 2, 1, 500
    elif device.type != "cuda":
        raise SystemExit("the full benchmark needs a GPU; use --quick on a CPU")
    torch.backends.cudnn.benchmark = True
    results = run_cases(
        cases(args, device), benchmark="faces", results_path=args.results, reps=args.reps, warmup=args.warmup
    )
    print()
    print(table(results))


if __name__ == "__main__":
    main()
