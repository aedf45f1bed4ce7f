"""Head benchmark: DenseHead's fused kernels vs plain PyTorch vs Cut Cross-Entropy, forward and backward.

    python benchmarks/heads.py                      # C = 670,091 and 2,812,281, D = 768, B = 128 (a GPU)
    python benchmarks/heads.py --quick              # small sizes, runs on CPU as a smoke test

Providers, all with fp32 master weights ``W (C, D)`` and bf16 compute:

- ``torch``: ``x @ W.T`` under bf16 autocast, then ``F.cross_entropy`` or
  ``F.binary_cross_entropy_with_logits`` (the logits and a bf16 copy of ``W`` are materialised).
- ``megaclass``: what :class:`megaclass.heads.dense.DenseHead` runs under bf16 autocast: the fused op
  ``linear_loss`` on bf16 features and the fp32 weight (Triton kernels on CUDA).
- ``reference``: the same op forced onto the chunked plain-PyTorch backend (off by default).
- ``cce``: ``cut_cross_entropy.linear_cross_entropy`` on bf16 ``x`` and ``W.to(bfloat16)`` (CE only: Cut
  Cross-Entropy has no binary cross-entropy).

Besides the timings it prints the card's floor for the fused op: FLOPs (``2BCD`` per matmul: one forward,
three backward) over the measured bf16 matmul rate, and bytes (fp32 ``W`` read in forward, read again and
its fp32 gradient written in backward) over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Case, add_common_arguments, device_rates, markdown_table, run_cases  # noqa: E402
from megaclass.ops.linear_cross_entropy import LinearLossOptions, linear_loss  # noqa: E402
from megaclass.targets import RaggedLabels  # noqa: E402

FULL_CLASSES = (670_091, 2_812_281)


def parse_args() -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add_common_arguments(parser)
    parser.add_argument("--classes", type=int, nargs="+", help="C values (default 670091 2812281)")
    parser.add_argument("--dim", type=int, default=768, help="D, the feature width")
    parser.add_argument("--batch", type=int, default=128, help="B, the batch size")
    parser.add_argument("--losses", default="ce,bce", help="comma-separated subset of ce,bce")
    parser.add_argument("--providers", default="torch,megaclass,cce", help="torch,megaclass,reference,cce")
    parser.add_argument("--labels-per-sample", type=int, default=5, help="positives per sample for bce")
    return parser.parse_args()


def autocast() -> contextlib.AbstractContextManager:
    if torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_inputs(batch: int, classes: int, dim: int, loss: str, labels_per_sample: int):
    """fp32 master weight, fp32 features (an encoder's output), targets: class ids (ce) or ragged (bce)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = (torch.randn(classes, dim, device=device) / dim**0.5).requires_grad_(True)
    x = torch.randn(batch, dim, device=device).requires_grad_(True)
    if loss == "ce":
        return x, weight, torch.randint(0, classes, (batch,), device=device)
    indices = torch.randint(0, classes, (batch, labels_per_sample), device=device)
    indptr = torch.arange(0, batch * labels_per_sample + 1, labels_per_sample, device=device)
    return x, weight, RaggedLabels(indptr, indices.reshape(-1))  # duplicates are vanishingly rare at this C


def torch_loss(x, weight, targets, loss: str) -> torch.Tensor:
    with autocast():
        logits = x @ weight.T  # (B, C) bf16 under autocast
        if loss == "ce":
            return F.cross_entropy(logits, targets)
        dense = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        dense[targets.sample_ids(), targets.indices] = 1
        return F.binary_cross_entropy_with_logits(logits, dense, reduction="sum") / x.shape[0]


def head_loss(impl: str) -> Callable:
    """DenseHead's forward: the fused op on the autocast dtype's features and the fp32 master weight."""

    def run(x, weight, targets, loss: str) -> torch.Tensor:
        options = LinearLossOptions(loss="softmax" if loss == "ce" else "bce")
        with autocast():
            features = x.to(torch.bfloat16) if x.is_cuda else x  # what DenseHead does under autocast
            return linear_loss(features, weight, targets, options=options, impl=impl)

    return run


def cce_loss(x, weight, targets, loss: str) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(x.to(torch.bfloat16), weight.to(torch.bfloat16), targets)


def make_case(provider: str, mode: str, fn: Callable, params: dict, lps: int) -> Case:
    batch, classes, dim, loss = params["B"], params["C"], params["D"], params["loss"]
    state: dict = {}

    def setup():
        x, weight, targets = make_inputs(batch, classes, dim, loss, lps)
        state["tensors"] = (x, weight)
        if mode == "fwd":
            return lambda: fn(x, weight, targets, loss)
        if mode == "bwd":
            out = fn(x, weight, targets, loss)
            return lambda: out.backward(retain_graph=True)
        return lambda: fn(x, weight, targets, loss).backward()

    matmuls = {"fwd": 1, "bwd": 3, "fwd+bwd": 4}[mode]
    weight_passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]  # fp32 W read (fwd, bwd), fp32 grad W written
    return Case(
        provider,
        mode,
        params,
        setup,
        grad_to_none=lambda: state["tensors"],
        flops=2.0 * batch * classes * dim * matmuls,
        bytes_moved=4.0 * classes * dim * weight_passes,
    )


