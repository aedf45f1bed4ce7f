"""DenseHead: loss, gradients and top-k against dense PyTorch; config parsing; state dict round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaclass.heads import HeadContext, build_head, head_config
from megaclass.heads.dense import DenseHead, DenseHeadConfig
from megaclass.ops.collectives import ClassShard
from megaclass.ops.margins import MarginConfig, MarginKind, margin_logits
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels


def make_head(multilabel: bool, classes: int = 23, dim: int = 6, **options) -> DenseHead:
    return DenseHead(DenseHeadConfig(chunk_size=8, **options), HeadContext(dim, classes, multilabel))


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("bias", [False, True])
def test_multiclass_softmax_matches_cross_entropy(impl, bias, device_for):
    device = device_for(impl)
    head = make_head(False, bias=bias, impl=impl).to(device)
    with torch.no_grad():
        if head.bias is not None:
            head.bias.normal_()
    x = torch.randn(5, 6, device=device, requires_grad=True)
    y = torch.randint(0, 23, (5,), device=device)
    loss = head(x, y)
    logits = x @ head.weight.T + (head.bias if bias else 0)
    expected = F.cross_entropy(logits, y)
    torch.testing.assert_close(loss, expected)
    params = [x, *head.parameters()]
    for got, want in zip(
        torch.autograd.grad(loss, params), torch.autograd.grad(expected, params), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["auto", "squared_hinge"])
def test_multilabel_default_is_bce(loss_name):
    head = make_head(True, loss=loss_name, bias=False)
    x = torch.randn(4, 6, requires_grad=True)
    y = RaggedLabels.from_lists([[1, 5], [], [22], [0, 1, 2]])
    dense = torch.zeros(4, 23)
    dense[y.sample_ids(), y.indices] = 1
    logits = x @ head.weight.T
    if loss_name == "auto":
        expected = F.binary_cross_entropy_with_logits(logits, dense, reduction="sum") / 4
    else:
        expected = F.relu(1 - (2 * dense - 1) * logits).square().sum() / 4
    loss = head(x, y)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x)[0])


def test_arcface_head_and_cosine_topk():
    margin = MarginConfig(kind=MarginKind.ARCFACE, scale=16.0, margin=0.3)
    head = make_head(False, bias=False, margin=margin)
    x = torch.randn(7, 6, requires_grad=True)
    y = torch.randint(0, 23, (7,))
    cosine = F.normalize(x, dim=-1) @ F.normalize(head.weight, dim=-1).T
    expected = F.cross_entropy(margin_logits(cosine, y, margin), y)
    torch.testing.assert_close(head(x, y), expected)
    scores, ids = head.topk(x.detach(), 4)
    reference = (16.0 * cosine.detach()).topk(4, dim=1)
    assert torch.equal(ids, reference.indices)
    torch.testing.assert_close(scores, reference.values)


def test_topk_matches_full_scores_and_autocast():
    head = make_head(False, classes=50, bias=True)
    with torch.no_grad():
        head.bias.normal_()
    x = torch.randn(3, 6)
    scores, ids = head.topk(x, 5)
    expected = (x @ head.weight.T + head.bias).topk(5, dim=1)
    assert torch.equal(ids, expected.indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_scores, _ = head.topk(x, 5)
        loss = head(x, torch.tensor([0, 1, 2]))
    assert low_scores.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(low_scores, expected.values, rtol=0.05, atol=0.05)


def test_registry_config_and_state_dict_round_trip():
    config = head_config({"type": "dense", "loss": "bce", "bias": "false", "chunk_size": 16})
    assert isinstance(config, DenseHeadConfig) and config.bias is False
    head = build_head(config, HeadContext(6, 11, True))
    clone = build_head(config, HeadContext(6, 11, True))
    clone.load_state_dict(head.state_dict())
    assert torch.equal(clone.weight, head.weight)
    assert head.state_bytes()["weights"] == 11 * 6 * 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "hinge"}, "loss"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"bias": True, "margin": {"kind": "arcface"}}, "bias"),
        ({"bias": False, "loss": "bce", "margin": {"kind": "cosface"}}, "softmax"),
    ],
)
def test_bad_config_raises_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        head_config({"type": "dense", **options})


def test_bad_features_and_margin_on_multilabel():
    head = make_head(False)
    with pytest.raises(ValueError, match="features must be"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="multi-class"):
        make_head(True, bias=False, margin=MarginConfig(kind=MarginKind.COSFACE, margin=0.35))


def test_bias_follows_the_margin_unless_set():
    context = HeadContext(in_features=4, num_classes=6, multilabel=False)
    assert head_config({"type": "dense"}).bias is None  # the config keeps what was asked
    assert build_head(head_config({"type": "dense"}), context).bias is not None
    assert build_head(head_config({"type": "dense", "margin": "arcface"}), context).bias is None
    with pytest.raises(ConfigError, match="bias must be false"):
        head_config({"type": "dense", "margin": "arcface", "bias": True})
    assert head_config({"type": "dense", "margin": "cosface", "bias": False}).margin.kind.value == "cosface"


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("loss_name", ["bce", "softmax", "squared_hinge"])
def test_padded_multilabel_targets_give_the_unpadded_loss_and_gradients(impl, loss_name, device_for):
    device = device_for(impl)
    head = make_head(True, loss=loss_name, impl=impl).to(device)
    with torch.no_grad():
        head.bias.normal_()
    x = torch.randn(5, 6, device=device, requires_grad=True)
    y = RaggedLabels.from_lists([[1, 5], [], [22], [0, 1, 2], []], device=device)
    params = [x, *head.parameters()]
    results = []
    for targets in (y, y.pad_to(11)):  # pads on a last row without labels
        loss = head(x, targets)
        results.append([loss, *torch.autograd.grad(loss, params)])
    tolerance = 0.0 if device.type == "cpu" else 1e-6
    for name, got, want in zip(["loss", "x", "weight", "bias"], *results, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=name)


def test_multilabel_capture_is_not_refused_but_a_sharded_head_takes_no_padded_targets():
    head = make_head(True)
    assert head.capture_blocker(targets_static=False) is None
    sharded = DenseHead(DenseHeadConfig(), HeadContext(6, 23, True), shard=ClassShard(0, 23, 23))
    assert "class-sharded" in sharded.capture_blocker(targets_static=False)
    with pytest.raises(ValueError, match="class-sharded head takes unpadded labels"):
        sharded(torch.randn(2, 6), RaggedLabels.from_lists([[1], [2]]).pad_to(3))


def test_initial_rows_are_the_same_whatever_range_a_process_draws():
    """The rows of any class range equal those of the whole matrix (blocks of 4,096 rows at D 1,024, the last
    cut at C), and are N(0, std^2)."""
    from megaclass.heads.dense import _init_block_rows, _init_normal_rows_

    classes, dim, std = 10_000, 1024, 0.03
    assert _init_block_rows(dim) == 4096 and _init_block_rows(64) == 65_536 and _init_block_rows(1 << 23) == 1
    whole = torch.empty(classes, dim)
    _init_normal_rows_(whole, 0, num_classes=classes, std=std, seed=3)
    for start, stop in ((0, 3000), (3000, 9000), (9000, 10_000), (4095, 4097)):
        piece = torch.empty(stop - start, dim)
        _init_normal_rows_(piece, start, num_classes=classes, std=std, seed=3)
        assert torch.equal(piece, whole[start:stop])
    assert abs(whole.std().item() - std) < 0.01 * std and abs(whole.mean().item()) < 0.01 * std
    other = torch.empty(classes, dim)
    _init_normal_rows_(other, 0, num_classes=classes, std=std, seed=4)
    assert not torch.equal(other, whole)
