"""``train.cuda_graph``: where the head's step is captured, and (on a GPU) that a run computes the same
numbers replayed from the graph as launched op by op, across epoch ends, index rebuilds, rewirings and a
resume."""

import json
import os

import numpy as np
import pytest
import torch

from megaclass.data.synthetic import SynthConfig, synthesize
from megaclass.heads import HeadContext, build_head, head_config
from megaclass.heads.base import Head
from megaclass.schema import ConfigError
from megaclass.state_io import read_state
from megaclass.targets import RaggedLabels
from megaclass.train import Trainer, load_config
from megaclass.train.graphs import (
    CaptureError,
    StepGraph,
    batch_capacity,
    resolve_cuda_graph,
    whole_step_blocker,
)

CUDA = torch.device("cuda")  # resolve_cuda_graph reads the device type only: the decisions test on CPU too
MULTI_CLASS = HeadContext(in_features=8, num_classes=100, multilabel=False)


def _head(spec: dict, context: HeadContext = MULTI_CLASS) -> Head:
    return build_head(head_config(spec), context)


def _resolve(setting: str, head: Head, *, device=CUDA, multilabel: bool = False, world_size: int = 1):
    return resolve_cuda_graph(setting, head=head, device=device, multilabel=multilabel, world_size=world_size)


# ------------------------------------------------------------------------------------- the switch, on CPU


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_off_on_cpu(setting):
    choice = _resolve(setting, _head({"type": "dense"}), device=torch.device("cpu"))
    assert not choice.on
    assert "CUDA device" in choice.reason if setting == "auto" else choice.reason == "train.cuda_graph=off"


def test_on_on_cpu_names_the_device():
    with pytest.raises(ConfigError, match="train.cuda_graph=on.*the device is cpu"):
        _resolve("on", _head({"type": "dense"}), device=torch.device("cpu"))


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "dense"},
        {"type": "dense", "loss": "bce", "impl": "torch"},
        {"type": "sparse", "fan_in": 4, "aux_clusters": 0},
        {"type": "selected", "sample_num": 20, "index": {"type": "exact"}},
        {"type": "selected", "sample_num": 20, "index": {"type": "gpu"}},
        {"type": "partial_fc"},
    ],
)
def test_auto_captures_multi_class_heads(spec):
    head = _head(spec)
    assert _resolve("auto", head).on and _resolve("on", head).on
    assert not _resolve("off", head).on


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"type": "sparse", "fan_in": 4, "aux_clusters": 0, "impl": "reference"}, "head.impl=reference"),
        (
            {"type": "selected", "sample_num": 20, "index": {"type": "exact"}, "store": "host"},
            "head.store=host",
        ),
        ({"type": "selected", "sample_num": 20, "index": {"type": "annoy"}}, "head.index=annoy"),
        (
            {"type": "selected", "sample_num": 20, "index": {"type": "exact"}, "margin": {"kind": "arcface"}},
            "head.margin",
        ),
    ],
)
def test_auto_leaves_heads_with_host_work_eager(spec, reason):
    head = _head(spec)
    choice = _resolve("auto", head)
    assert not choice.on and reason in choice.reason
    with pytest.raises(ConfigError, match=f"train.cuda_graph=on: .*{reason}"):
        _resolve("on", head)


MULTI_LABEL = HeadContext(in_features=64, num_classes=100, multilabel=True)


@pytest.mark.parametrize("spec", [{"type": "dense"}, {"type": "sparse", "aux_clusters": 0}])
def test_auto_captures_multi_label_dense_and_sparse_heads(spec):
    head = _head(spec, MULTI_LABEL)
    assert _resolve("auto", head, multilabel=True).on and _resolve("on", head, multilabel=True).on


def test_multi_label_targets_are_not_captured_by_the_selected_head():
    head = _head({"type": "selected"}, MULTI_LABEL)
    assert "ragged" in _resolve("auto", head, multilabel=True).reason
    with pytest.raises(ConfigError, match="ragged"):
        _resolve("on", head, multilabel=True)


def test_several_processes_are_not_captured():
    choice = _resolve("auto", _head({"type": "dense"}), world_size=2)
    assert not choice.on and "2 processes" in choice.reason


