"""Fused linear + loss ops against dense PyTorch (``x @ W.T``, then the loss) in float64, gradients too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaclass.ops import Impl
from megaclass.ops.collectives import ClassShard
from megaclass.ops.linear_cross_entropy import (
    LinearLossOptions,
    dense_backend,
    linear_bce,
    linear_cross_entropy,
    linear_loss,
    linear_squared_hinge,
    resolve_impl,
)
from megaclass.ops.linear_cross_entropy.chunked import TorchChunkedBackend, chunk_size_for
from megaclass.ops.linear_cross_entropy.common import DenseOperands
from megaclass.ops.linear_cross_entropy.reference import ReferenceBackend
from megaclass.ops.margins import MarginConfig, MarginKind, margin_logits
from megaclass.targets import RaggedLabels

IMPLS = ["reference", "triton", "torch"]
LOSSES = ["softmax", "bce", "squared_hinge"]
# (B, C, D): one row, one class, primes, the interpreter's 16-wide blocks +-1, B over one row block (atomics)
SHAPES = [(1, 1, 1), (1, 17, 5), (7, 31, 19), (5, 15, 16), (6, 16, 17), (17, 33, 8)]
ARCFACE = MarginConfig(kind=MarginKind.ARCFACE, scale=8.0, margin=0.4)
COSFACE = MarginConfig(kind=MarginKind.COSFACE, scale=16.0, margin=0.35)


def dense_loss(x, weight, bias, targets, loss, *, margin=None, reduction="mean"):
    """The spec: full logits, then the loss, in whatever dtype the inputs have."""
    if margin is not None:
        cosine = F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).T
        logits = margin_logits(cosine, targets, margin)
        return F.cross_entropy(logits, targets, reduction=reduction)
    logits = x @ weight.T
    if bias is not None:
        logits = logits + bias
    batch, classes = logits.shape
    ragged = (
        targets
        if isinstance(targets, RaggedLabels)
        else RaggedLabels(torch.arange(batch + 1, device=targets.device), targets)
    )
    positive = torch.zeros(batch, classes, dtype=logits.dtype, device=logits.device)
    positive[ragged.sample_ids(), ragged.indices] = 1.0
    if loss == "softmax":
        counts = positive.sum(1)
        per_row = -(positive * torch.log_softmax(logits, 1)).sum(1) / counts.clamp_min(1)
        has = counts > 0
        return per_row[has].sum() / (has.sum().clamp_min(1) if reduction == "mean" else 1)
    if loss == "bce":
        per_row = F.binary_cross_entropy_with_logits(logits, positive, reduction="none").sum(1)
    else:
        per_row = F.relu(1 - (2 * positive - 1) * logits).square().sum(1)
    return per_row.mean() if reduction == "mean" else per_row.sum()


def make_targets(kind, batch, classes):
    if kind == "multiclass":
        return torch.randint(0, classes, (batch,))
    labels = []
    for row in range(batch):
        count = 0 if row % 3 == 1 else 1 + row % min(classes, 4)  # every third row has no label
        labels.append(torch.randperm(classes)[:count].tolist())
    return RaggedLabels.from_lists(labels)


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def assert_close(actual, expected, *, rtol, atol, name):
    error = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = (error > bound).nonzero()
    assert bad.numel() == 0, (
        f"{name}: first mismatch at {bad[0].tolist()}: {actual.flatten()[0:3]} vs expected"
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target_kind", ["multiclass", "multilabel"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_matches_dense(device_for, impl, loss, shape, target_kind, with_bias):
    with torch.device(device_for(impl)):
        batch, classes, dim = shape
        x = torch.randn(batch, dim, requires_grad=True)
        weight = torch.randn(classes, dim, requires_grad=True)
        bias = torch.randn(classes, requires_grad=True) if with_bias else None
        targets = make_targets(target_kind, batch, classes)
        options = LinearLossOptions(loss=loss, chunk_size=16)
        out = linear_loss(x, weight, targets, bias=bias, options=options, impl=impl)
        leaves = [x, weight, bias]
        expected = dense_loss(
            x.double(), weight.double(), None if bias is None else bias.double(), targets, loss
        )
        assert_close(out, expected, rtol=1e-5, atol=1e-5, name="loss")
        for name, got, want in zip(
            ["x", "weight", "bias"], grads_of(out, leaves), grads_of(expected, leaves), strict=False
        ):
            assert_close(got, want, rtol=1e-4, atol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("margin", [ARCFACE, COSFACE], ids=["arcface", "cosface"])
@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 31, 19), (17, 33, 8)])
def test_margin_matches_dense(device_for, impl, margin, shape):
    with torch.device(device_for(impl)):
        batch, classes, dim = shape
        x = torch.randn(batch, dim, requires_grad=True)
        weight = torch.randn(classes, dim, requires_grad=True)
        targets = torch.randint(0, classes, (batch,))
        out = linear_cross_entropy(x, weight, targets, margin=margin, chunk_size=16, impl=impl)
        expected = dense_loss(x.double(), weight.double(), None, targets, "softmax", margin=margin)
        assert_close(out, expected, rtol=1e-5, atol=1e-5, name="loss")
        for name, got, want in zip(
            ["x", "weight"], grads_of(out, [x, weight]), grads_of(expected, [x, weight]), strict=False
        ):
            assert_close(got, want, rtol=1e-4, atol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("loss", "margin"),
    [("softmax", None), ("bce", None), ("squared_hinge", None), ("softmax", ARCFACE)],
    ids=["softmax", "bce", "squared_hinge", "arcface"],
)
def test_bf16_error_within_twice_reference_error(device_for, impl, loss, margin):
    """bf16 inputs, fp32 master weights: error against the fp64 truth at most 2x plain PyTorch's in bf16.

    PyTorch's bf16 error is taken as at least one bf16 rounding of the value (2^-8 relative): a lucky rounding
    of a scalar says nothing about the computation's error."""
    with torch.device(device_for(impl)):
        batch, classes, dim = 9, 45, 40
        x = torch.randn(batch, dim).bfloat16().requires_grad_(True)
        weight = (torch.randn(classes, dim) / dim**0.5).requires_grad_(True)
        targets = torch.randint(0, classes, (batch,))
        options = LinearLossOptions(loss=loss, margin=margin or MarginConfig(), chunk_size=16)
        out = linear_loss(x, weight, targets, options=options, impl=impl)
        got = [out, *grads_of(out, [x, weight])]
        truth_loss = dense_loss(x.double(), weight.double(), None, targets, loss, margin=margin)
        truth = [truth_loss, *grads_of(truth_loss, [x, weight])]
        plain_loss = dense_loss(
            x, weight.bfloat16(), None, targets, loss, margin=margin
        )  # all bf16, like autocast
        plain = [plain_loss, *grads_of(plain_loss, [x, weight])]
        for name, ours, theirs, exact in zip(
            ["loss", "grad x", "grad weight"], got, plain, truth, strict=False
        ):
            our_error = (ours.double() - exact).abs().max().item()
            their_error = max((theirs.double() - exact).abs().max().item(), 2**-8 * exact.abs().max().item())
            assert our_error <= 2 * their_error + 1e-6, (
                f"{name}: error {our_error:.3g} vs bf16 PyTorch {their_error:.3g}"
            )


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs_and_sum_reduction(device_for, impl):
    with torch.device(device_for(impl)):
        base = torch.randn(12, 6, requires_grad=True)
        x = base.T  # (6, 12), non-contiguous
        weight_base = torch.randn(12, 23, requires_grad=True)
        weight = weight_base.T  # (23, 12), non-contiguous
        targets = torch.randint(0, 23, (6,))
        out = linear_cross_entropy(x, weight, targets, reduction="sum", chunk_size=16, impl=impl)
        expected = dense_loss(x.double(), weight.double(), None, targets, "softmax", reduction="sum")
        assert_close(out, expected, rtol=1e-5, atol=1e-5, name="loss")
        for got, want in zip(
            grads_of(out, [base, weight_base]), grads_of(expected, [base, weight_base]), strict=False
        ):
            assert_close(got, want, rtol=1e-4, atol=1e-5, name="grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_public_functionals_and_no_labels(device_for, impl):
    with torch.device(device_for(impl)):
        x, weight = torch.randn(3, 8, requires_grad=True), torch.randn(10, 8)
        empty = RaggedLabels.from_lists([[], [], []])
        loss = linear_cross_entropy(x, weight, empty, impl=impl)
        assert loss.item() == 0.0  # no sample has a label: nothing to average
        loss.backward()
        assert torch.count_nonzero(x.grad) == 0
        y = torch.tensor([1, 2, 3])
        plain = (
            F.binary_cross_entropy_with_logits(x @ weight.T, F.one_hot(y, 10).float(), reduction="sum") / 3
        )
        torch.testing.assert_close(linear_bce(x, weight, y, impl=impl), plain)
        hinge = F.relu(1 - (2 * F.one_hot(y, 10).float() - 1) * (x @ weight.T)).square().sum() / 3
        torch.testing.assert_close(linear_squared_hinge(x, weight, y, impl=impl), hinge)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"x": torch.randn(3)}, "x must be"),
        ({"weight": torch.randn(5, 3)}, "weight must be"),
        ({"targets": torch.tensor([0, 1])}, "targets must be"),
        ({"targets": torch.tensor([0, 1, 10])}, "out of range"),
        ({"targets": torch.tensor([0.0, 1.0, 2.0])}, "integer"),
        ({"bias": torch.randn(4)}, "bias must be"),
        ({"margin": ARCFACE, "targets": RaggedLabels.from_lists([[1], [2], [3]])}, "multi-class"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, message):
    args = {
        "x": torch.randn(3, 4),
        "weight": torch.randn(10, 4),
        "targets": torch.tensor([0, 1, 2]),
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(args.pop("x"), args.pop("weight"), args.pop("targets"), **args)


def test_margin_needs_softmax():
    with pytest.raises(ValueError, match="softmax"):
        LinearLossOptions(loss="bce", margin=ARCFACE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    ("batch", "classes", "dim"),
    [(128, 20_011, 768), (300, 4_099, 200), (3, 130, 64), (130, 2**17 + 5, 64)],  # last: 2 super-chunks
)
def test_cuda_kernels_match_reference_at_tile_sizes(impl, loss, batch, classes, dim):
    """The compiled kernels / cuBLAS path (large tiles, several row blocks and super-chunks, partial tiles)
    against the fp64 dense truth: at most twice the chunked fp32-accumulating reference's error."""
    x = torch.randn(batch, dim, device="cuda").bfloat16().requires_grad_(True)
    weight = (torch.randn(classes, dim, device="cuda") / dim**0.5).requires_grad_(True)
    bias = torch.randn(classes, device="cuda").requires_grad_(True)
    targets = make_targets("multilabel", batch, classes).to("cuda")
    options = LinearLossOptions(loss=loss)
    got = linear_loss(x, weight, targets, bias=bias, options=options, impl=impl)
    reference = linear_loss(x, weight, targets, bias=bias, options=options, impl="reference")
    truth = dense_loss(x.double(), weight.double(), bias.double(), targets, loss)
    leaves = [x, weight, bias]
    for ours, theirs, exact in zip(
        [got, *grads_of(got, leaves)],
        [reference, *grads_of(reference, leaves)],
        [truth, *grads_of(truth, leaves)],
        strict=True,
    ):
        our_error = (ours.double() - exact).abs().max().item()
        their_error = max((theirs.double() - exact).abs().max().item(), 1e-6 * exact.abs().max().item())
        assert our_error <= 2 * their_error, f"error {our_error:.3g} vs chunked PyTorch {their_error:.3g}"


def _dense_inputs(batch, classes, dim, *, dtype, cosine, with_bias, exclude):
    """Inputs of a backend's ``grads``: features (unit rows with a margin), rows, bias, excluded classes."""
    x = torch.randn(batch, dim)
    if cosine:
        x = F.normalize(x, dim=-1)
    x = x.to(dtype)
    weight = torch.randn(classes, dim) / dim**0.5
    bias = torch.randn(classes) if with_bias else None
    excluded = torch.randint(0, classes, (batch,)) if exclude else None
    margin = ARCFACE if cosine else MarginConfig()
    return x, weight, bias, excluded, margin


CHUNK_CASES = [  # (B, C, classes per super-chunk): C = chunk - 1, chunk, chunk + 1, two chunks + 1, ragged
    (5, 31, 32),
    (5, 32, 32),
    (5, 33, 32),
    (17, 65, 32),
    (3, 49, 24),
    (1, 1, 32),
]


def _assert_grads_match(got, want, name):
    for label, ours, theirs in zip(["dx", "dW", "dbias"], got, want, strict=True):
        if theirs is None:
            assert ours is None, f"{name}: {label} should be None"
            continue
        assert_close(ours, theirs, rtol=1e-4, atol=1e-6, name=f"{name} {label}")


@pytest.mark.parametrize(("batch", "classes", "chunk"), CHUNK_CASES)
@pytest.mark.parametrize(
    ("loss", "cosine", "with_bias"),
    [
        ("softmax", False, True),
        ("softmax", False, False),
        ("bce", False, False),
        ("squared_hinge", False, True),
        ("softmax", True, False),
    ],
    ids=["softmax-bias", "softmax", "bce", "hinge-bias", "arcface"],
)
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_backward_super_chunk_boundaries(
    device_for, backend_name, loss, cosine, with_bias, batch, classes, chunk
):
    """Backward over super-chunks of ``chunk`` classes (C at chunk - 1, chunk, chunk + 1, several, ragged)
    equals the reference backend's gradients on the same inputs: fp32 and bf16 operands."""
    with torch.device(device_for(backend_name)):
        for dtype in (torch.float32, torch.bfloat16):
            x, weight, bias, exclude, margin = _dense_inputs(
                batch, classes, 24, dtype=dtype, cosine=cosine, with_bias=with_bias, exclude=cosine
            )
            options = LinearLossOptions(loss=loss, margin=margin, chunk_size=7)
            dense = DenseOperands(x, weight, bias, exclude, options)
            lse = ReferenceBackend().reduce(dense)
            coef = torch.randn(batch)  # any sign: the incoming gradient may be negative
            want = ReferenceBackend().grads(dense, lse, coef)
            if backend_name == "triton":
                from megaclass.ops.linear_cross_entropy import kernels

                scale = float(margin.scale) if cosine else 0.0
                got = kernels.linear_loss_bwd(
                    x, weight, bias, exclude, lse, coef, loss=loss, scale=scale, chunk_classes=chunk
                )
            else:
                backend = TorchChunkedBackend(chunk_size=chunk)
                assert_close(backend.reduce(dense), lse, rtol=1e-5, atol=1e-5, name="lse")
                got = backend.grads(dense, lse, coef)
            _assert_grads_match(got, want, f"{backend_name} {dtype}")


def test_chunk_sizes_bound_memory():
    from megaclass.ops.linear_cross_entropy.kernels import chunk_classes_for

    assert chunk_classes_for(128, 2) == 2**18  # (B, chunk) bf16 scratch: 64 MiB
    assert chunk_classes_for(1024, 4) == 2**14
    assert chunk_classes_for(10**6, 4) == 2**12  # never below the minimum
    assert chunk_size_for(128, 768, 2) == 2**16  # (chunk, D) bf16 rows within 128 MiB
    assert chunk_size_for(1, 1, 2) == 2**17
    with pytest.raises(ValueError, match="chunk_size"):
        TorchChunkedBackend(chunk_size=0)


@pytest.mark.parametrize(
    ("device_type", "batch", "dtype", "expected"),
    [
        ("cpu", 128, torch.bfloat16, Impl.REFERENCE),
        ("cpu", 4096, torch.float32, Impl.REFERENCE),
        ("cuda", 1, torch.bfloat16, Impl.TRITON),
        ("cuda", 128, torch.bfloat16, Impl.TRITON),  # one row block of the kernels
        ("cuda", 128, torch.float16, Impl.TRITON),
        ("cuda", 128, torch.float32, Impl.TRITON),
        ("cuda", 129, torch.bfloat16, Impl.TORCH),  # a second row block: cuBLAS chunks
        ("cuda", 4096, torch.bfloat16, Impl.TORCH),
        ("cuda", 8, torch.float64, Impl.TORCH),  # no float64 dots in the kernels
    ],
)
@pytest.mark.parametrize(("classes", "dim"), [(1, 1), (670_091, 768), (10**7, 4096)])
def test_resolve_impl_rule(device_type, batch, dtype, expected, classes, dim):
    problem = {"batch": batch, "num_classes": classes, "dim": dim, "dtype": dtype}
    assert resolve_impl("auto", device_type=device_type, **problem) is expected
    for forced in ("triton", "torch", "reference"):  # a named backend is never overridden
        assert resolve_impl(forced, device_type=device_type, **problem) is Impl(forced)


def test_resolve_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match="cuda-magic"):
        resolve_impl("cuda-magic", device_type="cpu", batch=1, num_classes=1, dim=1, dtype=torch.float32)


