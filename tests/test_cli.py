"""The real CLI end to end on a small slice of the embedded deb-tags data: train, resume, eval, predict."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from megaclass.cli import COMMANDS, main
from megaclass.data.featurizer import TextFeaturizer
from megaclass.dst import DSTConfig, rewire_fraction
from megaclass.train.config import load_config
from megaclass.train.inference import load_run
from megaclass.train.memory import format_head_memory

pytestmark = pytest.mark.integration


_TINY = [
    "--set",
    "train.device=cpu",  # bit-exact comparisons: GPU kernels add with atomics, in no fixed order
    "model.hidden=[48]",
    "model.dropout=0.1",
    "head.loss=softmax",
    "optim.encoder.lr=0.01",
    "optim.head.lr=0.01",
    "optim.warmup_steps=3",
    "train.batch_size=32",
    "train.log_every=1",
    "train.progress=false",
    "train.cpu_threads=1",  # module-scoped runs start before the per-test thread count is set: fix it here
    "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def tiny(deb_tags_slice):
    return deb_tags_slice(320, 100)


def _train(tiny, out, *extra):
    train, test = tiny
    return main(
        ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "3", *_TINY, *extra]
    )


def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as file:
        records = [json.loads(line) for line in file]
    return [(r["step"], loss) for r in records if r["kind"] == "train" for loss in r["losses"]]


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert _train(tiny, out) == 0
    return out


def test_train_writes_the_run_folder(full_run):
    with open(full_run / "metrics.json") as file:
        metrics = json.load(file)
    for key in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "train_seconds", "peak_memory_bytes"):
        assert key in metrics, key
    assert 0 <= metrics["P@5"] <= metrics["P@1"] <= 1 and metrics["peak_memory_bytes"] > 0
    for name in ("config.yaml", "run.json", "report.md", "report.png", "log.jsonl", "model", "checkpoints"):
        assert (full_run / name).exists(), name
    losses = [loss for _, loss in _losses(full_run)]
    assert len(losses) == 3 * 10
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), "the training loss must fall"


def test_a_run_without_a_test_file_is_scored_on_its_validation_rows(tiny, full_run, tmp_path, capsys):
    out = tmp_path / "untested"
    train, test = tiny
    assert main(["train", "--train", train, "--out", str(out), "--epochs", "3", *_TINY]) == 0
    printed = capsys.readouterr().out
    assert "test (curve)" not in printed and "validation (epoch 3; no --test): P@1 " in printed
    assert _losses(out) == _losses(full_run)  # the test file takes no part in training
    metrics = json.loads((out / "metrics.json").read_text())
    tested = json.loads((full_run / "metrics.json").read_text())
    assert "P@1" not in metrics and metrics["valid_P@1"] == tested["valid_P@1"]
    assert metrics["valid_P@5"] <= metrics["valid_P@1"] and metrics["epoch_kept"] == tested["epoch_kept"]
    assert "test_file" not in json.loads((out / "run.json").read_text())
    assert "| valid_P@1 |" in (out / "report.md").read_text()
    assert "| epoch | train_loss | valid P@1 |" in (out / "report.md").read_text()
    # a resume takes the run's files (no test file) and may add one: the extended run is scored on it
    assert main(["train", "--resume", "--out", str(out), "--epochs", "4", *_TINY]) == 0
    assert "validation (epoch 4; no --test)" in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(out), "--test", test, "--epochs", "5", *_TINY]) == 0
    assert "test (epoch 5): P@1 " in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["test_file"]["path"] == os.path.abspath(test)
    assert "P@1" in json.loads((out / "metrics.json").read_text())
    bare = tmp_path / "bare"  # no test file and no validation rows: trained, and said to be unscored
    assert main(["train", "--train", train, "--out", str(bare), *_TINY, "train.valid_fraction=0"]) == 0
    assert "the run is not scored" in capsys.readouterr().out
    assert (bare / "model").is_dir()


def test_resume_continues_bit_exactly(tiny, full_run, tmp_path):
    out = tmp_path / "resumed"
    assert _train(tiny, out, "train.stop_after_steps=14") == 0  # mid-epoch 2
    assert not (out / "metrics.json").exists()
    assert _train(tiny, out, "--resume") == 0
    assert _losses(out) == _losses(full_run)
    with open(out / "metrics.json") as a, open(full_run / "metrics.json") as b:
        resumed, full = json.load(a), json.load(b)
    assert {k: v for k, v in resumed.items() if "@" in k} == {k: v for k, v in full.items() if "@" in k}


def test_a_resume_naming_only_its_folder_continues_on_what_the_run_recorded(tiny, full_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert _train(tiny, out, "train.stop_after_steps=14") == 0
    stopped = capsys.readouterr().out  # a stopped run reports its peak memory too, and how to go on
    assert re.search(
        r"stopped after step 14 \(train.stop_after_steps\); peak memory [0-9.]+ [KMG]i?B", stopped
    )
    assert f"continue it with: megaclass train --resume --out {out}" in stopped
    assert main(["train", "--resume", "--out", str(out), "--set", "train.progress=false"]) == 0
    printed = capsys.readouterr().out
    assert f"--resume: --train {tiny[0]}, --test {tiny[1]} (as {out / 'run.json'} records them)" in printed
    # the settings the run was given are given again: its own recipe line, no value named as kept
    recipe = next(line for line in printed.splitlines() if line.startswith("recipe:"))
    assert "resumed" not in recipe and "model.hidden" not in recipe
    # the recorded settings, not the recipe's (the log's windows are this resume's: train.log_every)
    assert [loss for _, loss in _losses(out)] == [loss for _, loss in _losses(full_run)]
    # the test scores once, on the trainer's line; the command's last line says time, memory and folder
    scores = [line for line in printed.splitlines() if line.startswith(("test (epoch", "P@1"))]
    assert len(scores) == 1 and re.match(r"test \(epoch \d\): P@1 0\.\d{4}  P@3 ", scores[0])
    assert printed.splitlines()[-1].startswith("train time ") and str(out) in printed.splitlines()[-1]
    shutil.rmtree(out / "checkpoints")  # as a run killed before its first checkpoint: step 0, as recorded
    os.remove(out / "metrics.json")
    shutil.rmtree(out / "model")
    assert main(["train", "--resume", "--out", str(out), "--set", "train.progress=false"]) == 0
    assert [loss for _, loss in _losses(out)] == [loss for _, loss in _losses(full_run)]


def test_the_plan_of_a_resume_is_that_of_the_settings_its_run_recorded(tiny, tmp_path, capsys):
    out = tmp_path / "planned"
    assert _train(tiny, out, "train.stop_after_steps=2") == 0
    capsys.readouterr()
    assert _train(tiny, tmp_path / "other", "--dry-run") == 0
    printed = capsys.readouterr().out.splitlines()
    planned = [line for line in printed if line.startswith(("memory plan", "encoder"))]
    recipe = printed[0]
    assert recipe.startswith("recipe: xmc-mlp") and "resumed" not in recipe  # the run's recipe line
    assert main(["train", "--resume", "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    resumed = [line for line in printed if line.startswith(("memory plan", "encoder"))]
    assert resumed == planned and "D 48" in planned[0]  # model.hidden=[48], not the recipe's [1024]
    assert printed[1] == recipe  # the settings the run was given, given again


def test_a_run_whose_memory_plan_does_not_fit_is_refused_before_it_starts(
    tiny, tmp_path, capsys, monkeypatch
):
    from megaclass import cli
    from megaclass.errors import RunDoesNotFit
    from megaclass.train import loop, plan

    checked, out = tmp_path / "checked", tmp_path / "small"
    assert _train(tiny, checked, "train.stop_after_steps=2") == 0  # fits this machine
    monkeypatch.setattr(plan, "machine_memory", lambda *args, **kwargs: (None, 1 << 20))  # a host of 1 MiB
    capsys.readouterr()
    assert _train(tiny, out) == 3
    error = capsys.readouterr().err
    assert error.startswith("megaclass train: error: the run does not fit: host memory needs")
    assert error.count("\n") == 1
    assert "to shrink it:" in error and "--no-fit-check starts the run anyway" in error
    assert not out.exists()  # nothing written
    monkeypatch.setattr(cli, "_forward_to_torchrun", lambda *args: pytest.fail("ranks started"))
    assert _train(tiny, out, "--nproc-per-node", "2") == 3  # checked before the ranks start
    with pytest.raises(RunDoesNotFit, match="host memory needs"):  # the Python API alike
        loop.train(load_config(overrides=_TINY[1:]), train_path=tiny[0], test_path=tiny[1], out_dir=str(out))
    assert _train(tiny, out, "train.stop_after_steps=2", "--no-fit-check") == 0  # started anyway
    assert _losses(out) == _losses(checked)  # the check leaves the run as it is (its seed: after the plan)
    assert _train(tiny, out, "train.stop_after_steps=4", "--resume") == 0  # a resume is not checked


def test_a_resume_without_data_files_names_what_is_missing(tiny, tmp_path, capsys):
    out = tmp_path / "moved"
    assert main(["train", "--out", str(out), "--test", tiny[1]]) == 2
    assert "--train required (a --resume takes the files its run recorded)" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert f"{out} holds no run.json to take --train from; pass it" in capsys.readouterr().err
    train = tmp_path / "train.txt"
    shutil.copy(tiny[0], train)
    assert (
        main(
            [
                "train",
                "--train",
                str(train),
                "--test",
                tiny[1],
                "--out",
                str(out),
                *_TINY,
                "train.stop_after_steps=2",
            ]
        )
        == 0
    )
    train.unlink()
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert (
        f"--train {train}, as {out / 'run.json'} records it, does not exist here" in capsys.readouterr().err
    )


def test_a_rerun_into_a_finished_run_is_refused_until_overwrite(tiny, full_run, tmp_path, capsys):
    files = sorted(str(path.relative_to(full_run)) for path in full_run.rglob("*"))
    stamps = {name: os.stat(full_run / name).st_mtime_ns for name in files}
    capsys.readouterr()
    assert _train(tiny, full_run) == 2
    error = capsys.readouterr().err
    assert f"--out {full_run} holds a run" in error and "--resume" in error and "--overwrite" in error
    assert sorted(str(path.relative_to(full_run)) for path in full_run.rglob("*")) == files
    assert {name: os.stat(full_run / name).st_mtime_ns for name in files} == stamps
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    assert _train(tiny, copy, "--overwrite") == 0
    assert _losses(copy) == _losses(full_run)


def test_resume_refuses_a_changed_config(tiny, tmp_path, capsys):
    out = tmp_path / "changed"
    assert _train(tiny, out, "train.stop_after_steps=3") == 0
    capsys.readouterr()
    assert _train(tiny, out, "--resume", "--set", "model.hidden=[8]") == 2
    assert "--resume: the config differs from the checkpoint's in model.hidden;" in capsys.readouterr().err


def test_eval_and_predict_from_the_run_folder(tiny, full_run, tmp_path, capsys):
    _, test = tiny
    capsys.readouterr()
    assert main(["eval", "--run", str(full_run), "--test", test]) == 0
    metrics = json.loads(capsys.readouterr().out)
    with open(full_run / "metrics.json") as file:
        trained = json.load(file)
    for key in ("P@1", "P@5", "nDCG@5", "PSP@5"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-12)
    predictions = tmp_path / "predictions.txt"
    assert (
        main(["predict", "--run", str(full_run), "--input", test, "--out", str(predictions), "--k", "7"]) == 0
    )
    lines = predictions.read_text().splitlines()
    assert len(lines) == 100
    for line in lines:
        pairs = [pair.split(":") for pair in line.split()]
        ids, scores = [int(i) for i, _ in pairs], [float(s) for _, s in pairs]
        assert len(ids) == 7 and len(set(ids)) == 7 and all(0 <= i < 595 for i in ids)
        assert scores == sorted(scores, reverse=True)


def test_user_errors_exit_2_with_a_message(tiny, tmp_path, capsys):
    train, test = tiny
    bad = tmp_path / "bad.txt"
    bad.write_text("3 10 5\n1 2:0.5\n9 1:0.2\n0 1:1\n")
    cases = [
        (["--set", "train.epoch=3"], "unknown key(s) 'epoch' (did you mean 'epochs'?)"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
    ]
    for extra, message in cases:
        code = main(["train", "--train", train, "--test", test, "--out", str(tmp_path / "x"), *extra])
        assert code == 2 and message in capsys.readouterr().err
    code = main(["train", "--train", str(bad), "--test", test, "--out", str(tmp_path / "y")])
    assert code == 2 and "bad.txt:3" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path / "nothing"), "--test", test]) == 2


def test_a_diverging_run_stops_at_the_first_bad_loss(tiny, tmp_path, capsys):
    code = _train(tiny, tmp_path / "run", "--set", "optim.encoder.lr=1e30", "--set", "optim.head.lr=1e30")
    error = capsys.readouterr().err
    assert code == 2 and "training diverged" in error and "at step" in error
    assert not os.path.exists(tmp_path / "run" / "metrics.json")


def test_python_m_megaclass_and_dispatch_table():
    assert {"train", "eval", "predict"} <= set(COMMANDS)
    out = subprocess.run(
        [sys.executable, "-m", "megaclass", "--help"], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("chosen", [None, "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_the_gpu_allocator_grows_its_segments_unless_the_user_chose_its_settings(chosen, monkeypatch, capsys):
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    environment = {name: value for name, value in os.environ.items() if name not in names}
    if chosen:
        environment[chosen] = "max_split_size_mb:64"
    monkeypatch.setattr(os, "environ", environment)  # what main sets goes with the test
    with pytest.raises(SystemExit):
        main(["--help"])
    capsys.readouterr()
    if chosen:
        assert os.environ[chosen] == "max_split_size_mb:64"
        assert [name for name in names if name in os.environ] == [chosen]
    else:
        assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"


def test_text_data_trains_and_predicts_through_the_saved_featurizer(repo_root, tmp_path, capsys):
    data = os.path.join(repo_root, "data", "deb-tags")
    paths = []
    for name, rows in (("train.txt.gz", 200), ("test.txt.gz", 60)):
        with gzip.open(os.path.join(data, name), "rt") as file:
            lines = [file.readline() for _ in range(rows)]
        paths.append(tmp_path / name.replace(".gz", ""))
        paths[-1].write_text("".join(lines))
    out = tmp_path / "run"
    args = ["train", "--train", str(paths[0]), "--test", str(paths[1]), "--out", str(out), "--epochs", "1"]
    assert (
        main([*args, *_TINY, "data.num_classes=595", "data.featurizer={min_df: 1, char_ngrams: null}"]) == 0
    )
    assert (out / "featurizer").is_dir()
    with open(out / "metrics.json") as file:
        trained = json.load(file)
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--test", str(paths[1])]) == 0
    assert json.loads(capsys.readouterr().out)["P@5"] == pytest.approx(trained["P@5"], abs=1e-12)


_SPARSE = [
    "--head",
    "sparse",
    "--set",
    "head.fan_in=8",
    "head.intermediate=64",
    "head.aux_leaf=40",
    "head.aux_cutoff_epoch=2",
    "head.dst.interval=4",
]


@pytest.fixture(scope="module")
def sparse_run(tiny, tmp_path_factory):
    """A sparse head with its intermediate layer, auxiliary loss (label features made by default) and DST."""
    out = tmp_path_factory.mktemp("sparse")
    assert _train(tiny, out, *_SPARSE) == 0
    return out


def test_sparse_run_logs_rewiring_and_reports_head_memory(sparse_run):
    with open(sparse_run / "log.jsonl") as file:
        records = [json.loads(line) for line in file if '"train"' in line]
    assert all(record["head/sparsity"] == pytest.approx(1 - 8 / 64) for record in records)
    rewirings = [record["head/rewirings"] for record in records]
    # Bound to the trainer's 30 steps, the rewired fraction anneals to 0: late rewirings round to none.
    due = [s for s in range(1, 31) if round(8 * rewire_fraction(DSTConfig(interval=4), s, 30)) > 0]
    assert rewirings == sorted(rewirings) and rewirings[-1] == len(due) < 30 // 4
    alphas = [record["head/aux_alpha"] for record in records]
    assert 0 < alphas[0] <= 0.5 and alphas[-1] == 0.0, "the auxiliary weight decays to 0 at its cut-off"
    with open(sparse_run / "metrics.json") as file:
        metrics = json.load(file)
    parts = ("weights", "structure", "grad", "optimizer")
    assert metrics["head_total_bytes"] == sum(metrics[f"head_{part}_bytes"] for part in parts)
    assert 0 <= metrics["head_optimizer_bytes"] - 2 * metrics["head_grad_bytes"] <= 64  # 2 moments + steps
    assert metrics["dense_head_total_bytes"] == 4 * 595 * (48 + 1) * 4
    assert metrics["head/sparsity"] == pytest.approx(0.875)
    assert "## Head memory" in (sparse_run / "report.md").read_text()
    memory = {key: value for key, value in metrics.items() if key.endswith("_bytes") and "head" in key}
    line = format_head_memory(memory, sparsity=0.875, ranks=2)
    total = f"{memory['head_total_bytes'] / 2**20:.2f}"
    assert line.startswith(f"head sparsity 87.5%, head + optimizer state {total} MiB")
    assert " MiB over 2 ranks (weights " in line and " over " not in format_head_memory(memory)


def test_sparse_run_with_auxiliary_head_reloads_for_eval_and_predict(tiny, sparse_run, tmp_path, capsys):
    _, test = tiny
    capsys.readouterr()
    assert main(["eval", "--run", str(sparse_run), "--test", test]) == 0
    metrics = json.loads(capsys.readouterr().out)
    with open(sparse_run / "metrics.json") as file:
        trained = json.load(file)
    for key in ("P@1", "P@5", "nDCG@5"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-12)
    predictions = tmp_path / "predictions.txt"
    assert main(["predict", "--run", str(sparse_run), "--input", test, "--out", str(predictions)]) == 0
    assert len(predictions.read_text().splitlines()) == 100


def test_sparse_auxiliary_loss_without_label_features_is_a_config_error(tiny, tmp_path, capsys):
    code = _train(tiny, tmp_path / "run", *_SPARSE, "data.label_feature_dim=0")
    assert code == 2
    assert "data.label_feature_dim" in capsys.readouterr().err


def test_weight_average_is_evaluated_saved_and_resumed_exactly(tiny, full_run, tmp_path, capsys):
    averaged, resumed = tmp_path / "averaged", tmp_path / "resumed"
    assert _train(tiny, averaged, "train.ema_decay=0.9") == 0
    assert (
        "weight average (train.ema_decay=0.9): the encoder and the head are evaluated and kept averaged"
        in (capsys.readouterr().out)
    )
    assert _losses(averaged) == _losses(full_run), "averaging does not change training"
    assert _train(tiny, resumed, *_SPARSE, "train.ema_decay=0.9", "train.stop_after_steps=14") == 0
    assert _train(tiny, resumed, "--resume", *_SPARSE, "train.ema_decay=0.9") == 0
    uninterrupted = tmp_path / "uninterrupted"
    assert _train(tiny, uninterrupted, *_SPARSE, "train.ema_decay=0.9") == 0
    _, test = tiny
    for run in (averaged, resumed):
        with open(run / "metrics.json") as file:
            trained = json.load(file)
        capsys.readouterr()
        assert main(["eval", "--run", str(run), "--test", test]) == 0  # the saved model is the average
        assert json.loads(capsys.readouterr().out)["P@5"] == pytest.approx(trained["P@5"], abs=1e-12)
    with open(averaged / "metrics.json") as a, open(full_run / "metrics.json") as b:
        first, second = json.load(a), json.load(b)
    assert {k: v for k, v in first.items() if "@" in k} != {k: v for k, v in second.items() if "@" in k}
    with open(resumed / "metrics.json") as a, open(uninterrupted / "metrics.json") as b:
        first, second = json.load(a), json.load(b)
    assert {k: v for k, v in first.items() if "@" in k} == {k: v for k, v in second.items() if "@" in k}


def _stdin(monkeypatch, data: bytes) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def _predict(run, source: str, out, *extra: str) -> list[str]:
    assert main(["predict", "--run", str(run), "--input", source, "--out", str(out), "--k", "5", *extra]) == 0
    return out.read_text().splitlines()


def test_predict_reads_unlabelled_bow_rows_from_stdin(tiny, full_run, tmp_path, monkeypatch):
    """Header-less rows without labels (`` f:v`` and ``f:v`` lines) score as the labelled file's rows do."""
    _, test = tiny
    expected = _predict(full_run, test, tmp_path / "file.txt")
    with open(test) as file:
        rows = file.read().splitlines()[1:]
    bare = [row[row.index(" ") :] if i % 2 else row[row.index(" ") + 1 :] for i, row in enumerate(rows)]
    _stdin(monkeypatch, ("\n".join(bare) + "\n").encode())
    assert _predict(full_run, "-", tmp_path / "stdin.txt") == expected