def test_a_head_is_not_capturable_by_default():
    class Plain(Head):
        pass

    choice = _resolve("auto", Plain(MULTI_CLASS))
    assert not choice.on and "Plain does not declare its step capturable" in choice.reason
    assert Plain(MULTI_CLASS).graph_generators() == [] and Plain(MULTI_CLASS).graph_key() == ()


def test_full_multi_class_batches_fit():
    graph = StepGraph(_head({"type": "dense"}), batch_size=4, autocast_dtype=None)
    assert graph.fits(torch.tensor([1, 2, 3, 4]))
    assert not graph.fits(torch.tensor([1, 2, 3]))  # an epoch's smaller last batch runs eagerly
    assert not graph.fits(torch.zeros(4, 2, dtype=torch.int64))


def test_multi_label_batches_fit_within_the_batch_capacity():
    graph = StepGraph(_head({"type": "dense"}, MULTI_LABEL), batch_size=3, autocast_dtype=None)
    labels = RaggedLabels.from_lists([[1, 2], [], [3, 4, 5]])
    assert not graph.fits(labels) and graph.overflows == 0  # no capacity: multi-class targets only
    graph = StepGraph(graph.head, batch_size=3, autocast_dtype=None, label_capacity=5)
    assert graph.fits(labels) and graph.fits(RaggedLabels.from_lists([[], [], []]))
    assert not graph.fits(RaggedLabels.from_lists([[1], [2]]))  # a smaller last batch
    assert not graph.fits(labels.pad_to(5))  # padded already: the graph pads into its own buffers
    assert graph.overflows == 0
    assert not graph.fits(RaggedLabels.from_lists([[1, 2], [6], [3, 4, 5]]))  # 6 labels: runs eagerly
    assert graph.overflows == 1


def test_static_labels_are_padded_over_the_previous_step():
    graph = StepGraph(_head({"type": "dense"}), batch_size=3, autocast_dtype=None, label_capacity=6)
    steps = [RaggedLabels.from_lists([[1, 2], [], [3, 4, 5]]), RaggedLabels.from_lists([[7], [8], []])]
    features = torch.randn(3, 8)
    graph._prepare(("key",), features, steps[0])
    for labels in steps:
        graph._copy_targets(labels)
        static, expected = graph._targets, labels.pad_to(6)
        assert static.padded and static.to_lists() == labels.to_lists()
        assert torch.equal(static.indptr, expected.indptr) and torch.equal(static.indices, expected.indices)


def test_label_capacity_from_the_fullest_batch():
    row_labels = np.array([1, 2, 3, 9, 4, 0, 30])
    batches = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([6])]  # 3, 12, 4; 30 alone
    assert batch_capacity(row_labels, batches, batch_size=2) == 39  # 64 (12 * 1.25 rounded): over 30 + 9
    row_labels = np.array([40, 40, 40, 40] + [100, 0, 0, 0] * 4)  # the 4 fullest rows: 400 labels
    batches = [np.arange(start, start + 4) for start in range(0, 20, 4)]  # 160, then 100 each
    assert batch_capacity(row_labels, batches, batch_size=4) == 256  # 160 * 1.25 = 200, rounded up
    assert batch_capacity(np.zeros(4, dtype=np.int64), [np.arange(4)], batch_size=4) == 0


# -------------------------------------------------------------------------- what a captured step reads


def test_sparse_auxiliary_mix_follows_the_epoch():
    head = _head({"type": "sparse", "fan_in": 4, "aux_clusters": 3, "aux_cutoff_epoch": 2.0})
    # a head built without label features has no clusters: build them as a loaded state dict would
    head._build_aux(torch.arange(100) % 3, 3)
    head._aux_missing = False
    for epoch in (0.5, 1.5):
        head.after_step(1, epoch, lr=0.1)
        alpha = head.aux_alpha()
        assert alpha > 0
        assert head.aux_mix.tolist() == pytest.approx([1 - alpha, alpha], rel=1e-7)
        assert head.graph_key()[0] is True
    features, targets = torch.randn(4, 8), torch.tensor([1, 5, 9, 99])
    main = head.aux_mix[0] * _without_aux(head, features, targets)
    expected = main + head.aux_mix[1] * head._aux_loss(head._hidden(features), _ragged(targets))
    assert torch.equal(head(features, targets), expected)
    head.after_step(2, 2.0, lr=0.1)  # the cut-off: the auxiliary loss is off, a captured step is recaptured
    assert head.aux_alpha() == 0.0 and head.graph_key()[0] is False
    assert head.aux_mix.tolist() == [1.0, 0.0]


