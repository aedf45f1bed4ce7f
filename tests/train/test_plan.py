"""The memory plan: the heads' planned parts against what built heads hold after a few training steps, the
data shape read without parsing, the refusal line and exit code, and a dry run that writes nothing."""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from megaclass.cli import main
from megaclass.data.batch import InputSpec
from megaclass.data.featurizer import FeaturizerConfig, TextFeaturizer
from megaclass.data.synthetic import synthesize
from megaclass.data.xmc import load_xmc
from megaclass.heads import HeadContext, build_head, head_class, head_config
from megaclass.heads.base import PlanRequest
from megaclass.index.kmeans import cluster_layout
from megaclass.models import build_model
from megaclass.models.text import load_tokenizer
from megaclass.schema import from_dict
from megaclass.state_io import STREAM_CHUNK_BYTES, format_bytes
from megaclass.targets import RaggedLabels
from megaclass.train import plan as plan_module
from megaclass.train.build import build_optimizer
from megaclass.train.config import OptimGroupConfig, load_config, load_config_and_keys
from megaclass.train.plan import (
    _CUDA_HOST,
    MemoryPlan,
    PlanPart,
    _fitting_batch,
    _GpuLike,
    _token_width,
    inference_bytes,
    plan_for,
    plan_run,
    read_data_shape,
    saved_tensor_bytes,
)

DIM, BATCH, STEPS = 64, 16, 3

HEADS = {
    "dense": {"type": "dense"},
    "sparse": {"type": "sparse", "fan_in": 16, "group": 4, "aux_clusters": 0},
    "selected": {
        "type": "selected",
        "sample_num": 200,
        "interval": 2,
        "index": {"type": "gpu", "background": False},
    },
    "partial_fc": {"type": "partial_fc"},
}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _measured(head, config, classes: int, multilabel: bool) -> dict[str, int]:
    """Bytes the head holds after ``STEPS`` steps, by the plan's parts (gradients: the last step's)."""
    optimizer = build_optimizer(head, OptimGroupConfig())
    generator = torch.Generator().manual_seed(0)
    grads = 0
    for step in range(1, STEPS + 1):
        features = torch.randn(BATCH, DIM, generator=generator)
        ids = torch.randint(0, classes, (BATCH,), generator=generator)
        targets = RaggedLabels.from_lists([[int(i)] for i in ids]) if multilabel else ids
        loss = head(features, targets)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = _tensor_bytes(p.grad for p in head.parameters())
        pending = getattr(
            head, "_pending", None
        )  # a selected head's pulled rows, whose gradient the store takes
        if pending is not None:
            grads += _tensor_bytes([pending[1].grad])
        if optimizer is not None:
            optimizer.step()
        head.after_step(step, step / 10, lr=0.01)
    held = head.state_bytes()
    optimizer_state = held.get("row_optimizer", 0)
    if optimizer is not None:
        optimizer_state += sum(_tensor_bytes(state.values()) for state in optimizer.state.values())
    return {
        "weights": held["weights"],
        "gradients": grads,
        "optimizer": optimizer_state,
        "index": held["structure"],
    }


@pytest.mark.parametrize("classes", [1_000, 10_000, 100_000])
@pytest.mark.parametrize("name", list(HEADS))
def test_planned_head_parts_match_what_a_trained_head_holds(name, classes):
    config = head_config(HEADS[name])
    multilabel = name == "sparse"
    context = HeadContext(in_features=DIM, num_classes=classes, multilabel=multilabel)
    head = build_head(config, context)
    measured = _measured(head, config, classes, multilabel)
    request = PlanRequest(batch=BATCH, eval_batch=64, device_type="cpu", optimizer_moments=2)
    planned = head_class(config).planned_bytes(config, context, request)
    for part, held in measured.items():
        plan = planned[part].device + planned[part].host
        assert abs(plan - held) <= 0.15 * held, f"{name} C={classes} {part}: planned {plan}, held {held}"


def test_store_placement_and_bf16_state_move_the_planned_bytes():
    context = HeadContext(in_features=DIM, num_classes=1000, multilabel=False)
    selected = head_config({"type": "selected", "store": "host"})
    on_host = head_class(selected).planned_bytes(selected, context, PlanRequest(BATCH, 8, device_type="cpu"))
    assert on_host["weights"].device == 0 and on_host["weights"].host == 1000 * DIM * 4
    # host rows for a GPU stay pageable: the same bytes as for a CPU run
    for_gpu = head_class(selected).planned_bytes(selected, context, PlanRequest(BATCH, 8, device_type="cuda"))
    assert for_gpu["weights"] == on_host["weights"] and for_gpu["optimizer"] == on_host["optimizer"]
    # the setting that shrinks host rows' optimizer state: SGD's momentum, else bf16 moments, else SGD
    for optimizer, dtype, setting in [
        ({"kind": "sgd", "momentum": 0.9}, "float32", "head.optimizer.momentum=0"),
        ({"kind": "adamw"}, "float32", "head.store_dtype=bf16_sr"),
        ({"kind": "adamw"}, "bf16_sr", "head.optimizer.kind=sgd"),
    ]:
        settings = {"type": "selected", "store": "host", "optimizer": optimizer, "store_dtype": dtype}
        rows = head_config(settings)
        planned = head_class(rows).planned_bytes(rows, context, PlanRequest(BATCH, 8, device_type="cuda"))
        assert planned["optimizer"].setting == setting
    dense = head_config({"type": "dense"})
    fp32, bf16 = (
        head_class(dense).planned_bytes(dense, context, PlanRequest(BATCH, 8, low_precision=low))
        for low in (False, True)
    )
    assert 2 * bf16["optimizer"].device == fp32["optimizer"].device == 2 * 1000 * (DIM + 1) * 4


