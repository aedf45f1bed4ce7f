"""SelectedHead (HF-Softmax) against plain-PyTorch references over the selected columns."""

import math

import pytest
import torch

from megaclass.heads import HeadContext, build_head, head_config
from megaclass.heads.selected import SelectedHead, SelectedHeadConfig
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels


def _head(num_classes=97, dim=12, multilabel=False, **options) -> SelectedHead:
    config = head_config({"type": "selected", "sample_num": 20, "coverage_every": 0, **options})
    return build_head(config, HeadContext(in_features=dim, num_classes=num_classes, multilabel=multilabel))


def _reference_margin(cosine, target, kind, scale, margin):
    """ArcFace / CosFace logits written from the papers' formulas."""
    logits = scale * cosine.clone()
    rows = torch.arange(cosine.shape[0])
    c = cosine[rows, target]
    if kind == "cosface":
        logits[rows, target] = scale * (c - margin)
    else:
        theta = torch.acos(c.clamp(-1, 1))
        shifted = torch.where(
            theta + margin <= math.pi, torch.cos(theta + margin), c - margin * math.sin(margin)
        )
        logits[rows, target] = scale * shifted
    return logits


def _reference_loss(head, features, targets, selection_ids, adjust, multilabel, margin):
    weight = head.store.rows()[selection_ids].clone().requires_grad_(True)  # (S, D)
    x = features.detach().clone().requires_grad_(True)
    position = {int(c): j for j, c in enumerate(selection_ids)}
    if multilabel:
        logits = x @ weight.T
    else:
        target = torch.tensor([position[int(t)] for t in targets])
        if margin is None:
            logits = x @ weight.T
        else:
            cosine = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(weight, dim=1).T
            logits = _reference_margin(cosine, target, *margin)
    logits = logits + adjust
    if multilabel:
        log_probs = torch.log_softmax(logits, dim=1)
        losses = [
            -log_probs[b, [position[c] for c in labels]].mean()
            for b, labels in enumerate(targets.to_lists())
            if labels
        ]
        loss = torch.stack(losses).mean()
    else:
        loss = torch.nn.functional.cross_entropy(logits, target)
    loss.backward()
    return loss, x.grad, weight.grad


@pytest.mark.parametrize("index", ["none", "exact", "gpu"])
@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("margin", [None, ("arcface", 16.0, 0.5), ("cosface", 30.0, 0.35)])
@pytest.mark.parametrize("batch", [1, 7])
def test_loss_and_grads_equal_cross_entropy_on_selected_columns(index, logq, margin, batch):
    options = {"index": {"type": index, "leaf_size": 8} if index == "gpu" else index, "logq_correction": logq}
    if margin is not None:
        options["margin"] = {"kind": margin[0], "scale": margin[1], "margin": margin[2]}
    head = _head(**options)
    features = torch.randn(batch, 12, requires_grad=True)
    targets = torch.randint(97, (batch,))
    loss = head(features, targets)
    loss.backward()
    ids, rows = head._pending
    assert ids.numel() == 20 and torch.unique(ids).numel() == 20
    assert set(targets.tolist()) <= set(ids.tolist())
    adjust = torch.zeros(20)
    positives = torch.unique(targets).numel()
    if logq:
        near = int(head.metrics()["neighbour_classes"])
        fixed = positives + near
        if fixed < 20:
            adjust[fixed:] = math.log((97 - fixed) / (20 - fixed))
    expected, grad_x, grad_w = _reference_loss(head, features, targets, ids, adjust, False, margin)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(features.grad, grad_x)
    torch.testing.assert_close(rows.grad, grad_w)


def test_multilabel_loss_and_grads():
    head = _head(multilabel=True, index="exact")
    targets = RaggedLabels.from_lists([[3, 50, 7], [], [50], [96, 0]])
    features = torch.randn(4, 12, requires_grad=True)
    loss = head(features, targets)
    loss.backward()
    ids, rows = head._pending
    expected, grad_x, grad_w = _reference_loss(head, features, targets, ids, torch.zeros(20), True, None)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(features.grad, grad_x)
    torch.testing.assert_close(rows.grad, grad_w)