def _ragged(targets):
    from megaclass.targets import as_ragged

    return as_ragged(targets)


def _without_aux(head, features, targets):
    from megaclass.ops.fixed_fanin import combine_loss, fixed_fanin_rows_positive

    ragged = _ragged(targets)
    hidden = head._hidden(features)
    rows, positive = fixed_fanin_rows_positive(
        hidden, head.weight, head.index, ragged.sample_ids(), head.label_position[ragged.indices],
        head.bias, group=head.config.group, loss=head.loss_kind, impl=head.config.impl,
    )  # fmt: skip
    return combine_loss(rows, positive, ragged, head.loss_kind)


def test_sparse_rewiring_changes_the_graph_key():
    head = _head({"type": "sparse", "fan_in": 4, "aux_clusters": 0})
    before = head.graph_key()
    head.rewire(2)
    assert head.graph_key() != before


def test_selected_index_rebuild_changes_the_graph_key():
    head = _head({"type": "selected", "sample_num": 20, "index": {"type": "gpu"}})
    head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4])).backward()  # the first step builds the index
    built = head.graph_key()
    assert built[0] is True
    head.after_step(1, 0.0, lr=0.1)
    assert head.graph_key() == built
    head.rebuild_index()
    assert head.graph_key() != built


def test_selected_after_replay_hands_the_rows_to_after_step():
    head = _head({"type": "selected", "sample_num": 20, "index": {"type": "exact"}, "coverage_every": 1})
    features, targets = torch.randn(4, 8), torch.tensor([1, 2, 3, 4])
    loss = head(features, targets)
    loss.backward()
    ids, rows = head._pending
    head.after_step(1, 0.0, lr=0.1)
    assert head._pending is None
    # what a replay leaves: the selection and rows of the captured step, recorded again after each replay
    head._captured = (features, _selection_of(ids), rows)
    head._metrics.clear()
    head.after_replay()
    assert head._pending[0] is ids and head._pending[1] is rows
    assert 0 < head.metrics()["coverage"] <= 1 and head.metrics()["active_classes"] == 20


def _selection_of(ids):
    from megaclass.index import Selection

    zero = torch.zeros((), dtype=torch.int64)
    return Selection(ids, torch.zeros(4, dtype=torch.int64), zero, zero, torch.zeros(ids.numel()))


# --------------------------------------------------------------------------------------- the trainer


def _write_task(
    folder, *, classes: int, train_rows: int, test_rows: int, features: int, labels_per_doc: float = 1.0
) -> tuple[str, str]:
    config = SynthConfig(labels_per_doc=labels_per_doc, cluster_size=8)
    paths = (str(folder / "train.txt"), str(folder / "test.txt"))
    for stream, (path, rows) in enumerate(zip(paths, (train_rows, test_rows), strict=True)):
        synthesize(path, num_docs=rows, num_labels=classes, num_features=features, seed=0, stream=stream,
                   config=config)  # fmt: skip
    return paths


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    return _write_task(
        tmp_path_factory.mktemp("task"), classes=200, train_rows=150, test_rows=40, features=300
    )


@pytest.fixture(scope="module")
def multi_label_task(tmp_path_factory):
    return _write_task(
        tmp_path_factory.mktemp("multi_label_task"),
        classes=200,
        train_rows=150,
        test_rows=40,
        features=300,
        labels_per_doc=3.0,
    )


def _trainer(task, out, head: str, *overrides: str, resume: bool = False) -> Trainer:
    config = load_config(head=head, overrides=list(overrides))
    return Trainer(config, train_path=task[0], test_path=task[1], out_dir=str(out), resume=resume)