def test_dense_backend_dispatch():
    assert isinstance(dense_backend("torch"), TorchChunkedBackend)
    assert isinstance(dense_backend(Impl.REFERENCE), ReferenceBackend)
    assert type(dense_backend("triton")).__name__ == "TritonBackend"
    with pytest.raises(ValueError, match="resolve"):
        dense_backend("auto")
    with pytest.raises(ValueError):
        dense_backend("cuda-magic")


def test_auto_on_cpu_runs_the_reference_arithmetic():
    """``auto`` is the resolved backend's arithmetic exactly, every call (no timing, no state)."""
    x, weight = torch.randn(6, 10, dtype=torch.bfloat16), torch.randn(37, 10)
    targets = torch.randint(0, 37, (6,))
    options = LinearLossOptions(loss="bce", chunk_size=8)
    auto = [linear_loss(x, weight, targets, options=options) for _ in range(2)]
    assert torch.equal(auto[0], auto[1])
    assert torch.equal(auto[0], linear_loss(x, weight, targets, options=options, impl="reference"))


@pytest.mark.parametrize("loss", LOSSES)
def test_whole_shard_is_the_plain_op(loss):
    """A shard of every class runs the single-process op: the same loss and gradients, bit for bit."""
    x = torch.randn(5, 9, requires_grad=True)
    weight, bias = torch.randn(13, 9, requires_grad=True), torch.randn(13, requires_grad=True)
    targets = make_targets("multilabel", 5, 13)
    options = LinearLossOptions(loss=loss, chunk_size=4)
    found = []
    for shard in (None, ClassShard(0, 13, 13)):
        out = linear_loss(x, weight, targets, bias=bias, options=options, shard=shard)
        found.append([out, *grads_of(out, [x, weight, bias])])
    for plain, whole in zip(*found, strict=True):
        assert torch.equal(plain, whole)


