"""Class shards and the collectives: on one process (no group: identities), and on 2 gloo ranks, where each
collective, the sharded fused loss (loss and every gradient) and the sharded top-k equal their single-process
results."""

from __future__ import annotations

import pytest
import torch
from _ranks import SHARDED_CASES, launch

from megaclass.ops.collectives import (
    ClassShard,
    all_reduce_logsumexp,
    all_reduce_max,
    all_reduce_replicated,
    gather_rows,
    gather_targets,
    local_targets,
    merge_topk,
    scale_grad,
    shard_range,
    world_of,
)
from megaclass.targets import RaggedLabels


@pytest.mark.parametrize("classes,world", [(10, 3), (7, 7), (100, 2), (5, 1), (11, 4)])
def test_shard_ranges_cover_classes_once(classes: int, world: int) -> None:
    ranges = [shard_range(classes, rank, world) for rank in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == classes
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    sizes = [b - a for a, b in ranges]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1  # the first C mod N ranks: +1


@pytest.mark.parametrize(("args", "message"), [((2, 0, 3), "C >= world size"), ((5, 2, 2), "rank")])
def test_shard_range_rejects_bad_arguments(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        shard_range(*args)


def test_class_shard_for_rank_and_properties() -> None:
    shards = [ClassShard.for_rank(10, rank, 3) for rank in range(3)]
    assert [(s.start, s.stop, s.size) for s in shards] == [(0, 4, 4), (4, 7, 3), (7, 10, 3)]
    assert not any(s.is_whole for s in shards)
    whole = ClassShard.for_rank(10, 0, 1)
    assert whole == ClassShard(0, 10, 10) and whole.is_whole and whole.size == 10
    assert ClassShard.for_rank(10, 1, 3, group="g").group == "g"
    with pytest.raises(AttributeError):
        whole.start = 1  # frozen


@pytest.mark.parametrize(
    ("start", "stop", "classes", "message"),
    [(0, 0, 5, "start < stop"), (3, 2, 5, "start < stop"), (-1, 2, 5, "start"), (0, 6, 5, "num_classes=5"),
     (0, 1, 0, "num_classes")],
)  # fmt: skip
def test_class_shard_rejects_bad_ranges(start: int, stop: int, classes: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassShard(start, stop, classes)


def test_local_targets_keeps_owned_labels() -> None:
    targets = RaggedLabels.from_lists([[0, 5, 9], [], [4], [6, 3], [7]])
    local = local_targets(targets, 4, 7)
    assert local.to_lists() == [[1], [], [0], [2], []]


def test_single_process_collectives_are_identity() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert world_of() == (0, 1)
    assert gather_rows(x, grad_scale=2.0) is x
    assert all_reduce_replicated(x) is x and all_reduce_logsumexp(x) is x
    assert torch.equal(all_reduce_max(x), x) and not all_reduce_max(x).requires_grad
    targets = torch.tensor([1, 2, 3])
    assert gather_targets(targets) is targets
    scores, ids = merge_topk(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[7, 8, 9]]), 2)
    assert ids.tolist() == [[7, 9]] and scores.tolist() == [[3.0, 2.0]]


def test_scale_grad_scales_only_the_gradient() -> None:
    x = torch.randn(4, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 0.25))
    assert scale_grad(x, 1.0) is x


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case's errors on each of 2 gloo ranks (one world for the whole module)."""
    return launch(str(tmp_path_factory.mktemp("ranks")), world_size=2)


COLLECTIVES = ["world_of", "gather_rows", "gather_targets", "all_reduce_replicated", "all_reduce_logsumexp"]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", [*COLLECTIVES, "merge_topk"])
def test_collectives_on_two_ranks(two_ranks: list[dict], case: str, rank: int) -> None:
    errors = two_ranks[rank][case]
    bad = {name: value for name, value in errors.items() if value > 1e-6}
    assert not bad, f"{case} rank {rank}: errors (relative to the largest value, or 1 for a mismatch) {bad}"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("case", list(SHARDED_CASES))
def test_sharded_linear_loss_equals_the_single_process_op(
    two_ranks: list[dict], case: str, impl: str, rank: int
) -> None:
    """Each rank's loss, its rows' weight and bias gradients, and the ranks' summed dx equal the plain
    op's."""
    errors = two_ranks[rank][f"linear_loss-{case}-{impl}"]
    assert {"loss", "grad_x", "grad_weight"} <= errors.keys()
    bad = {name: value for name, value in errors.items() if value > 1e-5}
    assert not bad, f"{case} {impl} rank {rank}: error over 1e-5 (relative to the largest value) in {bad}"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("scores", ["dot", "cosine"])
def test_sharded_topk_equals_the_single_process_topk(two_ranks: list[dict], scores: str, rank: int) -> None:
    errors = two_ranks[rank][f"chunked_topk-{scores}"]
    assert errors["ids"] == 0, f"rank {rank}: top-k ids differ"
    assert errors["scores"] <= 1e-5, f"rank {rank}: scores differ by {errors['scores']}"