def test_trainer_refuses_on_without_cuda(small_task, tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(small_task, out, "dense", "train.cuda_graph=on", "train.device=cpu")
    with pytest.raises(ConfigError, match="train.cuda_graph=on: .*the device is cpu"):
        trainer.setup()
    assert not out.exists(), "refused before the run folder is written"


def test_trainer_logs_steps_per_second(small_task, tmp_path):
    trainer = _trainer(
        small_task, tmp_path, "dense", "model.hidden=[16]", "train.batch_size=32", "train.epochs=1",
        "train.log_every=2", "train.progress=false", "train.device=cpu", "train.valid_fraction=0",
    )  # fmt: skip
    trainer.setup()
    try:
        assert trainer.step_graph is None  # auto on CPU: off
        trainer.train()
    finally:
        trainer.close()
    with open(tmp_path / "log.jsonl") as file:
        records = [json.loads(line) for line in file if '"kind": "train"' in line]
    assert len(records) == 3  # 150 rows: windows of 2, 2 and the epoch's last step
    assert all(record["steps_per_s"] > 0 for record in records)


def test_trainer_pads_multi_label_targets_and_inputs_to_capacities_it_names(
    multi_label_task, tmp_path, monkeypatch, capsys
):
    trainer = _trainer(
        multi_label_task, tmp_path, "dense", "model.hidden=[16]", "train.batch_size=32",
        "train.progress=false", "train.device=cpu", "train.valid_fraction=0",
    )  # fmt: skip
    trainer.setup()
    try:
        assert trainer.train_data.multilabel and trainer.step_graph is None  # auto on CPU: off
        graph = trainer._step_graph()  # what a GPU run captures with
        row_labels, batches = trainer.train_data.labels.row_lengths(), trainer.loader.epoch_rows(0)
        assert graph.label_capacity == batch_capacity(row_labels, batches, batch_size=32) > 0
        assert graph.encoder is trainer.encoder  # an MLP over sparse rows: captured with the head
        row_nonzeros = trainer.train_data.features.row_lengths()
        assert graph.input_capacity == batch_capacity(row_nonzeros, batches, batch_size=32) > 0
        full = [trainer.train_data.batch(rows) for rows in batches if len(rows) == 32]
        assert all(graph.fits(batch.targets, batch.inputs) for batch in full)
        last = trainer.train_data.batch(batches[-1])
        assert not graph.fits(last.targets, last.inputs)  # 150 rows: 22 in the last
        trainer.step_graph = graph
        assert trainer._graph_counts() == {"graph_label_overflows": 0, "graph_input_overflows": 0}
        monkeypatch.setattr(trainer, "train_epoch", lambda epoch: False)  # the opening line only
        trainer.train()
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert f"multi-label targets padded to {graph.label_capacity} labels a batch" in out
    assert f"inputs padded to {graph.input_capacity} non-zeros a batch" in out


def test_an_encoder_of_other_inputs_leaves_the_head_alone_in_the_graph(small_task, tmp_path):
    trainer = _trainer(
        small_task, tmp_path, "dense", "model.hidden=[16]", "train.batch_size=32", "train.progress=false",
        "train.device=cpu", "train.valid_fraction=0", "optim.encoder_frozen_steps=5",
    )  # fmt: skip
    trainer.setup()
    try:
        assert trainer._whole_step_blocker() == "optim.encoder_frozen_steps: the encoder starts frozen"
        graph = trainer._step_graph()
        assert graph.encoder is None and graph.input_capacity is None
        assert "the encoder's run eagerly: optim.encoder_frozen_steps" in trainer._graph_reason(graph)
    finally:
        trainer.close()
    assert whole_step_blocker(torch.nn.Linear(2, 2), "sparse", frozen_steps=0) == (
        "Linear does not declare that padded sparse inputs compute the same"
    )
    assert whole_step_blocker(torch.nn.Linear(2, 2), "tokens", frozen_steps=0).startswith("the encoder reads")


def test_whole_step_graph_pads_sparse_inputs_with_zero_weights_in_the_last_row():
    from megaclass.data.batch import InputSpec, SparseInputs
    from megaclass.models.mlp import MLPConfig, MLPEncoder

    encoder = MLPEncoder(MLPConfig(hidden=(8,)), InputSpec(kind="sparse", num_features=10))
    graph = StepGraph(_head({"type": "dense"}), batch_size=2, autocast_dtype=None, encoder=encoder,
                      input_capacity=6)  # fmt: skip
    rows = SparseInputs.from_lists([[1, 7], [3]], [[0.5, 0.25], [2.0]])
    assert graph.fits(torch.tensor([0, 1]), rows)
    assert not graph.fits(
        torch.tensor([0, 1]), SparseInputs.from_lists([[1] * 4, [2] * 3], [[1.0] * 4, [1.0] * 3])
    )
    assert graph.input_overflows == 1
    graph._prepare(("a key",), rows, torch.tensor([0, 1]))  # the static buffers, as a first run makes
    graph._copy_inputs(rows)
    static = graph._inputs
    assert static.indices.tolist() == [1, 7, 3, 0, 0, 0] and static.indptr.tolist() == [0, 2, 6]
    assert static.weights.tolist() == [0.5, 0.25, 2.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(encoder(static), encoder(rows), rtol=0, atol=0)  # the pads add exact zeros


class _FailingCapture:
    """A head graph whose capture fails at the first full batch, as a head with a host sync's would."""

    label_capacity = None
    encoder = None

    def fits(self, targets, inputs=None) -> bool:
        return True

    def run(self, features, targets):
        raise CaptureError("the head's step could not be captured: operation not permitted when capturing")


def test_a_failed_capture_leaves_the_run_eager_and_says_so(small_task, tmp_path, capsys):
    settings = (
        "model.hidden=[16]", "train.batch_size=32", "train.epochs=1", "train.progress=false",
        "train.device=cpu", "train.valid_fraction=0",
    )  # fmt: skip
    eager = _trainer(small_task, tmp_path / "eager", "dense", *settings)
    eager.setup()
    try:
        eager.train()
    finally:
        eager.close()
    trainer = _trainer(small_task, tmp_path / "fell_back", "dense", *settings)
    trainer.setup()
    try:
        trainer.step_graph = _FailingCapture()
        trainer.train()
        assert trainer.step_graph is None
    finally:
        trainer.close()
    assert "cuda graph off from step 1: the head's step could not be captured" in capsys.readouterr().out
    assert _losses(tmp_path / "fell_back") == _losses(tmp_path / "eager")  # the failed step ran eagerly


# ---------------------------------------------------------------------------- on the GPU: the same run

_GPU_RUN = (
    "model.hidden=[64]",
    "train.batch_size=64",
    "train.epochs=2",
    "train.log_every=5",
    "train.progress=false",
    "train.valid_fraction=0",
    "train.device=cuda",
    "train.bf16=true",
)
_GPU_HEADS = {  # C ~ 5,000, D 64, B 64: 11 steps an epoch, the last of 17 rows
    "dense_softmax": ("dense", "head.loss=softmax"),
    # the MLP's first layer with a sparse gradient, its entries captured at the padded inputs' size
    "dense_sparse_grad": ("dense", "head.loss=softmax", "model.sparse_grad=true", "train.grad_clip=1.0"),
    "sparse_softmax": ("sparse", "head.fan_in=16", "head.aux_clusters=0", "head.dst.interval=4"),
    # the auxiliary loss on (its weight read from the device), then off from the cut-off: captured again
    "sparse_aux": (
        "sparse",
        "head.fan_in=16",
        "head.aux_clusters=auto",
        "head.aux_cutoff_epoch=1.5",
        "head.dst.interval=4",
    ),
    "selected_exact": (
        "selected",
        "head.index=exact",
        "head.sample_num=512",
        "head.interval=5",
        "head.coverage_every=3",
    ),
    "selected_gpu": (
        "selected",
        "head.index=gpu",
        "head.sample_num=512",
        "head.interval=5",
        "head.coverage_every=3",
    ),
    # rows in host memory mapped for the GPU: pulled by its kernels inside the graph, updated by them after it
    "selected_host": (
        "selected",
        "head.index=gpu",
        "head.sample_num=512",
        "head.interval=5",
        "head.coverage_every=3",
        "head.store=host",
    ),
}


@pytest.fixture(scope="module")
def gpu_task(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return _write_task(
        tmp_path_factory.mktemp("gpu_task"),
        classes=5000,
        train_rows=64 * 10 + 17,
        test_rows=256,
        features=2000,
    )


def _run(task, out, kind: str, *overrides: str, resume: bool = False) -> Trainer:
    trainer = _trainer(task, out, kind, *_GPU_RUN, *overrides, resume=resume)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def _losses(out) -> list[float]:
    with open(os.path.join(out, "log.jsonl")) as file:
        records = [json.loads(line) for line in file]
    return [loss for record in records if record["kind"] == "train" for loss in record["losses"]]


def _assert_same_model(out, reference) -> None:
    got, expected = read_state(os.path.join(out, "model")), read_state(os.path.join(reference, "model"))
    for part in ("encoder", "head"):
        assert got[part].keys() == expected[part].keys()
        for name, value in expected[part].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(got[part][name], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_GPU_HEADS))
def test_replayed_run_computes_the_eager_run(gpu_task, tmp_path, name):
    kind, *head_overrides = _GPU_HEADS[name]
    eager = _run(gpu_task, tmp_path / "off", kind, *head_overrides, "train.cuda_graph=off")
    assert eager.step_graph is None
    replayed = _run(gpu_task, tmp_path / "on", kind, *head_overrides, "train.cuda_graph=on")
    graph = replayed.step_graph
    assert graph.encoder is not None, "the MLP's step is captured with the head's"
    assert graph.replays >= 8, "most steps replay: 22 steps, 2 smaller last batches, eager warm-up steps"
    if kind != "dense":  # rewirings (sparse) and index rebuilds (selected) are captured again
        assert graph.captures >= 3
    np.testing.assert_allclose(_losses(tmp_path / "on"), _losses(tmp_path / "off"), rtol=1e-4, atol=1e-5)
    _assert_same_model(tmp_path / "on", tmp_path / "off")


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["auto", "on"])
def test_a_step_that_cannot_be_captured_runs_eagerly_under_auto(gpu_task, tmp_path, monkeypatch, setting):
    """A host sync inside the head's step fails its capture: auto goes on eagerly with the eager run's
    numbers, on stops with a configuration error."""
    kind, *head_overrides = _GPU_HEADS["sparse_softmax"]
    _run(gpu_task, tmp_path / "off", kind, *head_overrides, "train.cuda_graph=off")
    forward_backward = StepGraph._forward_backward

    def syncing(self):
        loss = forward_backward(self)
        loss.item()  # not permitted while the stream is captured
        return loss

    monkeypatch.setattr(StepGraph, "_forward_backward", syncing)
    if setting == "on":
        with pytest.raises(ConfigError, match="train.cuda_graph=on: the head's step could not be captured"):
            _run(gpu_task, tmp_path / "on", kind, *head_overrides, "train.cuda_graph=on")
        # the failed capture's random generators are no longer marked as capturing: eager draws work
        assert torch.nn.functional.dropout(torch.ones(64, device=CUDA), 0.5).count_nonzero() > 0
        return
    fell_back = _run(gpu_task, tmp_path / "auto", kind, *head_overrides, "train.cuda_graph=auto")
    assert fell_back.step_graph is None
    assert torch.nn.functional.dropout(torch.ones(64, device=CUDA), 0.5).count_nonzero() > 0
    np.testing.assert_allclose(_losses(tmp_path / "auto"), _losses(tmp_path / "off"), rtol=1e-4, atol=1e-5)
    _assert_same_model(tmp_path / "auto", tmp_path / "off")


@pytest.mark.gpu
def test_mapped_host_rows_train_as_rows_on_the_gpu(gpu_task, tmp_path):
    """The same rows drawn, selected, pulled and updated by the same kernels: a run on host rows mapped for
    the GPU computes the run on the GPU's own rows."""
    kind, *on_gpu = _GPU_HEADS["selected_gpu"]
    _run(gpu_task, tmp_path / "gpu", kind, *on_gpu, "train.cuda_graph=on")
    host = _run(gpu_task, tmp_path / "host", *_GPU_HEADS["selected_host"], "train.cuda_graph=on")
    assert host.step_graph.replays >= 8  # captured, as only rows mapped for the GPU are
    assert not host.head.store.mapped  # unlocked when the run ended
    np.testing.assert_allclose(_losses(tmp_path / "host"), _losses(tmp_path / "gpu"), rtol=1e-4, atol=1e-5)
    _assert_same_model(tmp_path / "host", tmp_path / "gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sparse_softmax", "selected_gpu", "selected_host", "dense_sparse_grad"])