def test_shard_must_match_the_weight_rows():
    x, weight = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"shard's rows \[3, 9\)"):
        linear_loss(x, weight, torch.tensor([0, 10]), shard=ClassShard(3, 9, 12))
    with pytest.raises(ValueError, match="out of range"):  # global ids are checked against C
        linear_loss(x, weight, torch.tensor([0, 12]), shard=ClassShard(3, 8, 12))


FUSING_IMPLS = ["triton", "reference"]  # the backends that compute bce / squared hinge gradients in forward
FUSED_LOSSES = {"triton": ["bce", "squared_hinge"], "reference": ["softmax", "bce", "squared_hinge"]}
FUSED_CASES = [(impl, loss) for impl in FUSING_IMPLS for loss in FUSED_LOSSES[impl]]


def _backend_class(impl):
    if impl == "reference":
        return ReferenceBackend
    from megaclass.ops.linear_cross_entropy.function import TritonBackend

    return TritonBackend


def _fused_run(x, weight, bias, targets, loss, *, impl, fuse_gradient, factor, reduction="mean"):
    """Loss and gradients of ``factor * loss`` through ``impl``'s backend, fused or recomputing."""
    from megaclass.ops.linear_cross_entropy.common import linear_loss_apply

    options = LinearLossOptions(loss=loss, reduction=reduction, chunk_size=7)  # several reference chunks
    backend = _backend_class(impl)(fuse_gradient=fuse_gradient)
    out = linear_loss_apply(x, weight, targets, bias, options, backend)
    leaves = [t for t in (x, weight, bias) if t is not None]
    return [out, *torch.autograd.grad(out * factor, leaves)]


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 31, 19), (6, 16, 17), (17, 33, 8), (3, 49, 24)])
@pytest.mark.parametrize("factor", [1.0, -2.5, 0.0], ids=["one", "negative", "zero"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("impl", "loss"), FUSED_CASES)
def test_gradient_in_forward_matches_dense(device_for, impl, loss, shape, factor, with_bias):
    """The gradient computed in the forward pass: the loss and every gradient of ``factor * loss`` (an
    upstream gradient other than the expected 1) against the fp64 dense truth, with rows without labels, a
    non-contiguous ``x`` and ``reduction=sum`` on odd shapes."""
    with torch.device(device_for(impl)):
        batch, classes, dim = shape
        base = torch.randn(dim, batch, requires_grad=True)
        x = base.T  # (B, D) non-contiguous
        weight = torch.randn(classes, dim, requires_grad=True)
        bias = torch.randn(classes, requires_grad=True) if with_bias else None
        targets = make_targets("multilabel", batch, classes)
        for reduction in ("mean", "sum"):
            got = _fused_run(
                x, weight, bias, targets, loss,
                impl=impl, fuse_gradient=True, factor=factor, reduction=reduction,
            )  # fmt: skip
            truth_loss = dense_loss(
                x.double(), weight.double(), None if bias is None else bias.double(), targets, loss,
                reduction=reduction,
            )  # fmt: skip
            leaves = [t for t in (x, weight, bias) if t is not None]
            truth = [truth_loss, *torch.autograd.grad(truth_loss * factor, leaves)]
            for name, ours, exact in zip(["loss", "dx", "dW", "dbias"], got, truth, strict=False):
                assert_close(ours, exact, rtol=1e-4, atol=1e-5, name=f"{reduction} {name}")


@pytest.mark.parametrize("factor", [1.0, 3.0])
@pytest.mark.parametrize(("impl", "loss"), FUSED_CASES)
def test_gradient_in_forward_bf16_within_twice_reference_error(device_for, impl, loss, factor):
    """bf16 features, fp32 weights, an upstream gradient of 1 or 3: the fused schedule's error against the
    fp64 truth is at most twice the recomputing schedule's (the one it replaces) and plain bf16 PyTorch's."""
    with torch.device(device_for(impl)):
        batch, classes, dim = 9, 45, 40
        x = torch.randn(batch, dim).bfloat16().requires_grad_(True)
        weight = (torch.randn(classes, dim) / dim**0.5).requires_grad_(True)
        targets = make_targets("multilabel", batch, classes)
        fused = _fused_run(x, weight, None, targets, loss, impl=impl, fuse_gradient=True, factor=factor)
        recomputed = _fused_run(x, weight, None, targets, loss, impl=impl, fuse_gradient=False, factor=factor)
        truth_loss = dense_loss(x.double(), weight.double(), None, targets, loss)
        truth = [truth_loss, *torch.autograd.grad(truth_loss * factor, [x, weight])]
        for name, ours, theirs, exact in zip(["loss", "dx", "dW"], fused, recomputed, truth, strict=True):
            our_error = (ours.double() - exact).abs().max().item()
            their_error = max((theirs.double() - exact).abs().max().item(), 2**-8 * exact.abs().max().item())
            assert our_error <= 2 * their_error, f"{name}: error {our_error:.3g} vs {their_error:.3g}"


@pytest.mark.parametrize(("impl", "loss"), FUSED_CASES)
def test_gradient_in_forward_skips_the_recompute_until_a_second_backward(device_for, impl, loss, monkeypatch):
    """The first backward pass only scales the forward pass's gradients (no logit recompute); a second one
    through the same graph recomputes, so gradients accumulate to twice the first."""
    backend = _backend_class(impl)
    recomputes = []
    plain_grads = backend.grads
    monkeypatch.setattr(
        backend, "grads", lambda self, *args: recomputes.append(1) or plain_grads(self, *args)
    )
    with torch.device(device_for(impl)):
        x = torch.randn(5, 12, requires_grad=True)
        weight = torch.randn(37, 12, requires_grad=True)
        targets = make_targets("multilabel", 5, 37)
        out = linear_loss(x, weight, targets, options=LinearLossOptions(loss=loss, chunk_size=8), impl=impl)
        out.backward(retain_graph=True)
        assert recomputes == []
        first = [x.grad.clone(), weight.grad.clone()]
        out.backward()
        assert recomputes == [1]
        for twice, once in zip([x.grad, weight.grad], first, strict=True):
            assert_close(twice, 2 * once, rtol=1e-5, atol=1e-6, name="second backward")


@pytest.mark.parametrize("impl", FUSING_IMPLS)
def test_gradient_in_forward_only_when_a_gradient_is_wanted(device_for, impl, monkeypatch):
    """No input needs a gradient (inference, no_grad): the forward pass reduces only."""
    fused_calls = []
    if impl == "triton":
        from megaclass.ops.linear_cross_entropy import kernels as owner

        name = "linear_loss_fwd_grads"
    else:
        owner, name = ReferenceBackend, "reduce_and_grads"
    plain = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: fused_calls.append(1) or plain(*a, **k))
    with torch.device(device_for(impl)):
        x, weight = torch.randn(4, 8), torch.randn(21, 8)
        targets = torch.randint(0, 21, (4,))
        expected = dense_loss(x.double(), weight.double(), None, targets, "bce")
        assert_close(linear_bce(x, weight, targets, impl=impl), expected, rtol=1e-5, atol=1e-5, name="loss")
        with torch.no_grad():
            linear_bce(x, weight.requires_grad_(True), targets, impl=impl)
        assert fused_calls == []
        linear_bce(x, weight, targets, impl=impl)
        assert fused_calls == [1]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("impl", FUSING_IMPLS)
