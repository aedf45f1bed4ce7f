"""Head benchmark: DenseHead's fused op vs plain PyTorch vs Cut Cross-Entropy, forward and backward.

    python benchmarks/heads.py                      # self-check, then C = 670,091 and 2,812,281 (a GPU)
    python benchmarks/heads.py --quick              # small sizes, runs on CPU as a smoke test
    python benchmarks/heads.py --classes 670091 2812281 --dim 768 --batch 128 --losses ce,bce \
        --modes fwd+bwd --providers torch,megaclass-triton,megaclass-triton-recompute  # fused vs recompute
    python benchmarks/heads.py --classes 670091 --providers torch,megaclass-triton --modes fwd+bwd \
        --cuda-graph --skip-check  # and the megaclass rows captured in a CUDA graph, as the trainer runs

Providers, all with fp32 master weights ``W (C, D)`` and bf16 compute:

- ``torch``: ``x @ W.T`` under bf16 autocast, then ``F.cross_entropy`` or
  ``F.binary_cross_entropy_with_logits`` (the logits and a bf16 copy of ``W`` are materialised).
- ``megaclass``: what :class:`megaclass.heads.dense.DenseHead` runs under bf16 autocast: the fused op
  ``linear_loss`` on bf16 features and the fp32 weight, ``impl="auto"`` (one of the two below by
  ``resolve_impl``'s fixed rule; the choice for each problem is printed at the end).
- ``megaclass-triton``: the same op on its Triton kernels (``impl="triton"``).
- ``megaclass-triton-recompute``: the Triton kernels with bce's gradient recomputed in the backward pass as
  softmax's is (``TritonBackend(fuse_gradient=False)``), the schedule ``megaclass-triton`` replaced for bce:
  both in one run show the gain. (``megaclass-triton`` computes bce's gradient in its forward pass when an
  input needs one, so its ``fwd`` row includes that work and its ``bwd`` row, timed by repeated backward
  passes through one graph, the recompute: compare bce on ``fwd+bwd``.)
- ``megaclass-torch``: the same op on cuBLAS bf16 matmuls over class chunks (``impl="torch"``).
- ``reference``: the same op on the fp32-accumulating plain-PyTorch spec (off by default; the CPU's path),
  and ``reference-recompute`` with bce's gradient recomputed in backward (the CPU's schedule it replaced).
- ``<provider>-graph`` (``--cuda-graph``, a GPU, ``fwd+bwd``): each ``megaclass`` provider's forward and
  backward captured in one CUDA graph and replayed: what the trainer runs (it captures its whole step), the
  GPU's time without the host launching the ops one by one.
- ``cce``: ``cut_cross_entropy.linear_cross_entropy`` on bf16 ``x`` and ``W.to(bfloat16)`` (CE only: Cut
  Cross-Entropy has no binary cross-entropy).

The run checks itself before timing: on two small problems (one spanning several backward super-chunks and
row blocks) every provider's loss, ``dx`` and ``dW`` are compared with the fp32 reference; the maximum
relative error is printed with PASS (within twice plain PyTorch's bf16 error, or 2^-7) or FAIL.

A case that can take the CUDA context down (Cut Cross-Entropy at ``C x D >= 2^31``: its 32-bit indexing
ends in an illegal memory access) runs in a child process; once it has crashed there, the same provider's
other cases at that size are refused with a row saying why, and the run goes on.

Besides the timings it prints the card's floor for each fwd+bwd row: the larger of FLOPs over the measured
bf16 matmul rate and bytes over the measured copy bandwidth.

- Bytes: the fp32 master ``W (C, D)`` is read once in forward and once more in backward, and its fp32
  gradient written once: ``3 x 4CD`` (6.18 GB at C = 670,091, D 768; 25.9 GB at C = 2,812,281). ``x``,
  ``dx`` and per-row statistics are ``O(BD)``: nothing.
- FLOPs: ``2BCD`` for the logits in forward, ``2 x 2BCD`` for ``dW = G^T x`` and ``dx = G W`` in backward:
  ``6BCD`` (395 GFLOP at C = 670,091; recomputing the logits in backward adds ``2BCD`` of work the floor
  does not count).
- Which bound: ``6BCD / 12CD = B / 2`` FLOP per byte, 64 at B 128, against an H200's ridge of about
  990 TFLOP/s bf16 / 4.8 TB/s = 206 (and fp32 without tensor cores, ~60 TFLOP/s, is never used: the dots
  take bf16 operands with fp32 sums). The op is memory-bound up to B ~ 400 with fp32 weights (B ~ 200 with
  bf16 weights and gradient), so the floor is the bytes: 1.29 ms at 4.8 TB/s, about 1.5 ms at the ~4.2 TB/s
  a copy reaches; the FLOPs would take 0.4 ms.
- What the kernels can reach: softmax needs the row's lse before any ``G``, and ``dx = G W`` needs ``W``
  again after ``G``; keeping ``dx`` on chip while streaming ``W`` needs a ``(B, D)`` fp32 accumulator
  (393 KB at B 128, D 768: more than an SM's registers), so CE reads ``W`` three times (forward, the
  ``dW`` pass, the split-K ``dx`` pass): 4/3 of the floor's bytes. bce's ``G = sigmoid(z) / B`` needs no row
  statistic, so its forward pass runs both gradient passes and the backward only scales (``W`` read twice,
  the floor's bytes plus the ``(B, C)`` bf16 ``G`` scratch written and read, ~8% more).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    Case,
    Result,
    add_common_arguments,
    cce_available,
    cuda_graph,
    device_rates,
    markdown_table,
    run_cases,
    run_in_child,
)
from megaclass.ops.linear_cross_entropy import LinearLossOptions, linear_loss, resolve_impl  # noqa: E402
from megaclass.ops.linear_cross_entropy.common import linear_loss_apply  # noqa: E402
from megaclass.ops.linear_cross_entropy.reference import ReferenceBackend  # noqa: E402
from megaclass.targets import RaggedLabels  # noqa: E402

FULL_CLASSES = (670_091, 2_812_281)
INDEX_LIMIT = 2**31  # Cut Cross-Entropy indexes W with 32-bit integers
# Self-check problems (B, C, D): one like the timed ones, one over several super-chunks and two row blocks.
CHECK_SHAPES = ((128, 10_007, 768), (130, 2**18 + 5, 64))
CHECK_SHAPES_QUICK = ((16, 1_009, 64), (20, 3_001, 32))
CHECK_FLOOR = 2**-7  # relative error always accepted: about two bf16 roundings


def parse_args() -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add_common_arguments(parser)
    parser.add_argument("--classes", type=int, nargs="+", help="C values (default 670091 2812281)")
    parser.add_argument("--dim", type=int, default=768, help="D, the feature width")
    parser.add_argument("--batch", type=int, default=128, help="B, the batch size")
    parser.add_argument("--losses", default="ce,bce", help="comma-separated subset of ce,bce")
    parser.add_argument(
        "--providers",
        default="torch,cce,megaclass,megaclass-triton,megaclass-torch",
        help="comma-separated subset of " + ",".join(PROVIDERS),
    )
    parser.add_argument("--labels-per-sample", type=int, default=5, help="positives per sample for bce")
    parser.add_argument("--isolate", default="", help="providers to run in child processes at every size")
    parser.add_argument("--skip-check", action="store_true", help="time without the correctness check")
    parser.add_argument("--autotune", action="store_true", help="let the Triton kernels tune their tiles")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="add <provider>-graph rows: megaclass providers' fwd+bwd captured in a CUDA graph (GPU only)",
    )
    parser.add_argument("--in-child", action="store_true", help=argparse.SUPPRESS)  # one case, no check
    return parser.parse_args()


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


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


def _options(loss: str) -> LinearLossOptions:
    return LinearLossOptions(loss="softmax" if loss == "ce" else "bce")


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
        with autocast():
            features = x.to(torch.bfloat16) if x.is_cuda else x  # what DenseHead does under autocast
            return linear_loss(features, weight, targets, options=_options(loss), impl=impl)

    return run


def recompute_loss(impl: str) -> Callable:
    """``impl``'s backend with every loss's gradient recomputed in the backward pass."""

    def run(x, weight, targets, loss: str) -> torch.Tensor:
        if impl == "triton":
            from megaclass.ops.linear_cross_entropy.function import TritonBackend as backend_class
        else:
            backend_class = ReferenceBackend
        with autocast():
            features = x.to(torch.bfloat16) if x.is_cuda else x
            backend = backend_class(fuse_gradient=False)
            return linear_loss_apply(features, weight, targets, None, _options(loss), backend)

    return run


def cce_loss(x, weight, targets, loss: str) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(x.to(torch.bfloat16), weight.to(torch.bfloat16), targets)


def fp32_reference(x, weight, targets, loss: str) -> torch.Tensor:
    """The executable spec in fp32: the truth of the self-check."""
    return linear_loss(x.float(), weight, targets, options=_options(loss), impl="reference")


PROVIDERS: dict[str, Callable] = {
    "torch": torch_loss,
    "cce": cce_loss,
    "megaclass": head_loss("auto"),
    "megaclass-triton": head_loss("triton"),
    "megaclass-triton-recompute": recompute_loss("triton"),
    "megaclass-torch": head_loss("torch"),
    "reference": head_loss("reference"),
    "reference-recompute": recompute_loss("reference"),
}


def available_providers(wanted: list[str]) -> list[str]:
    """``wanted`` less those this machine cannot run (each skip is said on stderr)."""
    unknown = sorted(set(wanted) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {sorted(PROVIDERS)}")
    kept = []
    for name in wanted:
        if name == "cce" and not cce_available():
            print("cce: cut_cross_entropy not importable or no CUDA device; skipped", file=sys.stderr)
        elif name.startswith("megaclass-triton") and not _triton_runnable():
            print(f"{name}: needs CUDA or TRITON_INTERPRET=1; skipped", file=sys.stderr)
        else:
            kept.append(name)
    return kept


def _triton_runnable() -> bool:
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _loss_and_grads(fn: Callable, x, weight, targets, loss: str) -> list[torch.Tensor]:
    x_leaf, weight_leaf = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    out = fn(x_leaf, weight_leaf, targets, loss)
    out.backward()
    return [out.detach().float(), x_leaf.grad.float(), weight_leaf.grad.float()]


def _relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (
        (value.double() - truth.double()).abs().max() / truth.double().abs().max().clamp_min(1e-30)
    ).item()


def self_check(providers: list[str], losses: list[str], *, quick: bool, labels_per_sample: int) -> bool:
    """Loss, dx and dW of every provider against the fp32 reference on small problems; prints a table."""
    print("Self-check against the fp32 reference (max relative error; bound: 2x torch's, at least 2^-7)")
    print("| B | C | D | loss | provider | loss err | dx err | dW err | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    passed = True
    for batch, classes, dim in CHECK_SHAPES_QUICK if quick else CHECK_SHAPES:
        for loss in losses:
            inputs = make_inputs(batch, classes, dim, loss, labels_per_sample)
            truth = _loss_and_grads(fp32_reference, *inputs, loss)
            bounds = [CHECK_FLOOR] * 3
            names = sorted(providers, key=lambda name: name != "torch")  # torch first: it sets the bound
            for name in names:
                if name == "cce" and loss == "bce":
                    continue
                try:
                    got = _loss_and_grads(PROVIDERS[name], *inputs, loss)
                except Exception as error:  # a failing provider is a FAIL row, not the end of the check
                    print(f"| {batch} | {classes} | {dim} | {loss} | {name} | {error!r:.80} | | | FAIL |")
                    passed = False
                    continue
                errors = [_relative_error(value, exact) for value, exact in zip(got, truth, strict=True)]
                if name == "torch":
                    bounds = [max(CHECK_FLOOR, 2 * error) for error in errors]
                ok = all(error <= bound for error, bound in zip(errors, bounds, strict=True))
                passed &= ok or name in ("torch", "cce")  # the baselines' accuracy is reported, not ours
                cells = " | ".join(f"{error:.2e}" for error in errors)
                verdict = "PASS" if ok else "FAIL"
                print(f"| {batch} | {classes} | {dim} | {loss} | {name} | {cells} | {verdict} |", flush=True)
            del inputs, truth
    print("self-check:", "PASS" if passed else "FAIL")
    return passed


def make_case(provider: str, mode: str, fn: Callable, params: dict, lps: int, *, graph: bool = False) -> Case:
    """One timed case; ``graph``: ``fwd+bwd`` captured in a CUDA graph (gradients reset inside the step)."""
    batch, classes, dim, loss = params["B"], params["C"], params["D"], params["loss"]
    state: dict = {}

    def setup():
        x, weight, targets = make_inputs(batch, classes, dim, loss, lps)
        if graph:
            state["tensors"] = ()

            def train_step() -> None:
                x.grad = weight.grad = None
                fn(x, weight, targets, loss).backward()

            return cuda_graph(train_step)
        state["tensors"] = (x, weight)
        if mode == "fwd":
            return lambda: fn(x, weight, targets, loss)
        if mode == "bwd":
            out = fn(x, weight, targets, loss)
            return lambda: out.backward(retain_graph=True)
        return lambda: fn(x, weight, targets, loss).backward()

    return Case(
        f"{provider}-graph" if graph else provider,
        mode,
        params,
        setup,
        grad_to_none=lambda: state.pop("tensors"),  # popped: finished cases must not keep their inputs
        flops=floor_flops(batch, classes, dim, mode),
        bytes_moved=floor_bytes(classes, dim, mode),
    )


def floor_flops(batch: int, classes: int, dim: int, mode: str) -> float:
    """The matmuls a pass cannot avoid, ``2BCD`` each: the logits (fwd); ``dW`` and ``dx`` (bwd)."""
    return 2.0 * batch * classes * dim * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]


def floor_bytes(classes: int, dim: int, mode: str) -> float:
    """The fp32 ``W`` traffic a pass cannot avoid: read (fwd), read and its fp32 gradient written (bwd)."""
    return 4.0 * classes * dim * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]


def build_cases(args: argparse.Namespace, providers: list[str]) -> list[Case]:
    classes_list = args.classes or ((2_003,) if args.quick else FULL_CLASSES)
    dim, batch = (64, 16) if args.quick else (args.dim, args.batch)
    cases = []
    for classes in classes_list:
        for loss in _split(args.losses):
            for provider in providers:
                if provider == "cce" and loss == "bce":
                    continue  # Cut Cross-Entropy has no binary cross-entropy
                for mode in _split(args.modes):
                    params = {"C": classes, "D": dim, "B": batch, "loss": loss}
                    cases.append(
                        make_case(provider, mode, PROVIDERS[provider], params, args.labels_per_sample)
                    )
                    graphable = mode == "fwd+bwd" and provider.startswith("megaclass")
                    if args.cuda_graph and graphable and torch.cuda.is_available():
                        graphed = make_case(
                            provider, mode, PROVIDERS[provider], params, args.labels_per_sample, graph=True
                        )
                        cases.append(graphed)
    return cases


class CrashGuard:
    """The ``isolate`` hook of :func:`run_cases`: risky cases run in a child process; after a crash there,
    the provider's other cases at that size are refused instead of run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.always = set(_split(args.isolate))
        self.crashed: dict[tuple[str, int], str] = {}

    def risky(self, case: Case) -> bool:
        return case.provider == "cce" and case.params["C"] * case.params["D"] >= INDEX_LIMIT

    def __call__(self, case: Case) -> Result | None:
        if not (self.risky(case) or case.provider in self.always):
            return None
        key = (case.provider, case.params["C"])
        if key in self.crashed:
            return Result(case.provider, case.mode, dict(case.params), status=self.crashed[key])
        result = run_in_child(case, self._argv(case), timeout_s=300)
        if result.status not in ("ok", "OOM"):
            why = "32-bit indexing (C*D >= 2^31)" if self.risky(case) else result.status[:80]
            self.crashed[key] = f"refused: crashes: {why}; shown once in a child process above"
        return result

    def _argv(self, case: Case) -> list[str]:
        args, params = self.args, case.params
        argv = [str(Path(__file__).resolve()), "--in-child", "--providers", case.provider]
        argv += ["--classes", str(params["C"]), "--losses", params["loss"], "--modes", case.mode]
        argv += ["--dim", str(args.dim), "--batch", str(args.batch), "--reps", str(args.reps)]
        argv += ["--warmup", str(args.warmup), "--labels-per-sample", str(args.labels_per_sample)]
        return argv + (["--quick"] if args.quick else []) + (["--autotune"] if args.autotune else [])