def test_resumed_replayed_run_computes_the_eager_run(gpu_task, tmp_path, name):
    kind, *head_overrides = _GPU_HEADS[name]
    _run(gpu_task, tmp_path / "off", kind, *head_overrides, "train.cuda_graph=off")
    out = tmp_path / "resumed"
    stopped = _run(gpu_task, out, kind, *head_overrides, "train.cuda_graph=on", "train.stop_after_steps=13")
    assert stopped.state.global_step == 13
    _run(gpu_task, out, kind, *head_overrides, "train.cuda_graph=on", resume=True)
    np.testing.assert_allclose(_losses(out), _losses(tmp_path / "off"), rtol=1e-4, atol=1e-5)
    _assert_same_model(out, tmp_path / "off")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [{"type": "dense"}, {"type": "selected", "index": {"type": "exact"}}])
def test_head_step_graph_replays_the_eager_step(spec):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    context = HeadContext(in_features=64, num_classes=5000, multilabel=False)
    heads = [_head({**spec, "seed": 3}, context).to(CUDA) for _ in range(2)]
    graph = StepGraph(heads[1], batch_size=64, autocast_dtype=torch.bfloat16)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    for step in range(1, 7):
        features = torch.randn(64, 64, device=CUDA, generator=generator)
        targets = torch.randint(5000, (64,), device=CUDA, generator=generator)
        eager_features = features.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager_loss = heads[0](eager_features, targets)
        eager_loss.backward()
        loss, features_grad = graph.run(features, targets)
        torch.testing.assert_close(loss, eager_loss.detach(), msg=f"loss at step {step}")
        torch.testing.assert_close(features_grad, eager_features.grad, msg=f"features grad at step {step}")
        for (name, got), expected in zip(heads[1].named_parameters(), heads[0].parameters(), strict=True):
            torch.testing.assert_close(got.grad, expected.grad, msg=f"{name} grad at step {step}")
        for head in heads:
            head.after_step(step, 0.0, lr=0.1)
            for param in head.parameters():
                param.grad = None
    assert graph.captures == 1 and graph.replays >= 3  # eager warm-up steps, then replays


