"""bf16 head state with stochastic rounding: SQNR vs fp32 updates, exact on fp32, resume, row updates."""

import copy
import math

import pytest
import torch
from torch import nn

from megaclass.train.low_precision import (
    BF16SGD,
    BF16AdamW,
    HeadState,
    _touched_rows,
    row_adamw_,
    row_sgd_,
    to_bf16_state,
)


def sqnr_db(truth: torch.Tensor, approx: torch.Tensor, start: torch.Tensor) -> float:
    """Signal = the change fp32 training made; noise = how far the low-precision run ended from it."""
    signal = (truth.double() - start.double()).pow(2).sum()
    noise = (approx.double() - truth.double()).pow(2).sum()
    return 10 * math.log10(signal / noise)


def _run(weight: torch.Tensor, grads: list[torch.Tensor], make_optimizer) -> torch.Tensor:
    param = nn.Parameter(weight.clone())
    optimizer = make_optimizer([param])
    for grad in grads:
        param.grad = grad.to(param.dtype)
        optimizer.step()
    return param.detach().float()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_sqnr_many_small_steps(kind):
    """Updates of ~1/4 of a bf16 ulp: round-to-nearest loses them all, stochastic rounding keeps them."""
    torch.manual_seed(0)
    dim, steps = 256, 250
    start = torch.randn(dim).to(torch.bfloat16).float()  # representable in bf16: every run starts equal
    drift = torch.randn(dim)
    grads = [drift + 0.3 * torch.randn(dim) for _ in range(steps)]
    if kind == "sgd":
        lr = 2**-8 / 4 / 1.5  # |lr * g| ~ ulp(1) / 4 (bf16 ulp at 1 is 2^-7)
        fp32 = lambda p: torch.optim.SGD(p, lr=lr)  # noqa: E731
        sr = lambda p: BF16SGD(p, lr=lr, seed=1)  # noqa: E731
    else:
        lr = 2**-8 / 4
        fp32 = lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)  # noqa: E731
        sr = lambda p: BF16AdamW(p, lr=lr, seed=1)  # noqa: E731
    truth = _run(start, grads, fp32)
    rtn = _run(start.to(torch.bfloat16), grads, fp32)  # torch's optimizers on bf16 params: round to nearest
    stochastic = _run(start.to(torch.bfloat16), grads, sr)
    sqnr_sr, sqnr_rtn = sqnr_db(truth, stochastic, start), sqnr_db(truth, rtn, start)
    assert sqnr_sr > 16.0, f"stochastic rounding SQNR {sqnr_sr:.1f} dB"
    assert sqnr_rtn < 5.0, f"round-to-nearest SQNR {sqnr_rtn:.1f} dB"
    assert sqnr_sr > sqnr_rtn + 13.0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_parameters_match_torch(weight_decay):
    weight = torch.randn(5, 7)
    grads = [torch.randn(5, 7) for _ in range(6)]
    want = _run(weight, grads, lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=weight_decay, eps=1e-6))
    got = _run(weight, grads, lambda p: BF16AdamW(p, lr=0.01, weight_decay=weight_decay, eps=1e-6))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    want = _run(weight, grads, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=weight_decay))
    got = _run(weight, grads, lambda p: BF16SGD(p, lr=0.1, momentum=0.9, weight_decay=weight_decay))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer_class", [BF16AdamW, BF16SGD])
