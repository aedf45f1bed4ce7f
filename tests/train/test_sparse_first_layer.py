"""``megaclass train`` with ``model.sparse_grad``: the MLP's first layer trained by lazy row updates, clipped
with the rest, written into the run's config, and resumed to the uninterrupted run's numbers."""

import json

import pytest
import yaml

from megaclass.cli import main

pytestmark = pytest.mark.integration

_SETTINGS = [
    "train.device=cpu",
    "model.hidden=[16]",
    "head.loss=softmax",
    "optim.encoder.lr=0.01",
    "optim.head.lr=0.01",
    "train.batch_size=32",
    "train.cpu_threads=1",
    "train.log_every=1",
    "train.progress=false",
    "train.grad_clip=0.5",
    "train.valid_fraction=0",
]


def _records(out) -> list[dict]:
    with open(out / "log.jsonl") as file:
        records = [json.loads(line) for line in file]
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in records]


@pytest.fixture(scope="module")
def data(deb_tags_slice):
    return deb_tags_slice(96, 40)


def _argv(data, out, *settings):
    train, test = data
    return ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "2", "--set", *settings]


def test_a_sparse_first_layer_trains_and_resumes_exactly(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_argv(data, full, *_SETTINGS, "model.sparse_grad=true")) == 0
    assert main(_argv(data, cut, *_SETTINGS, "model.sparse_grad=true", "train.stop_after_steps=4")) == 0
    assert main([*_argv(data, cut, *_SETTINGS, "model.sparse_grad=true"), "--resume"]) == 0
    assert _records(cut) == _records(full)
    assert yaml.safe_load((full / "config.yaml").read_text())["model"]["sparse_grad"] is True
    losses = [r["loss"] for r in _records(full) if r["kind"] == "train"]
    assert losses[-1] < losses[0]


def test_the_dense_and_sparse_first_layers_start_alike(data, tmp_path):
    """The first step's loss is the same (the update differs only in the rows it moves: the second step's
    loss may differ); ``auto`` on a small vocabulary resolves to a dense gradient, in config.yaml."""
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    assert main(_argv(data, dense, *_SETTINGS, "train.stop_after_steps=1")) == 0
    assert main(_argv(data, sparse, *_SETTINGS, "train.stop_after_steps=1", "model.sparse_grad=true")) == 0
    first = [[r["loss"] for r in _records(out) if r["kind"] == "train"][0] for out in (dense, sparse)]
    assert first[0] == first[1]
    assert yaml.safe_load((dense / "config.yaml").read_text())["model"]["sparse_grad"] is False