# multi-label: the targets padded to the run's label capacity (256 here: 64 rows of ~3 labels, the fullest
# batch of the first epoch 186); bce by default, softmax over each sample's positives
_GPU_MULTI_LABEL_HEADS = {
    "dense_bce": ("dense",),
    "dense_softmax": ("dense", "head.loss=softmax"),
    # the MLP's first layer with a sparse gradient, its entries captured at the padded inputs' size
    "dense_sparse_grad": ("dense", "head.loss=softmax", "model.sparse_grad=true", "train.grad_clip=1.0"),
    "sparse_bce": ("sparse", "head.fan_in=16", "head.aux_clusters=0", "head.dst.interval=4"),
    "sparse_hinge_aux": (
        "sparse",
        "head.fan_in=16",
        "head.loss=squared_hinge",
        "head.aux_clusters=auto",
        "head.aux_cutoff_epoch=1.5",
        "head.dst.interval=4",
    ),
}


@pytest.fixture(scope="module")
def gpu_multi_label_task(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return _write_task(
        tmp_path_factory.mktemp("gpu_multi_label_task"),
        classes=5000,
        train_rows=64 * 10 + 17,
        test_rows=256,
        features=2000,
        labels_per_doc=3.0,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_GPU_MULTI_LABEL_HEADS))
