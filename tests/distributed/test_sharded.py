"""Each class-sharded head on 2 gloo ranks equals the plain head on the global batch (loss, grads, a step,
top-k), and the pieces that need no process group. (Shards and collectives alone: tests/ops.)"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import launch
from megaclass.distributed.info import DistInfo
from megaclass.targets import RaggedLabels

CASES = [
    *(
        f"dense-{loss}-{kind}"
        for loss in ("softmax", "bce", "squared_hinge")
        for kind in ("multiclass", "multilabel")
    ),
    "dense-arcface",
    "selected-multiclass",
    "selected-multilabel",
    "selected-multiclass-arcface",
    "sparse-bce",
    "sparse-softmax",
    "sparse-hinge",
]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_sharded_head_equals_plain_head(head_world, case: str, rank: int) -> None:
    errors = head_world.results[rank][case]
    assert errors.pop("topk_ids") == 0, f"{case} rank {rank}: top-k ids differ"
    bad = {name: value for name, value in errors.items() if value > 1e-5}
    assert not bad, f"{case} rank {rank}: max abs error over 1e-5 in {bad}"


@pytest.mark.parametrize("world_size", [1, 2])
def test_checkpoint_of_two_ranks_resumes_on_any_world(head_world, world_size: int) -> None:
    out_dir = os.path.join(os.path.dirname(head_world.out_dir), f"reload{world_size}")
    os.makedirs(out_dir)
    reloaded = launch("reload", out_dir, world_size=world_size)
    assert reloaded.codes == [0] * world_size, "\n".join(reloaded.stderr)
    for head in ("dense", "selected", "sparse"):
        saved, loaded = head_world.results[0][f"checkpoint-{head}"], reloaded.results[0][f"checkpoint-{head}"]
        for when in ("next", "after"):  # the next loss, and the one after an optimizer step on loaded state
            assert loaded[when] == pytest.approx(saved[when], rel=1e-5), (
                f"{head} {when} on {world_size} ranks"
            )


def test_dist_info_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert DistInfo.from_env() == DistInfo(0, 0, 1, True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert DistInfo.from_env() == DistInfo(3, 1, 4, False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        DistInfo.from_env()


@pytest.mark.parametrize(
    "loss,margin", [("softmax", False), ("bce", False), ("squared_hinge", False), ("softmax", True)]
)
def test_triton_backend_equals_reference_on_a_shard(device_for, loss: str, margin: bool) -> None:
    """One rank's part (classes [3, 12) of 15; targets 12 and 0 another rank's): kernels as the reference."""
    from megaclass.ops.collectives import ClassShard
    from megaclass.ops.linear_cross_entropy import LinearLossOptions, linear_loss
    from megaclass.ops.margins import MarginConfig

    margin_config = MarginConfig(kind="arcface", scale=8.0, margin=0.3) if margin else MarginConfig()
    options = LinearLossOptions(loss=loss, margin=margin_config)
    device = device_for("triton")
    x = torch.randn(6, 16, device=device, requires_grad=True)
    weight = torch.randn(9, 16, device=device, requires_grad=True)
    targets = torch.tensor([3, 10, 5, 12, 0, 4], device=device)
    found = []
    for impl in ("reference", "triton"):
        value = linear_loss(x, weight, targets, options=options, impl=impl, shard=ClassShard(3, 12, 15))
        found.append((value, *torch.autograd.grad(value, (x, weight))))
    for name, ref, out in zip(("loss", "grad_x", "grad_weight"), *found, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("loss,margin", [("softmax", False), ("bce", False), ("softmax", True)])
def test_one_rank_sharded_dense_head_is_the_plain_head(
    loss: str, margin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """World size 1 runs the plain head's op (no statistics to reduce): the same loss and gradients."""
    from megaclass.heads.base import ClassShard, HeadContext
    from megaclass.heads.dense import DenseHead, DenseHeadConfig
    from megaclass.ops.linear_cross_entropy.sharded import ShardedLinearLossFunction
    from megaclass.ops.margins import MarginConfig

    margin_config = MarginConfig(kind="arcface", scale=8.0, margin=0.3) if margin else MarginConfig()
    config = DenseHeadConfig(loss=loss, margin=margin_config, bias=not margin)
    context = HeadContext(in_features=16, num_classes=11, multilabel=loss == "bce")
    sharded = DenseHead(config, context, ClassShard.for_rank(11, 0, 1))
    plain = DenseHead(config, context)
    plain.load_state_dict(sharded.state_dict())
    features = torch.randn(5, 16)
    multilabel = RaggedLabels.from_lists([[0, 3], [], [10], [4], [1, 2, 9]])
    targets = multilabel if loss == "bce" else torch.arange(5)

    def reducing_op(*args, **kwargs):
        raise AssertionError("world size 1 ran the op that reduces over ranks")

    monkeypatch.setattr(ShardedLinearLossFunction, "apply", reducing_op)
    for head in (sharded, plain):
        head(features, targets).backward()
    assert torch.equal(sharded.weight.grad, plain.weight.grad)
    if not margin:
        assert torch.equal(sharded.bias.grad, plain.bias.grad)
    assert torch.equal(sharded(features, targets), plain(features, targets))


def test_fsdp2_units_look_inside_containers_without_a_forward() -> None:
    """A ModuleList (the MLP's layer norms) has no forward for FSDP2 to wrap: its children are the units."""
    from torch import nn

    from megaclass.distributed.parallel import _shard_units

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Linear(4, 3)
            self.norms = nn.ModuleList([nn.LayerNorm(3), nn.LayerNorm(3)])
            self.empty = nn.ModuleList([nn.ReLU()])
            self.head = nn.Sequential(nn.Linear(3, 2))

    encoder = Encoder()
    units = _shard_units(encoder)
    assert units == [encoder.embedding, *encoder.norms, encoder.head]