def test_gradient_in_forward_empty_batch(device_for, impl, with_bias):
    with torch.device(device_for(impl)):
        x = torch.randn(0, 6, requires_grad=True)
        weight = torch.randn(9, 6, requires_grad=True)
        bias = torch.randn(9, requires_grad=True) if with_bias else None
        out = linear_bce(x, weight, RaggedLabels.from_lists([]), bias=bias, impl=impl)
        assert out.item() == 0.0
        out.backward()
        assert x.grad.shape == (0, 6)
        assert torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize(("batch", "classes", "chunk"), CHUNK_CASES)
@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_gradient_launcher_over_super_chunks(device_for, loss, with_bias, batch, classes, chunk):
    """The one-pass launcher over super-chunks (C at chunk - 1, chunk, chunk + 1, several, ragged): its
    per-row loss sums equal the reference's reduction and its gradients the reference's backward."""
    from megaclass.ops.linear_cross_entropy import kernels

    with torch.device(device_for("triton")):
        for dtype in (torch.float32, torch.bfloat16):
            x, weight, bias, _, _ = _dense_inputs(
                batch, classes, 24, dtype=dtype, cosine=False, with_bias=with_bias, exclude=False
            )
            dense = DenseOperands(x, weight, bias, None, LinearLossOptions(loss=loss, chunk_size=7))
            coef = torch.randn(batch)
            reduced, *got = kernels.linear_loss_fwd_grads(
                x, weight, bias, coef, loss=loss, chunk_classes=chunk
            )
            assert_close(reduced, ReferenceBackend().reduce(dense), rtol=1e-5, atol=1e-5, name="reduced")
            want = ReferenceBackend().grads(dense, reduced, coef)
            _assert_grads_match(got, want, f"fused {dtype}")


