"""Sparse head benchmark: fixed fan-in layer with its fused BCE loss vs plain PyTorch dense BCE and torch CSR.

    python benchmarks/sparse.py                     # C = 670,091 and 2,812,281, D = 768, B = 128 (a GPU)
    python benchmarks/sparse.py --quick             # small sizes, runs on CPU as a smoke test
    python benchmarks/sparse.py --fan-in 32 --groups 1 16 32 --modes fwd+bwd,step --cuda-graph
    python benchmarks/sparse.py --fan-in 32 --groups 32 --modes fwd+bwd --providers megaclass --cuda-graph \
        --variants fused,unfused --weight-dtypes fp32,bf16      # the kernel schedules side by side

Modes: ``fwd`` (the loss), ``fwd+bwd`` (loss and all gradients), ``step`` (``fwd+bwd`` then an AdamW step on
the head's parameters: what one training step of the head costs). Peak memory counts weights, indices,
gradients and, for ``step``, the AdamW state.

Providers, all with fp32 master weights and bf16 features (as under autocast):

- ``megaclass``: :func:`megaclass.ops.fixed_fanin.fixed_fanin_loss` on ``weight (C, K)`` fp32, ``index``
  int32 ``(ceil(C / G), K)`` and a bias; Triton kernels, the loss fused (no ``B x C`` logits kept; BCE by
  default, ``--losses bce,softmax`` adds the softmax cross-entropy, recomputed per label tile in backward).
  ``--variants`` runs kernel schedules side by side: ``fused`` (the defaults: BCE / hinge gradients computed
  in the forward pass; one label tile per program in the passes that write gradients, several in a forward
  pass without them, by ``kernels.tiles_per_program``) and ``unfused`` (the backward pass recomputes the
  logits, one tile per program in every pass: the schedule before fusion).
  ``--weight-dtypes fp32,bf16`` adds bf16 weights and bias (``optim.head_state=bf16_sr``; ``step`` then
  runs :class:`megaclass.train.low_precision.BF16AdamW`, stochastic rounding).
- ``torch-dense``: ``x @ W.T`` (``W (C, D)``) under bf16 autocast, then ``F.binary_cross_entropy_with_logits``
  against a dense ``B x C`` target: the baseline a user writes.
- ``torch-csr``: the same fixed fan-in weights as a ``torch.sparse_csr_tensor (C, D)`` times ``x.T`` in fp32,
  then the same dense BCE (backward where torch supports it; an error row otherwise).
- ``megaclass-graph`` (``--cuda-graph``): the ``megaclass`` step captured in a CUDA graph and replayed, so
  the time is the GPU's alone, without the host's launch overhead of some 70 small ops per step.

The floor printed per case is the card's roofline for the fused op: FLOPs ``2BCK`` forward, ``4BCK`` backward
over the measured bf16 matmul rate, and bytes (``floor_bytes``: weights, bias and index read once, their
gradient written, the input-gradient buffer written and read; for ``step`` AdamW reads weights, gradient and
two moments and writes three of them) over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Case, add_common_arguments, cuda_graph, device_rates, markdown_table, run_cases  # noqa: E402
from megaclass.dst import random_fanin_index  # noqa: E402
from megaclass.ops import resolve_impl  # noqa: E402
from megaclass.ops.fixed_fanin import (  # noqa: E402
    FaninLoss,
    FixedFaninFunction,
    FixedFaninOptions,
    combine_loss,
)
from megaclass.targets import RaggedLabels  # noqa: E402
from megaclass.train.low_precision import BF16AdamW  # noqa: E402

FULL_CLASSES = (670_091, 2_812_281)
VARIANTS = {"fused": {}, "unfused": {"fuse_gradient": False, "tiles_per_program": 1}}
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.set_defaults(modes="fwd,fwd+bwd,step", reps=10, warmup=1)
    parser.add_argument("--classes", type=int, nargs="+", help="C values (default 670091 2812281)")
    parser.add_argument("--fan-in", type=int, nargs="+", default=[32, 64, 128], help="K values")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 16, 32], help="G values")
    parser.add_argument("--dim", type=int, default=768, help="D, the feature width")
    parser.add_argument("--batch", type=int, default=128, help="B, the batch size")
    parser.add_argument("--providers", default="megaclass,torch-dense,torch-csr", help="comma-separated")
    parser.add_argument("--labels-per-sample", type=int, default=5, help="positives per sample")
    parser.add_argument(
        "--losses", default="bce", help="fused losses of the megaclass rows: bce,hinge,softmax"
    )
    parser.add_argument(
        "--variants", default="fused", help="megaclass kernel schedules: fused,unfused (see the docstring)"
    )
    parser.add_argument("--weight-dtypes", default="fp32", help="megaclass weight dtypes: fp32,bf16")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="add megaclass-graph rows: fwd+bwd / step captured in a CUDA graph and replayed (GPU only)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print the GPU kernel time table of each megaclass case"
    )
    return parser.parse_args()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast() -> contextlib.AbstractContextManager:
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if torch.cuda.is_available()
        else contextlib.nullcontext()
    )


def _targets(batch: int, classes: int, per_sample: int, device: torch.device) -> RaggedLabels:
    labels = torch.randint(0, classes, (batch, per_sample), device=device)  # (B, L / B)
    indptr = torch.arange(0, batch * per_sample + 1, per_sample, device=device)
    return RaggedLabels(indptr, labels.reshape(-1))


def _optimizer(params: list[torch.Tensor], **options: bool) -> torch.optim.Optimizer:
    """AdamW as the trainer runs it: torch's for fp32 parameters, stochastically rounded for bf16 ones."""
    if params[0].dtype == torch.bfloat16:
        return BF16AdamW(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3, **options)


