"""The face pipeline through the real CLI: decode-rec, train with a margin head and verification during
training, extract (plain and flip-fused), verify from features and from the run.

The backbone is a tiny IResNet that sees the fixture's 112x112 faces resized to 56x56 (``model.input_size``),
so 150 steps fit the CPU test budget.
"""

import json
import os

import numpy as np
import pytest
import torch

from megaclass.cli import main
from megaclass.data.verification_bin import load_verification_bin

TRAIN_ARGS = [
    "--head", "dense",
    "--set", "head.margin.kind=cosface", "head.margin.scale=16", "head.margin.margin=0.3", "head.bias=false",
    "model.type=iresnet18", "model.layers=[1,1,1,1]", "model.widths=[8,16,32,64]", "model.embedding_size=64",
    "model.input_size=56",
    "train.epochs=15", "train.batch_size=32", "train.eval_every=15", "train.progress=false",
    "train.device=cpu",
    "optim.encoder.name=sgd", "optim.head.name=sgd", "optim.encoder.lr=0.1", "optim.head.lr=0.1",
    "optim.encoder.weight_decay=5e-4", "optim.head.weight_decay=5e-4", "optim.warmup_steps=10",
]  # fmt: skip


def _run(argv, capsys):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.slow
@pytest.mark.integration
def test_train_extract_verify(tmp_path, fixture_dir, fixture_bin, capsys):
    decoded, run = tmp_path / "decoded", tmp_path / "run"
    _run(["data", "decode-rec", fixture_dir, decoded], capsys)
    out = _run(
        ["train", "--train", os.path.join(fixture_dir, "train.rec"), "--test", decoded / "val_list.txt",
         "--out", run, *TRAIN_ARGS, f"eval.verification=[{fixture_bin}]"],
        capsys,
    )  # fmt: skip
    assert "verify: accuracy" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["verify/accuracy"] >= 0.8, metrics
    assert metrics["steps"] == 150

    pairs = load_verification_bin(fixture_bin)
    _run(
        ["extract", "--run", run, "--data", fixture_bin, "--out", tmp_path / "plain.npy", "--device", "cpu"],
        capsys,
    )
    _run(["extract", "--run", run, "--data", fixture_bin, "--out", tmp_path / "flip.npy", "--flip"], capsys)
    plain, fused = np.load(tmp_path / "plain.npy"), np.load(tmp_path / "flip.npy")
    assert plain.shape == fused.shape == (len(pairs.images), 64) and plain.dtype == np.float32
    assert not np.allclose(plain, fused)

    results = {}
    for name, source in [
        ("features", ["--features", tmp_path / "plain.npy"]),
        ("run", ["--run", run, "--batch-size", 1024]),
        ("features-flip", ["--features", tmp_path / "flip.npy"]),
        ("run-flip", ["--run", run, "--flip", "--batch-size", 1024]),
    ]:
        text = _run(["verify", "--data", fixture_bin, *source, "--json", tmp_path / f"{name}.json"], capsys)
        assert text.startswith("verify: accuracy ")
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for a, b in [("features", "run"), ("features-flip", "run-flip")]:
        for key in ("accuracy", "accuracy_std", "threshold", "tar", "far"):
            assert results[a][key] == pytest.approx(results[b][key], abs=1e-6), (a, b, key)
    assert results["features"]["accuracy"] >= 0.8
    # the trainer's verification uses flip fusion and the same batches: the same numbers
    assert metrics["verify/accuracy"] == pytest.approx(results["run-flip"]["accuracy"], abs=1e-6)

    val = tmp_path / "val.npy"
    _run(
        ["extract", "--run", run, "--data", decoded / "val_list.txt", "--out", val, "--batch-size", 8], capsys
    )
    assert np.load(val).shape == (40, 64) and np.isfinite(np.load(val)).all()
    _run(["data", "make-rec", decoded / "val_list.txt", tmp_path / "valrec"], capsys)
    assert (tmp_path / "valrec" / "property").read_text() == "40,112,112"

    json_out = _run(
        ["verify", "--data", fixture_bin, "--features", tmp_path / "plain.npy", "--json", "-"], capsys
    )
    assert json.loads(json_out)["accuracy"] == results["features"]["accuracy"]


def test_verify_rejects_mismatched_features(tmp_path, fixture_bin, capsys):
    np.save(tmp_path / "short.npy", np.ones((10, 4), dtype=np.float32))
    code = main(["verify", "--data", fixture_bin, "--features", str(tmp_path / "short.npy")])
    assert code == 2
    assert "shape (10, 4), expected (120, D)" in capsys.readouterr().err


@pytest.mark.integration
def test_resume_is_bit_exact(tmp_path, fixture_dir, capsys):
    """A face run stopped mid-epoch and resumed ends with an uninterrupted run's weights (flips included)."""
    from megaclass.state_io import read_state

    train = os.path.join(fixture_dir, "train.rec")
    common = [
        "--train", train, "--test", train, "--head", "dense",
        "--set", "head.margin.kind=arcface", "head.bias=false", "model.type=iresnet18",
        "model.layers=[1,1,1,1]", "model.widths=[4,8,8,8]", "model.embedding_size=16", "model.input_size=32",
        "train.epochs=2",
        "train.batch_size=64", "train.progress=false", "train.device=cpu", "optim.encoder.name=sgd",
    ]  # fmt: skip
    _run(["train", "--out", tmp_path / "whole", *common], capsys)
    _run(["train", "--out", tmp_path / "parts", *common, "train.stop_after_steps=7"], capsys)
    assert not (tmp_path / "parts" / "model").exists()
    _run(["train", "--out", tmp_path / "parts", "--resume", *common], capsys)
    whole, parts = (
        read_state(str(tmp_path / "whole" / "model")),
        read_state(str(tmp_path / "parts" / "model")),
    )
    for part in ("encoder", "head"):
        assert whole[part].keys() == parts[part].keys()
        for name, tensor in whole[part].items():
            assert torch.equal(tensor, parts[part][name]), f"{part}.{name}"


def test_extract_and_verify_refuse_a_run_that_reads_no_images(tmp_path, fixture_bin, deb_tags_slice, capsys):
    train, test = deb_tags_slice(100, 20)
    out = tmp_path / "bow"
    settings = ["model.hidden=[16]", "train.progress=false"]
    argv = ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "1", "--set", *settings]
    assert main(argv) == 0
    capsys.readouterr()
    for argv in (
        ["extract", "--run", str(out), "--data", fixture_bin, "--out", str(tmp_path / "x.npy")],
        ["verify", "--run", str(out), "--data", fixture_bin],
    ):
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        assert f"--run {out}: its model reads sparse inputs, not face images" in error
    assert not (tmp_path / "x.npy").exists()