def test_forward_gradient_launcher_rejects_softmax():
    from megaclass.ops.linear_cross_entropy import kernels

    with pytest.raises(ValueError, match="bce or squared_hinge"):
        kernels.linear_loss_fwd_grads(
            torch.randn(2, 3), torch.randn(4, 3), None, torch.ones(2), loss="softmax"
        )


@pytest.mark.parametrize("numel", [0, 1, 4095, 4097])
@pytest.mark.parametrize("factor", [1.0, -0.5, 0.0])
def test_gated_scale(device_for, numel, factor):
    from megaclass.ops.linear_cross_entropy import kernels

    with torch.device(device_for("triton")):
        values = torch.randn(numel)
        expected = values * factor
        kernels.gated_scale_(values, torch.tensor([factor]))
        assert torch.equal(values, expected)


@pytest.mark.parametrize(
    ("loss", "dtype", "fused"),
    [
        ("bce", torch.float32, True),
        ("bce", torch.bfloat16, True),
        ("squared_hinge", torch.bfloat16, True),
        ("bce", torch.float16, False),  # G at 1/B could fall below fp16's subnormals before an AMP scale
        ("softmax", torch.bfloat16, False),  # G needs the row's lse: the kernels recompute in backward
    ],
)
def test_which_problems_fuse_the_gradient(loss, dtype, fused):
    options = LinearLossOptions(loss=loss)
    dense = DenseOperands(torch.randn(2, 3, dtype=dtype), torch.randn(4, 3), None, None, options)
    from megaclass.ops.linear_cross_entropy.function import TritonBackend

    assert TritonBackend().fuses_gradient(dense) is fused
    assert ReferenceBackend().fuses_gradient(dense) is (fused or loss == "softmax")
    for impl in FUSING_IMPLS:
        assert _backend_class(impl)(fuse_gradient=False).fuses_gradient(dense) is False
    assert TorchChunkedBackend().fuses_gradient(dense) is False