@pytest.mark.parametrize("store", ["gpu", "host"])
def test_after_step_applies_row_sgd_with_the_given_lr(store):
    head = _head(store=store, index="exact", optimizer={"kind": "sgd", "momentum": 0.9, "weight_decay": 0.0})
    features, targets = torch.randn(5, 12), torch.randint(97, (5,))
    head(features, targets).backward()
    before = head.store.rows().clone()
    ids, rows = head._pending
    head.after_step(1, 0.0, lr=0.25)
    after = head.store.rows()
    torch.testing.assert_close(
        after[ids], before[ids] - 0.25 * rows.grad
    )  # first momentum step: buffer = grad
    untouched = torch.ones(97, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(after[untouched], before[untouched])


@pytest.mark.parametrize("store", ["gpu", "host"])
def test_rows_catch_up_on_the_steps_before_their_first_update(store):
    """Rows first active at global step 7 equal dense AdamW's after six zero-gradient steps and the seventh
    (decay and bias correction of step 7): the head hands its global step to the row optimizer."""
    optimizer = {"kind": "adamw", "weight_decay": 0.1, "betas": [0.0, 0.99]}  # no first moment: exact
    head = _head(store=store, index="exact", optimizer=optimizer)
    features, targets = torch.randn(5, 12), torch.randint(97, (5,))
    head(features, targets).backward()
    ids, rows = head._pending
    reference = head.store.rows()[ids].clone().requires_grad_(True)
    dense = torch.optim.AdamW([reference], lr=0.2, betas=(0.0, 0.99), weight_decay=0.1)
    for step in range(1, 8):
        reference.grad = rows.grad.clone() if step == 7 else torch.zeros_like(rows.grad)
        dense.step()
    head.after_step(7, 0.0, lr=0.2)
    torch.testing.assert_close(head.store.rows()[ids], reference.detach())


@pytest.mark.parametrize("margin", [None, "arcface"])
@pytest.mark.parametrize("store", ["gpu", "host"])
def test_topk_scores_all_classes(margin, store):
    options = {"store": store, "chunk_size": 10}
    if margin:
        options["margin"] = {"kind": margin, "scale": 8.0}
    head = _head(**options)
    features = torch.randn(6, 12)
    scores, ids = head.topk(features, 4)
    weight = head.store.rows()
    if margin:
        full = (
            8.0
            * torch.nn.functional.normalize(features, dim=1)
            @ torch.nn.functional.normalize(weight, dim=1).T
        )
    else:
        full = features @ weight.T
    expected = full.topk(4, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(ids, expected.indices)
    with pytest.raises(ValueError, match="k must be"):
        head.topk(features, 98)


@pytest.mark.parametrize("margin", [None, "arcface"])
@pytest.mark.parametrize("store", ["gpu", "host"])
def test_topk_through_an_exact_index_is_the_exact_topk(margin, store):
    options = {"store": store, "index": "exact", "topk_search": "index"}
    if margin:
        options["margin"] = {"kind": margin, "scale": 8.0}
    head = _head(**options)
    features = torch.randn(6, 12)
    assert head.topk_is_approximate()
    scores, ids = head.topk(features, 4)  # the index's 16 nearest scored by the head's logits
    expected = head._exact_topk(features, 4)
    torch.testing.assert_close(scores, expected[0])
    assert torch.equal(ids, expected[1])
    assert head.topk_recall(features, 4) == 1.0


@pytest.mark.parametrize("index", ["gpu", "exact"])
def test_a_cosine_index_ranks_topk_candidates_by_the_dot_logits(index):
    from tests.index._clustered import trained_like

    rows, queries = trained_like(3000, 16, 60, 64, seed=1)
    head = _head(num_classes=3000, dim=16, index=index, topk_search="index")  # metric: cosine by default
    head.materialize().rows().copy_(rows)  # rows of unequal norms: angle and logit rank them apart
    recall = head.topk_recall(queries, 5)
    assert recall == 1.0 if index == "exact" else recall >= 0.9, recall


def test_topk_recall_measures_the_search_not_the_autocast_rounding():
    head = _head(num_classes=400, dim=64, metric="dot", index="exact", topk_search="index")
    rows = head.materialize().rows()
    rows.copy_(rows[:1] + 1e-3 * torch.randn(rows.shape))  # near-equal scores: bf16 would reorder them
    features = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.topk_recall(features, 5) == 1.0  # an exact index finds the exact top-k


def test_topk_through_the_cluster_index_and_its_recall():
    from tests.index._clustered import trained_like

    rows, queries = trained_like(3000, 16, 60, 64, seed=1)
    head = _head(num_classes=3000, dim=16, metric="dot", topk_search="index")
    head.materialize().rows().copy_(rows)
    scores, ids = head.topk(queries, 5)
    truth = (queries @ rows.T).topk(5, dim=1)
    found = (ids[:, :, None] == truth.indices[:, None, :]).any(2).float().mean()
    assert head.topk_recall(queries, 5) == pytest.approx(float(found)) and float(found) >= 0.9
    hits = ids >= 0
    torch.testing.assert_close(scores[hits], (queries[:, None, :] * rows[ids.clamp_min(0)]).sum(2)[hits])
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


def test_topk_through_the_index_sees_the_rows_updated_since_its_build():
    """Training leaves the index up to `interval` steps behind the rows; a ranking through it refreshes the
    rows updated since (here every row, moved to other directions) before it searches."""
    from tests.index._clustered import trained_like

    rows, _ = trained_like(3000, 16, 60, 64, seed=1)
    moved, queries = trained_like(3000, 16, 60, 64, seed=2)
    head = _head(
        num_classes=3000,
        dim=16,
        metric="dot",
        topk_search="index",
        index={"type": "gpu", "background": False},
    )
    head.materialize().rows().copy_(rows)
    head.rebuild_index()
    head.materialize().rows().copy_(moved)
    head._dirty.fill_(True)  # as the steps that moved them mark them
    assert head.topk_recall(queries, 5) >= 0.9
    assert not head._dirty.any()


def test_the_index_an_averaged_evaluation_searches_is_refreshed_from_the_trained_rows():
    """Before the rows' average takes their place, the index the evaluation searches is brought up to the
    trained rows: nothing is refreshed from the average while it is in place."""
    from tests.index._clustered import trained_like

    rows, queries = trained_like(3000, 16, 60, 64, seed=1)
    moved, _ = trained_like(3000, 16, 60, 64, seed=2)
    index = {"type": "gpu", "background": False}
    head = _head(num_classes=3000, dim=16, metric="dot", topk_search="index", index=index)
    store = head.materialize()
    store.rows().copy_(rows)
    head.rebuild_index()
    (average,) = head.average_rows(0.9).values()  # from `rows`, at step 0
    store.rows().copy_(moved)
    head._dirty.fill_(True)  # as the steps that moved them mark them
    average.swap_(step=5)
    assert not head._dirty.any()
    norms = head.selector.state_dict()["norms"].clone()
    torch.testing.assert_close(norms.float(), moved.norm(dim=1), rtol=1e-2, atol=1e-3)
    scores, ids = head.topk(queries, 5)  # scored by the average, searched in the trained rows' index
    assert torch.equal(head.selector.state_dict()["norms"], norms)
    torch.testing.assert_close(scores, (queries[:, None, :] * store.rows()[ids]).sum(2))
    average.swap_(step=5)
    assert torch.equal(store.rows(), moved)


def test_topk_search_auto_scans_below_ten_million_classes():
    head = _head()
    assert not head.topk_is_approximate() and head.topk_recall(torch.randn(2, 12), 3) is None
    assert not _head(index="none").topk_is_approximate()
    with pytest.raises(ConfigError, match="needs an index"):
        _head(index="none", topk_search="index")
    with pytest.raises(ConfigError, match="topk_search"):
        _head(topk_search="fast")


def test_coverage_is_the_active_share_of_the_softmax_mass():
    head = _head(coverage_every=1, index="exact")
    features, targets = torch.randn(8, 12), torch.randint(97, (8,))
    head(features, targets)
    ids = head._pending[0]
    logits = features @ head.store.rows().T  # (B, C)
    expected = torch.exp(torch.logsumexp(logits[:, ids], 1) - torch.logsumexp(logits, 1)).mean()
    assert head.metrics()["coverage"] == pytest.approx(float(expected), rel=1e-5)


def test_warmup_uses_random_classes_then_the_index():
    head = _head(index={"type": "gpu", "leaf_size": 8}, warmup_random_steps=2, interval=1)
    for step in range(1, 5):
        features, targets = torch.randn(4, 12), torch.randint(97, (4,))
        head(features, targets).backward()
        neighbours = head.metrics()["neighbour_classes"]
        assert (neighbours == 0) == (step <= 2), step
        head.after_step(step, 0.0, lr=0.1)
    assert head.metrics()["index_build_ms"] > 0


@pytest.mark.parametrize(
    "index,store", [("gpu", "gpu"), ("exact", "host"), ("none", "gpu"), ("annoy", "gpu")]
)
def test_state_dict_round_trip_continues_exactly(index, store, train_head):
    if index == "annoy":
        pytest.importorskip("annoy")
    index_options = {"gpu": {"leaf_size": 8}, "annoy": {"ntrees": 5}}.get(index, {})
    options = {
        "index": {"type": index, **index_options},
        "store": store,
        "interval": 2,
        "optimizer": {"kind": "adam"},
    }
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(6, 12, generator=generator), torch.randint(97, (6,), generator=generator))
        for _ in range(6)
    ]
    head = _head(**options)
    train_head(head, batches[:3], 1)
    if index == "annoy":
        head.selector.wait()  # a running background build would make the continuation timing-dependent
    state = {key: value.clone() for key, value in head.state_dict().items()}
    resumed = _head(**options)  # fresh: rows, optimizer state, index, rng and step come from the state
    resumed.load_state_dict(state)
    assert torch.equal(resumed.store.rows(), head.store.rows())
    if index == "annoy":  # keep both forests on the same schedule: no background rebuilds from here
        head.selector.background = resumed.selector.background = False
    assert train_head(resumed, batches[3:], 4) == train_head(head, batches[3:], 4)
    assert torch.equal(resumed.store.rows(), head.store.rows())


