"""Fixed fan-in layer: Triton kernels (interpreted on CPU) and the chunked PyTorch path vs the reference."""

import pytest
import torch

from megaclass.ops.fixed_fanin import (
    fixed_fanin,
    fixed_fanin_loss,
    fixed_fanin_rows,
    fixed_fanin_topk,
    reference_fixed_fanin,
    reference_fixed_fanin_loss,
)
from megaclass.targets import RaggedLabels

# (B, D, C, K, G): B = 1, D and C off the block sizes, K from 1 to 256, groups off G, a non-power-of-two G
CASES = [
    (1, 37, 50, 1, 1),
    (5, 33, 65, 7, 1),
    (3, 300, 20, 256, 1),
    (4, 100, 48, 40, 16),
    (2, 70, 33, 17, 16),
    (3, 50, 40, 5, 3),
]
IMPLS = ["triton", "reference"]


@pytest.fixture(autouse=True)
def _on_gpu_when_present():
    """Tensors live on the GPU where there is one (Triton compiles for it), else on the CPU (interpreter)."""
    if torch.cuda.is_available():
        torch.set_default_device("cuda")
    yield
    torch.set_default_device(None)


def _problem(case, dtype, *, bias=True, duplicates=True):
    batch, dim, classes, fan_in, group = case
    x = torch.randn(batch, dim, dtype=dtype)
    weight = (torch.randn(classes, fan_in) / fan_in**0.5).to(dtype)
    index = torch.randint(0, dim, (-(-classes // group), fan_in), dtype=torch.int32)
    if duplicates:
        index[0] = index[
            0, 0
        ].item()  # one row reads the same input K times (a copy: CUDA rejects self-overlap)
    b = torch.randn(classes, dtype=dtype) if bias else None
    return x, weight, index, b


def _assert_close(name, out, truth, same_dtype_reference):
    """The kernel's error against fp64 truth is at most 2x the reference's own error in the same dtype."""
    error = (out.double() - truth).abs()
    reference_error = (same_dtype_reference.double() - truth).abs().max().item()
    scale = 1.0 + truth.abs().max().item()
    floor = 1e-5 * scale if out.dtype in (torch.float32, torch.float64) else 1e-2 * scale
    tolerance = max(2 * reference_error, floor)
    worst = int(error.argmax())
    assert error.max().item() <= tolerance, (
        f"{name}: max error {error.max().item():.3g} > {tolerance:.3g} at flat index {worst} "
        f"(got {out.flatten()[worst].item()}, expected {truth.flatten()[worst].item()})"
    )


def _grads(fn, tensors, grad_out=None):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, grad_out if grad_out is not None else None)
    return out, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_logits_and_gradients(case, dtype, impl):
    x, weight, index, bias = _problem(case, dtype)
    group = case[4]
    grad_out = torch.randn(case[0], case[2], dtype=torch.float64)

    def truth_fn(a, w, b):
        return reference_fixed_fanin(a, w, index, b, group=group)

    truth, truth_grads = _grads(truth_fn, [x.double(), weight.double(), bias.double()], grad_out)
    same, same_grads = _grads(truth_fn, [x, weight, bias], grad_out.to(dtype))
    out, grads = _grads(
        lambda a, w, b: fixed_fanin(a, w, index, b, group=group, impl=impl),
        [x, weight, bias],
        grad_out.to(dtype),
    )
    assert out.dtype == dtype and out.shape == (case[0], case[2])
    _assert_close("y", out, truth, same)
    for name, g, t, s in zip(["dx", "dweight", "dbias"], grads, truth_grads, same_grads, strict=True):
        assert g.dtype == dtype
        _assert_close(name, g, t, s)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["bce", "hinge", "softmax"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[5]], ids=str)
def test_fused_loss(case, loss, dtype, impl):
    x, weight, index, bias = _problem(case, dtype)
    batch, classes, group = case[0], case[2], case[4]
    lists = [sorted({(3 * b + j) % classes for j in range(b % 3)}) for b in range(batch)]  # an empty row too
    lists[-1] = [classes - 1, 0]
    targets = RaggedLabels.from_lists(lists)

    def truth_fn(a, w, b):
        return reference_fixed_fanin_loss(
            a, w, index, targets.indptr, targets.indices, b, group=group, loss=loss
        )

    truth, truth_grads = _grads(truth_fn, [x.double(), weight.double(), bias.double()])
    same, same_grads = _grads(truth_fn, [x, weight, bias])
    out, grads = _grads(
        lambda a, w, b: fixed_fanin_loss(a, w, index, targets, b, group=group, loss=loss, impl=impl),
        [x, weight, bias],
    )
    _assert_close("loss", out, truth, same)
    for name, g, t, s in zip(["dx", "dweight", "dbias"], grads, truth_grads, same_grads, strict=True):
        _assert_close(name, g, t, s)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_bias_noncontiguous_int64(impl):
    x_t, weight, index, _ = _problem((4, 29, 35, 9, 1), torch.float32, bias=False)
    x = x_t.T.contiguous().T  # a non-contiguous (B, D) view
    assert not x.is_contiguous()
    out, grads = _grads(
        lambda a, w: fixed_fanin(a, w, index.long(), impl=impl), [x, weight], torch.ones(4, 35)
    )
    truth, truth_grads = _grads(
        lambda a, w: reference_fixed_fanin(a, w, index), [x, weight], torch.ones(4, 35)
    )
    torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)
    for g, t in zip(grads, truth_grads, strict=True):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 16])