def test_reference_softmax_holds_its_logits_up_to_the_bound(monkeypatch):
    """The reference softmax fuses while the ``(B, C)`` float32 logits fit :data:`HELD_LOGITS_BYTES`, never
    with a cosine margin (its lse takes the target's logit) nor with fp16 features."""
    from megaclass.ops.linear_cross_entropy import reference

    monkeypatch.setattr(reference, "HELD_LOGITS_BYTES", 4 * 6 * 10)  # a batch of 6 against 10 classes

    def fuses(batch, classes, *, dtype=torch.float32, margin=None):
        options = LinearLossOptions(margin=margin or MarginConfig())
        x = torch.randn(batch, 3, dtype=dtype)
        return ReferenceBackend().fuses_gradient(
            DenseOperands(x, torch.randn(classes, 3), None, None, options)
        )

    assert fuses(6, 10) and fuses(5, 12) and fuses(1, 1)
    assert not fuses(6, 11) and not fuses(7, 10)
    assert not fuses(6, 10, margin=ARCFACE) and not fuses(6, 10, dtype=torch.float16)
    softmax, bce = LinearLossOptions(), LinearLossOptions(loss="bce")
    assert reference.holds_softmax_logits(softmax, 6, 10) and not reference.holds_softmax_logits(
        softmax, 61, 1
    )
    assert not reference.holds_softmax_logits(bce, 6, 10)  # bce's gradient needs no row's whole logits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_gradient_in_forward_captures_in_a_cuda_graph(factor):
    """The fused forward and its gated backward scale run with no host sync: a CUDA graph of forward and
    backward replays to the eager gradients, at an upstream gradient of 1 (no scaling) and of 3."""
    x = torch.randn(128, 64, device="cuda").bfloat16().requires_grad_(True)
    weight = (torch.randn(5_003, 64, device="cuda") / 8).requires_grad_(True)
    targets = make_targets("multilabel", 128, 5_003).to("cuda")
    scale = torch.tensor(factor, device="cuda")

    def step():
        (linear_bce(x, weight, targets, impl="triton") * scale).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile the kernels outside the capture
            x.grad = weight.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = [x.grad.clone(), weight.grad.clone()]
    x.grad = weight.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    # dx sums its class blocks with atomic adds, in no fixed order, then rounds to bf16: one bf16 step apart
    assert_close(x.grad, eager[0], rtol=2**-7, atol=1e-3, name="graph dx")
    assert_close(weight.grad, eager[1], rtol=1e-4, atol=1e-5, name="graph dW")