@pytest.mark.parametrize(("group", "tiles", "rows_a_tile"), [(1, 20941, 32), (32, 20941, 32)])
def test_a_sparse_head_on_a_gpu_plans_its_kernels_buffer_and_partials(group, tiles, rows_a_tile):
    """On a GPU the sparse head's step holds the kernels' input-gradient buffer and the fused pass's partials
    for a chunk of labels (the buffer in the features' dtype, a float32 row of the batch a label tile) beside
    what a CPU step holds."""
    from megaclass.ops.fixed_fanin.columns import CHUNK_ROWS

    config = head_config({"type": "sparse", "fan_in": 32, "group": group, "aux_clusters": 0})
    context = HeadContext(in_features=DIM, num_classes=670_091, multilabel=True)

    def activations(device_type, feature_bytes):
        request = PlanRequest(batch=128, eval_batch=8, device_type=device_type, feature_bytes=feature_bytes)
        return head_class(config).planned_bytes(config, context, request)["activations"].device

    chunk_tiles = min(tiles, CHUNK_ROWS // rows_a_tile)
    for feature_bytes in (2, 4):
        extra = activations("cuda", feature_bytes) - activations("cpu", feature_bytes)
        assert extra == 128 * chunk_tiles * (rows_a_tile * feature_bytes + 4)


@pytest.mark.parametrize(
    ("settings", "multilabel", "classes", "held"),
    [
        ({}, False, 16_760, True),  # softmax on the CPU's reference backend: the batch's logits held
        ({}, True, 16_760, False),  # bce: its gradient comes from each chunk's logits in turn
        ({"margin": {"kind": "arcface"}}, False, 16_760, False),  # a margin's lse needs the target's logit
        ({}, False, 10**6, False),  # (B, C) above the 256 MiB the reference backend holds
    ],
)
def test_a_dense_head_on_the_cpu_plans_the_softmax_logits_it_holds(settings, multilabel, classes, held):
    config = head_config({"type": "dense", **settings})
    context = HeadContext(in_features=DIM, num_classes=classes, multilabel=multilabel)

    def activations(device_type):
        request = PlanRequest(batch=256, eval_batch=8, device_type=device_type)
        return head_class(config).planned_bytes(config, context, request)["activations"].device

    assert activations("cpu") - activations("cuda") == (256 * classes * 4 if held else 0)


def test_a_sparse_head_plans_its_rewiring_on_top_of_what_it_holds(synthetic):
    """A rewiring runs after a step, outside a captured one: its scratch is a phase of its own on top of the
    held parts (the captured step's activations among them), sized by the first rewiring's count."""
    from megaclass.dst import rewiring_scratch_bytes

    context = HeadContext(in_features=DIM, num_classes=670_091, multilabel=True)
    request = PlanRequest(batch=128, eval_batch=8, device_type="cuda")
    for dst, count in (({}, round(0.3 * 32)), ({"fraction": 0.1}, 3), ({"enabled": False}, 0)):
        config = head_config({"type": "sparse", "fan_in": 32, "group": 16, "aux_clusters": 0, "dst": dst})
        planned = head_class(config).planned_bytes(config, context, request)["rewiring"]
        assert planned.device == rewiring_scratch_bytes(670_091, 32, 16, count)
    config = load_config(head="sparse", overrides=["model.hidden=[64]"])
    shape = dataclasses.replace(read_data_shape(str(synthetic / "train_bow.txt")), num_labels=4_000_000)
    plan = plan_run(config, shape, device_type="cuda", gpu_capacity=None, host_capacity=64 << 30)
    parts = {part.name: part for part in plan.parts}
    assert parts["head activations"].phase == "steady"  # in the captured step's memory pool
    assert parts["head rewiring"].phase == "rewiring"  # outside it, after the step
    held = sum(part.device_bytes for part in plan.parts if part.phase in ("steady", "background"))
    on_top: dict[str, int] = {}
    for part in plan.parts:
        if part.phase not in ("steady", "background"):
            on_top[part.phase] = on_top.get(part.phase, 0) + part.device_bytes
    phase = max(on_top, key=lambda name: on_top[name])
    assert plan.peak(0) == (held + on_top[phase], phase)
    assert on_top["rewiring"] == parts["head rewiring"].device_bytes


def test_a_parameter_server_runs_index_is_planned_where_it_lives():
    context = HeadContext(in_features=DIM, num_classes=1000, multilabel=False)
    request = PlanRequest(batch=BATCH, eval_batch=8)
    host = head_config({"type": "selected", "store": "host"})
    planned = {"host": head_class(host).planned_bytes(host, context, request)}
    for place in ("trainer", "shards"):
        config = head_config({"type": "selected", "store": "ps://127.0.0.1:1", "index_on": place})
        planned[place] = head_class(config).planned_bytes(config, context, request)
    assert planned["trainer"]["weights"].host == 0  # the rows live on the servers either way
    for part in ("index", "index build", "activations"):  # the host store stages rows in host memory too
        assert planned["trainer"][part].device == planned["host"][part].device
    selection = planned["shards"]["index"].device
    assert 0 < selection < planned["trainer"]["index"].device / 4  # the selection's buffers alone
    assert planned["shards"]["index build"].device == 0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    for split, (docs, stream) in {"train": (600, 0), "test": (150, 1)}.items():
        synthesize(
            folder / f"{split}_bow.txt", num_docs=docs, num_labels=500, num_features=2000, stream=stream
        )
    return folder


def test_data_shape_from_the_header_and_a_sample_matches_the_parsed_file(synthetic, tmp_path):
    path = str(synthetic / "train_bow.txt")
    shape = read_data_shape(path)
    data = load_xmc(path, cache=False)
    assert (shape.num_rows, shape.num_features, shape.num_labels) == (len(data.labels), 2000, 500)
    assert shape.multilabel
    assert shape.nonzeros_per_row == pytest.approx(data.features.nnz / len(data.labels))
    assert shape.labels_per_row == pytest.approx(data.labels.nnz / len(data.labels))
    parsed = sum(a.nbytes for a in (data.features.indptr, data.features.indices, data.features.data))
    parsed += data.labels.indptr.nbytes + data.labels.indices.nbytes
    assert abs(shape.array_bytes() - parsed) <= 0.15 * parsed
    text = tmp_path / "train.txt"
    text.write_text("3,7\tred fox\n1\tjumps over it\n\n2\tdog\n", encoding="utf-8")
    shape = read_data_shape(str(text))
    assert (shape.inputs, shape.num_rows, shape.num_labels, shape.labels_per_row) == ("text", 4, 8, 4 / 3)
    # a file smaller than the sample is counted as the featuriser counts: no n-gram is in two texts
    texts = ["red fox", "jumps over it", "dog"]
    assert TextFeaturizer().fit(texts).num_features == 0
    assert (shape.num_features, shape.nonzeros_per_row) == (1, 0.0)  # at least one column
    hashed = read_data_shape(str(text), featurizer={"n_features": 1 << 18})
    assert hashed.num_features == 1 << 18  # hashed columns: that many, whatever the corpus
    distinct = TextFeaturizer(FeaturizerConfig(n_features=1 << 18)).fit_transform(texts).indices.size
    assert hashed.nonzeros_per_row == distinct / 3
    assert not os.path.exists(str(synthetic / "train_bow.txt") + ".megaclass.npz")  # nothing parsed


def test_plan_refuses_the_part_that_does_not_fit():
    parts = (
        PlanPart("head weights", 0, 10 << 30, setting="head.store=ps://..."),
        PlanPart("encoder weights", 1 << 30, 0, setting="model.hidden"),
        PlanPart("checkpoint host copy", 0, 30 << 30, "checkpoint", "a host with more memory"),
    )
    plan = MemoryPlan(parts, "cuda", gpu_capacity=2 << 30, host_capacity=32 << 30)
    line = plan.refusal()
    assert line is not None and "\n" not in line
    assert "host memory needs 40.00 GiB of 32.00 GiB (8.00 GiB over" in line
    assert "checkpoint host copy (30.00 GiB); to shrink it: a host with more memory" in line
    assert MemoryPlan(parts, "cuda", gpu_capacity=2 << 30, host_capacity=40 << 30).refusal() is None
    small_gpu = MemoryPlan(parts, "cuda", gpu_capacity=1 << 29, host_capacity=40 << 30).refusal()
    assert "GPU memory needs 1.00 GiB of 512.00 MiB" in small_gpu and "encoder weights" in small_gpu
    on_cpu = MemoryPlan(parts, "cpu", gpu_capacity=None, host_capacity=40 << 30).refusal()
    assert "host memory needs 41.00 GiB" in on_cpu  # a CPU run holds the device parts in host memory


def test_a_background_index_build_counts_at_every_phase(synthetic):
    parts = (
        PlanPart("head weights", 0, 10 << 30, setting="head.store=ps://..."),
        PlanPart("head index build", 0, 12 << 30, "background", "head.index.dtype=int8"),
        PlanPart("checkpoint host copy", 0, 6 << 30, "checkpoint", "a host with more memory"),
    )
    plan = MemoryPlan(parts, "cpu", gpu_capacity=None, host_capacity=20 << 30)
    assert plan.peak(1) == (28 << 30, "checkpoint")  # held at any time: on top of the steady parts too
    line = plan.refusal()
    assert "the largest part held while it runs in the background is head index build (12.00 GiB)" in line
    shape = read_data_shape(str(synthetic / "train_bow.txt"), num_classes=10**7)
    # a row's int64 group, assignment, group's rows, 3 nearby groups and 3 sorted places; its 8 best candidate
    # clusters (fp32 scores, int32 ids)
    clusters = 10**7 * (8 * 9 + 8 * 8)
    # then the capacity assignment's sort (104 bytes a row) or, larger where rows are wide, the scratch blocks
    # (gathered rows, their scores, the best candidates: an eighth of the rows' entries each, under 2^27)
    blocks = max(10**7 * 104, 3 * 4 * (10**7 * 64 // 8))
    snapshot = 10**7 * (64 * 2 + 16)  # the new snapshot's bf16 rows, norms, scales, assignments
    groups, per_group, width = cluster_layout(10**7)
    structure = groups * per_group * (width * 8 + 2 * 64 * 4 + 16 * 8)  # members, sums, centroids, near
    for background, beside in (
        ("true", snapshot + clusters + blocks),
        ("auto", clusters + blocks - structure),
    ):
        # in a thread the build holds all its scratch beside the index it replaces; synchronous (a GPU's
        # default) it drops that index first
        config = load_config(
            head="selected", overrides=["model.hidden=[64]", f"head.index.background={background}"]
        )
        built = plan_run(config, shape, device_type="cuda", gpu_capacity=139 << 30, host_capacity=128 << 30)
        build = {part.name: part for part in built.parts}["head index build"]
        assert build.phase == "background" and build.device_bytes == beside


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_a_captured_step_holds_its_activations_all_along_and_an_eager_one_its_own(synthetic, setting):
    config = load_config(head="sparse", overrides=["model.hidden=[64]", f"train.cuda_graph={setting}"])
    shape = read_data_shape(str(synthetic / "train_bow.txt"))
    for device_type in ("cuda", "cpu"):
        plan = plan_run(config, shape, device_type=device_type, gpu_capacity=None, host_capacity=64 << 30)
        phases = {part.name: part.phase for part in plan.parts}
        captured = device_type == "cuda" and setting == "auto"  # in the graph's memory pool between steps
        expected = "steady" if captured else "step"
        assert phases["encoder activations"] == phases["head activations"] == expected
        # a step run eagerly beside the graph (an epoch's smaller last batch) makes its own gradients and
        # activations of what the graph holds: the MLP's with the head's, or the head's alone
        parts = {part.name: part for part in plan.parts}
        assert ("eager step beside the captured one" in parts) == captured
        if captured:
            whole = ("encoder gradients", "encoder activations", "head gradients", "head activations")
            eager = parts["eager step beside the captured one"]
            assert eager.phase == "step" and eager.device_bytes == sum(parts[n].device_bytes for n in whole)
            frozen = dataclasses.replace(
                config, optim=dataclasses.replace(config.optim, encoder_frozen_steps=5)
            )
            plan = plan_run(frozen, shape, device_type="cuda", gpu_capacity=None, host_capacity=64 << 30)
            parts = {part.name: part for part in plan.parts}  # the encoder runs eagerly every step
            head_only = parts["head gradients"].device_bytes + parts["head activations"].device_bytes
            assert parts["eager step beside the captured one"].device_bytes == head_only
    # host rows are mapped for the GPU and captured, unless a weight average keeps them on the host; a
    # parameter server's rows never
    auto = setting == "auto"
    for store, more, captured in (
        ("host", [], auto),
        ("host", ["train.ema_decay=0.999"], False),
        ("ps://localhost:1", [], False),
    ):
        overrides = [f"head.store={store}", f"train.cuda_graph={setting}", *more]
        config = load_config(head="selected", overrides=overrides)
        plan = plan_run(config, shape, device_type="cuda", gpu_capacity=None, host_capacity=64 << 30)
        parts = {part.name: part for part in plan.parts}
        assert parts["head activations"].phase == ("steady" if captured else "step")
        assert ("eager step beside the captured one" in parts) == captured


def test_plan_of_a_first_layer_drawn_in_blocks(synthetic):
    # 70,000 features x 1,024: above the size from which the MLP draws its first layer in seeded blocks,
    # which the plan's model on the meta device must not draw
    shape = dataclasses.replace(read_data_shape(str(synthetic / "train_bow.txt")), num_features=70_000)
    config = load_config(overrides=["model.hidden=[1024]"])
    plan = plan_run(config, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30)
    parts = {part.name: part for part in plan.parts}
    assert parts["encoder weights"].device_bytes >= 70_000 * 1024 * 4


def test_plan_of_a_large_selected_head_on_host_rows(synthetic):
    config = load_config(head="selected", overrides=["head.store=host", "model.hidden=[64]"])
    shape = read_data_shape(str(synthetic / "train_bow.txt"), num_classes=10**8)
    plan = plan_run(config, shape, device_type="cuda", gpu_capacity=139 << 30, host_capacity=128 << 30)
    parts = {part.name: part for part in plan.parts}
    assert parts["head weights"].host_bytes == 10**8 * 64 * 4 and parts["head weights"].device_bytes == 0
    assert parts["head optimizer state"].host_bytes == 10**8 * 64 * 4  # SGD momentum: one buffer a row
    assert parts["head state dict copies"].host_bytes == 0  # a save streams the rows from where they live
    # the index on the GPU is saved through one page-locked block, kept from the first save on
    assert parts["checkpoint staging block"].host_bytes == STREAM_CHUNK_BYTES
    assert parts["checkpoint staging block"].phase == "steady"
    assert plan.refusal() is None and plan.peak(0)[0] < 139 << 30
    assert plan.peak(1)[0] < 64 << 30  # rows and momentum: 51.2 GB, and a save adds no copy
    halves = load_config(
        head="selected", overrides=["head.store=host", "head.store_dtype=bf16_sr", "model.hidden=[64]"]
    )
    parts = {p.name: p for p in plan_run(halves, shape, device_type="cuda", gpu_capacity=139 << 30,
                                         host_capacity=128 << 30).parts}  # fmt: skip
    assert parts["head weights"].host_bytes == parts["head optimizer state"].host_bytes == 10**8 * 64 * 2


@pytest.mark.parametrize(
    ("settings", "checkpoints", "copies"),
    [
        (["train.epochs=1", "train.keep_checkpoints=1"], 1, 1),  # one save, at the epoch's end
        (["train.epochs=1", "train.keep_checkpoints=1", "train.checkpoint_every=1"], 2, 1),
        (["train.epochs=3", "train.keep_checkpoints=1"], 2, 2),
        (["train.epochs=3", "train.keep_checkpoints=5"], 3, 2),  # no more than the run writes
    ],
)
def test_planned_disk_counts_the_checkpoints_a_run_writes(synthetic, settings, checkpoints, copies):
    shape = read_data_shape(str(synthetic / "train_bow.txt"))
    plan = plan_run(
        load_config(head="dense", overrides=settings),
        shape,
        device_type="cpu",
        gpu_capacity=None,
        host_capacity=64 << 30,
    )
    weights = sum(
        p.host_bytes + p.device_bytes for p in plan.parts if p.name in ("head weights", "encoder weights")
    )
    assert plan.disk_bytes() == checkpoints * plan.checkpoint_bytes() + copies * weights
    assert f"{checkpoints} checkpoint" in plan.format()


def test_cli_plan_refuses_with_one_line_and_its_exit_code(synthetic, capsys):
    train = str(synthetic / "train_bow.txt")
    code = main(["plan", "--train", train, "--head", "dense", "--gpu-memory", "0.01", "--host-memory", "64"])
    captured = capsys.readouterr()
    assert code == 3
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("megaclass plan: error: the run does not fit: GPU")
    assert "peak GPU" in captured.out
    assert main(["plan", "--train", train, "--gpu-memory", "139", "--host-memory", "128"]) == 0
    assert "the run fits" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_writes_nothing(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    before = sorted(os.listdir(synthetic))
    argv = ["train", "--train", str(synthetic / "train_bow.txt"), "--test", str(synthetic / "test_bow.txt")]
    code = main([*argv, "--out", str(out), "--dry-run", "--set", "train.device=cpu", "--host-memory", "64"])
    assert code == 0
    assert "memory plan: dense head, 500 classes" in capsys.readouterr().out
    assert not out.exists()
    assert sorted(os.listdir(synthetic)) == before


def test_a_sparse_first_layer_plans_a_gradient_row_per_non_zero(synthetic):
    """model.sparse_grad: the encoder's gradient is the batch's non-zeros x H0 (values and row ids), not the
    table; weights and Adam's moments stay whole."""
    shape = read_data_shape(str(synthetic / "train_bow.txt"))
    settings = ["model.hidden=[64]", "train.batch_size=16"]
    plans = {
        sparse: plan_run(
            load_config(overrides=[*settings, f"model.sparse_grad={sparse}"]),
            shape,
            device_type="cpu",
            gpu_capacity=None,
            host_capacity=64 << 30,
        )
        for sparse in ("true", "false")
    }
    parts = {sparse: {p.name: p.device_bytes for p in plan.parts} for sparse, plan in plans.items()}
    table = shape.num_features * 64 * 4
    nonzeros = max(1, round(16 * shape.nonzeros_per_row))
    assert parts["false"]["encoder gradients"] - parts["true"]["encoder gradients"] == table - nonzeros * (
        64 * 4 + 8
    )
    for name in ("encoder weights", "encoder optimizer state"):
        assert parts["true"][name] == parts["false"][name]
    # the optimizer's step on the touched rows, float32: summed and moving gradient rows, weights, Adam's two
    # moments and its denominator; none where the whole table's gradient is dense
    touched = min(nonzeros, shape.num_features)
    assert parts["true"]["encoder row update"] == 6 * touched * 64 * 4
    assert parts["false"]["encoder row update"] == 0
    assert {p.name: p.phase for p in plans["true"].parts}["encoder row update"] == "step"
    sgd = load_config(overrides=[*settings, "model.sparse_grad=true", "optim.encoder.name=sgd"])
    plan = plan_run(sgd, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30)
    momentum = sgd.optim.encoder.momentum > 0
    row_update = {p.name: p.device_bytes for p in plan.parts}["encoder row update"]
    assert row_update == (4 + momentum) * touched * 64 * 4


def _folder_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(top, name)) for top, _, names in os.walk(path) for name in names)


@pytest.mark.parametrize("head", ["dense", "sparse", "selected"])
def test_planned_disk_matches_the_run_folder(synthetic, tmp_path, capsys, head):
    """One checkpoint within 5% of a trained run's (dense, sparse and selected heads), and the folder at most
    what the plan says."""
    train, test = str(synthetic / "train_bow.txt"), str(synthetic / "test_bow.txt")
    settings = ["train.device=cpu", "model.hidden=[256]", "train.progress=false", "train.keep_checkpoints=1"]
    if head == "selected":
        settings.append("head.sample_num=0.1")
    argv = ["train", "--train", train, "--test", test, "--out", str(tmp_path / "run"), "--head", head]
    shape = read_data_shape(train)
    assert main([*argv, "--epochs", "2", "--set", *settings]) == 0
    capsys.readouterr()
    config = load_config(tmp_path / "run" / "config.yaml")
    plan = plan_run(config, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30)
    (saved,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    assert plan.checkpoint_bytes() == pytest.approx(_folder_bytes(saved), rel=0.05)
    assert _folder_bytes(tmp_path / "run") <= plan.disk_bytes()


def test_dry_run_refuses_a_run_folder_on_a_disk_too_small(synthetic, tmp_path, capsys, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1 << 20))
    argv = ["train", "--train", str(synthetic / "train_bow.txt"), "--test", str(synthetic / "test_bow.txt")]
    code = main([*argv, "--out", str(tmp_path / "a" / "run"), "--dry-run", "--host-memory", "64"])
    captured = capsys.readouterr()
    assert code == 3 and "of 1.00 MiB free" in captured.out
    (error,) = captured.err.strip().splitlines()
    assert error.startswith("megaclass train: error: the run does not fit: disk needs")
    assert "train.keep_checkpoints" in error
    # the refusal names what fills a checkpoint most and the setting that shrinks it
    assert "; the largest part of a checkpoint is encoder " in error and "to shrink it: " in error
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("head", "store", "rows_on"),
    [
        ("dense", "gpu", None),
        ("selected", "gpu", "device"),
        ("selected", "host", "host"),
        ("selected", "ps", ""),
    ],
)
def test_a_weight_average_is_planned_where_the_averaged_weights_live(synthetic, head, store, rows_on):
    overrides = ["model.hidden=[64]", "train.ema_decay=0.99"]
    if head == "selected":
        url = "ps://127.0.0.1:1" if store == "ps" else store
        overrides += [f"head.store={url}", "head.store_dtype=bf16_sr"]
    config = load_config(head=head, overrides=overrides)
    shape = read_data_shape(str(synthetic / "train_bow.txt"), num_classes=10**6)
    options = {"device_type": "cuda", "gpu_capacity": 139 << 30, "host_capacity": 128 << 30}
    parts = {part.name: part for part in plan_run(config, shape, **options).parts}
    average, encoder = parts["weight average"], parts["encoder weights"].device_bytes
    if rows_on is None:  # the head's parameters, as they are held
        assert average.device_bytes == encoder + parts["head weights"].device_bytes
    else:  # a store's rows: float32 and a step count a row, even for bf16 rows (none on the servers)
        rows = 10**6 * (64 * 4 + 8)
        assert average.device_bytes == encoder + (rows if rows_on == "device" else 0)
        assert average.host_bytes == (rows if rows_on == "host" else 0)
        assert average.elsewhere_bytes == (10**6 * 64 * 4 if rows_on == "" else 0)  # in checkpoints
    without = load_config(head=head, overrides=[o for o in overrides if "ema_decay" not in o])
    assert "weight average" not in {part.name for part in plan_run(without, shape, **options).parts}


def test_rows_on_parameter_servers_are_planned_in_the_checkpoints_they_reach(synthetic):
    """Rows and row-optimizer state on parameter servers take no memory here, yet a checkpoint and the kept
    weights hold them (float32, whatever the shards hold them in): the disk plan counts them."""
    overrides = ["model.hidden=[64]", "head.store=ps://127.0.0.1:1", "head.store_dtype=bf16_sr"]
    shape = read_data_shape(str(synthetic / "train_bow.txt"), num_classes=10**6)
    options = {"device_type": "cuda", "gpu_capacity": 139 << 30, "host_capacity": 128 << 30}
    plan = plan_run(load_config(head="selected", overrides=overrides), shape, **options)
    parts = {part.name: part for part in plan.parts}
    weights, state = parts["head weights"], parts["head optimizer state"]
    assert (weights.device_bytes, weights.host_bytes, state.device_bytes, state.host_bytes) == (0, 0, 0, 0)
    assert weights.elsewhere_bytes == 10**6 * 64 * 4
    assert state.elsewhere_bytes == 10**6 * 64 * 4  # SGD with momentum (the head's default): a buffer a row
    assert plan.checkpoint_bytes() >= weights.elsewhere_bytes + state.elsewhere_bytes
    encoder = parts["encoder weights"].saved_bytes
    assert plan.disk_bytes() == plan.checkpoints_at_once * plan.checkpoint_bytes() + plan.weight_copies * (
        encoder + weights.elsewhere_bytes
    )


@pytest.mark.parametrize("store", ["gpu", "host", "ps"])
def test_a_save_behind_the_steps_plans_its_copy_of_the_state_where_it_makes_one(synthetic, store):
    """A checkpoint and the kept weights copied into host memory, held from the first save on; none where the
    copy would take more than an eighth of the host, where rows live on parameter servers, or when off."""
    url = "ps://127.0.0.1:1" if store == "ps" else store
    overrides = ["model.hidden=[64]", f"head.store={url}"]
    shape = read_data_shape(str(synthetic / "train_bow.txt"), num_classes=10**6)
    name = "background save copy"

    def plan(host_capacity, *extra):
        config = load_config(head="selected", overrides=[*overrides, *extra])
        options = {"device_type": "cuda", "gpu_capacity": 139 << 30, "host_capacity": host_capacity}
        return plan_run(config, shape, **options)

    roomy = plan(128 << 30)
    parts = {part.name: part for part in roomy.parts}
    if store == "ps":
        assert name not in parts
        return
    weights = parts["encoder weights"].saved_bytes + parts["head weights"].saved_bytes
    copy = parts[name]
    assert (copy.device_bytes, copy.phase) == (0, "steady")
    assert copy.host_bytes == roomy.checkpoint_bytes() + weights
    assert name not in {part.name for part in plan(8 * copy.host_bytes - 1).parts}  # over an eighth
    assert name in {part.name for part in plan(8 * copy.host_bytes).parts}
    assert name not in {part.name for part in plan(128 << 30, "train.background_saves=false").parts}


def test_reading_the_data_and_building_the_modules_come_before_the_parts_made_later():
    g = 1 << 30
    parts = [
        PlanPart("data sets in memory", 0, 10 * g),
        PlanPart("libraries a run loads", 0, 6 * g, after_setup=True),
        PlanPart("evaluation metrics", 0, 1 * g, "evaluation"),
        PlanPart("head initialisation", 0, 4 * g, "setup"),
    ]
    parsing = [PlanPart("data file being parsed", 0, 8 * g, "loading")]
    plan = MemoryPlan((*parts, *parsing), "cpu", gpu_capacity=None, host_capacity=64 * g)
    assert plan.peak(1) == (18 * g, "loading")  # 10 held then, and 8 on top
    smaller = [PlanPart("data file being parsed", 0, 5 * g, "loading")]
    plan = MemoryPlan((*parts, *smaller), "cpu", gpu_capacity=None, host_capacity=64 * g)
    assert plan.peak(1) == (17 * g, "evaluation")  # all 16 held by then, and 1 on top


def test_a_refusal_for_a_batch_too_large_names_the_batch_that_fits(synthetic):
    path = str(synthetic / "train_bow.txt")  # 600 rows

    def plan(batch, host_gib=1024.0):
        config = load_config(
            overrides=[
                "model.hidden=[8192]",
                f"train.batch_size={batch}",
                "train.device=cpu",
                "train.background_saves=false",  # its copy, held by a host with room for it, plans apart
            ]
        )
        return plan_for(config, path, resolve=lambda config, facts: config, host_memory=host_gib)

    peaks = {batch: plan(batch).peak(1)[0] for batch in (512, 256, 128)}
    assert peaks[512] > peaks[256] > peaks[128]
    between = (peaks[256] + peaks[128]) / 2 / (1 << 30)  # 256 does not fit, 128 does
    refused = plan(4096, between)  # a batch of 4,096 takes the 600 rows: 300 is the first halving tried
    assert refused.blamed_part().setting == "train.batch_size"
    assert refused.refusal().endswith("to shrink it: train.batch_size (train.batch_size=150 fits)")
    assert plan(512).fits_with == "" and plan(512).refusal() is None
    never = MemoryPlan((PlanPart("encoder activations", 0, 8, "step", "train.batch_size"),), "cpu", None, 4)
    tried = []

    def too_large(config):
        tried.append(config.train.batch_size)
        return never

    assert _fitting_batch(load_config(), "train.batch_size", too_large, 20) == "no train.batch_size fits"
    assert tried == [10, 5, 2, 1]  # halvings of the 20 rows a batch takes at most


def test_the_host_side_of_a_run_of_several_processes_on_this_host_is_theirs_together(synthetic):
    config = load_config(overrides=["model.hidden=[64]"])
    shape = read_data_shape(str(synthetic / "train_bow.txt"))
    options = {"device_type": "cpu", "gpu_capacity": None, "world_size": 4}
    one = plan_run(config, shape, host_capacity=64 << 30, **options)
    each = one.peak(1)[0]
    four = plan_run(config, shape, host_capacity=64 << 30, host_processes=4, **options)
    assert four.peak(1) == (4 * each, one.peak(1)[1])
    assert f"(at {one.peak(1)[1]}; 4 processes of {format_bytes(each)})" in four.format()
    tight = plan_run(config, shape, host_capacity=2 * each, host_processes=4, **options)
    assert plan_run(config, shape, host_capacity=2 * each, **options).refusal() is None
    assert f"host memory needs {format_bytes(4 * each)} of {format_bytes(2 * each)}" in tight.refusal()


PROCESS_PARTS = ("interpreter and PyTorch", "libraries a run loads")


def test_a_gpu_run_plans_host_memory_for_the_cuda_runtime(synthetic):
    """The process's own memory is in the plan on any device, once; the host memory a GPU run was measured
    to hold beside its other planned parts is that and the CUDA runtime's, not counted twice."""
    config = load_config(head="sparse", overrides=["model.hidden=[64]"])  # no modules' build on top
    shape = read_data_shape(str(synthetic / "train_bow.txt"))
    options = {"gpu_capacity": 139 << 30, "host_capacity": 128 << 30}
    plans = {device: plan_run(config, shape, device_type=device, **options) for device in ("cuda", "cpu")}
    on_gpu = {p.name: p for p in plans["cuda"].parts}
    process = sum(on_gpu[name].host_bytes for name in PROCESS_PARTS)
    assert on_gpu["CUDA runtime"].host_bytes + on_gpu["CUDA context"].host_bytes + process == _CUDA_HOST
    assert on_gpu["CUDA runtime"].after_setup and not on_gpu["CUDA context"].after_setup
    assert {on_gpu[name].phase for name in (*PROCESS_PARTS, "CUDA runtime")} == {"steady"}
    names = [p.name for p in plans["cpu"].parts]
    assert "CUDA runtime" not in names and all(names.count(name) == 1 for name in PROCESS_PARTS)
    for plan in plans.values():
        without = dataclasses.replace(plan, parts=tuple(p for p in plan.parts if p.name not in PROCESS_PARTS))
        assert plan.peak(1)[1] == without.peak(1)[1]
        assert plan.peak(1)[0] - without.peak(1)[0] == process  # in the peak, once


def test_label_sized_host_arrays_stay_within_their_planned_parts(synthetic):
    """What a run holds per label in host memory (the training label counts, all along) and what its
    evaluation adds (propensities and their inverses): at 2 x 10^8 labels each 8 bytes a label is 1.5 GiB."""
    import tracemalloc

    import numpy as np

    from megaclass.data.batch import count_labels
    from megaclass.metrics.ranking import RankingMetrics, propensity

    classes = 200_000
    shape = dataclasses.replace(read_data_shape(str(synthetic / "train_bow.txt")), num_labels=classes)
    config = load_config(head="dense", overrides=["model.hidden=[64]"])
    parts = {
        p.name: p
        for p in plan_run(config, shape, device_type="cpu", gpu_capacity=None, host_capacity=128 << 30).parts
    }
    labels = np.random.default_rng(0).integers(0, classes, size=50_000)
    tracemalloc.start()
    try:
        counts = count_labels(type("Labels", (), {"indices": labels}), classes)
        held, counting = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        metrics = RankingMetrics(classes, propensities=propensity(counts, len(labels)))
        _, evaluating = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert metrics.inverse_propensity.shape == (classes,)
    assert parts["label counts"].phase == "steady" and parts["evaluation metrics"].phase == "evaluation"
    slack = 64 << 10  # the interpreter's own small allocations on the way
    assert max(held, counting) <= parts["label counts"].host_bytes + slack
    assert evaluating <= parts["label counts"].host_bytes + parts["evaluation metrics"].host_bytes + slack


def test_plan_of_a_transformer_on_text(write_text_data, tiny_model_options, tmp_path, capsys):
    write_text_data(tmp_path)
    model = [f"model.{key}={value!r}" for key, value in tiny_model_options.items()]
    shape = read_data_shape(str(tmp_path / "train.txt"))
    plans = {}
    for batch in (8, 16):
        config = load_config(overrides=[*model, f"train.batch_size={batch}"])
        plan = plan_run(config, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30)
        plans[batch] = {part.name: part.device_bytes + part.host_bytes for part in plan.parts}
    weights = sum(p.numel() * 4 for p in build_model(config.model, InputSpec(kind="tokens")).parameters())
    assert plans[8]["encoder weights"] == plans[16]["encoder weights"] == weights
    # the activations of one document of model.max_length tokens, as many times as the batch has rows
    assert 0 < plans[8]["encoder activations"] and plans[16]["encoder activations"] == pytest.approx(
        2 * plans[8]["encoder activations"], rel=0.01
    )
    seen = []  # the facts a recipe is chosen by: text read as token ids, as the run reads it
    plan_for(config, str(tmp_path / "train.txt"), resolve=lambda config, facts: seen.append(facts) or config)
    assert seen[0].inputs == "tokens"
    out = tmp_path / "run"
    argv = ["train", "--train", str(tmp_path / "train.txt"), "--test", str(tmp_path / "test.txt")]
    code = main([*argv, "--out", str(out), "--dry-run", "--set", *model])
    assert code == 0 and "the run fits" in capsys.readouterr().out
    assert not out.exists()


def test_plan_of_face_images(fixture_rec):
    shape = read_data_shape(fixture_rec)
    assert (shape.inputs, shape.num_rows, shape.num_labels, shape.num_features) == ("images", 320, 40, 112)
    assert shape.facts().inputs == "images" and shape.facts().num_features == 0
    model = ["model.type=mobilefacenet"]
    config = load_config(head="selected", overrides=[*model, "train.batch_size=16"])
    plan = plan_run(config, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30)
    parts = {part.name: part.device_bytes + part.host_bytes for part in plan.parts}
    encoder = build_model(config.model, InputSpec(kind="image"))
    assert parts["encoder weights"] == sum(p.numel() * 4 for p in encoder.parameters())
    assert parts["encoder activations"] > 16 * 3 * 112 * 112 * 4  # more than the float32 batch alone
    # no batch holds more rows than the data: a batch of 512 is planned as one of the 320 images
    whole = load_config(head="selected", overrides=[*model, "train.batch_size=512"])
    plan = plan_run(whole, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30)
    assert "320 rows, batch 320" in plan.summary


def test_autocast_like_casts_as_cuda_autocast_does():
    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
    conv, prelu = torch.nn.Conv2d(3, 4, 3), torch.nn.PReLU(4)
    x, image = torch.randn(2, 8), torch.randn(2, 3, 6, 6)
    with _GpuLike(autocast=True, fused_attention=False) as mode:
        hidden = linear(x)
        normed = norm(hidden)  # float32 ops cast their bf16 inputs back
        again = linear(normed)  # a weight is cast once a pass, as autocast caches its casts
        mapped = prelu(conv(image))
        plain = torch.relu(hidden)  # other ops keep their inputs' dtype
    assert (hidden.dtype, normed.dtype, again.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert (mapped.dtype, plain.dtype) == (torch.bfloat16, torch.bfloat16)
    casts = mode.weight_casts
    assert len(casts) == 5 and all(c.dtype == torch.bfloat16 for c in casts.values())  # not the norm's
    assert torch.equal(casts[id(linear.weight)], linear.weight.detach().to(torch.bfloat16))
    expected = F.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16())
    assert torch.equal(hidden, expected)


def test_saved_tensor_bytes_under_autocast_count_the_weight_casts_once():
    encoder = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    inputs = torch.randn(5, 16, requires_grad=True)
    batch, casts = saved_tensor_bytes(encoder, inputs, autocast=False)
    # each op's saved tensors (the ReLU's output twice: its own and the second linear's input), the
    # features and their gradient, in float32
    assert (batch, casts) == (4 * (5 * 16 + 5 * 32 + 5 * 32 + 2 * 5 * 4), 0)
    batch, casts = saved_tensor_bytes(encoder, inputs, autocast=True)
    assert batch == 2 * (5 * 16 + 5 * 32 + 5 * 32 + 2 * 5 * 4)  # the same in bf16: the first input cast
    assert casts == 2 * (16 * 32 + 32 * 4)  # the weights' bf16 copies the backward keeps, not the biases'


def test_the_longest_line_read_across_pieces(tmp_path, monkeypatch):
    lines = ["0\tshort", "1\t" + "x" * 40, "2\tmid dle words", "3\tlast line, no newline at its end"]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines))
    monkeypatch.setattr(plan_module, "_READ_BYTES", 7)  # lines spanning several pieces
    shape = read_data_shape(str(path))
    assert shape.longest_line_bytes == max(len(line) for line in lines) == 42
    assert sorted(shape.texts) == sorted(line.split("\t", 1)[1] for line in lines)  # the whole file