def test_topk_in_chunks(group, impl):
    x, weight, index, bias = _problem((3, 40, 100, 6, group), torch.float32)
    scores, ids = fixed_fanin_topk(x, weight, index, 7, bias, group=group, chunk_size=32, impl=impl)
    full = reference_fixed_fanin(x, weight, index, bias, group=group)
    expected = full.topk(7, dim=1)
    torch.testing.assert_close(scores, expected.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.gather(1, ids), expected.values, rtol=1e-5, atol=1e-5)


def test_rejects_bad_shapes():
    x, weight, index, bias = _problem((2, 10, 8, 3, 2), torch.float32)
    with pytest.raises(ValueError, match="index: expected shape"):
        fixed_fanin(x, weight, index[:-1], bias, group=2)
    with pytest.raises(ValueError, match="bias"):
        fixed_fanin(x, weight, index, bias[:-1], group=2)
    with pytest.raises(ValueError, match="int32 or int64"):
        fixed_fanin(x, weight, index.float(), group=2)
    with pytest.raises(ValueError, match="k: expected"):
        fixed_fanin_topk(x, weight, index, 9, group=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 16])
def test_bf16_features_fp32_weights(group, impl):
    """Autocast style: bf16 features meet fp32 master weights (bf16 tensor-core dot when grouped)."""
    x, weight, index, bias = _problem((4, 50, 40, 24, group), torch.float32)
    x16 = x.bfloat16()
    grad_out = torch.randn(4, 40)
    truth, truth_grads = _grads(
        lambda a, w, b: reference_fixed_fanin(a, w, index, b, group=group),
        [x16.double(), weight.double(), bias.double()],
        grad_out.double(),
    )
    out, grads = _grads(
        lambda a, w, b: fixed_fanin(a, w, index, b, group=group, impl=impl),
        [x16, weight, bias],
        grad_out.bfloat16(),
    )
    assert (
        out.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    )
    for got, expected in zip([out, *grads], [truth, *truth_grads], strict=True):
        scale = expected.abs().max().item()
        assert (got.double() - expected).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("loss", ["none", "softmax"])
