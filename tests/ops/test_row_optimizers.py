"""Row-sparse optimizers against torch.optim on the same rows; seeded initial rows against a plain draw."""

import pytest
import torch

from megaclass.ops.row_optimizers import (
    INIT_CHUNK,
    RowOptimizerConfig,
    apply_sparse_update_,
    init_row_state,
    init_rows_,
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


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind.value}-m{c.momentum}-wd{c.weight_decay}")
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 16)])
def test_all_rows_touched_equals_torch_optim(config, shape):
    """Touching every row every step reproduces the dense torch optimizer exactly (changing lr too)."""
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
        apply_sparse_update_(weight, state, ids, grads[ids], lr=lr, config=config)
        torch.testing.assert_close(
            weight, reference.detach(), rtol=1e-9, atol=1e-9, msg=lambda m, step=step: f"step {step}: {m}"
        )


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "adagrad"])
def test_lazy_untouched_rows_do_not_change(kind):
    """Rows not in ``ids`` keep their values and state; touched rows follow a per-row dense optimizer."""
    config = RowOptimizerConfig(kind=kind, weight_decay=0.01)
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
        apply_sparse_update_(weight, state, ids, grads, lr=0.1, config=config)
    for row, param in references.items():
        torch.testing.assert_close(
            weight[row], param.detach(), rtol=1e-9, atol=1e-9, msg=lambda m, row=row: f"row {row}: {m}"
        )
    if "step" in state:
        assert state["step"].tolist() == [3, 0, 0, 5, 0, 0, 0, 3, 0, 2]


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


def test_init_rows_range_errors():
    with pytest.raises(ValueError, match="not inside a matrix of 4 rows"):
        init_rows_(torch.empty(3, 2), seed=0, row_start=2, num_rows=4)