def print_floor(cases: list[Case], results: list[Result]) -> None:
    """Every fwd+bwd row against the card's floor: max(FLOPs / bf16 rate, bytes / copy bandwidth), with the
    bound that sets it (see the module docstring for the count)."""
    rates = device_rates()
    if rates is None:
        print("\n(no GPU: floor not measured)")
        return
    print(f"\nCard: {rates.name}: copy {rates.bandwidth_gbs:.0f} GB/s, bf16 {rates.bf16_tflops:.0f} TFLOP/s")
    print("Floor: 3 x 4CD bytes (fp32 W read fwd + bwd, fp32 grad W written), 6BCD FLOPs (fwd z; bwd dW, dx)")
    print("| C | B | loss | provider | GFLOP | GB moved | bound | floor_ms | time_ms | x floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, result in zip(cases, results, strict=True):
        if case.mode != "fwd+bwd" or result.status != "ok":
            continue
        floor = rates.floor_ms(flops=case.flops, bytes_moved=case.bytes_moved)
        compute_ms = case.flops / (rates.bf16_tflops * 1e12) * 1e3
        bound = "FLOPs" if compute_ms >= floor else "bytes"
        print(
            f"| {case.params['C']} | {case.params['B']} | {case.params['loss']} | {case.provider} | "
            f"{case.flops / 1e9:.0f} | {case.bytes_moved / 1e9:.2f} | {bound} | {floor:.3f} | "
            f"{result.time_ms:.3f} | {result.time_ms / floor:.2f} |"
        )


def print_auto_choices(cases: list[Case]) -> None:
    """What ``impl="auto"`` resolves to for each problem the ``megaclass`` provider ran."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    problems = sorted({(case.params["B"], case.params["C"], case.params["D"]) for case in cases
                       if case.provider == "megaclass"})  # fmt: skip
    if problems:
        print("\nmegaclass impl=auto resolves to (B x D, C, bf16 -> backend):")
    for batch, classes, dim in problems:
        impl = resolve_impl(
            "auto", device_type=device_type, batch=batch, num_classes=classes, dim=dim, dtype=torch.bfloat16
        )
        print(f"  B={batch} D={dim} C={classes} bfloat16 -> {impl.value}")


def main() -> None:
    args = parse_args()
    if args.autotune:
        os.environ["MEGACLASS_AUTOTUNE"] = "1"
    if args.quick:
        args.reps = min(args.reps, 3)
        args.warmup = min(args.warmup, 1)
    providers = available_providers(_split(args.providers))
    if not (args.skip_check or args.in_child):
        check_losses = _split(args.losses)
        if not self_check(
            providers, check_losses, quick=args.quick, labels_per_sample=args.labels_per_sample
        ):
            print("self-check FAILED: the timings below are of wrong results", file=sys.stderr)
        print()
    if not torch.cuda.is_available():
        for name in [name for name in providers if name.startswith("megaclass-triton")]:
            providers.remove(name)  # the interpreter checks the kernels; its speed means nothing
            print(f"{name}: not timed in the CPU interpreter (checked above)", file=sys.stderr)
    cases = build_cases(args, providers)
    guard = None if args.in_child else CrashGuard(args)
    results = run_cases(
        cases, benchmark="heads", results_path=args.results, reps=args.reps, warmup=args.warmup, isolate=guard
    )
    if args.in_child:
        return
    print()
    print(markdown_table(results))
    print_floor(cases, results)
    print_auto_choices(cases)


if __name__ == "__main__":
    main()
