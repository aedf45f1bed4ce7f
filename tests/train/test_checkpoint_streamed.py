"""Checkpoints of a row-store head: its rows are written from the store and read back into it block by block
(never a second copy), in float32 and in bf16 with stochastic rounding, and resuming continues exactly."""

import pytest
import torch

from megaclass.distributed.checkpoint import load_whole_head
from megaclass.heads import HeadContext, build_head, head_config
from megaclass.state_io import SavedTensor
from megaclass.train import checkpoint
from megaclass.train.export import load_run_weights, read_export


def _head(store: str, store_dtype: str):
    options = {"index": {"type": "exact"}, "store": store, "store_dtype": store_dtype, "interval": 2}
    config = head_config(
        {"type": "selected", "sample_num": 20, "coverage_every": 0, "optimizer": {"kind": "adamw"}, **options}
    )
    return build_head(config, HeadContext(in_features=12, num_classes=97, multilabel=False))


@pytest.mark.parametrize("store", ["gpu", "host"])
@pytest.mark.parametrize("store_dtype", ["float32", "bf16_sr"])
def test_a_row_store_head_resumes_exactly_from_streamed_rows(tmp_path, store, store_dtype, train_head):
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(6, 12, generator=generator), torch.randint(97, (6,), generator=generator))
        for _ in range(6)
    ]
    head = _head(store, store_dtype)
    train_head(head, batches[:3], 1, lr=0.05)
    held = torch.bfloat16 if store_dtype == "bf16_sr" else torch.float32
    assert head.store.rows().dtype == held
    path = checkpoint.save_checkpoint(str(tmp_path), 3, {"head": head.state_dict(), "step": 3})
    loaded = checkpoint.load_checkpoint(path)
    streamed = {key for key, value in loaded["head"].items() if isinstance(value, SavedTensor)}
    assert streamed == {key for key in head.state_dict() if key.startswith("store.")}
    assert loaded["head"]["store.weight"].dtype == held

    resumed = _head(store, store_dtype)  # fresh rows and state, overwritten from the file
    load_whole_head(resumed, None, state=loaded["head"], optimizer_state=None)
    for name, tensor in head.store.state_dict().items():
        restored = resumed.store.state_dict()[name]
        assert restored.dtype == tensor.dtype and torch.equal(restored, tensor), name
    assert train_head(resumed, batches[3:], 4, lr=0.05) == train_head(head, batches[3:], 4, lr=0.05)
    assert torch.equal(resumed.store.rows(), head.store.rows())


def test_weights_folders_stream_row_store_entries_only(tmp_path):
    head = _head("host", "float32")
    state = {"encoder": {"w": torch.randn(3, 3)}, "head": head.state_dict()}
    folder = str(tmp_path / "model")
    checkpoint.save_checkpoint(str(tmp_path / "ck"), 1, state)
    from megaclass.state_io import write_state

    write_state(folder, state)
    weights = load_run_weights(folder)
    assert isinstance(weights["encoder"]["w"], torch.Tensor)
    assert isinstance(weights["head"]["store.optim.exp_avg"], SavedTensor)
    assert isinstance(weights["head"]["selection.dirty"], torch.Tensor)
    assert checkpoint.is_row_store_entry("head.store.weight")
    assert not checkpoint.is_row_store_entry("encoder.store.weight")


def _run_folder(tmp_path):
    """A run folder as training leaves it, but for its weights: config, run facts and label counts."""
    import numpy as np

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("head: {type: selected}\n")
    (run / "run.json").write_text("{}")
    np.save(run / "label_counts.npy", np.arange(97))
    return run


def test_export_streams_a_row_store_head_into_one_file(tmp_path):
    from megaclass.state_io import write_state
    from megaclass.train.export import export_run

    head = _head("host", "bf16_sr")
    run = _run_folder(tmp_path)
    encoder = {"layer.weight": torch.randn(12, 5)}
    write_state(str(run / "model"), {"encoder": encoder, "head": head.state_dict()})
    out = export_run(str(run), str(tmp_path / "out" / "model.safetensors"))
    parts, metadata = read_export(out)
    assert metadata["config.yaml"] == "head: {type: selected}\n"
    assert torch.equal(parts["encoder"]["layer.weight"], encoder["layer.weight"])
    for name, tensor in head.state_dict().items():
        assert parts["head"][name].dtype == tensor.dtype and torch.equal(parts["head"][name], tensor), name
    assert torch.equal(parts["run"]["label_counts"], torch.arange(97))


def test_export_of_an_unfinished_run_holds_its_heads_weights_alone(tmp_path):
    """A run without ``model/`` exports its newest checkpoint: the weights the checkpoint names, not its rows'
    optimizer state, the selection's state or the index."""
    import shutil

    from megaclass.train.export import export_run

    head = _head("host", "float32")
    run = _run_folder(tmp_path)
    state = {"encoder": {"w": torch.randn(2)}, "head": head.state_dict(), "step": 5}
    checkpoint.save_checkpoint(str(run / "checkpoints"), 5, {**state, "head_weights": ["store.weight"]})
    with pytest.warns(checkpoint.CheckpointWarning, match="no final weights"):
        parts, _ = read_export(export_run(str(run), str(tmp_path / "a.safetensors")))
    assert set(parts["head"]) == {"store.weight"} and torch.equal(
        parts["head"]["store.weight"], head.store.rows()
    )
    shutil.rmtree(run / "checkpoints")  # a checkpoint that names no weights exports its whole head
    checkpoint.save_checkpoint(str(run / "checkpoints"), 5, state)
    with pytest.warns(checkpoint.CheckpointWarning):
        parts, _ = read_export(export_run(str(run), str(tmp_path / "b.safetensors")))
    assert set(parts["head"]) == set(head.state_dict())