# ------------------------------------------------------------- padded targets: a CUDA graph's static shape

# labels of each row, the capacity, C, D: pads on a last row without labels, a full capacity, one label, none
PADDED_CASES = {
    "empty_rows": ([[2, 0], [], [5], []], 9, 7, 5),
    "full_capacity": ([[1, 3], [4, 0, 6]], 5, 7, 17),
    "one_label": ([[], [6], []], 4, 7, 3),
    "no_labels": ([[], []], 3, 1, 4),
}


def padded_case(name: str) -> tuple[list[list[int]], int, int, int]:
    """A named case, or ``random<seed>``: random B, C, D, labels per row (0 included) and spare capacity."""
    if name in PADDED_CASES:
        return PADDED_CASES[name]
    generator = torch.Generator().manual_seed(int(name.removeprefix("random")))
    batch, classes, dim = (int(torch.randint(1, high, (), generator=generator)) for high in (10, 40, 20))
    lists = []
    for _ in range(batch):
        count = int(torch.randint(0, min(classes, 5) + 1, (), generator=generator))
        lists.append(torch.randperm(classes, generator=generator)[:count].tolist())
    spare = int(torch.randint(0, 7, (), generator=generator))
    return lists, sum(map(len, lists)) + spare, classes, dim


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", [*PADDED_CASES, "random1", "random2", "random3"])
def test_padded_targets_give_the_unpadded_loss_and_gradients(device_for, impl, loss, reduction, case):
    lists, capacity, classes, dim = padded_case(case)
    device = device_for(impl)
    with torch.device(device):
        x = torch.randn(len(lists), dim, requires_grad=True)
        weight = torch.randn(classes, dim, requires_grad=True)
        bias = torch.randn(classes, requires_grad=True)
    targets = RaggedLabels.from_lists(lists, device=device)
    options = LinearLossOptions(loss=loss, reduction=reduction, chunk_size=16)
    results = []
    for given in (targets, targets.pad_to(capacity)):
        out = linear_loss(x, weight, given, bias=bias, options=options, impl=impl)
        results.append([out, *grads_of(out, [x, weight, bias])])
    tolerance = 0.0 if device.type == "cpu" else 1e-6  # the GPU's atomics may add in another order
    for name, got, want in zip(["loss", "grad x", "grad weight", "grad bias"], *results, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=name)


