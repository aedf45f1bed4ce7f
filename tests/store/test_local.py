"""Rows in this process's memory: the seeded start, lazy updates and the checkpoint round trip."""

import pytest
import torch

from megaclass.ops.row_optimizers import RowOptimizerConfig, init_rows_
from megaclass.store.local import LocalRows, check_ids


def test_starts_from_the_seeded_matrix_with_zero_state():
    rows = LocalRows(7, 3, optimizer=RowOptimizerConfig(kind="adam"), seed=2, init_bound=0.5)
    expected = torch.empty(7, 3)
    init_rows_(expected, seed=2, bound=0.5)
    assert torch.equal(rows.weight, expected)
    assert (rows.num_rows, rows.dim) == (7, 3)
    assert sorted(rows.state) == ["exp_avg", "exp_avg_sq", "last_step", "step"]
    assert all(int(tensor.count_nonzero()) == 0 for tensor in rows.state.values())


def test_update_changes_only_the_given_rows():
    rows = LocalRows(5, 2, optimizer=RowOptimizerConfig(momentum=0.5))
    before = rows.weight.clone()
    rows.update_(torch.tensor([3, 1]), torch.tensor([[1.0, 2.0], [4.0, 8.0]]), lr=0.5)
    expected = before.clone()
    expected[3] -= 0.5 * torch.tensor([1.0, 2.0])  # first step: the momentum buffer is the gradient
    expected[1] -= 0.5 * torch.tensor([4.0, 8.0])
    torch.testing.assert_close(rows.weight, expected)
    assert rows.state["momentum_buffer"][[0, 2, 4]].count_nonzero() == 0


def test_state_dict_is_a_copy_that_restores_exactly():
    config = RowOptimizerConfig(kind="adagrad")
    rows = LocalRows(4, 2, optimizer=config, seed=1)
    rows.update_(torch.tensor([0, 2]), torch.ones(2, 2), lr=0.1)
    saved = rows.state_dict()
    assert sorted(saved) == ["optim.step", "optim.sum", "weight"]
    rows.update_(torch.tensor([2]), torch.ones(1, 2), lr=0.1)
    assert not torch.equal(saved["weight"], rows.weight)  # later steps do not reach the saved copy
    fresh = LocalRows(4, 2, optimizer=config, seed=9)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.weight, saved["weight"])
    assert fresh.state["step"].tolist() == [1, 0, 1, 0]


def test_errors():
    with pytest.raises(ValueError, match="num_rows and dim must be >= 1"):
        LocalRows(0, 2)
    rows = LocalRows(3, 2, optimizer=RowOptimizerConfig(momentum=0.0))
    with pytest.raises(ValueError, match=r"missing \['weight'\]"):
        rows.load_state_dict({})
    with pytest.raises(ValueError, match=r"'weight': expected shape \(3, 2\), got \(2, 2\)"):
        rows.load_state_dict({"weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="ids: expected a"):
        check_ids(torch.tensor([[0]]))