def test_host_store_head_matches_device_store_head(train_head):
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 12, generator=generator), torch.randint(97, (6,), generator=generator))
        for _ in range(4)
    ]
    device = _head(index="exact", store="gpu")
    host = _head(index="exact", store="host")
    assert train_head(device, batches, 1) == train_head(host, batches, 1)


def test_learns_a_planted_task():
    """Selected classes with the GPU index: a linear probe on clustered data gets most samples right."""
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(200, 12, generator=generator)
    head = _head(num_classes=200, index={"type": "gpu", "leaf_size": 16}, sample_num=40, interval=10)
    for step in range(1, 151):
        targets = torch.randint(200, (32,), generator=generator)
        features = centres[targets] + 0.1 * torch.randn(32, 12, generator=generator)
        head(features, targets).backward()
        head.after_step(step, 0.0, lr=0.5)
    targets = torch.arange(200)
    accuracy = (head.topk(centres, 1)[1][:, 0] == targets).float().mean()
    assert accuracy > 0.9


def test_config_errors():
    for bad in (0, -5, 1.5, 0.0):  # one message for every bad budget: a count or a fraction
        with pytest.raises(ConfigError, match=r"sample_num: expected a count >= 1 or a fraction in \(0, 1\)"):
            SelectedHeadConfig(sample_num=bad)
    with pytest.raises(ConfigError, match="index"):
        head_config({"type": "selected", "index": "faiss"})
    with pytest.raises(ConfigError, match="multi-label"):
        _head(multilabel=True, margin={"kind": "arcface"})
    head = _head()
    with pytest.raises(ValueError, match="features must be"):
        head(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="4 samples for 3"):
        head(torch.randn(3, 12), torch.tensor([0, 1, 2, 3]))
    config = head_config(
        {
            "type": "selected",
            "sample_num": "500",
            "index": "annoy",
            "store": "host",
            "interval": "10",
            "logq_correction": "true",
        }
    )  # --set values arrive as text
    assert (config.sample_num, config.index.type, config.store, config.interval, config.logq_correction) == (
        500,
        "annoy",
        "host",
        10,
        True,
    )