def test_replayed_multi_label_run_computes_the_eager_run(gpu_multi_label_task, tmp_path, name):
    kind, *head_overrides = _GPU_MULTI_LABEL_HEADS[name]
    eager = _run(gpu_multi_label_task, tmp_path / "off", kind, *head_overrides, "train.cuda_graph=off")
    assert eager.step_graph is None
    replayed = _run(gpu_multi_label_task, tmp_path / "on", kind, *head_overrides, "train.cuda_graph=auto")
    graph = replayed.step_graph
    assert graph is not None and graph.label_capacity == 256 and graph.overflows == 0
    assert graph.replays >= 8, "most steps replay: 22 steps, 2 smaller last batches, eager warm-up steps"
    if kind == "dense":
        # the dense kernels' input gradient adds class blocks with atomics, in no fixed order, and rounds to
        # bf16: two eager runs differ by a bf16 step there, and AdamW carries it into the weights
        np.testing.assert_allclose(_losses(tmp_path / "on"), _losses(tmp_path / "off"), rtol=1e-3, atol=1e-4)
        return
    np.testing.assert_allclose(_losses(tmp_path / "on"), _losses(tmp_path / "off"), rtol=1e-4, atol=1e-5)
    _assert_same_model(tmp_path / "on", tmp_path / "off")


