"""SparseHead against a dense-logits reference: loss, every gradient, top-k, rewiring, resume."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megaclass.dst import DSTConfig
from megaclass.heads import HeadContext, head_config, head_types
from megaclass.heads.sparse import SparseHead, SparseHeadConfig
from megaclass.ops.collectives import ClassShard
from megaclass.ops.fixed_fanin import reference_fixed_fanin
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels

CLASSES, DIM = 120, 24


def _context(multilabel=True):
    rng = np.random.default_rng(0)
    return HeadContext(
        in_features=DIM,
        num_classes=CLASSES,
        multilabel=multilabel,
        label_counts=rng.integers(1, 100, CLASSES),
        label_features=rng.standard_normal((CLASSES, 6)).astype(np.float32),
    )


def _targets(batch, multilabel):
    if not multilabel:
        return torch.randint(0, CLASSES, (batch,))
    lists = [sorted(set(torch.randint(0, CLASSES, (b % 4,)).tolist())) for b in range(batch)]
    return RaggedLabels.from_lists(lists)


def _reference_logits(head, features):
    """``(B, C)`` logits in original label order, from the head's parameters with plain PyTorch."""
    hidden = head.intermediate(features)
    parts = [reference_fixed_fanin(hidden, head.weight, head.index, head.bias, group=head.config.group)]
    if head.dense is not None:
        parts.insert(0, head.dense(hidden))
    by_position = torch.cat(parts, 1)  # (B, C) in head positions
    return by_position[:, head.label_position], hidden


def _reference_loss(head, features, targets):
    logits, hidden = _reference_logits(head, features)
    ragged = (
        targets
        if isinstance(targets, RaggedLabels)
        else RaggedLabels.from_lists([[t] for t in targets.tolist()])
    )
    target = torch.zeros_like(logits)
    target[ragged.sample_ids(), ragged.indices] = 1.0
    if head.loss_kind == "bce":
        main = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    elif head.loss_kind == "hinge":
        main = F.relu(1 - (2 * target - 1) * logits).square().sum()
    else:
        main = -(target * logits.log_softmax(1)).sum(1).div(target.sum(1).clamp_min(1)).sum()
    main = main / logits.shape[0]
    alpha = head.aux_alpha()
    if alpha == 0:
        return main
    cluster_target = torch.zeros(logits.shape[0], head.aux.out_features)
    cluster_target[ragged.sample_ids(), head.label_cluster[ragged.indices]] = 1.0
    aux = (
        F.binary_cross_entropy_with_logits(head.aux(hidden), cluster_target, reduction="sum")
        / logits.shape[0]
    )
    return (1 - alpha) * main + alpha * aux


CONFIGS = {
    "plain": dict(fan_in=5, aux_clusters=0),
    "hinge": dict(fan_in=5, loss="squared_hinge", aux_clusters=0, bias=False),
    "softmax_grouped": dict(fan_in=6, group=16, loss="softmax", aux_clusters=0),
    "intermediate_aux": dict(fan_in=4, intermediate=40, activation="relu", aux_clusters="auto", aux_leaf=10),
    "dense_frequent": dict(
        fan_in=7, group=3, dense_frequent=9, aux_clusters=5, intermediate=16, activation="gelu"
    ),
    "dense_frequent_softmax": dict(fan_in=7, dense_frequent=9, loss="softmax", aux_clusters=0),
}


@pytest.mark.parametrize("multilabel", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_dense_reference(name, multilabel):
    head = SparseHead(SparseHeadConfig(**CONFIGS[name]), _context(multilabel))
    head.after_step(0, 0.3, lr=0.1)  # mid-way through the auxiliary schedule
    features = torch.randn(7, DIM, requires_grad=True)
    targets = _targets(7, multilabel)
    params = [features, *head.parameters()]
    loss = head(features, targets)
    grads = torch.autograd.grad(loss, params)
    expected = _reference_loss(head, features, targets)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["plain", "softmax_grouped", "dense_frequent"])
def test_topk_matches_reference(name):
    head = SparseHead(SparseHeadConfig(**CONFIGS[name], topk_chunk=32), _context())
    features = torch.randn(5, DIM)
    scores, ids = head.topk(features, 6)
    logits, _ = _reference_logits(head, features)
    expected = logits.topk(6, dim=1).values
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.gather(1, ids), expected, rtol=1e-5, atol=1e-5)