def test_state_is_bf16_and_resume_is_bit_exact(optimizer_class):
    model = to_bf16_state(nn.Linear(6, 11))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    options = {"momentum": 0.9} if optimizer_class is BF16SGD else {}
    optimizer = optimizer_class(model.parameters(), lr=0.05, seed=3, **options)
    inputs = [torch.randn(4, 6).to(torch.bfloat16) for _ in range(6)]

    def train(model, optimizer, batches):
        for x in batches:
            optimizer.zero_grad()
            model(x).float().pow(2).mean().backward()
            optimizer.step()

    train(model, optimizer, inputs[:3])
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    for state in optimizer.state.values():
        for name, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.bfloat16, name
    train(model, optimizer, inputs[3:])

    resumed = to_bf16_state(nn.Linear(6, 11))
    resumed.load_state_dict(saved_model)
    resumed_optimizer = optimizer_class(resumed.parameters(), lr=0.05, seed=3, **options)
    resumed_optimizer.load_state_dict(saved_optimizer)
    train(resumed, resumed_optimizer, inputs[3:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_adamw_touches_only_rows(dtype):
    rows, dim = 13, 5
    weight = torch.randn(rows, dim).to(dtype)
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    ids = torch.tensor([11, 0, 4])
    before = weight.clone()
    # reference: torch AdamW on just those rows, three steps (the bias corrections move)
    param = nn.Parameter(before[ids].float())
    reference = torch.optim.AdamW([param], lr=0.01, weight_decay=0.1)
    for step in range(1, 4):
        grads = torch.randn(3, dim)
        row_adamw_(weight, exp_avg, exp_avg_sq, ids, grads, step=step, lr=0.01, weight_decay=0.1, seed=2)
        param.grad = grads
        reference.step()
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(weight[untouched], before[untouched]) and torch.all(exp_avg[untouched] == 0)
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}
    torch.testing.assert_close(weight[ids].float(), param.detach(), **tolerance)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_row_sgd_matches_dense_sgd(momentum):
    weight = torch.randn(9, 4)
    buffer = torch.zeros_like(weight) if momentum else None
    ids = torch.tensor([2, 8])
    param = nn.Parameter(weight[ids].clone())
    reference = torch.optim.SGD([param], lr=0.1, momentum=momentum, weight_decay=0.01)
    for step in range(1, 4):
        grads = torch.randn(2, 4)
        row_sgd_(weight, buffer, ids, grads, step=step, lr=0.1, momentum=momentum, weight_decay=0.01)
        param.grad = grads
        reference.step()
    torch.testing.assert_close(weight[ids], param.detach(), rtol=1e-6, atol=1e-7)


def _sparse_grad(rows: list[int], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with torch.sparse.check_sparse_tensor_invariants(enable=True):  # explicit: torch 2.11 warns otherwise
        return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, is_coalesced=False)


def test_touched_rows_of_a_gradient_a_row_each_are_its_entries():
    """Entries already a row each, in order, are the rows that move as they are (no copy where every one
    moves); a row held as zeros is left out; unordered entries are summed by row first."""
    grad = _sparse_grad([0, 2, 5], torch.randn(3, 4), (6, 4))
    rows, values = _touched_rows(grad)
    assert rows.tolist() == [0, 2, 5] and values.data_ptr() == grad._values().data_ptr()
    held = torch.randn(3, 4)
    held[1] = 0.0
    rows, values = _touched_rows(_sparse_grad([0, 2, 5], held, (6, 4)))
    assert rows.tolist() == [0, 5] and torch.equal(values, held[[0, 2]])
    unordered = torch.randn(3, 4)
    rows, values = _touched_rows(_sparse_grad([5, 0, 5], unordered, (6, 4)))
    assert rows.tolist() == [0, 5]
    torch.testing.assert_close(values, torch.stack([unordered[1], unordered[0] + unordered[2]]))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sparse_gradients_update_their_rows_lazily(weight_decay):
    """A sparse gradient moves the rows it holds, summed over repeats; rows it holds as zeros (padding) and
    rows it lacks keep their weights and moments; bias corrections follow the optimizer's step count."""
    shape, lr, betas = (6, 3), 0.01, (0.9, 0.999)
    start = torch.randn(shape)
    param = nn.Parameter(start.clone())
    optimizer = BF16AdamW([param], lr=lr, weight_decay=weight_decay)
    steps = [([1, 4, 1, 0], torch.randn(4, 3)), ([4, 0, 2], torch.randn(3, 3))]
    steps[0][1][3] = 0.0  # row 0 held as zeros at step 1: a padded entry
    weight, m, v = (
        start.double(),
        torch.zeros(shape, dtype=torch.float64),
        torch.zeros(shape, dtype=torch.float64),
    )
    for step, (rows, values) in enumerate(steps, start=1):
        param.grad = _sparse_grad(rows, values, shape)
        optimizer.step()
        grad = torch.zeros(shape, dtype=torch.float64).index_add_(0, torch.tensor(rows), values.double())
        for row in grad.abs().sum(1).nonzero().flatten().tolist():  # plain lazy AdamW, row by row
            m[row] = betas[0] * m[row] + (1 - betas[0]) * grad[row]
            v[row] = betas[1] * v[row] + (1 - betas[1]) * grad[row] ** 2
            weight[row] *= 1 - lr * weight_decay
            denom = (v[row] / (1 - betas[1] ** step)).sqrt() + 1e-8
            weight[row] -= lr / (1 - betas[0] ** step) * m[row] / denom
    torch.testing.assert_close(param.detach().double(), weight, rtol=1e-6, atol=1e-7)
    assert torch.equal(param.detach()[3], start[3]) and torch.all(optimizer.state[param]["exp_avg"][3] == 0)
    assert torch.equal(param.detach()[5], start[5])


def test_a_sparse_gradient_over_every_row_is_dense_adamw_and_sgd():
    shape = (5, 4)
    start, grads = torch.randn(shape), [torch.randn(shape) for _ in range(3)]
    rows = [4, 3, 2, 1, 0]  # every row, out of order
    for ours, theirs in (
        (
            lambda p: BF16AdamW(p, lr=0.01, weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        ),
        (lambda p: BF16SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    ):
        sparse, dense = nn.Parameter(start.clone()), nn.Parameter(start.clone())
        optimizers = ours([sparse]), theirs([dense])
        for grad in grads:
            sparse.grad = _sparse_grad(rows, grad[rows], shape)
            dense.grad = grad.clone()
            for optimizer in optimizers:
                optimizer.step()
        torch.testing.assert_close(sparse.detach(), dense.detach(), rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    weight = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="grads"):
        row_sgd_(weight, None, torch.tensor([0]), torch.zeros(1, 2), step=1, lr=0.1)
    with pytest.raises(ValueError, match="momentum_buffer"):
        row_sgd_(weight, None, torch.tensor([0]), torch.zeros(1, 3), step=1, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="state"):
        row_adamw_(
            weight,
            torch.zeros(4, 3, dtype=torch.bfloat16),
            torch.zeros(4, 3),
            torch.tensor([0]),
            torch.zeros(1, 3),
            step=1,
            lr=0.1,
        )
    with pytest.raises(ValueError, match="betas"):
        BF16AdamW([nn.Parameter(torch.zeros(1))], betas=(1.0, 0.9))
    assert HeadState("bf16_sr") is HeadState.BF16_SR


def test_chunked_update_equals_one_chunk(monkeypatch):
    """Updating a large tensor chunk by chunk computes the same fp32 values as one pass (fp32 parameters)."""
    import megaclass.train.low_precision as low_precision

    weight = torch.randn(37, 11)
    grads = [torch.randn(37, 11) for _ in range(3)]
    whole = _run(weight, grads, lambda p: BF16AdamW(p, lr=0.01, weight_decay=0.1))
    monkeypatch.setattr(low_precision, "_CHUNK", 64)
    chunked = _run(weight, grads, lambda p: BF16AdamW(p, lr=0.01, weight_decay=0.1))
    assert torch.equal(whole, chunked)
    sgd_whole = _run(weight, grads, lambda p: BF16SGD(p, lr=0.1, momentum=0.9))
    monkeypatch.setattr(low_precision, "_CHUNK", 50)
    assert torch.equal(sgd_whole, _run(weight, grads, lambda p: BF16SGD(p, lr=0.1, momentum=0.9)))
    # bf16: chunks draw their own bits, still one of the two neighbours of the fp32 update
    param = nn.Parameter(weight.to(torch.bfloat16))
    BF16SGD([param], lr=0.1, seed=1)
    param.grad = grads[0].to(torch.bfloat16)
    exact = param.detach().float() - 0.1 * param.grad.float()
    BF16SGD([param], lr=0.1, seed=1).step()
    assert torch.all((param.detach().float() - exact).abs() <= exact.abs() * 2**-7 + 1e-30)