@pytest.fixture(scope="module")
def text_run(repo_root, tmp_path_factory):
    """A TF-IDF text run (1 epoch on 200 rows) and its 60-row test file."""
    data = os.path.join(repo_root, "data", "deb-tags")
    folder = tmp_path_factory.mktemp("text_run")
    paths = []
    for name, rows in (("train.txt.gz", 200), ("test.txt.gz", 60)):
        with gzip.open(os.path.join(data, name), "rt") as file:
            paths.append(folder / name.replace(".gz", ""))
            paths[-1].write_text("".join(file.readline() for _ in range(rows)))
    out = folder / "run"
    args = ["train", "--train", str(paths[0]), "--test", str(paths[1]), "--out", str(out), "--epochs", "1"]
    assert main([*args, *_TINY, "data.num_classes=595"]) == 0
    return out, str(paths[1])


def test_a_resumed_text_run_reads_its_texts_through_the_featurizer_it_fitted(text_run, tmp_path, monkeypatch):
    run, test = text_run
    train = os.path.join(os.path.dirname(test), "train.txt")
    out = tmp_path / "resumed"
    args = ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "1", *_TINY]
    assert main([*args, "data.num_classes=595", "train.stop_after_steps=2"]) == 0

    def refit(self, texts):
        raise AssertionError("a resumed run fitted its featuriser again")

    monkeypatch.setattr(TextFeaturizer, "fit", refit)
    assert main([*args, "data.num_classes=595", "--resume"]) == 0
    with open(out / "metrics.json") as a, open(run / "metrics.json") as b:
        resumed, uninterrupted = json.load(a), json.load(b)
    assert {k: v for k, v in resumed.items() if "@" in k} == {
        k: v for k, v in uninterrupted.items() if "@" in k
    }