@pytest.mark.gpu
def test_multi_label_batches_over_the_capacity_run_eagerly(gpu_multi_label_task, tmp_path, monkeypatch):
    """A capacity below some batches' label counts: those steps run eagerly, the rest replay, and the run
    computes the eager run's numbers; the log counts the batches run eagerly."""
    sparse = _GPU_MULTI_LABEL_HEADS["sparse_bce"]
    _run(gpu_multi_label_task, tmp_path / "off", *sparse, "train.cuda_graph=off")
    step_graph = Trainer._step_graph

    def low_label_capacity(self, **kwargs):
        graph = step_graph(self, **kwargs)
        graph.label_capacity = 175
        return graph

    monkeypatch.setattr(Trainer, "_step_graph", low_label_capacity)
    replayed = _run(gpu_multi_label_task, tmp_path / "on", *sparse, "train.cuda_graph=on")
    graph = replayed.step_graph
    assert graph.label_capacity == 175 and graph.overflows >= 4 and graph.replays >= 4
    np.testing.assert_allclose(_losses(tmp_path / "on"), _losses(tmp_path / "off"), rtol=1e-4, atol=1e-5)
    _assert_same_model(tmp_path / "on", tmp_path / "off")
    with open(tmp_path / "on" / "log.jsonl") as file:
        counts = [
            record["graph_label_overflows"] for record in map(json.loads, file) if record["kind"] == "train"
        ]
    assert counts[-1] == graph.overflows and counts == sorted(counts)


def _random_labels(
    batch: int, most: int, classes: int, generator: torch.Generator, *, least: int = 0
) -> RaggedLabels:
    """Distinct labels of each of ``batch`` rows, ``least .. most`` of them."""
    counts = torch.randint(least, most + 1, (batch,), generator=generator).tolist()
    return RaggedLabels.from_lists(
        [torch.randperm(classes, generator=generator)[:n].tolist() for n in counts]
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "spec", [{"type": "dense"}, {"type": "dense", "loss": "softmax"}, {"type": "sparse", "aux_clusters": 0}]
)
def test_head_step_graph_replays_the_eager_multi_label_step(spec):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    context = HeadContext(in_features=64, num_classes=5000, multilabel=True)
    heads = [_head({**spec, "fan_in": 16} if spec["type"] == "sparse" else spec, context) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    heads = [head.to(CUDA) for head in heads]
    graph = StepGraph(heads[1], batch_size=64, autocast_dtype=torch.bfloat16, label_capacity=256)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        features = torch.randn(64, 64, generator=generator).to(CUDA)
        least = 5 if step == 5 else 0  # step 5: 64 rows of 5 to 7 labels, over the capacity (eager)
        targets = _random_labels(64, 7 if step == 5 else 5, 5000, generator, least=least).to(CUDA)
        eager_features = features.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager_loss = heads[0](eager_features, targets)
        eager_loss.backward()
        if graph.fits(targets):
            loss, features_grad = graph.run(features, targets)
        else:
            assert step == 5 and targets.indices.numel() > 256
            replayed_features = features.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = heads[1](replayed_features, targets)
            loss.backward()
            features_grad = replayed_features.grad
        torch.testing.assert_close(loss, eager_loss.detach(), rtol=1e-4, atol=1e-5, msg=f"loss at {step}")
        # the dense kernels add the input gradient's class blocks with atomics, in no fixed order, and round
        # it to bf16: a bf16 step apart
        tolerance = {"rtol": 2**-7, "atol": 1e-3} if spec["type"] == "dense" else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(
            features_grad, eager_features.grad, **tolerance, msg=f"features grad at {step}"
        )
        for (name, got), expected in zip(heads[1].named_parameters(), heads[0].parameters(), strict=True):
            torch.testing.assert_close(got.grad, expected.grad, **tolerance, msg=f"{name} at {step}")
        for head in heads:
            head.after_step(step, 0.0, lr=0.1)
            for param in head.parameters():
                param.grad = None
    assert graph.overflows == 1 and graph.captures >= 1 and graph.replays >= 3
