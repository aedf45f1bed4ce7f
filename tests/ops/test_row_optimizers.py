"""Row-sparse optimizers against torch.optim on the same rows; seeded initial rows against a plain draw."""

import dataclasses
import math

import pytest
import torch

from megaclass.ops import row_optimizers
from megaclass.ops.row_optimizers import (
    INIT_CHUNK,
    RowOptimizerConfig,
    apply_sparse_update_,
    init_row_state,
    init_rows_,
    put_rows_,
    take_rows,
)
from megaclass.schema import ConfigError


def _torch_optimizer(config: RowOptimizerConfig, param: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    kind = config.kind.value
    if kind == "sgd":
        return torch.optim.SGD(
            [param],
            lr=lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )
    if kind == "adagrad":
        return torch.optim.Adagrad([param], lr=lr, weight_decay=config.weight_decay, eps=config.eps)
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls([param], lr=lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


CONFIGS = [
    RowOptimizerConfig(kind="sgd", momentum=0.0),
    RowOptimizerConfig(kind="sgd", momentum=0.9, weight_decay=5e-4),
    RowOptimizerConfig(kind="sgd", momentum=0.9, weight_decay=1e-3, nesterov=True),
    RowOptimizerConfig(kind="adam"),
    RowOptimizerConfig(kind="adam", weight_decay=1e-2),
    RowOptimizerConfig(kind="adamw", weight_decay=1e-2, betas=(0.8, 0.99)),
    RowOptimizerConfig(kind="adagrad", weight_decay=1e-3, eps=1e-10),
]


@pytest.mark.parametrize("global_steps", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind.value}-m{c.momentum}-wd{c.weight_decay}")
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 16)])
def test_all_rows_touched_equals_torch_optim(config, shape, lazy, global_steps):
    """Touching every row every step reproduces the dense torch optimizer exactly (changing lr too), under
    both rules, given the global step or not."""
    config = dataclasses.replace(config, lazy=lazy)
    weight = torch.randn(shape, dtype=torch.float64)
    reference = weight.clone().requires_grad_(True)
    optimizer = _torch_optimizer(config, reference, lr=0.1)
    state = init_row_state(config, shape[0], shape[1])
    state = {name: tensor.double() for name, tensor in state.items()}
    ids = torch.randperm(shape[0])  # order of ids must not matter
    for step, lr in enumerate([0.1, 0.05, 0.02, 0.2]):
        grads = torch.randn(shape, dtype=torch.float64)
        for group in optimizer.param_groups:
            group["lr"] = lr
        reference.grad = grads.clone()
        optimizer.step()
        apply_sparse_update_(
            weight, state, ids, grads[ids], lr=lr, config=config, step=step + 1 if global_steps else None
        )
        torch.testing.assert_close(
            weight, reference.detach(), rtol=1e-9, atol=1e-9, msg=lambda m, step=step: f"step {step}: {m}"
        )


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "adagrad"])
def test_lazy_untouched_rows_do_not_change(kind):
    """Rows not in ``ids`` keep their values and state; touched rows follow a per-row dense optimizer."""
    config = RowOptimizerConfig(kind=kind, weight_decay=0.01, lazy=True)
    weight = torch.randn(10, 4, dtype=torch.float64)
    state = {k: v.double() for k, v in init_row_state(config, 10, 4).items()}
    references = {r: weight[r].clone().requires_grad_(True) for r in range(10)}
    optimizers = {r: _torch_optimizer(config, p, lr=0.1) for r, p in references.items()}
    for step in range(5):
        ids = torch.tensor([0, 3, 7]) if step % 2 == 0 else torch.tensor([3, 9])
        grads = torch.randn(ids.numel(), 4, dtype=torch.float64)
        for row, grad in zip(ids.tolist(), grads, strict=True):
            references[row].grad = grad.clone()
            optimizers[row].step()
        apply_sparse_update_(weight, state, ids, grads, lr=0.1, config=config, step=step + 1)
    for row, param in references.items():
        torch.testing.assert_close(
            weight[row], param.detach(), rtol=1e-9, atol=1e-9, msg=lambda m, row=row: f"row {row}: {m}"
        )
    if "step" in state:
        assert state["step"].tolist() == [3, 0, 0, 5, 0, 0, 0, 3, 0, 2]