def test_text_run_predicts_bare_lines_from_stdin_and_from_its_exported_file(text_run, tmp_path, monkeypatch):
    run, test = text_run
    expected = _predict(run, test, tmp_path / "file.txt")
    with open(test) as file:
        texts = [line.split("\t", 1)[1] for line in file.read().splitlines()]
    _stdin(monkeypatch, ("\n".join(texts) + "\n").encode())
    assert _predict(run, "-", tmp_path / "stdin.txt") == expected  # bare documents, no tabs
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("".join(f"\t{text}\n" for text in texts))  # empty label lists
    assert _predict(run, str(unlabelled), tmp_path / "unlabelled-out.txt") == expected
    exported = tmp_path / "model.safetensors"
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    moved = alone / "model.safetensors"  # the exported file by itself, away from the run folder
    os.replace(exported, moved)
    assert _predict(moved, str(unlabelled), tmp_path / "export-out.txt") == expected


def test_repeated_labels_count_once_in_eval(tiny, full_run, tmp_path, capsys):
    _, test = tiny
    with open(test) as file:
        header, *rows = file.read().splitlines()
    doubled_rows = []
    for row in rows:
        labels, features = row.split(" ", 1)
        doubled_rows.append(f"{labels},{labels} {features}")  # every label written twice
    doubled = tmp_path / "doubled.txt"
    doubled.write_text("\n".join([header, *doubled_rows]) + "\n")
    capsys.readouterr()
    assert main(["eval", "--run", str(full_run), "--test", test]) == 0
    plain = json.loads(capsys.readouterr().out)
    with pytest.warns(UserWarning, match="repeated labels are dropped"):
        assert main(["eval", "--run", str(full_run), "--test", str(doubled)]) == 0
    assert json.loads(capsys.readouterr().out) == plain