def test_the_token_width_is_the_widest_batch(tiny_model_options, tmp_path, monkeypatch):
    """A batch is padded to its longest row: the plan's document is the data's longest, tokenised, where its
    sample holds the whole file; else as long as its longest line's bytes allow (a byte or more a token)."""
    texts = ["ruby", "python library for web mail", "the kernel"]  # a token a word of the vocabulary
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{i}\t{text}\n" for i, text in enumerate(texts)))
    config = load_config(overrides=[f"model.{key}={value!r}" for key, value in tiny_model_options.items()])
    tokenizer = load_tokenizer(config.model)
    assert [len(tokenizer(text)["input_ids"]) for text in texts] == [3, 7, 4]  # [CLS] and [SEP] too
    assert _token_width(config, read_data_shape(str(path)), tokenizer) == 7
    short = dataclasses.replace(config, model=dataclasses.replace(config.model, max_length=5))
    assert _token_width(short, read_data_shape(str(path)), tokenizer) == 5  # truncated as the run truncates
    monkeypatch.setattr(plan_module, "_SAMPLE_BYTES", 8)  # a sample of part of the file
    shape = read_data_shape(str(path))
    assert not shape.texts and shape.longest_line_bytes == len("1\tpython library for web mail")
    # 29 bytes: up to 31 tokens, past model.max_length
    assert _token_width(config, shape, tokenizer) == config.model.max_length == 24
    shape = dataclasses.replace(shape, longest_line_bytes=len("2\tthe kernel"))
    assert _token_width(config, shape, tokenizer) == len("2\tthe kernel") + 2