def _touched_on(schedule: list[list[int]]) -> list[torch.Tensor]:
    return [torch.tensor(ids, dtype=torch.int64) for ids in schedule]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_catch_up_decay_equals_dense_decay_over_skipped_steps(kind):
    """Rows touched now and then carry exactly the decay a dense optimizer applies with zero gradients on the
    skipped steps (at a constant lr; under a schedule the skipped steps decay at the touching step's lr):
    AdamW's decoupled decay with its second moment (no first moment: its tail is timed per touch), and SGD's
    L2 decay without momentum."""
    config = RowOptimizerConfig(kind=kind, momentum=0.0, betas=(0.0, 0.99), weight_decay=0.3)
    schedule = [[0, 2], [2], [], [1, 2], [2], [0], [2], [], [0, 1, 2, 3]]  # row 3: first touched at the end
    weight = torch.randn(4, 3, dtype=torch.float64)
    reference = weight.clone().requires_grad_(True)
    optimizer = _torch_optimizer(config, reference, lr=0.1)
    state = {k: v.double() for k, v in init_row_state(config, 4, 3).items()}
    lr = 0.1
    for step, ids in enumerate(_touched_on(schedule)):
        grads = torch.randn(ids.numel(), 3, dtype=torch.float64)
        dense_grads = torch.zeros(4, 3, dtype=torch.float64).index_copy(0, ids, grads)
        reference.grad = dense_grads
        optimizer.step()
        if ids.numel():
            apply_sparse_update_(weight, state, ids, grads, lr=lr, config=config, step=step + 1)
        # a touched row matches now; an untouched one once it catches up (the last step touches all rows)
        torch.testing.assert_close(weight[ids], reference.detach()[ids], rtol=1e-9, atol=1e-9)
    assert not torch.equal(weight, weight.new_zeros(()))


def test_catch_up_second_moment_equals_dense_adam():
    """Adam's second moment of rows touched now and then equals dense Adam's with zero gradients between."""
    config = RowOptimizerConfig(kind="adam", betas=(0.9, 0.99))
    schedule = [[0, 1], [1], [], [], [0, 1], [1], [0, 2], [0, 1, 2]]
    weight = torch.randn(3, 5, dtype=torch.float64)
    reference = weight.clone().requires_grad_(True)
    optimizer = _torch_optimizer(config, reference, lr=0.01)
    state = {k: v.double() for k, v in init_row_state(config, 3, 5).items()}
    for step, ids in enumerate(_touched_on(schedule)):
        grads = torch.randn(ids.numel(), 5, dtype=torch.float64)
        reference.grad = torch.zeros(3, 5, dtype=torch.float64).index_copy(0, ids, grads)
        optimizer.step()
        if ids.numel():
            apply_sparse_update_(weight, state, ids, grads, lr=0.01, config=config, step=step + 1)
    torch.testing.assert_close(
        state["exp_avg_sq"], optimizer.state[reference]["exp_avg_sq"], rtol=1e-12, atol=0
    )
    assert state["last_step"].tolist() == [8, 8, 8] and state["step"].tolist() == [4, 5, 2]


def _distance_moved(config: RowOptimizerConfig, *, every: int, steps: int, dense: bool) -> float:
    """How far a row with a constant gradient on one step in ``every`` (zero between) moves in ``steps``."""
    weight = torch.zeros(1, 4, dtype=torch.float64)
    gradient = torch.tensor([[1.0, -0.5, 0.25, 2.0]], dtype=torch.float64)
    if dense:
        param = weight.clone().requires_grad_(True)
        optimizer = _torch_optimizer(config, param, lr=0.001)
        for step in range(steps):
            param.grad = gradient if step % every == 0 else torch.zeros_like(gradient)
            optimizer.step()
        return float(param.detach().norm())
    state = {k: v.double() for k, v in init_row_state(config, 1, 4).items()}
    for step in range(0, steps, every):
        apply_sparse_update_(
            weight, state, torch.tensor([0]), gradient, lr=0.001, config=config, step=step + 1
        )
    return float(weight.norm())