@pytest.mark.parametrize("index", ["exact", "gpu"])
def test_an_index_searched_ranking_reports_its_recall(deb_tags_slice, tmp_path, capsys, index):
    train, test = deb_tags_slice(200, 40)
    out = tmp_path / "run"
    settings = ["model.hidden=[16]", "train.progress=false", f"head.index={index}", "head.topk_search=index"]
    assert main(["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "1",
                 "--head", "selected", "--set", "head.sample_num=50", *settings]) == 0  # fmt: skip
    with open(out / "metrics.json") as file:
        metrics = json.load(file)
    recall = metrics["topk_recall@5"]  # the eval's top-5 against an exact scan, on its first batch
    assert recall == 1.0 if index == "exact" else 0.0 < recall <= 1.0, recall
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--test", test]) == 0  # the store and index on the run's device
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["P@1"] == pytest.approx(metrics["P@1"], abs=0.03)
    assert evaluated["topk_recall@5"] == 1.0 if index == "exact" else 0.0 < evaluated["topk_recall@5"] <= 1.0
    loaded = load_run(str(out))
    assert loaded.head.materialize().device.type == loaded.device.type


def test_predict_says_how_many_labels_a_row_it_wrote_and_eval_out_dash_is_stdout(
    tiny, full_run, tmp_path, capsys, monkeypatch
):
    _, test = tiny
    classes = json.loads((full_run / "run.json").read_text())["num_classes"]
    predictions = tmp_path / "all.txt"
    argv = ["predict", "--run", str(full_run), "--input", test, "--out", str(predictions)]
    assert main([*argv, "--k", str(classes + 50)]) == 0
    assert f"wrote top-{classes} labels (all the run's {classes} classes) of" in capsys.readouterr().out
    assert {len(line.split()) for line in predictions.read_text().splitlines()} <= {classes}
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--run", str(full_run), "--test", test, "--out", "-"]) == 0
    assert "P@1" in json.loads(capsys.readouterr().out) and not (tmp_path / "-").exists()
    assert main(["predict", "--run", str(full_run), "--input", test, "--k", "3"]) == 0  # no --out: stdout
    printed = capsys.readouterr()
    rows = printed.out.splitlines()
    assert rows == _predictions_top(predictions, 3) and "rows to stdout" in printed.err


