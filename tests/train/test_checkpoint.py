"""Checkpoints: exact round trips of nested state, optimizer continuation, atomic writes, pruning."""

import os
import random

import numpy as np
import pytest
import torch

from megaclass.train import checkpoint


def _nested_state():
    return {
        "weights": {"a": torch.randn(3, 5), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)},
        "dtypes": [
            torch.arange(6, dtype=torch.int64),
            torch.ones(2, dtype=torch.bool),
            torch.randn(4).to(torch.bfloat16),
            torch.randint(0, 255, (7,), dtype=torch.uint8),
        ],
        "numpy": np.arange(5, dtype=np.uint32),
        "python": random.getstate(),
        3: ("tuple", 1, 2.0, None, True),
        "view": torch.arange(12.0).reshape(3, 4)[:, 1],
    }


def _assert_equal(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_round_trip_is_exact(tmp_path):
    state = _nested_state()
    path = checkpoint.save_checkpoint(str(tmp_path / "ckpt"), 7, state)
    assert os.path.basename(path) == "step_000000007"
    assert checkpoint.latest_checkpoint(str(tmp_path / "ckpt")) == path
    _assert_equal(state, checkpoint.load_checkpoint(path))


def test_unstorable_value_names_its_key():
    with pytest.raises(TypeError, match="'outer.bad'"):
        checkpoint.flatten({"outer": {"bad": object()}})


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_continues_exactly(tmp_path, name):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        make_optimizer = {
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        }[name]
        return model, make_optimizer(model.parameters())

    def step(model, optimizer, seed):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    model, optimizer = make()
    for seed in range(3):
        step(model, optimizer, seed)
    saved = checkpoint.save_checkpoint(
        str(tmp_path), 3, {"model": model.state_dict(), "optim": optimizer.state_dict()}
    )
    for seed in range(3, 6):
        step(model, optimizer, seed)

    restored, restored_optimizer = make()
    state = checkpoint.load_checkpoint(saved)
    restored.load_state_dict(state["model"])
    restored_optimizer.load_state_dict(state["optim"])
    for seed in range(3, 6):
        step(restored, restored_optimizer, seed)
    for a, b in zip(model.parameters(), restored.parameters(), strict=False):
        assert torch.equal(a, b)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    folder = str(tmp_path)
    first = checkpoint.save_checkpoint(folder, 1, {"x": torch.ones(3)})
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(folder, 2, {"x": torch.zeros(3)})
    assert checkpoint.latest_checkpoint(folder) == first
    assert sorted(os.listdir(folder)) == ["latest.json", "step_000000001"], "no temporary left behind"
    assert torch.equal(checkpoint.load_checkpoint(first)["x"], torch.ones(3))


def test_keeps_the_newest(tmp_path):
    folder = str(tmp_path)
    for step in range(1, 6):
        checkpoint.save_checkpoint(folder, step, {"step": step}, keep=2)
    assert sorted(os.listdir(folder)) == ["latest.json", "step_000000004", "step_000000005"]
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(folder)) == {"step": 5}


def test_overwrite_state_folder(tmp_path):
    folder = str(tmp_path / "model")
    checkpoint.write_state(folder, {"w": torch.ones(2)})
    checkpoint.write_state(folder, {"w": torch.zeros(2)})
    assert torch.equal(checkpoint.read_state(folder)["w"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["model"]


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest_checkpoint(str(tmp_path / "missing")) is None