def test_index_options_nest_under_their_type():
    config = head_config({"type": "selected", "index": {"type": "gpu", "probes": 16, "dtype": "int8"}})
    assert (config.index.type, config.index.probes, config.index.dtype) == ("gpu", 16, "int8")
    assert head_config({"type": "selected"}).index.type == "gpu"
    assert head_config({"type": "selected", "index": {"probes": 4}}).index.probes == 4  # gpu: the default
    with pytest.raises(ConfigError, match="unknown key.*probes"):
        head_config({"type": "selected", "index": {"type": "annoy", "probes": 4}})
    with pytest.raises(ConfigError, match="leaf_size"):
        head_config({"type": "selected", "leaf_size": 4})  # flat index options are refused
    with pytest.raises(ConfigError, match="index.type.*'faiss'"):
        head_config({"type": "selected", "index": {"type": "faiss"}})


def test_sample_num_is_a_count_or_a_fraction():
    assert SelectedHeadConfig(sample_num=0.05).active_classes(1000) == 50
    assert SelectedHeadConfig(sample_num=0.0001).active_classes(1000) == 1
    assert SelectedHeadConfig(sample_num=30).active_classes(1000) == 30
    head = _head(sample_num=0.25, index="exact")
    assert head.sample_num == math.ceil(0.25 * 97)
    with pytest.raises(ConfigError, match="sample_num"):
        SelectedHeadConfig(sample_num=1.5)