def _predictions_top(path, k: int) -> list[str]:
    """Each line of the predictions file ``path`` cut to its first ``k`` labels."""
    return [" ".join(line.split()[:k]) for line in path.read_text().splitlines()]


def _named_copy(source: str, target, names: list[str], kept: set[str] | None = None) -> set[str]:
    """``source``'s text lines with each label id replaced by its name (only the lines whose names are all in
    ``kept``, when given) written to ``target``; returns the names written."""
    lines, written = [], set()
    for line in open(source).read().splitlines():
        ids, text = line.split("\t", 1)
        row = [names[int(i)] for i in ids.split(",")]
        if kept is None or set(row) <= kept:
            lines.append(",".join(row) + f"\t{text}\n")
            written.update(row)
    target.write_text("".join(lines))
    return written


def test_a_run_whose_text_lines_name_their_labels(text_run, repo_root, tmp_path, capsys):
    """``python,devel<TAB>text`` lines: the run's names are its training file's, sorted, in its
    ``labels.txt``; its test files, eval, predict (``--names`` too) and export read and write them."""
    run, test = text_run
    with gzip.open(os.path.join(repo_root, "data", "deb-tags", "labels.txt.gz"), "rt") as file:
        deb_tags = file.read().splitlines()
    train, named_test = tmp_path / "train.txt", tmp_path / "test.txt"
    trained = _named_copy(os.path.join(os.path.dirname(test), "train.txt"), train, deb_tags)
    _named_copy(test, named_test, deb_tags, kept=trained)  # a name training lacks is refused: below
    out = tmp_path / "named"
    args = ["train", "--train", str(train), "--test", str(named_test), "--out", str(out), *_TINY]
    assert main([*args, "train.epochs=1"]) == 0
    names = (out / "labels.txt").read_text().splitlines()
    assert names == sorted(trained) and json.loads((out / "run.json").read_text())["num_classes"] == len(
        names
    )
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--test", str(named_test), "--out", "-"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["P@1"] <= 1
    ids = _predict(out, str(named_test), tmp_path / "ids.txt")
    with_names = _predict(out, str(named_test), tmp_path / "names.txt", "--names")
    for id_line, name_line in zip(ids, with_names, strict=True):
        assert [pair.rsplit(":", 1)[0] for pair in name_line.split("\t")] == [
            names[int(pair.split(":")[0])] for pair in id_line.split()
        ]
    exported = tmp_path / "named.safetensors"
    assert main(["export", "--run", str(out), "--out", str(exported)]) == 0
    assert _predict(exported, str(named_test), tmp_path / "exported.txt", "--names") == with_names
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--test", test]) == 2  # ids where the run's labels are names
    assert f"{test}:1: labels are ids, but the run's are names" in capsys.readouterr().err
    unseen = tmp_path / "unseen.txt"
    unseen.write_text(f"{names[0]}\tok\nno-such-tag\tnew\n")
    assert (
        main(["train", "--train", str(train), "--test", str(unseen), "--out", str(tmp_path / "r"), *_TINY])
        == 2
    )
    error = capsys.readouterr().err
    assert f"{unseen}:2: label 'no-such-tag' is not one of the {len(names)} label names of the run" in error
    (tmp_path / "labels.txt").write_text("".join(f"{name}\n" for name in ["aaa", *names]))  # other ids since
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", *_TINY]) == 2
    assert f"the run's labels are {len(names)} names" in capsys.readouterr().err