def test_padded_cpu_targets_are_range_checked_on_their_labels_only():
    x, weight = torch.randn(2, 3), torch.randn(5, 3)
    padded = RaggedLabels.from_lists([[4], [0]]).pad_to(4)  # PAD_LABEL (-1) is no label
    torch.testing.assert_close(linear_bce(x, weight, padded), linear_bce(x, weight, padded.unpadded()))
    with pytest.raises(ValueError, match="label id 5 out of range"):
        linear_bce(x, weight, RaggedLabels.from_lists([[5], [0]]).pad_to(4))


@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_custom_ops_pass_opcheck(device_for, with_bias):
    """The dense ops registered for torch.compile (eager mode calls their bodies directly): their fake
    implementations, schemas and the gated scale's mutation agree with the real ones."""
    from megaclass.ops.linear_cross_entropy import function

    with torch.device(device_for("triton")):
        x, weight = torch.randn(5, 17), torch.randn(23, 17)
        bias = torch.randn(23) if with_bias else None
        lse, coef, exclude = torch.randn(5).abs() + 3, torch.full((5,), 0.2), torch.tensor([0, 3, 22, 1, 5])
        torch.library.opcheck(function.linear_loss_fwd, (x, weight, bias, None, "softmax", 0.0))
        torch.library.opcheck(function.linear_loss_fwd, (x, weight, bias, exclude, "bce", 0.0))
        torch.library.opcheck(function.linear_loss_bwd, (x, weight, bias, exclude, lse, coef, "softmax", 0.0))
        torch.library.opcheck(function.linear_loss_fwd_grads, (x, weight, bias, coef, "squared_hinge"))
        torch.library.opcheck(function.gated_scale_, (torch.randn(40), torch.tensor([0.5])))