def test_custom_ops_pass_opcheck(loss):
    """The registered ops' fake (meta) implementations and schemas agree with the real ones."""
    x, weight, index, bias = _problem((3, 20, 17, 4, 1), torch.float32)
    forward_args = (x, weight, index, bias, 1, loss, "reference")
    torch.library.opcheck(torch.ops.megaclass.fixed_fanin_fwd.default, forward_args)
    grad = torch.randn(3, 17) if loss == "none" else torch.randn(3)
    lse = torch.ops.megaclass.fixed_fanin_fwd(*forward_args) if loss == "softmax" else None
    backward_args = (x, weight, index, bias, grad, lse, 1, loss, "reference")
    torch.library.opcheck(torch.ops.megaclass.fixed_fanin_bwd.default, backward_args)


@pytest.mark.parametrize("loss", ["none", "bce", "softmax"])
@pytest.mark.parametrize(("group", "chunk_rows"), [(1, 40), (3, 33), (16, 40), (16, 64)])
def test_triton_backward_in_chunks(group, chunk_rows, loss):
    """The input-gradient buffer split into several chunks of labels (the last one partial) gives the
    chunked PyTorch launchers' gradients; two calls are bit-identical (no atomics)."""
    from megaclass.ops.fixed_fanin.chunked import chunked_bwd, chunked_fwd
    from megaclass.ops.fixed_fanin.kernels import fixed_fanin_bwd

    x, weight, index, bias = _problem((5, 23, 150, 9, group), torch.float32)
    grad = torch.randn(5, 150) if loss == "none" else torch.rand(5)
    lse = chunked_fwd(x, weight, index, bias, group=group, loss=loss) if loss == "softmax" else None
    options = {"group": group, "loss": loss, "grad": grad, "lse": lse}
    got = fixed_fanin_bwd(x, weight, index, bias, chunk_rows=chunk_rows, **options)
    expected = chunked_bwd(x, weight, index, bias, **options)
    for name, g, e in zip(["dx", "dweight", "dbias"], got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    again = fixed_fanin_bwd(x, weight, index, bias, chunk_rows=chunk_rows, **options)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


@pytest.mark.parametrize("per_label", [True, False])
@pytest.mark.parametrize("group", [1, 4])
def test_column_order_lists_every_connection_once_by_column(group, per_label):
    from megaclass.ops.fixed_fanin.columns import column_order

    classes, dim, fan_in, rows_per_chunk = 23, 7, 5, 4
    index = torch.randint(0, dim, (-(-classes // group), fan_in), dtype=torch.int32)
    order = column_order(
        index, classes=classes, group=group, dim=dim, per_label=per_label, rows_per_chunk=rows_per_chunk
    )
    table = index.repeat_interleave(group, 0)[:classes] if per_label else index  # (rows, K)
    perm, colptr = order.perm.long(), order.colptr
    assert sorted(perm.tolist()) == list(range(table.numel()))
    assert colptr[0] == 0 and colptr[-1] == table.numel() and colptr.numel() == order.chunks * dim + 1
    for chunk in range(order.chunks):
        for column in range(dim):
            start, stop = colptr[chunk * dim + column], colptr[chunk * dim + column + 1]
            listed = perm[start:stop]
            assert (table.reshape(-1)[listed] == column).all()
            assert (listed // fan_in // rows_per_chunk == chunk).all()
            assert (listed.diff() > 0).all()


def test_column_order_cached_per_topology():
    from megaclass.ops.fixed_fanin.columns import column_order

    index = torch.randint(0, 9, (6, 3), dtype=torch.int32)
    params = {"classes": 6, "group": 1, "dim": 9, "per_label": True, "rows_per_chunk": 4}
    first = column_order(index, **params)
    assert column_order(index, **params) is first
    assert column_order(index.clone(), **params) is not first  # another tensor
    index[0, 0] = (index[0, 0] + 1) % 9  # a rewiring in place bumps the version
    rebuilt = column_order(index, **params)
    assert rebuilt is not first and column_order(index, **params) is rebuilt
    index[1, 1] = 9
    with pytest.raises(ValueError, match=r"index: expected input columns in \[0, 9\)"):
        column_order(index, **params)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_rows", [True, False])
def test_rows_with_positives_one_node(use_rows, impl):
    """Row values and positive logits from one autograd node: gradients as from separate plain-autograd
    computations, also when only the positives are used."""
    from megaclass.ops.fixed_fanin import fixed_fanin_rows, fixed_fanin_rows_positive, positive_logits

    x, weight, index, bias = _problem((4, 30, 40, 6, 16), torch.float32)
    samples, labels = torch.tensor([0, 0, 2, 3]), torch.tensor([5, 39, 5, 0])

    def fused(a, w, b):
        rows, positive = fixed_fanin_rows_positive(a, w, index, samples, labels, b, group=16, impl=impl)
        return (rows.sum() if use_rows else 0.0) + (positive * torch.arange(1.0, 5.0)).sum()

    def separate(a, w, b):
        rows = fixed_fanin_rows(a, w, index, b, group=16, impl="reference")
        positive = positive_logits(a, w, index, b, samples, labels, group=16)
        return (rows.sum() if use_rows else 0.0) + (positive * torch.arange(1.0, 5.0)).sum()

    out, grads = _grads(fused, [x, weight, bias])
    expected, expected_grads = _grads(separate, [x, weight, bias])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="samples, labels"):
        fixed_fanin_rows_positive(x, weight, index, samples, labels[:-1], group=16, impl=impl)


# (B, D, C, K, G): one label; groups over several programs with the last program past the end; two batch
# blocks (B > 128), grouped and per-label; a non-power-of-two G
FUSED_CASES = [
    (3, 40, 1, 5, 1),
    (4, 30, 100, 6, 16),
    (130, 20, 70, 3, 16),
    (130, 20, 45, 4, 1),
    (5, 33, 65, 7, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_grad", ["expected", "uniform", "varying"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_fused_gradients_for_any_row_gradient(case, row_grad, dtype):
    """BCE / hinge row values with gradients from the forward pass (Triton), three tiles a program: every
    row gradient (the expected 1 / B, another uniform value, one per row) gives the reference's gradients;
    bf16 weights (bf16_sr) get bf16 gradients."""
    from megaclass.ops import Impl
    from megaclass.ops.fixed_fanin import (
        FaninLoss,
        FixedFaninFunction,
        FixedFaninOptions,
        reference_row_values,
    )

    x, weight, index, bias = _problem(case, dtype)
    batch, group = case[0], case[4]
    loss = "hinge" if case[2] % 2 else "bce"
    grad_rows = {
        "expected": torch.full((batch,), 1.0 / batch),
        "uniform": torch.full((batch,), 0.7),
        "varying": torch.randn(batch),
    }[row_grad].double()
    none = torch.empty(0, dtype=torch.long)
    options = FixedFaninOptions(group=group, loss=FaninLoss(loss), impl=Impl.TRITON, tiles_per_program=3)

    def fused(a, w, b):
        return FixedFaninFunction.apply(a, w, index, b, none, none, options, True)[0]

    def truth_fn(a, w, b):
        return reference_row_values(reference_fixed_fanin(a, w, index, b, group=group), loss)

    truth, truth_grads = _grads(truth_fn, [x.double(), weight.double(), bias.double()], grad_rows)
    same, same_grads = _grads(truth_fn, [x, weight, bias], grad_rows.to(dtype))
    out, grads = _grads(fused, [x, weight, bias], grad_rows.float())
    assert [g.dtype for g in grads] == [dtype, dtype, dtype]
    _assert_close("rows", out, truth, same)
    for name, g, t, s in zip(["dx", "dweight", "dbias"], grads, truth_grads, same_grads, strict=True):
        _assert_close(name, g, t, s)


@pytest.mark.parametrize("loss", ["bce", "hinge"])
@pytest.mark.parametrize(("group", "chunk_rows"), [(1, 40), (16, 40)])
def test_fused_forward_in_chunks_matches_backward(group, chunk_rows, loss):
    """Gradients in the forward pass over several buffer chunks and tiles per program equal the
    recomputing backward pass; the gated backward keeps them (expected row gradient) or scales them."""
    from megaclass.ops.fixed_fanin.kernels import (
        fixed_fanin_bwd,
        fixed_fanin_fwd_grad,
        fixed_fanin_grad_finish,
    )

    x, weight, index, bias = _problem((5, 23, 150, 9, group), torch.float32)
    options = {"group": group, "loss": loss}
    for scale in (1.0, 3.0):
        rows, grads = fixed_fanin_fwd_grad(
            x, weight, index, bias, row_grad=0.25, chunk_rows=chunk_rows, tiles_per_program=2, **options
        )
        grad = torch.full((5,), 0.25 * scale)
        got = fixed_fanin_grad_finish(
            x, weight, index, bias, grad=grad, row_grad=0.25, grads=grads, **options
        )
        expected = fixed_fanin_bwd(x, weight, index, bias, grad=grad, **options)
        for name, g, e in zip(["dx", "dweight", "dbias"], got, expected, strict=True):
            # dx adds with atomics on a GPU, in no fixed order
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        expected_rows = fixed_fanin_rows(x, weight, index, bias, impl="reference", **options)
        torch.testing.assert_close(rows, expected_rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["none", "softmax", "bce"])
@pytest.mark.parametrize("group", [1, 16])
def test_forward_tiles_per_program(group, loss):
    """Several tiles a program (the last partly past the labels) give the chunked launchers' output."""
    from megaclass.ops.fixed_fanin.chunked import chunked_fwd
    from megaclass.ops.fixed_fanin.kernels import fixed_fanin_fwd

    x, weight, index, bias = _problem((6, 31, 150, 5, group), torch.float32)
    for tiles in (1, 3, 8):
        got = fixed_fanin_fwd(x, weight, index, bias, group=group, loss=loss, tiles_per_program=tiles)
        expected = chunked_fwd(x, weight, index, bias, group=group, loss=loss)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tiles_per_program_rule():
    """Forward passes without gradients by size; passes that write gradients one tile a program."""
    from megaclass.ops.fixed_fanin.kernels import _geometry, tiles_per_program

    assert [tiles_per_program(t) for t in (1, 8191, 8192, 20941, 87884, 10**7)] == [1, 1, 2, 4, 8, 8]
    assert _geometry(128, 670091, 32, 32, 0).per_program == 4
    assert _geometry(128, 670091, 32, 32, 0, gradients=True).per_program == 1
    assert _geometry(128, 670091, 32, 32, 2, gradients=True).per_program == 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_empty_batch(loss, impl):
    x, weight, index, bias = _problem((2, 20, 40, 4, 16), torch.float32)
    out, grads = _grads(
        lambda a, w, b: fixed_fanin_rows(a, w, index, b, group=16, loss=loss, impl=impl),
        [x[:0], weight, bias],
        torch.empty(0),
    )
    assert out.shape == (0,)
    assert all((g == 0).all() for g in grads)


# labels of each row and the capacity: pads on a last row without labels, a full capacity, one label, none
PADDED_LISTS = {
    "empty_rows": ([[2, 0], [], [5], []], 9),
    "full_capacity": ([[1, 3], [4, 0, 6], [39]], 6),
    "one_label": ([[], [6], []], 4),
    "no_labels": ([[], []], 3),
}


def _padded_lists(name: str, classes: int) -> tuple[list[list[int]], int]:
    """A named case, or ``random<seed>``: random B, labels per row (0 included) and spare capacity."""
    if name in PADDED_LISTS:
        return PADDED_LISTS[name]
    generator = torch.Generator().manual_seed(int(name.removeprefix("random")))
    cpu = {"generator": generator, "device": "cpu"}  # the module's GPU tests set a CUDA default device
    batch = int(torch.randint(1, 10, (), **cpu))
    counts = torch.randint(0, 6, (batch,), **cpu).tolist()
    lists = [torch.randperm(classes, **cpu)[:count].tolist() for count in counts]
    return lists, sum(counts) + int(torch.randint(0, 7, (), **cpu))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", ["bce", "hinge", "softmax"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("case", [*PADDED_LISTS, "random1", "random2", "random3"])
def test_padded_targets_give_the_unpadded_loss_and_gradients(case, group, loss, impl):
    lists, capacity = _padded_lists(case, classes=40)
    x, weight, index, bias = _problem((len(lists), 30, 40, 5, group), torch.float32)
    targets = RaggedLabels.from_lists(lists, device=x.device)
    results = []
    for given in (targets, targets.pad_to(capacity)):
        out, grads = _grads(
            lambda a, w, b, given=given: fixed_fanin_loss(
                a, w, index, given, b, group=group, loss=loss, impl=impl
            ),
            [x, weight, bias],
        )
        results.append([out, *grads])
    tolerance = 0.0 if x.device.type == "cpu" else 1e-6  # the GPU's atomics may add in another order
    for name, got, want in zip(["loss", "dx", "dweight", "dbias"], *results, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=name)


def test_no_gradients_are_computed_in_the_forward_pass_without_grad_mode(monkeypatch):
    from megaclass.ops.fixed_fanin import kernels

    calls = []
    fwd_grad = kernels.fixed_fanin_fwd_grad
    monkeypatch.setattr(kernels, "fixed_fanin_fwd_grad", lambda *a, **k: calls.append(1) or fwd_grad(*a, **k))
    x, weight, index, bias = _problem((4, 30, 40, 5, 1), torch.float32)
    weight.requires_grad_()
    with torch.no_grad():  # an evaluation: the rows alone
        rows = fixed_fanin_rows(x, weight, index, bias, loss="bce", impl="triton")
    assert calls == []
    trained = fixed_fanin_rows(x, weight, index, bias, loss="bce", impl="triton")
    assert calls == [1]  # with grad mode on, the fused pass
    torch.testing.assert_close(rows, trained.detach())


@pytest.mark.parametrize("loss", ["none", "bce", "hinge", "softmax"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], CASES[5]], ids=str)
def test_cpu_launchers_over_several_chunks(case, loss, monkeypatch):
    """The CPU path's CSR products, with chunks of a few labels (partial groups, a repeated column, the
    cached column order per chunk), against the reference in fp64."""
    from megaclass.ops.fixed_fanin import chunked

    torch.set_default_device("cpu")  # on a GPU machine too (the fixture restores the default)
    monkeypatch.setattr(chunked, "_GATHER_BUDGET", 7 * case[0])  # 7 labels a chunk
    x, weight, index, bias = _problem(case, torch.float32)
    group = case[4]
    grad = torch.randn(case[0], case[2] if loss == "none" else 1).squeeze(1)
    tensors = [t.double().requires_grad_() for t in (x, weight, bias)]
    logits = reference_fixed_fanin(*tensors[:2], index, tensors[2], group=group)  # (B, C)
    rows = {
        "none": logits,
        "bce": torch.nn.functional.softplus(logits).sum(1),
        "hinge": torch.relu(1 + logits).square().sum(1),
        "softmax": torch.logsumexp(logits, 1),
    }[loss]
    truth = torch.autograd.grad(rows, tensors, grad.double())
    out = chunked.chunked_fwd(x, weight, index, bias, group=group, loss=loss)
    torch.testing.assert_close(out.double(), rows.detach(), rtol=1e-5, atol=1e-5)
    lse = out if loss == "softmax" else None
    got = chunked.chunked_bwd(x, weight, index, bias, group=group, loss=loss, grad=grad, lse=lse)
    for name, g, t in zip(["dx", "dweight", "dbias"], got, truth, strict=True):
        torch.testing.assert_close(
            g.double(), t, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