def _timed(mode: str, params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """The closure to time for ``mode``; ``step`` owns an AdamW over ``params``."""
    if mode == "fwd":

        def run() -> None:
            with torch.no_grad():
                loss_fn()

        return run
    # fused: one multi-tensor kernel per step on CUDA, what a user of a large head should pick
    fused = torch.cuda.is_available()
    optimizer = _optimizer(params, fused=fused) if mode == "step" else None

    def run_train() -> None:
        loss_fn().backward()
        if optimizer is not None:
            optimizer.step()

    return run_train


def _graphed(
    mode: str, params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]
) -> Callable[[], None]:
    """``mode``'s work (``fwd+bwd`` or ``step``) captured in a CUDA graph (the warm-up calls also build the
    cached column order), replayed: a training step's GPU time without the host's per-op launch overhead."""
    optimizer = _optimizer(params, fused=True, capturable=True) if mode == "step" else None

    def train_step() -> None:
        for param in params:
            param.grad = None
        loss_fn().backward()
        if optimizer is not None:
            optimizer.step()

    return cuda_graph(train_step)


def megaclass_case(
    mode: str,
    batch: int,
    classes: int,
    dim: int,
    fan_in: int,
    group: int,
    per_sample: int,
    loss: str,
    *,
    variant: str = "fused",
    weight_dtype: str = "fp32",
    graph: bool = False,
):
    held: list[torch.Tensor] = []  # the parameters, whose grads the harness resets between calls

    def setup() -> Callable[[], None]:
        device = _device()
        generator = torch.Generator(device=device).manual_seed(0)
        index = random_fanin_index(-(-classes // group), dim, fan_in, generator=generator)
        dtype = WEIGHT_DTYPES[weight_dtype]
        weight = torch.empty(classes, fan_in, device=device).uniform_(-(fan_in**-0.5), fan_in**-0.5)
        weight = weight.to(dtype).requires_grad_()
        bias = torch.zeros(classes, device=device, dtype=dtype, requires_grad=True)
        x = torch.randn(batch, dim, device=device, dtype=torch.bfloat16)
        targets = _targets(batch, classes, per_sample, device)
        samples, labels = targets.sample_ids(), targets.indices.long()
        impl = resolve_impl("auto", x, weight, index)
        options = FixedFaninOptions(group=group, loss=FaninLoss(loss), impl=impl, **VARIANTS[variant])
        held[:] = [weight, bias]

        def loss_fn() -> torch.Tensor:  # what fixed_fanin_loss runs, with the variant's kernel options
            rows, positive = FixedFaninFunction.apply(
                x, weight, index, bias, samples, labels, options, torch.is_grad_enabled()
            )
            return combine_loss(rows, positive, targets, loss)

        return _graphed(mode, [weight, bias], loss_fn) if graph else _timed(mode, [weight, bias], loss_fn)

    return setup, held


def dense_case(mode: str, batch: int, classes: int, dim: int, per_sample: int):
    held: list[torch.Tensor] = []  # the parameters, whose grads the harness resets between calls

    def setup() -> Callable[[], None]:
        device = _device()
        weight = torch.empty(classes, dim, device=device).uniform_(-(dim**-0.5), dim**-0.5).requires_grad_()
        x = torch.randn(batch, dim, device=device)
        targets = _targets(batch, classes, per_sample, device)
        dense_target = torch.zeros(batch, classes, device=device)
        dense_target[targets.sample_ids(), targets.indices] = 1.0
        held[:] = [weight]

        def loss_fn() -> torch.Tensor:
            with _autocast():
                logits = x @ weight.T  # (B, C)
            return F.binary_cross_entropy_with_logits(logits.float(), dense_target, reduction="sum") / batch

        return _timed(mode, [weight], loss_fn)

    return setup, held


def csr_case(mode: str, batch: int, classes: int, dim: int, fan_in: int, per_sample: int):
    held: list[torch.Tensor] = []  # the parameters, whose grads the harness resets between calls

    def setup() -> Callable[[], None]:
        device = _device()
        generator = torch.Generator(device=device).manual_seed(0)
        cols = random_fanin_index(classes, dim, fan_in, generator=generator).long().sort(dim=1).values
        crow = torch.arange(0, classes * fan_in + 1, fan_in, device=device)
        values = torch.empty(classes * fan_in, device=device).uniform_(-(fan_in**-0.5), fan_in**-0.5)
        values.requires_grad_()
        x = torch.randn(batch, dim, device=device)
        targets = _targets(batch, classes, per_sample, device)
        dense_target = torch.zeros(batch, classes, device=device)
        dense_target[targets.sample_ids(), targets.indices] = 1.0
        held[:] = [values]

        def loss_fn() -> torch.Tensor:
            sparse = torch.sparse_csr_tensor(crow, cols.reshape(-1), values, (classes, dim))
            logits = (sparse @ x.T).T  # (B, C)
            return F.binary_cross_entropy_with_logits(logits, dense_target, reduction="sum") / batch

        return _timed(mode, [values], loss_fn)

    return setup, held


def floor_bytes(mode: str, classes: int, fan_in: int, group: int, batch: int, weight_bytes: int) -> float:
    """Fewest global-memory bytes: weights, bias and index read once, in ``fwd+bwd`` their gradient written
    and the input-gradient buffer (one bf16 row of ``B`` per connection) written and read once; ``step``
    adds AdamW reading weights, gradient and two moments and writing three of them."""
    weights = (classes * fan_in + classes) * weight_bytes
    index = -(-classes // group) * fan_in * 4
    if mode == "fwd":
        return weights + index
    grouped = group >= 16 and group & (group - 1) == 0  # the tensor-core kernels: a row per connection
    buffer_rows = -(-classes // group) * fan_in if grouped else classes  # else a dz row per label
    buffer = 2 * buffer_rows * batch * 2  # bf16, written and read
    total = 2 * weights + index + buffer
    return total + (7 * weights if mode == "step" else 0)


def build_cases(args: argparse.Namespace) -> list[Case]:
    classes_list = args.classes or ([5_003, 20_011] if args.quick else list(FULL_CLASSES))
    fan_ins = [8, 16] if args.quick else args.fan_in
    groups = [1, 16] if args.quick else args.groups
    dim, batch = (64, 8) if args.quick else (args.dim, args.batch)
    providers = args.providers.split(",")
    modes = args.modes.split(",")
    cases = []
    for classes in classes_list:
        for mode in modes:
            for fan_in in fan_ins:
                megaclass_grid = product(
                    groups if "megaclass" in providers else [],
                    args.losses.split(","),
                    args.variants.split(","),
                    args.weight_dtypes.split(","),
                )
                for group, loss, variant, weights in megaclass_grid:
                    params = {"C": classes, "K": fan_in, "G": group, "D": dim, "B": batch, "loss": loss,
                              "variant": variant, "weights": weights}  # fmt: skip
                    flops = 2 * batch * classes * fan_in * (1 if mode == "fwd" else 3)
                    per_sample = args.labels_per_sample
                    options = {"variant": variant, "weight_dtype": weights}
                    floor = floor_bytes(mode, classes, fan_in, group, batch, WEIGHT_DTYPES[weights].itemsize)
                    setup, held = megaclass_case(
                        mode, batch, classes, dim, fan_in, group, per_sample, loss, **options
                    )
                    cases.append(Case("megaclass", mode, params, setup, lambda h=held: h, flops, floor))
                    graphable = mode == "fwd+bwd" or (mode == "step" and weights == "fp32")
                    if args.cuda_graph and graphable and torch.cuda.is_available():
                        setup, held = megaclass_case(
                            mode, batch, classes, dim, fan_in, group, per_sample, loss, **options, graph=True
                        )
                        cases.append(
                            Case("megaclass-graph", mode, params, setup, lambda h=held: h, flops, floor)
                        )
                if "torch-csr" in providers and fan_in == fan_ins[0]:
                    params = {"C": classes, "K": fan_in, "G": 1, "D": dim, "B": batch}
                    setup, held = csr_case(mode, batch, classes, dim, fan_in, args.labels_per_sample)
                    cases.append(Case("torch-csr", mode, params, setup, lambda h=held: h))
            if "torch-dense" in providers:
                params = {"C": classes, "K": dim, "G": 1, "D": dim, "B": batch}
                setup, held = dense_case(mode, batch, classes, dim, args.labels_per_sample)
                flops = 2 * batch * classes * dim * (1 if mode == "fwd" else 3)
                cases.append(Case("torch-dense", mode, params, setup, lambda h=held: h, flops))
    return cases


def print_floors(cases: list[Case]) -> None:
    rates = device_rates()
    if rates is None:
        print("(no GPU: floors not measured)")
        return
    print(f"\n{rates.name}: {rates.bandwidth_gbs:.0f} GB/s copy, {rates.bf16_tflops:.0f} TFLOP/s bf16 matmul")
    for case in cases:
        if case.provider == "megaclass":
            floor = rates.floor_ms(flops=case.flops, bytes_moved=case.bytes_moved)
            params = " ".join(f"{k}={v}" for k, v in case.params.items())
            print(
                f"floor {case.mode:>7} {params}: {floor:.3f} ms "
                f"({case.flops:.3g} FLOP, {case.bytes_moved:.3g} B)"
            )


def print_profiles(cases: list[Case]) -> None:
    """Kernel times of three calls of each megaclass case (after a warm-up call), by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    for case in cases:
        if case.provider != "megaclass":
            continue
        fn = case.setup()
        grads = case.grad_to_none()
        for call in range(4):
            for tensor in grads:
                tensor.grad = None
            if call == 1:
                profiler = profile(activities=activities)
                profiler.__enter__()
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler.__exit__(None, None, None)
        params = " ".join(f"{k}={v}" for k, v in case.params.items())
        print(f"\nprofile {case.mode} {params} (3 calls)")
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=14, max_name_column_width=60))
        del fn, grads


def main() -> None:
    args = parse_args()
    cases = build_cases(args)
    reps, warmup = (2, 1) if args.quick else (args.reps, args.warmup)
    results = run_cases(cases, benchmark="sparse", results_path=args.results, reps=reps, warmup=warmup)
    print()
    print(markdown_table(results))
    print_floors(cases)
    if args.profile:
        print_profiles(cases)


if __name__ == "__main__":
    main()