def build_cases(args: argparse.Namespace) -> list[Case]:
    providers = {
        "torch": torch_loss,
        "megaclass": head_loss("auto"),
        "reference": head_loss("reference"),
        "cce": cce_loss,
    }
    wanted = [name.strip() for name in args.providers.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(providers))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {sorted(providers)}")
    if "cce" in wanted and not _cce_available():
        print("cce: cut_cross_entropy not importable or no CUDA device; skipped", file=sys.stderr)
        wanted.remove("cce")
    classes_list = args.classes or ((5_003,) if args.quick else FULL_CLASSES)
    dim, batch = (64, 16) if args.quick else (args.dim, args.batch)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    cases = []
    for classes in classes_list:
        for loss in [name.strip() for name in args.losses.split(",") if name.strip()]:
            for provider in wanted:
                if provider == "cce" and loss == "bce":
                    continue  # Cut Cross-Entropy has no binary cross-entropy
                for mode in modes:
                    params = {"C": classes, "D": dim, "B": batch, "loss": loss}
                    case = make_case(provider, mode, providers[provider], params, args.labels_per_sample)
                    cases.append(case)
    return cases


def _cce_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def print_floor(cases: list[Case], results) -> None:
    """The card's floor for megaclass fwd+bwd: max(FLOPs / bf16 rate, bytes / copy bandwidth)."""
    rates = device_rates()
    if rates is None:
        print("\n(no GPU: floor not measured)")
        return
    print(f"\nCard: {rates.name}: copy {rates.bandwidth_gbs:.0f} GB/s, bf16 {rates.bf16_tflops:.0f} TFLOP/s")
    print("| C | loss | GFLOP | GB moved | floor_ms | megaclass_ms | x floor |")
    print("|---|---|---|---|---|---|---|")
    for case, result in zip(cases, results, strict=True):
        if case.provider != "megaclass" or case.mode != "fwd+bwd" or result.status != "ok":
            continue
        floor = rates.floor_ms(flops=case.flops, bytes_moved=case.bytes_moved)
        print(
            f"| {case.params['C']} | {case.params['loss']} | {case.flops / 1e9:.0f} | "
            f"{case.bytes_moved / 1e9:.2f} | {floor:.3f} | {result.time_ms:.3f} | "
            f"{result.time_ms / floor:.2f} |"
        )


def main() -> None:
    args = parse_args()
    if args.quick:
        args.reps = min(args.reps, 3)
        args.warmup = min(args.warmup, 1)
    cases = build_cases(args)
    results = run_cases(
        cases, benchmark="heads", results_path=args.results, reps=args.reps, warmup=args.warmup
    )
    print()
    print(markdown_table(results))
    print_floor(cases, results)


if __name__ == "__main__":
    main()