def test_predict_writes_label_names_from_a_named_file_or_beside_the_training_file(
    text_run, repo_root, tmp_path, capsys
):
    run, test = text_run
    ids = _predict(run, test, tmp_path / "ids.txt")
    names = [f"label {i}: with spaces" for i in range(595)]  # spaces and colons: pairs split on tabs
    label_file = tmp_path / "names.txt"
    label_file.write_text("".join(f"{name}\n" for name in names))
    named = _predict(run, test, tmp_path / "named.txt", "--names", str(label_file))
    for id_line, name_line in zip(ids, named, strict=True):
        expected = [(names[int(i)], score) for i, score in (pair.split(":") for pair in id_line.split())]
        assert [tuple(pair.rsplit(":", 1)) for pair in name_line.split("\t")] == expected
    out = str(tmp_path / "refused.txt")
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--input", test, "--out", out, "--names", str(short)]) == 2
    assert "short.txt has 2 names, the run has 595 classes" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), "--input", test, "--out", out, "--names"]) == 2
    assert "no labels.txt or lbl.json beside the run's training file" in capsys.readouterr().err
    # a run whose training file has its label names beside it, as training reads them
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(os.path.join(repo_root, "data", "deb-tags", "labels.txt.gz"), folder)
    shutil.copy(os.path.join(os.path.dirname(test), "train.txt"), folder)
    beside = tmp_path / "beside"
    args = [
        "train",
        "--train",
        str(folder / "train.txt"),
        "--test",
        test,
        "--out",
        str(beside),
        "--epochs",
        "1",
    ]
    assert main([*args, *_TINY]) == 0
    with gzip.open(folder / "labels.txt.gz", "rt") as file:
        deb_tags = file.read().splitlines()
    ids = _predict(beside, test, tmp_path / "beside-ids.txt")
    named = _predict(beside, test, tmp_path / "beside-named.txt", "--names")
    for id_line, name_line in zip(ids, named, strict=True):
        assert [pair.rsplit(":", 1)[0] for pair in name_line.split("\t")] == [
            deb_tags[int(pair.split(":")[0])] for pair in id_line.split()
        ]