@pytest.mark.parametrize("every", [5, 20])
def test_catch_up_adam_moves_a_sparse_row_as_far_as_dense_adam(every):
    """A row active on one step in ``every``: dense Adam moves it ``sqrt(every)`` times as far as lazy
    Adam does; the catch-up rule moves it as far as dense Adam (within 15%: the moment's timing differs)."""
    config = RowOptimizerConfig(kind="adam")
    dense = _distance_moved(config, every=every, steps=2000, dense=True)
    caught_up = _distance_moved(config, every=every, steps=2000, dense=False)
    lazy = _distance_moved(dataclasses.replace(config, lazy=True), every=every, steps=2000, dense=False)
    assert caught_up == pytest.approx(dense, rel=0.15)
    assert lazy * math.sqrt(every) == pytest.approx(dense, rel=0.25)


def test_catch_up_sgd_momentum_decay_rate():
    """SGD with momentum and L2 decay: an untouched row shrinks at dense SGD's steady rate."""
    config = RowOptimizerConfig(kind="sgd", momentum=0.9, weight_decay=0.01)
    weight = torch.ones(1, 2, dtype=torch.float64)
    param = weight.clone().requires_grad_(True)
    optimizer = _torch_optimizer(config, param, lr=0.1)
    state = {k: v.double() for k, v in init_row_state(config, 1, 2).items()}
    zero = torch.zeros(1, 2, dtype=torch.float64)
    for _ in range(1000):
        param.grad = zero
        optimizer.step()
    apply_sparse_update_(weight, state, torch.tensor([0]), zero, lr=0.1, config=config, step=1000)
    dense_log_shrink, caught_up_log_shrink = (
        math.log(float(param[0, 0].detach())),
        math.log(float(weight[0, 0])),
    )
    assert caught_up_log_shrink == pytest.approx(dense_log_shrink, rel=0.02)  # 1 - lr wd / (1 - mu): 10% off


def test_config_errors():
    with pytest.raises(ConfigError, match="momentum"):
        RowOptimizerConfig(momentum=1.5)
    with pytest.raises(ConfigError, match="nesterov"):
        RowOptimizerConfig(kind="adam", nesterov=True)
    with pytest.raises(ValueError, match="grads"):
        apply_sparse_update_(
            torch.zeros(3, 2),
            {},
            torch.tensor([0]),
            torch.zeros(2, 2),
            lr=0.1,
            config=RowOptimizerConfig(momentum=0),
        )


def _plain_draw(num_rows: int, dim: int, seed: int, bound: float) -> torch.Tensor:
    """The documented matrix: chunk ``i`` of ``INIT_CHUNK`` rows, ``U(-bound, bound)`` seeded ``seed + i``."""
    chunks = []
    for index, start in enumerate(range(0, num_rows, INIT_CHUNK)):
        generator = torch.Generator().manual_seed(seed + index)
        unit = torch.rand(min(INIT_CHUNK, num_rows - start), dim, generator=generator)
        chunks.append(unit * (2 * bound) - bound)
    return torch.cat(chunks)


@pytest.mark.parametrize("num_rows,dim", [(1, 1), (17, 5), (INIT_CHUNK + 3, 2)])
def test_init_rows_is_the_seeded_chunked_draw(num_rows, dim):
    weight = torch.empty(num_rows, dim)
    init_rows_(weight, seed=11)
    assert torch.equal(weight, _plain_draw(num_rows, dim, 11, dim**-0.5))
    assert float(weight.abs().max()) <= dim**-0.5
    other = torch.empty(num_rows, dim)
    init_rows_(other, seed=12, bound=0.25)
    assert torch.equal(other, _plain_draw(num_rows, dim, 12, 0.25))


@pytest.mark.parametrize(
    "bounds",
    [[0, 5, 9], [0, INIT_CHUNK - 1, INIT_CHUNK, INIT_CHUNK + 7], [0, 3, INIT_CHUNK + 1, INIT_CHUNK + 7]],
)
def test_init_rows_of_row_ranges_assemble_the_whole_matrix(bounds):
    """Shards filling their own row ranges (across chunk boundaries too) hold the rows of the whole draw."""
    num_rows = bounds[-1]
    whole = torch.empty(num_rows, 3, dtype=torch.float64)
    init_rows_(whole, seed=5)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = torch.empty(stop - start, 3, dtype=torch.float64)
        init_rows_(part, seed=5, row_start=start, num_rows=num_rows)
        assert torch.equal(part, whole[start:stop]), (start, stop)