def test_fused_attention_saves_what_the_gpu_kernels_keep():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with _GpuLike(autocast=False, fused_attention=True):
            out = F.scaled_dot_product_attention(query, key, value, None, 0.0, scale=0.5)
    assert torch.allclose(out, F.scaled_dot_product_attention(query, key, value, scale=0.5))
    # the inputs and the output, a float32 log-sum-exp a query row: no (T, T) probabilities
    assert sorted(saved) == sorted([((2, 3, 5, 8), torch.float32)] * 4 + [((2, 3, 5), torch.float32)])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with _GpuLike(autocast=True, fused_attention=True):
            F.scaled_dot_product_attention(query, key, value, dropout_p=0.5)
    assert ((2, 3, 5, 5), torch.float32) not in saved and ((2, 3, 5, 8), torch.bfloat16) in saved


def test_a_gpu_plan_counts_no_attention_matrices(tiny_model_options):
    """With dropout on the attention, a CPU runs the math kernel, which keeps the (T, T) probabilities and
    their dropout mask; the GPU's fused kernels keep what the CPU's own fused kernel keeps without dropout."""
    from megaclass.data.tokenized import TokenInputs

    def encoder(attention_dropout):
        options = {**tiny_model_options["config"], "attention_probs_dropout_prob": attention_dropout}
        model = [f"model.{key}={value!r}" for key, value in {**tiny_model_options, "config": options}.items()]
        return build_model(load_config(overrides=model).model, InputSpec(kind="tokens")).train()

    ids = torch.full((1, 20), 7, dtype=torch.int64)
    inputs = TokenInputs(ids, torch.ones_like(ids))
    with_dropout = encoder(0.1)
    math, _ = saved_tensor_bytes(with_dropout, inputs, autocast=False)
    fused, _ = saved_tensor_bytes(with_dropout, inputs, autocast=False, fused_attention=True)
    without, _ = saved_tensor_bytes(encoder(0.0), inputs, autocast=False)
    heads, layers, width = 2, 2, 20
    assert fused == without and math - fused >= layers * heads * width * width * 4  # the probabilities


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_saved_tensor_bytes_match_cuda_autocast():
    """The plan's emulation on ``meta`` tensors against the real thing on the GPU: the bytes a face encoder
    (convolutions, batch norms, PReLU, a linear layer) saves for the backward under bf16 autocast, its
    weights' casts included."""
    encoder = build_model(load_config(overrides=["model.type=mobilefacenet"]).model, InputSpec(kind="image"))
    encoder.train()
    images = torch.zeros(4, 3, 112, 112)
    planned = sum(saved_tensor_bytes(encoder.to("meta"), images.to("meta"), autocast=True))
    encoder = build_model(load_config(overrides=["model.type=mobilefacenet"]).model, InputSpec(kind="image"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        measured = sum(saved_tensor_bytes(encoder.cuda().train(), images.cuda(), autocast=False))
    assert planned == pytest.approx(measured, rel=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_saved_tensor_bytes_of_a_transformer_match_cuda(tiny_model_options):
    """The plan's emulation on the CPU against the GPU: a small BERT with dropout on its attention, a padded
    batch, under bf16 autocast (the GPU's fused attention, not the CPU's math kernel)."""
    from megaclass.data.tokenized import TokenInputs

    options = {**tiny_model_options["config"], "attention_probs_dropout_prob": 0.1}
    model = [f"model.{key}={value!r}" for key, value in {**tiny_model_options, "config": options}.items()]
    config = load_config(overrides=[*model, "model.dropout=0.1"]).model
    ids = torch.randint(5, 60, (4, 20))
    mask = torch.ones_like(ids)
    mask[1:, 12:] = 0  # three rows padded
    planned = sum(
        saved_tensor_bytes(
            build_model(config, InputSpec(kind="tokens")).train(),
            TokenInputs(ids, mask),
            autocast=True,
            fused_attention=True,
        )
    )
    encoder = build_model(config, InputSpec(kind="tokens")).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        measured = sum(saved_tensor_bytes(encoder, TokenInputs(ids.cuda(), mask.cuda()), autocast=False))
    assert planned == pytest.approx(measured, rel=0.1)


def test_inference_bytes_count_what_is_live_at_once():
    encoder = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    inputs = torch.randn(5, 16)
    # the ReLU's output beside its input, freed once the ReLU returns: the most at once, in float32
    assert inference_bytes(encoder, inputs, autocast=False) == 2 * 5 * 32 * 4
    # in bf16 under autocast, beside the first layer's bf16 weights (cast once a pass and kept)
    assert inference_bytes(encoder, inputs, autocast=True) == 2 * 5 * 32 * 2 + 2 * (16 * 32 + 32)


def test_the_plan_of_an_evaluation(tiny_model_options, write_text_data, synthetic, tmp_path):
    """The encoder's forward pass without gradients over an evaluation batch: at most ``eval.batch_size``
    rows, no more than the largest file evaluated or the held-out rows hold."""
    shape = read_data_shape(str(synthetic / "train_bow.txt"))
    test = read_data_shape(str(synthetic / "test_bow.txt"))

    def parts(config, *others):
        plan = plan_run(
            config, shape, device_type="cuda", gpu_capacity=None, host_capacity=64 << 30, others=others
        )
        return {part.name: part for part in plan.parts}

    config = load_config(head="dense", overrides=["model.hidden=[64]"])
    evaluation = parts(config, test)["encoder evaluation"]
    assert evaluation.phase == "evaluation" and evaluation.setting == "eval.batch_size"
    encoder = build_model(config.model, InputSpec(kind="sparse", num_features=shape.num_features))
    rows = min(config.eval.batch_size, test.num_rows)
    assert (
        evaluation.device_bytes
        > inference_bytes(encoder.eval(), _sparse_rows(shape, rows), autocast=True)
        > 0
    )
    fewer = load_config(head="dense", overrides=["model.hidden=[64]", "eval.batch_size=8"])
    assert parts(fewer, test)["encoder evaluation"].device_bytes < evaluation.device_bytes
    # no test file: the held-out rows alone
    held_out = round(config.train.valid_fraction * shape.num_rows)
    alone = parts(config)["encoder evaluation"].device_bytes
    assert alone == pytest.approx(evaluation.device_bytes * held_out / rows, rel=0.2)
    # an encoder the captured step does not hold runs eagerly: its activations are the step's alone
    assert parts(config, test)["encoder activations"].phase == "steady"  # captured with the head
    write_text_data(tmp_path)
    text = read_data_shape(str(tmp_path / "train.txt"))
    model = load_config(overrides=[f"model.{key}={value!r}" for key, value in tiny_model_options.items()])
    plan = plan_run(model, text, device_type="cuda", gpu_capacity=None, host_capacity=64 << 30)
    assert {part.name: part.phase for part in plan.parts}["encoder activations"] == "step"


def _sparse_rows(shape, rows):
    from megaclass.data.batch import SparseInputs

    stored = round(rows * shape.nonzeros_per_row)
    return SparseInputs(
        torch.zeros(stored, dtype=torch.int64), torch.zeros(rows + 1, dtype=torch.int64), torch.zeros(stored)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inference_bytes_match_cuda():
    """The plan's evaluation pass on the CPU against the allocator's peak on the GPU: a BERT's forward
    without gradients over a batch under bf16 autocast."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024
    )
    config._attn_implementation = "sdpa"
    model = BertModel(config, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids).last_hidden_state[:, 0]

    ids = torch.randint(5, 1000, (64, 96))
    planned = inference_bytes(Encoder(), ids, autocast=True, fused_attention=True)
    encoder, ids = Encoder().cuda(), ids.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        encoder(ids)
    torch.cuda.synchronize()
    assert planned == pytest.approx(torch.cuda.max_memory_allocated() - before, rel=0.15)


def test_plan_of_a_gpu_step_under_bf16_autocast(fixture_rec, write_text_data, tiny_model_options, tmp_path):
    def activations(config, shape):
        plan = plan_run(config, shape, device_type="cuda", gpu_capacity=None, host_capacity=64 << 30)
        return {part.name: part.device_bytes for part in plan.parts}["encoder activations"]

    faces = read_data_shape(fixture_rec)
    face = {
        bf16: load_config(head="selected", overrides=["model.type=mobilefacenet", f"train.bf16={bf16}"])
        for bf16 in ("true", "false")
    }
    ratio = activations(face["true"], faces) / activations(face["false"], faces)
    assert 0.48 < ratio < 0.55  # bf16 where float32, but for the float32 batch read from the data
    write_text_data(tmp_path)
    text = read_data_shape(str(tmp_path / "train.txt"))
    model = [f"model.{key}={value!r}" for key, value in tiny_model_options.items()]
    planned = {
        b: activations(load_config(overrides=[*model, f"train.batch_size={b}"]), text) for b in (8, 16)
    }
    # one document's activations `batch` times over, the weights' bf16 copies once
    encoder = build_model(load_config(overrides=model).model, InputSpec(kind="tokens"))
    casts = 2 * sum(m.weight.numel() for m in encoder.modules() if isinstance(m, torch.nn.Linear))
    assert 2 * planned[8] - planned[16] == pytest.approx(casts, rel=0.05)


def test_plan_of_rank_0_of_several_processes(synthetic, tmp_path, capsys, monkeypatch):
    shape = read_data_shape(str(synthetic / "train_bow.txt"))
    config = load_config(head="dense", overrides=["model.hidden=[64]", "train.batch_size=64"])

    def head_weights(plan):
        return {part.name: part.device_bytes + part.host_bytes for part in plan.parts}["head weights"]

    alone = plan_run(config, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30)
    four = plan_run(config, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30, world_size=4)
    assert "batch 64" in alone.summary and "(one process)" in alone.summary
    assert "batch 16" in four.summary and "(rank 0 of 4 processes, 125 classes)" in four.summary
    assert head_weights(four) == head_weights(alone) * 125 // 500  # the classes split over the ranks
    whole = load_config(head="dense", overrides=["model.hidden=[64]", "distributed.shard_head=never"])
    kept = plan_run(whole, shape, device_type="cpu", gpu_capacity=None, host_capacity=64 << 30, world_size=4)
    assert head_weights(kept) == head_weights(alone)
    # train --dry-run with --nproc-per-node plans rank 0 here, without starting the processes
    import megaclass.cli

    monkeypatch.setattr(megaclass.cli, "_forward_to_torchrun", lambda *_: pytest.fail("processes started"))
    argv = ["train", "--train", str(synthetic / "train_bow.txt"), "--test", str(synthetic / "test_bow.txt")]
    assert main([*argv, "--out", str(tmp_path / "run"), "--nproc-per-node", "2", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("rank 0 of 2 processes") == 1


_MEASURE = """
import megaclass.train.loop
from megaclass.heads import HeadContext, build_head, head_config
def resident(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))
imported = resident("VmRSS")
context = HeadContext(in_features=256, num_classes=3 * 16384, multilabel=False)
head = build_head(head_config({"type": "dense"}), context)
print(imported, resident("VmHWM") - imported - head.weight.numel() * 4)
"""


def test_the_process_and_a_dense_heads_first_rows_are_planned(repo_root):
    """What a fresh process holds once the trainer is imported is within the plan's part for the process
    (which counts what a run loads later, too); what building a dense head holds beside its rows (a block of
    initial rows drawn, at most 16 MiB) is within its planned initialisation."""
    import subprocess
    import sys

    from megaclass.train.plan import _PROCESS_HOST

    done = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True)
    imported, building = (int(word) for word in done.stdout.split())
    # a CUDA build of PyTorch maps its GPU libraries at import: counted in the plan's CUDA runtime there
    assert imported <= (_CUDA_HOST if torch.cuda.is_available() else _PROCESS_HOST)
    config = head_config({"type": "dense"})
    context = HeadContext(in_features=256, num_classes=3 * 16384, multilabel=False)
    planned = head_class(config).planned_bytes(config, context, PlanRequest(BATCH, 8, device_type="cpu"))
    assert planned["initialisation"].host == 16 << 20  # 16,384 rows of D 256 a block
    assert 0.8 * planned["initialisation"].host <= building <= planned["initialisation"].host + (8 << 20)
    # deb-tags' BoW rows under the default MLP (D 1,024): a block of 4,096 rows, or the labels if fewer, while
    # the modules are built
    shape = read_data_shape(os.path.join(repo_root, "data", "deb-tags", "test_bow.txt.gz"))
    options = {"device_type": "cpu", "gpu_capacity": None, "host_capacity": 64 << 30}
    plan = plan_run(load_config(head="dense"), shape, **options)
    parts = {part.name: part for part in plan.parts}
    assert parts["head initialisation"].host_bytes == min(4096, shape.num_labels) * 1024 * 4
    assert parts["head initialisation"].phase == "setup"


def test_a_dense_first_layer_gradient_kept_for_reuse_on_a_cpu(synthetic):
    """A CPU run over sparse rows keeps the pages of a freed dense first-layer gradient for the next step:
    a second table's worth; not a sparse gradient's, nor on a GPU."""
    shape = read_data_shape(str(synthetic / "train_bow.txt"))
    options = {"gpu_capacity": 139 << 30, "host_capacity": 64 << 30}
    kept = {}
    for device in ("cpu", "cuda"):
        for sparse in ("true", "false"):
            config = load_config(overrides=["model.hidden=[64]", f"model.sparse_grad={sparse}"])
            parts = {p.name: p for p in plan_run(config, shape, device_type=device, **options).parts}
            kept[device, sparse] = parts["encoder gradient kept"]
    assert kept["cpu", "false"].device_bytes == shape.num_features * 64 * 4
    assert kept["cpu", "false"].phase == "steady"
    assert kept["cpu", "true"].device_bytes == kept["cuda", "false"].device_bytes == 0


@pytest.fixture(scope="module")
def deb_tags_texts(repo_root):
    """The embedded deb-tags training texts and their featuriser's exact count under a few configs."""
    import gzip

    path = os.path.join(repo_root, "data", "deb-tags", "train.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as file:
        texts = [line.rstrip("\n").split("\t", 1)[-1] for line in file if line.strip()]
    return path, texts


VOCABULARIES = {
    "default": {},
    "min_df 5": {"min_df": 5},
    "words": {"word_ngrams": [1, 3], "char_ngrams": None, "min_df": 3},
    "characters": {"word_ngrams": None, "char_ngrams": [3, 5]},
}


@pytest.mark.parametrize("sample_bytes", [None, 300_000])
@pytest.mark.parametrize("name", list(VOCABULARIES))
def test_the_vocabulary_is_the_featurisers_count(deb_tags_texts, monkeypatch, name, sample_bytes):
    """A file within the sample is counted exactly (columns and stored features a row); from a sample
    (a sixth of the texts here) the count is extrapolated, never far under and not far over."""
    import megaclass.train.plan as plan

    path, texts = deb_tags_texts
    options = VOCABULARIES[name]
    featurizer = TextFeaturizer(from_dict(FeaturizerConfig, options, where="test"))
    exact = featurizer.fit_transform(texts)
    if sample_bytes is not None:
        monkeypatch.setattr(plan, "_SAMPLE_BYTES", sample_bytes)
    shape = read_data_shape(path, featurizer=options)
    if sample_bytes is None:
        assert shape.num_features == exact.num_columns
        assert shape.nonzeros_per_row == pytest.approx(exact.indices.size / len(texts))
    else:
        assert 0.97 * exact.num_columns <= shape.num_features <= 1.4 * exact.num_columns
        assert exact.indices.size / len(texts) <= shape.nonzeros_per_row  # every distinct n-gram a row


def test_a_text_plan_resolves_the_first_layer_as_the_run_does(deb_tags_texts):
    """On deb-tags' texts the run's featuriser has 85,804 columns: its first layer has a dense gradient
    (model.sparse_grad=auto) and the plan counts the weights, gradient and checkpoint of that table."""
    from megaclass.models.mlp import MLPConfig
    from megaclass.train.recipes import resolve_recipe

    path, texts = deb_tags_texts
    columns = TextFeaturizer().fit(texts).num_features
    config, keys = load_config_and_keys(None, ["train.epochs=1"], head="dense")
    plan = plan_for(
        config,
        path,
        resolve=lambda config, facts: resolve_recipe(config, keys, facts)[0],
        host_memory=8,
    )
    parts = {part.name: part for part in plan.parts}
    table = columns * 1024 * 4
    assert not MLPConfig().resolved_sparse_grad(columns)
    assert parts["encoder weights"].device_bytes >= table
    assert parts["encoder gradients"].device_bytes == parts["encoder weights"].device_bytes  # dense
    assert plan.checkpoint_bytes() < 1.1 * 3 * table and plan.refusal() is None  # fits in 8 GiB
