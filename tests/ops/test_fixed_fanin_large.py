"""Ten million labels at fan-in 16 on the CPU: the fused loss and its gradients agree with a float64 dense
computation over all labels (loss, input gradient) and with the reference on sampled labels (weight gradient)
for a few SGD steps."""

import pytest
import torch
import torch.nn.functional as F

from megaclass.dst import random_fanin_index
from megaclass.ops.fixed_fanin import fixed_fanin_loss, reference_fixed_fanin
from megaclass.targets import RaggedLabels

CLASSES, FAN_IN, GROUP, DIM, BATCH = 10_000_000, 16, 16, 64, 3
CHUNK = 1_000_000


def _dense_totals(x, weight, index, targets):
    """Loss and input gradient over all labels from the dense form: each chunk of labels becomes a
    ``(chunk, D)`` matrix (weights scattered to their columns), then a plain matmul; positives from
    ``reference``."""
    x = x.detach().double()
    total, grad_x = torch.zeros((), dtype=torch.float64), torch.zeros_like(x)
    for start in range(0, CLASSES, CHUNK):
        w = weight[start : start + CHUNK].detach().double()
        cols = index[torch.arange(start, start + w.shape[0]) // GROUP].long()  # (chunk, K)
        dense = torch.zeros(w.shape[0], DIM, dtype=torch.float64).scatter_add_(1, cols, w)  # (chunk, D)
        z = x @ dense.T  # (B, chunk)
        total += F.softplus(z).sum() / BATCH
        grad_x += torch.sigmoid(z) @ dense / BATCH
    x = x.requires_grad_()
    samples, labels = targets.sample_ids(), targets.indices
    z_pos = reference_fixed_fanin(
        x, weight[labels].detach().double(), index[labels // GROUP], group=1
    )  # (B, L)
    correction = -z_pos[samples, torch.arange(labels.numel())].sum() / BATCH
    (grad_pos,) = torch.autograd.grad(correction, [x])
    return total + correction.detach(), grad_x + grad_pos


@pytest.mark.slow
def test_ten_million_labels_few_steps_against_reference():
    generator = torch.Generator().manual_seed(0)
    index = random_fanin_index(CLASSES // GROUP, DIM, FAN_IN, generator=generator)  # (625_000, 16)
    weight = (0.05 * torch.randn(CLASSES, FAN_IN, generator=generator)).requires_grad_()
    x = torch.randn(BATCH, DIM, generator=generator, requires_grad=True)
    targets = RaggedLabels.from_lists([[CLASSES - 1, 5], [9_999_983], [1234567, 9_000_001, 42]])
    sampled = torch.cat([torch.randint(0, CLASSES, (500,), generator=generator), targets.indices])
    is_positive = torch.zeros(BATCH, sampled.numel())
    is_positive[targets.sample_ids(), torch.arange(500, sampled.numel())] = 1.0
    for _ in range(2):
        loss = fixed_fanin_loss(x, weight, index, targets, group=GROUP, loss="bce", impl="reference")
        grad_x, grad_w = torch.autograd.grad(loss, [x, weight])
        expected_loss, expected_grad_x = _dense_totals(x, weight, index, targets)
        torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0.0)
        torch.testing.assert_close(grad_x.double(), expected_grad_x, rtol=1e-4, atol=1e-3)
        w_sampled = weight[sampled].detach().requires_grad_()
        z = reference_fixed_fanin(x.detach(), w_sampled, index[sampled // GROUP], group=1)  # (B, S)
        sampled_loss = F.binary_cross_entropy_with_logits(z, is_positive, reduction="sum") / BATCH
        (expected_grad_w,) = torch.autograd.grad(sampled_loss, [w_sampled])
        torch.testing.assert_close(grad_w[sampled], expected_grad_w, rtol=1e-5, atol=1e-7)
        with torch.no_grad():  # an SGD step on both, so the second step sees moved weights and inputs
            weight -= 10.0 * grad_w
            x -= 0.1 * grad_x


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with ~20 GiB free")
def test_triton_offsets_beyond_int32_on_gpu():
    """Weights of more than 2^31 elements: the Triton kernels address them with int64 offsets."""
    from megaclass.ops.fixed_fanin import fixed_fanin_rows

    classes, fan_in, group, dim, batch = 2**31 // 16 + 1000, 16, 16, 64, 2
    generator = torch.Generator(device="cuda").manual_seed(0)
    index = random_fanin_index(-(-classes // group), dim, fan_in, generator=generator)
    weight = torch.randn(classes, fan_in, device="cuda", generator=generator).mul_(0.05).requires_grad_()
    assert weight.numel() > 2**31
    x = torch.randn(batch, dim, device="cuda", generator=generator)
    rows = fixed_fanin_rows(x, weight, index, group=group, loss="bce", impl="triton")
    (grad_w,) = torch.autograd.grad(rows.sum(), [weight])
    expected = torch.zeros(batch, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        for start in range(0, classes, 1 << 22):
            stop = min(start + (1 << 22), classes)
            rows_slice = slice(start // group, -(-stop // group))
            z = reference_fixed_fanin(x, weight[start:stop], index[rows_slice], group=group)  # (B, n)
            expected += F.softplus(z.double()).sum(1)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=0.0)
    sampled = torch.cat(
        [torch.arange(classes - 300, classes, device="cuda"), torch.arange(300, device="cuda")]
    )
    w_sampled = weight[sampled].detach().requires_grad_()
    z = reference_fixed_fanin(x, w_sampled, index[sampled // group], group=1)
    (expected_grad,) = torch.autograd.grad(F.softplus(z).sum(), [w_sampled])
    torch.testing.assert_close(grad_w[sampled], expected_grad, rtol=1e-4, atol=1e-6)