@pytest.mark.parametrize("threads", [1, 3])
def test_init_rows_drawn_on_several_threads_are_the_same_matrix(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight = torch.empty(3 * INIT_CHUNK + 5, 2)  # four chunks, side by side on three threads
        init_rows_(weight, seed=7)
        part = torch.empty(INIT_CHUNK + 4, 2)
        init_rows_(part, seed=7, row_start=INIT_CHUNK - 2, num_rows=3 * INIT_CHUNK + 5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weight, _plain_draw(3 * INIT_CHUNK + 5, 2, 7, 2**-0.5))
    assert torch.equal(part, weight[INIT_CHUNK - 2 : 2 * INIT_CHUNK + 2])


def test_init_rows_range_errors():
    with pytest.raises(ValueError, match="not inside a matrix of 4 rows"):
        init_rows_(torch.empty(3, 2), seed=0, row_start=2, num_rows=4)


@pytest.mark.parametrize("threads", [1, 3])  # numpy on this thread / over a pool's threads too
@pytest.mark.parametrize("thread_bytes", [64, 2 << 20])  # numpy writes / indexing writes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(1200,), (1200, 1), (1200, 5), (1200, 3, 2)])
@pytest.mark.parametrize("count", [0, 1, 9, 1100])
def test_put_rows_and_take_rows_equal_indexing(monkeypatch, threads, thread_bytes, dtype, shape, count):
    monkeypatch.setattr(row_optimizers, "_PUT_THREAD_BYTES", thread_bytes)
    generator = torch.Generator().manual_seed(count)
    tensor = (torch.randn(shape, generator=generator) * 100).to(dtype)
    ids = torch.randperm(shape[0], generator=generator)[:count]  # unique, unsorted
    values = (torch.randn(count, *shape[1:], generator=generator) * 100).to(dtype)
    expected = tensor.clone()
    expected[ids] = values
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(take_rows(tensor, ids), tensor[ids], rtol=0, atol=0)
        put_rows_(tensor, ids, values)
    finally:
        torch.set_num_threads(default)
    assert torch.equal(tensor, expected)


@pytest.mark.parametrize("threads", [1, 4])
def test_put_rows_gives_numpy_a_write_of_its_bytes_a_thread_or_more(monkeypatch, threads):
    """Below ``_PUT_THREAD_BYTES`` for each of torch's threads a write is left to ``index_put_``; from there
    it goes to numpy in one piece a thread."""
    monkeypatch.setattr(row_optimizers, "_PUT_THREAD_BYTES", 4096)
    pieces = []
    real_split = row_optimizers.run_split
    monkeypatch.setattr(
        row_optimizers,
        "run_split",
        lambda work, bounds: pieces.append(len(bounds) - 1) or real_split(work, bounds),
    )
    tensor = torch.zeros(10_000, 4)  # rows of 16 bytes: 256 rows fill 4096
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for count in (256 * threads - 1, 256 * threads):
            put_rows_(tensor, torch.arange(count), torch.ones(count, 4))
    finally:
        torch.set_num_threads(default)
    assert pieces == [threads]
    assert tensor[: 256 * threads].eq(1).all() and not tensor[256 * threads :].any()


def test_put_rows_takes_values_of_another_dtype_and_layout(monkeypatch):
    monkeypatch.setattr(row_optimizers, "_PUT_THREAD_BYTES", 1024)
    tensor = torch.zeros(3000, 4)
    ids = torch.randperm(3000)[:2500]
    values = torch.randn(4, 2500, dtype=torch.float64).T  # not contiguous, float64
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # four pieces, on three pool threads and the caller
    try:
        put_rows_(tensor, ids, values)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(tensor[ids], values.float(), rtol=0, atol=0)
    assert not tensor[torch.ones(3000, dtype=torch.bool).index_fill_(0, ids, False)].any()
    weight = torch.nn.Parameter(torch.zeros(600, 2))  # a parameter's rows, written under no_grad
    with torch.no_grad():
        put_rows_(weight, torch.arange(300).flip(0), torch.ones(300, 2))
    assert weight[:300].eq(1).all() and weight.sum() == 600
    column = torch.zeros(4, 3000).T  # a target that is not contiguous: indexing writes it
    put_rows_(column, ids[:300], values[:300])
    torch.testing.assert_close(column[ids[:300]], values[:300].float(), rtol=0, atol=0)