def test_the_default_leaves_about_half_the_budget_to_random_classes():
    """The original's rule asks sample_num // B + 1 neighbours a sample: at 64 samples and 200 active classes
    the index fills the whole budget; by default it gets about half and the rest is drawn at random."""
    features, targets = torch.randn(64, 12), torch.randint(1000, (64,))
    true_classes = targets.unique().numel()
    random_fill = {}
    for share in (None, 1.0):
        options = {} if share is None else {"neighbour_share": share}
        head = _head(num_classes=1000, index="exact", sample_num=200, **options)
        head(features, targets).backward()
        assert head.metrics()["active_classes"] == 200
        random_fill[share] = 200 - true_classes - head.metrics()["neighbour_classes"]
    assert _head(index="exact").config.neighbour_share == 0.5
    assert random_fill[1.0] == 0 and random_fill[None] >= 200 - true_classes - 2 * 64  # 2 a sample


@pytest.mark.parametrize("share,per_sample", [(1.0, 11), (0.5, 5), (0.0, 0)])
def test_neighbour_share_sets_the_index_share(share, per_sample):
    head = _head(index="exact", sample_num=40, neighbour_share=share)
    assert head._neighbour_count(4) == per_sample  # 1: the original's sample_num // B + 1
    features, targets = torch.randn(4, 12), torch.randint(97, (4,))
    head(features, targets).backward()
    neighbours = head.metrics()["neighbour_classes"]
    assert neighbours <= 4 * per_sample and (neighbours > 0) == (per_sample > 0)
    assert head.metrics()["active_classes"] == 40
    with pytest.raises(ConfigError, match="neighbour_share"):
        SelectedHeadConfig(neighbour_share=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_has_no_host_sync_on_cuda():
    """Forward, backward and the row update of a device-store step never wait for the GPU."""
    head = _head(num_classes=5000, dim=32, interval=10**6).cuda()
    features = torch.randn(64, 32, device="cuda", requires_grad=True)
    targets = torch.randint(5000, (64,), device="cuda")
    head(features, targets).backward()  # the first step builds the index (syncs allowed there)
    head.after_step(1, 0.0, lr=0.1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 5):
            head(features, targets).backward()
            head.after_step(step, 0.0, lr=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("store", ["gpu", "host"])
def test_memory_counts_the_rows_in_the_store(store):
    from megaclass.train.memory import head_memory

    head = _head(store=store, index="exact", optimizer={"kind": "adam"})
    held = head.state_bytes()
    assert held["weights"] == 97 * 12 * 4
    assert held["row_optimizer"] >= 2 * 97 * 12 * 4  # Adam's two moments per row element
    memory = head_memory(head, None, num_classes=97, in_features=12)
    assert memory["head_total_bytes"] >= held["weights"] + held["row_optimizer"]


def test_capture_is_refused_where_the_selection_is_not_static():
    """A CUDA graph replays fixed buffers: host stores, multi-label targets and background index builds (a
    swap between steps) keep the step eager, each with its reason."""
    context = HeadContext(in_features=8, num_classes=100, multilabel=False)

    def blocker(config, *, targets_static=True):
        return build_head(head_config(config), context).capture_blocker(targets_static=targets_static)

    assert blocker({"type": "selected", "store": "gpu"}) is None
    assert "ragged" in blocker({"type": "selected", "store": "gpu"}, targets_static=False)
    assert "head.store=host" in blocker({"type": "selected", "store": "host"})
    background = {"type": "selected", "store": "gpu", "index": {"type": "gpu", "background": True}}
    assert "background" in blocker(background)
