"""Gradient clipping in one process: the global norm of dense and sparse (row) gradients."""

import torch
from torch import nn

from megaclass.distributed.info import DistInfo
from megaclass.distributed.parallel import DataParallel


def _parallel(encoder: nn.Module, head: nn.Module) -> DataParallel:
    return DataParallel(encoder, head, encoder, head, sharded_head=False, dist=DistInfo())


def test_a_sparse_gradient_clips_as_its_dense_form():
    """Repeated rows are summed before squaring; every gradient scales by the same factor, in place."""
    table, head = nn.Parameter(torch.zeros(6, 3)), nn.Linear(3, 2)
    values = torch.randn(4, 3)
    rows = torch.tensor([[1, 4, 1, 0]])
    table.grad = torch.sparse_coo_tensor(rows, values, (6, 3), check_invariants=True, is_coalesced=False)
    head.weight.grad, head.bias.grad = torch.randn(2, 3), torch.randn(2)
    dense = table.grad.to_dense()
    want = torch.cat([dense.flatten(), head.weight.grad.flatten(), head.bias.grad]).norm()
    expected = [g * (0.5 / (want + 1e-6)) for g in (dense, head.weight.grad, head.bias.grad)]
    encoder = nn.Module()
    encoder.table = table
    values_before = table.grad._values().data_ptr()
    norm = _parallel(encoder, head).clip_grad_norm_(0.5)
    # scaled where they are: a replayed CUDA graph writes the next step's gradient into the same values
    assert table.grad._values().data_ptr() == values_before and table.grad._nnz() == 4
    torch.testing.assert_close(norm, want)
    torch.testing.assert_close(table.grad.to_dense(), expected[0])
    torch.testing.assert_close(head.weight.grad, expected[1])
    torch.testing.assert_close(head.bias.grad, expected[2])