def test_triton_impl_matches_reference_impl():
    config = dict(fan_in=6, group=16, intermediate=32, aux_clusters=0)
    heads = [
        SparseHead(SparseHeadConfig(**config, impl=impl), _context()) for impl in ("triton", "reference")
    ]
    heads[1].load_state_dict(heads[0].state_dict())
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiles for a GPU, else interprets
    heads = [head.to(device) for head in heads]
    features, targets = torch.randn(4, DIM, device=device), _targets(4, True).to(device)
    losses = [h(features, targets) for h in heads]
    grads = [torch.autograd.grad(loss, list(h.parameters())) for loss, h in zip(losses, heads, strict=True)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auxiliary_weight_decays_to_zero():
    head = SparseHead(SparseHeadConfig(fan_in=4, aux_alpha0=0.6, aux_cutoff_epoch=2.0), _context())
    assert head.aux is not None and int(torch.bincount(head.label_cluster).max()) <= 100
    values = []
    for epoch in (0.0, 1.0, 2.0, 3.0):
        head.after_step(1, epoch, lr=0.1)
        values.append(head.aux_alpha())
    assert values == pytest.approx([0.6, 0.3, 0.0, 0.0])
    assert head.metrics()["aux_alpha"] == 0.0
    head.after_step(1, 1.0, lr=0.1)
    restored = SparseHead(SparseHeadConfig(fan_in=4, aux_alpha0=0.6, aux_cutoff_epoch=2.0), _context())
    restored.load_state_dict(head.state_dict())
    assert restored.aux_alpha() == pytest.approx(0.3)


def _train(head, optimizer, steps, start=1):
    generator = torch.Generator().manual_seed(start)
    for step in range(start, start + steps):
        features = torch.randn(6, DIM, generator=generator)
        targets = RaggedLabels.from_lists(
            [[int(i) for i in torch.randint(0, CLASSES, (2,), generator=generator)]] * 6
        )
        loss = head(features, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        head.after_step(step, step / 10, lr=0.01)


DST = dict(interval=2, fraction=0.5, mode="fraction", seed=3, stop=1.0)  # rewired to the last step


@pytest.mark.parametrize("reset", [True, False])
def test_rewiring_resets_optimizer_state(reset):
    dst = DSTConfig(**DST, reset_optimizer_state=reset)
    config = SparseHeadConfig(fan_in=8, group=2, aux_clusters=0, dst=dst)
    head = SparseHead(head_config_from(config), _context())
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.01)
    head.bind_optimizer(optimizer, total_steps=20)
    _train(head, optimizer, 1)
    before = {k: v.clone() for k, v in optimizer.state[head.weight].items()}
    index_before = head.index.clone()
    head.after_step(2, 0.2, lr=0.01)  # due: rewires
    rewired = head.index != index_before
    assert int(head.dst_rewirings) == 1 and rewired.any()
    assert torch.equal(rewired.sum(1), torch.full((head.index.shape[0],), 4))  # round(0.5 cos-annealed * 8)
    mask = rewired.repeat_interleave(2, 0)[: head.weight.shape[0]]
    assert torch.all(head.weight[mask] == 0)
    for key in ("exp_avg", "exp_avg_sq"):
        state = optimizer.state[head.weight][key]
        if reset:
            assert torch.all(state[mask] == 0) and torch.equal(state[~mask], before[key][~mask])
        else:
            assert torch.equal(state, before[key])
    assert head.metrics()["rewired_fraction"] == pytest.approx(0.5)


def head_config_from(config):
    """Round trip through the registry's plain-data parsing, as the CLI does."""
    from megaclass.schema import to_dict

    return head_config(to_dict(config))


def test_resume_rewires_exactly_like_an_uninterrupted_run():
    config = SparseHeadConfig(fan_in=6, group=1, intermediate=16, aux_clusters=0, dst=DSTConfig(**DST))

    def fresh():
        torch.manual_seed(0)  # the intermediate layer's initialisation
        head = SparseHead(config, _context())
        optimizer = torch.optim.AdamW(head.parameters(), lr=0.01)
        head.bind_optimizer(optimizer, total_steps=12)
        return head, optimizer

    uninterrupted, optimizer = fresh()
    _train(uninterrupted, optimizer, 5)
    _train(uninterrupted, optimizer, 7, start=6)
    half, half_optimizer = fresh()
    _train(half, half_optimizer, 5)
    saved = (copy.deepcopy(half.state_dict()), copy.deepcopy(half_optimizer.state_dict()))
    del half, half_optimizer
    resumed, resumed_optimizer = fresh()
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    _train(resumed, resumed_optimizer, 7, start=6)
    assert int(resumed.dst_rewirings) == int(uninterrupted.dst_rewirings) >= 3
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_registry_and_cli_style_config():
    assert head_types()["sparse"] == (SparseHeadConfig, SparseHead)
    config = head_config(
        {"type": "sparse", "fan_in": "32", "group": 16, "intermediate": 4096, "aux_clusters": "auto",
         "dst": {"mode": "threshold", "interval": "500"}}
    )  # fmt: skip
    assert config.fan_in == 32 and config.group == 16 and config.dst.interval == 500
    assert head_config({"type": "sparse", "aux_clusters": 0}).aux_clusters == 0
    with pytest.raises(ConfigError, match="aux_clusters"):
        head_config({"type": "sparse", "aux_clusters": "many"})
    with pytest.raises(ConfigError, match="fan_in"):
        SparseHead(SparseHeadConfig(fan_in=DIM + 1, aux_clusters=0), _context())
    with pytest.raises(ConfigError, match="dense_frequent"):
        SparseHead(SparseHeadConfig(dense_frequent=3, aux_clusters=0), HeadContext(DIM, CLASSES, True))
    with pytest.raises(ValueError, match="features"):
        SparseHead(SparseHeadConfig(fan_in=4, aux_clusters=0), _context())(
            torch.randn(2, 3), _targets(2, True)
        )


def test_state_bytes_and_metrics():
    head = SparseHead(SparseHeadConfig(fan_in=6, aux_clusters=0), _context())
    held = head.state_bytes()
    assert held["weights"] == CLASSES * (6 + 1) * 4
    assert held["optimizer"] == 2 * held["weights"]
    assert held["dense_weights"] == CLASSES * (DIM + 1) * 4
    assert head.metrics()["sparsity"] == pytest.approx(1 - 6 / DIM)
    optimizer = torch.optim.AdamW(head.parameters())
    head.bind_optimizer(optimizer)
    _train(head, optimizer, 1)
    assert head.state_bytes()["optimizer"] >= 2 * held["weights"]
    assert math.isfinite(head.metrics()["rewired_fraction"])


def test_grouped_labels_are_ordered_by_label_cluster():
    from megaclass.index.clustering import hierarchical_balanced_2means

    context = _context()
    head = SparseHead(SparseHeadConfig(fan_in=4, group=16, aux_clusters=0, aux_leaf=20), context)
    leaves = hierarchical_balanced_2means(torch.as_tensor(context.label_features), max_leaf=20)
    ordered = leaves[head.label_order]
    assert torch.all(ordered[1:] >= ordered[:-1]) and not torch.equal(head.label_order, torch.arange(CLASSES))
    assert torch.equal(head.label_order[head.label_position], torch.arange(CLASSES))


@pytest.mark.parametrize("config", [dict(intermediate=16), dict(group=4, dense_frequent=5)])
def test_head_without_label_features_reloads_its_auxiliary_part(config):
    """A run folder rebuilds the head with no label features: the state dict alone restores the clusters."""
    trained = SparseHead(SparseHeadConfig(fan_in=4, aux_leaf=30, **config), _context())
    assert trained.aux is not None
    _train(trained, torch.optim.AdamW(trained.parameters()), 2)
    bare = HeadContext(DIM, CLASSES, True, label_counts=_context().label_counts)
    restored = SparseHead(SparseHeadConfig(fan_in=4, aux_leaf=30, **config), bare)
    assert restored.aux is None
    with pytest.raises(ConfigError, match="label features"):
        restored(torch.randn(2, DIM), _targets(2, True))  # training would silently lose the auxiliary loss
    restored.load_state_dict(trained.state_dict())
    assert restored.aux.out_features == trained.aux.out_features
    assert torch.equal(restored.label_cluster, trained.label_cluster)
    features, targets = torch.randn(5, DIM), _targets(5, True)
    torch.testing.assert_close(restored(features, targets), trained(features, targets), rtol=0, atol=0)
    for a, b in zip(restored.topk(features, 7), trained.topk(features, 7), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("last_row_empty", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_targets_give_the_unpadded_loss_and_gradients(name, last_row_empty):
    head = SparseHead(SparseHeadConfig(**CONFIGS[name]), _context())
    head.after_step(0, 0.3, lr=0.1)  # the auxiliary loss on: pads must mark no cluster either
    features = torch.randn(7, DIM, requires_grad=True)
    lists = _targets(7, True).to_lists()  # rows with 0 to 3 labels
    targets = RaggedLabels.from_lists([*lists[:-1], [] if last_row_empty else [0, 119]])  # the pads' row
    params = [features, *head.parameters()]
    results = []
    for given in (targets, targets.pad_to(targets.indices.numel() + 6)):
        loss = head(features, given)
        results.append([loss, *torch.autograd.grad(loss, params)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert head.capture_blocker(targets_static=False) is None


def test_sharded_head_takes_no_padded_targets():
    shard = ClassShard(0, CLASSES, CLASSES)
    head = SparseHead(SparseHeadConfig(fan_in=3, aux_clusters=0), _context(), shard=shard)
    with pytest.raises(ValueError, match="class-sharded head takes unpadded labels"):
        head(torch.randn(2, DIM), RaggedLabels.from_lists([[1], [2]]).pad_to(3))


def test_autocast_computes_the_sparse_layer_in_its_dtype(monkeypatch):
    # as nn.Linear under autocast: fp32 features (a LayerNorm's output, an embedding bag's) enter in bf16
    import megaclass.heads.sparse as sparse_module

    seen, layer = [], sparse_module.fixed_fanin_rows_positive

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return layer(x, *args, **kwargs)

    monkeypatch.setattr(sparse_module, "fixed_fanin_rows_positive", spy)
    head = SparseHead(SparseHeadConfig(fan_in=4, aux_clusters=0), _context(multilabel=False))
    features, targets = torch.randn(6, DIM), _targets(6, multilabel=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(features, targets)
    exact = head(features, targets)
    assert seen == [torch.bfloat16, torch.float32]  # outside autocast, fp32 features stay fp32
    torch.testing.assert_close(mixed, exact, rtol=2e-2, atol=0)
