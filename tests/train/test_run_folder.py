"""The run folder is never lost: a used folder is refused without --resume / --overwrite, bad inputs leave it
byte for byte as it was, a resume with other data files is refused before anything is written, and a resume
past a missing pointer, a damaged newest checkpoint or leftovers of a killed save continues from the newest
whole checkpoint to the uninterrupted run's numbers without deleting any whole checkpoint."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

from megaclass.cli import main
from megaclass.errors import DataFormatError
from megaclass.schema import ConfigError
from megaclass.state_io import verify_manifest
from megaclass.train.checkpoint import CheckpointWarning, checkpoint_folders
from megaclass.train.config import OptimConfig, load_config, lr_at

pytestmark = pytest.mark.integration

# 96 rows in batches of 32: 3 steps an epoch, 9 in all; checkpoints at steps 2, 3, 4, 6 (twice: every 2 steps
# and the epoch end), 8 and 9, all kept.
_ARGS = [
    "--epochs",
    "3",
    "--set",
    "train.device=cpu",  # bit-exact comparisons: GPU kernels add with atomics, in no fixed order
    "model.hidden=[16]",
    "model.dropout=0.1",
    "head.loss=softmax",
    "optim.encoder.lr=0.01",
    "optim.head.lr=0.01",
    "optim.warmup_steps=2",
    "train.batch_size=32",
    "train.log_every=1",
    "train.progress=false",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=20",
    "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def data(deb_tags_slice):
    return deb_tags_slice(96, 40)


def _train(data, out, *extra, train=None, test=None):
    train_path, test_path = data
    argv = ["train", "--train", train or train_path, "--test", test or test_path, "--out", str(out), *_ARGS]
    return main([*argv, *extra])


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train(data, out) == 0
    return out


def _snapshot(folder) -> dict[str, str]:
    """Every file and folder under ``folder``: relative path -> SHA-256 of the content ("dir" for folders)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                found[os.path.relpath(path, folder)] = hashlib.sha256(file.read()).hexdigest()
    return found


def _records(out) -> list[tuple]:
    """The log without wall-clock numbers: (kind, step, values) of every record."""
    with open(os.path.join(out, "log.jsonl")) as file:
        records = [json.loads(line) for line in file]
    clock = ("time", "steps_per_s")
    return [(r.pop("kind"), r.pop("step"), {k: v for k, v in r.items() if k not in clock}) for r in records]


def _test_metrics(out) -> dict[str, float]:
    with open(os.path.join(out, "metrics.json")) as file:
        return {k: v for k, v in json.load(file).items() if "@" in k}


def _whole_steps(out) -> set[int]:
    """Steps of the checkpoints under ``out`` whose files match their manifest."""
    steps = set()
    for path in checkpoint_folders(os.path.join(out, "checkpoints")):
        try:
            verify_manifest(path)
        except ValueError:
            continue
        steps.add(int(os.path.basename(path).split("_")[1]))
    return steps


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------------------------------- used folders


def test_a_finished_run_is_refused_without_a_flag_and_left_untouched(data, finished, capsys):
    before = _snapshot(finished)
    capsys.readouterr()
    assert _train(data, finished) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error, "one line"
    assert f"--out {finished} holds a run" in error and "--resume" in error and "--overwrite" in error
    assert _snapshot(finished) == before


def test_overwrite_replaces_the_run_and_nothing_else(data, finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "step_000000099").mkdir()  # would be resumed if the old checkpoints stayed
    assert _train(data, out, "--overwrite") == 0
    assert _records(out) == _records(finished) and _test_metrics(out) == _test_metrics(finished)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoints" / "step_000000099").exists()
    assert _whole_steps(out) == {2, 3, 4, 6, 8, 9}


def test_resume_and_overwrite_exclude_each_other(data, finished, capsys):
    before = _snapshot(finished)
    assert _train(data, finished, "--resume", "--overwrite") == 2
    assert "--resume" in capsys.readouterr().err
    assert _snapshot(finished) == before


@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"]])
@pytest.mark.parametrize("bad", ["missing train file", "corrupt train file", "unknown config key"])
def test_bad_inputs_leave_a_finished_run_byte_identical(data, finished, tmp_path, capsys, flag, bad):
    train = None
    extra = []
    if bad == "missing train file":
        train = str(tmp_path / "missing.txt")
    elif bad == "corrupt train file":
        train = str(tmp_path / "corrupt.txt")
        with open(data[0]) as source:
            lines = source.readlines()
        lines[5] = "99999 1:0.5\n"  # a label id past the header's label count
        with open(train, "w") as target:
            target.writelines(lines)
    else:
        extra = ["--set", "train.no_such_key=1"]
    before = _snapshot(finished)
    capsys.readouterr()
    assert _train(data, finished, *flag, *extra, train=train) == 2
    error = capsys.readouterr().err
    assert error.startswith("megaclass train: error:") and error.count("\n") == 1, error
    if not flag and bad != "unknown config key":
        assert "holds a run" in error, "a used folder is refused first"
    assert _snapshot(finished) == before


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        (
            "eval.filter_labels={tmp}/none.txt",
            "eval.filter_labels: {tmp}/none.txt: cannot read (No such file",
        ),
        (
            "eval.filter_labels={tmp}/filter.txt",
            "eval.filter_labels: {tmp}/filter.txt:2: doc id 40 out of range: --test {test} has 40 rows "
            "(doc ids 0 to 39)",
        ),
        (
            "eval.filter_labels={tmp}/labels.txt",
            "eval.filter_labels: {tmp}/labels.txt:1: label id 595 out of",
        ),
        (
            "eval.verification=[{tmp}/none.bin]",
            "eval.verification: {tmp}/none.bin: cannot read (No such file",
        ),
        ("eval.verification=[{tmp}/filter.txt]", "eval.verification: {tmp}/filter.txt: not a pickle of"),
    ],
    ids=["filter missing", "filter doc id", "filter label id", "bin missing", "bin not a pickle"],
)
def test_evaluation_files_are_checked_before_the_folder_changes(data, tmp_path, capsys, setting, problem):
    (tmp_path / "filter.txt").write_text("0 1\n40 2\n")  # the test file has rows 0 to 39
    (tmp_path / "labels.txt").write_text("0 595\n")  # deb-tags has labels 0 to 594
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    capsys.readouterr()
    assert _train(data, out, setting.format(tmp=tmp_path)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"megaclass train: error: {problem.format(tmp=tmp_path, test=data[1])}"), error
    assert error.count("\n") == 1
    assert _snapshot(out) == before


def test_the_filter_leaves_out_test_pairs_only(data, tmp_path):
    """The filter's doc ids are rows of --test: validation rows (of --train) are scored unfiltered."""
    with open(data[1]) as file:
        rows = file.read().splitlines()[1:]
    pairs = [f"{doc} {label}" for doc, row in enumerate(rows) for label in row.split()[0].split(",")]
    (tmp_path / "filter.txt").write_text("\n".join(pairs) + "\n")  # every test pair
    one_epoch = ["train.epochs=1", "train.valid_fraction=0.2"]
    assert _train(data, tmp_path / "plain", *one_epoch) == 0
    assert (
        _train(data, tmp_path / "filtered", *one_epoch, f"eval.filter_labels={tmp_path / 'filter.txt'}") == 0
    )
    valid = [[r for r in _records(tmp_path / run) if r[0] == "eval_valid"] for run in ("plain", "filtered")]
    assert len(valid[0]) == 1 and valid[0] == valid[1]
    assert _test_metrics(tmp_path / "plain")["P@1"] > 0
    assert _test_metrics(tmp_path / "filtered")["P@1"] == 0


def test_eval_refuses_a_filter_naming_rows_past_the_test_file(data, finished, tmp_path, capsys):
    filter_file = tmp_path / "filter.txt"
    filter_file.write_text("0 1\n9999 3\n")
    command = ["eval", "--run", str(finished), "--test", data[1], "--filter", str(filter_file)]
    capsys.readouterr()
    assert main(command) == 2
    assert capsys.readouterr().err == (
        f"megaclass eval: error: {filter_file}:2: doc id 9999 out of range: --test {data[1]} has 40 "
        "rows (doc ids 0 to 39)\n"
    )
    filter_file.write_text("0 1\n39 3\n")  # the last row
    assert main(command) == 0


def test_an_image_list_naming_a_missing_image_is_refused_before_the_run_starts(fixture_rec, tmp_path, capsys):
    listed = tmp_path / "test_list.txt"
    listed.write_text("missing/1.jpg 3\n")
    out = tmp_path / "run"
    argv = ["train", "--train", fixture_rec, "--test", str(listed), "--out", str(out), "--set"]
    argv += ["train.device=cpu", "model.type=iresnet18", "train.progress=false"]
    capsys.readouterr()
    assert main(argv) == 2
    missing = tmp_path / "missing" / "1.jpg"
    assert capsys.readouterr().err == (
        f"megaclass train: error: {listed}:1: image missing/1.jpg ({missing}) does not exist: paths are "
        "relative to the list's folder\n"
    )
    assert not out.exists()


def test_an_unwritable_out_is_refused_before_anything(data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert _train(data, blocker / "run") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "x"


# ----------------------------------------------------------------------------------------------- resuming


def test_run_json_records_the_data_files(data, finished):
    with open(finished / "run.json") as file:
        facts = json.load(file)
    for key, path in zip(("train_file", "test_file"), data, strict=True):
        with open(path, "rb") as file:
            content = file.read()
        assert facts[key] == {
            "path": path,
            "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
        }


def test_resume_with_another_training_file_of_the_same_width_is_refused(
    data, finished, deb_tags_slice, capsys
):
    other_train, _ = deb_tags_slice(80, 40)  # fewer rows, the same header width
    before = _snapshot(finished)
    capsys.readouterr()
    assert _train(data, finished, "--resume", train=other_train) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and other_train in error and data[0] in error, error
    assert _snapshot(finished) == before


def test_run_json_records_the_kernels_and_a_resume_that_would_run_others_is_refused(
    data, finished, tmp_path, capsys
):
    with open(finished / "run.json") as file:
        assert json.load(file)["kernels"] == {"linear_loss": "reference"}  # the dense head on the CPU
    out = _copy(finished, tmp_path)
    facts = json.loads((out / "run.json").read_text())
    facts["kernels"] = {"linear_loss": "triton"}  # as a run on a GPU records it
    (out / "run.json").write_text(json.dumps(facts))
    before = _snapshot(out)
    capsys.readouterr()
    assert _train(data, out, "--resume") == 2
    error = capsys.readouterr().err.strip()
    assert "the run computed with {'linear_loss': 'triton'}" in error and "\n" not in error, error
    assert _snapshot(out) == before


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """A run stopped after step 7 (mid-epoch 3): whole checkpoints at steps 2, 3, 4, 6 and 7."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert _train(data, out, "train.stop_after_steps=7") == 0
    assert _whole_steps(out) == {2, 3, 4, 6, 7}
    return out


def _flip_a_byte(path):
    with open(path, "r+b") as file:
        file.seek(-5, os.SEEK_END)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0x40]))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) - 100)


def _damage(out, case):
    """Apply ``case`` to the stopped run ``out``; returns (step resumed from, warning expected)."""
    folder = out / "checkpoints"
    newest = folder / "step_000000007"
    if case == "pointer missing":
        os.remove(folder / "latest.json")
        return 7, "latest.json is missing"
    if case == "pointer names a missing folder":  # a kill between the two renames of a step saved twice
        aside = folder / ".old-step_000000007-k1ll"
        aside.mkdir()
        os.replace(newest, aside / "step_000000007")
        return 7, "names step_000000007, which is missing"
    if case == "newest truncated":
        _truncate(newest / "tensors.safetensors")
        return 6, f"{newest}: tensors.safetensors has"
    if case == "newest has a flipped byte":
        _flip_a_byte(newest / "tensors.safetensors")
        return 6, f"{newest}: tensors.safetensors differs from its checksum"
    # leftovers of killed saves: an unfinished folder of a later step, an older one moved aside
    (folder / ".tmp-step_000000008-k1ll").mkdir()
    shutil.copytree(folder / "step_000000004", folder / ".old-step_000000004-k1ll" / "step_000000004")
    (folder / ".tmp-k1ll.json").write_text("{")
    return 7, None


@pytest.mark.parametrize(
    "case",
    [
        "pointer missing",
        "pointer names a missing folder",
        "newest truncated",
        "newest has a flipped byte",
        "leftovers",
    ],
)
def test_resume_continues_from_the_newest_whole_checkpoint(data, finished, stopped, tmp_path, capsys, case):
    out = _copy(stopped, tmp_path)
    step, warning = _damage(out, case)
    whole_before = _whole_steps(out)
    capsys.readouterr()
    if warning is None:
        assert _train(data, out, "--resume") == 0
    else:
        with pytest.warns(CheckpointWarning, match=warning):
            assert _train(data, out, "--resume") == 0
    assert f"step_{step:09d} at epoch 3, step {step}" in capsys.readouterr().out
    assert _records(out) == _records(finished), "the same numbers as the uninterrupted run, logged once"
    assert _test_metrics(out) == _test_metrics(finished)
    whole_after = _whole_steps(out)
    assert whole_before <= whole_after and {8, 9} <= whole_after, "no whole checkpoint deleted"
    assert (out / "checkpoints" / "step_000000007").is_dir(), "a damaged one is skipped, not deleted"
    leftovers = [name for name in os.listdir(out / "checkpoints") if name.startswith((".tmp-", ".old-"))]
    assert leftovers == []


def test_every_checkpoint_damaged_refuses_to_resume_and_keeps_them(data, stopped, tmp_path, capsys):
    out = _copy(stopped, tmp_path)
    for path in checkpoint_folders(str(out / "checkpoints")):
        _flip_a_byte(os.path.join(path, "tensors.safetensors"))
    before = _snapshot(out)
    with pytest.warns(CheckpointWarning):
        assert _train(data, out, "--resume") == 2
    assert "no whole checkpoint to resume from" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_head_that_cannot_fit_is_refused_before_the_data_is_read(tmp_path, monkeypatch) -> None:
    """fan_in above the encoder's width is known from the config alone: refused before any file is opened."""
    from megaclass.train import loop

    def no_data(*args, **kwargs):
        raise AssertionError("the training file was read before the config was checked")

    monkeypatch.setattr(loop, "open_dataset", no_data)
    config = load_config(None, ["head.type=sparse", "head.fan_in=64", "model.hidden=[32]"])
    with pytest.raises(ConfigError, match=r"head.fan_in: expected <= the sparse layer's input width 32"):
        loop.train(config, train_path="missing.txt", test_path="missing.txt", out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_run_says_when_the_next_checkpoint_will_not_fit(data, tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=0))
    assert _train(data, tmp_path / "run", "--epochs", "1") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("disk: ")]
    assert len(lines) == 2  # the checkpoints at steps 2 and 3
    assert "step_000000002" in lines[0] and "the next one will not fit" in lines[0]
    assert "train.keep_checkpoints" in lines[0]


def test_a_run_that_did_not_finish_is_read_from_its_newest_checkpoint_and_says_so(data, stopped, finished):
    from megaclass.train.inference import load_run

    with pytest.warns(CheckpointWarning, match=r"no final weights .* checkpoint, checkpoints/step_0+7"):
        load_run(str(stopped), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finished run's final weights: nothing to say
        load_run(str(finished), device="cpu")


def test_a_stopped_sharded_run_is_evaluated_predicted_and_exported(data, tmp_path, capsys):
    """The newest checkpoint of a class-sharded run (one process, ``distributed.shard_head=always``) serves
    ``eval``, ``predict`` and ``export`` as a single-process one does, and the command says so in one line."""
    out = tmp_path / "sharded"
    assert _train(data, out, "distributed.shard_head=always", "train.stop_after_steps=5") == 0
    assert not (out / "model").exists()
    command = [sys.executable, "-m", "megaclass", "eval", "--run", str(out), "--test", data[1]]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    evaluated = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    scores = json.loads(evaluated.stdout)
    (line,) = evaluated.stderr.splitlines()  # one line, not Python's warning with its source line
    assert re.fullmatch(r"megaclass eval: warning: .* has no final weights .*checkpoints/step_0+5", line)
    capsys.readouterr()
    exported = tmp_path / "model.safetensors"
    with pytest.warns(CheckpointWarning, match="no final weights"):
        assert main(["export", "--run", str(out), "--out", str(exported)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {exported}"
    assert main(["eval", "--run", str(exported), "--test", data[1]]) == 0
    assert json.loads(capsys.readouterr().out)["P@1"] == pytest.approx(scores["P@1"], abs=1e-6)
    predictions = tmp_path / "predictions.txt"
    with pytest.warns(CheckpointWarning, match="no final weights"):
        assert main(["predict", "--run", str(out), "--input", data[1], "--out", str(predictions)]) == 0
    assert len(predictions.read_text().splitlines()) == 40


# ------------------------------------------------------------------------------------- resuming with changes


def _losses(out) -> dict[int, float]:
    return {step: values["loss"] for kind, step, values in _records(out) if kind == "train"}


def _lr_scales(out) -> dict[int, float]:
    return {step: values["lr_scale"] for kind, step, values in _records(out) if kind == "train"}


def _resume_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("--resume: ")]


def test_a_finished_run_goes_on_with_more_epochs_and_other_learning_rates(data, finished, tmp_path, capsys):
    """What the divergence error and the README advise: other learning rates, train.grad_clip and more
    epochs, from the run's last checkpoint, the schedule recomputed over the new total from step 9 on."""
    out = _copy(finished, tmp_path)
    capsys.readouterr()
    assert _train(data, out, "optim.head.lr=0.005", "train.grad_clip=1", "--epochs", "4", "--resume") == 0
    printed = capsys.readouterr().out
    assert "step_000000009 at epoch 4, step 9" in printed
    assert _resume_lines(printed) == [
        "--resume: optim.head.lr 0.01 -> 0.005, train.epochs 3 -> 4, train.grad_clip 0 -> 1: "
        "from step 9 on the run does not repeat the interrupted one"
    ]
    (logged,) = [values for kind, _, values in _records(out) if kind == "resume"]
    assert logged == {
        "changes": {"optim.head.lr": [0.01, 0.005], "train.epochs": [3, 4], "train.grad_clip": [0.0, 1]}
    }
    losses, before = _losses(out), _losses(finished)
    assert sorted(losses) == list(range(1, 13))
    assert {step: losses[step] for step in before} == before, "steps 1 to 9 are the finished run's"
    schedule = OptimConfig(warmup_steps=2)
    scales = _lr_scales(out)
    assert scales[9] == 0.0, "the finished run's last step, at the end of its schedule"
    for step in (10, 11, 12):  # lr_scale is the step's (0-based step - 1) over 12 steps, no new warm-up
        assert scales[step] == pytest.approx(lr_at(step - 1, peak=1.0, total_steps=12, optim=schedule))
    assert scales[10] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["steps"]) == (4, 12)
    assert 12 in _whole_steps(out) and (out / "model").is_dir()

    capsys.readouterr()  # resumed again with the same settings: nothing changes, the run ends as finished
    assert _train(data, out, "optim.head.lr=0.005", "train.grad_clip=1", "--epochs", "4", "--resume") == 0
    printed = capsys.readouterr().out
    assert _resume_lines(printed) == []
    assert (
        "step 12: the run has trained all 4 epochs; it is scored and its final weights written again"
        in printed
    )
    assert _losses(out) == losses


def test_a_lengthened_run_keeps_its_warm_up_and_resumes_it_exactly(data, tmp_path, capsys):
    """optim.warmup_fraction is a fraction of the run's length: lengthened from 3 steps to 12 on a resume,
    the warm-up keeps its 1 step (0.5 of 3, not 6 steps of 12), also across a later resume."""
    warm = ("optim.warmup_steps=0", "optim.warmup_fraction=0.5")
    short = tmp_path / "short"
    assert _train(data, short, *warm, "--epochs", "1") == 0
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    shutil.copytree(short, whole)
    shutil.copytree(short, cut)
    assert _train(data, whole, *warm, "--epochs", "4", "--resume") == 0
    scales = _lr_scales(whole)
    schedule = OptimConfig(warmup_fraction=0.5)
    for step in range(4, 13):
        want = lr_at(step - 1, peak=1.0, total_steps=12, optim=schedule, warmup_total_steps=3)
        assert scales[step] == pytest.approx(want), step
    assert scales[4] != pytest.approx(4 / 6), "step 4 back in a 6-step warm-up"
    assert _train(data, cut, *warm, "train.stop_after_steps=7", "--epochs", "4", "--resume") == 0
    assert _train(data, cut, *warm, "--epochs", "4", "--resume") == 0
    assert _losses(cut) == _losses(whole)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--head", "sparse"], "in head.type dense -> sparse"),
        (["model.hidden=[8]"], "in model.hidden;"),
        (["train.batch_size=16"], "in train.batch_size;"),
    ],
)
def test_a_resume_that_changes_what_the_state_means_is_refused(data, finished, capsys, change, named):
    before = _snapshot(finished)
    capsys.readouterr()
    assert _train(data, finished, *change, "--resume") == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--resume: the config differs from the checkpoint's " + named in error, error
    assert "the run computed with" not in error, "the config is named before the kernels"
    assert _snapshot(finished) == before


def test_a_resume_with_fewer_epochs_ends_there_or_is_refused_past_it(data, stopped, tmp_path, capsys):
    before = _snapshot(stopped)
    capsys.readouterr()
    assert _train(data, stopped, "--epochs", "2", "--resume") == 2  # its checkpoint: step 7, in epoch 3
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "--resume: train.epochs=2 ends at step 6, before the checkpoint's step 7; pass train.epochs >= 3"
    )
    assert _snapshot(stopped) == before

    out = _copy(stopped, tmp_path)  # its newest checkpoint at the end of epoch 2: the new end, reached
    shutil.rmtree(out / "checkpoints" / "step_000000007")
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step_000000006", "step": 6}))
    assert _train(data, out, "--epochs", "2", "--resume") == 0
    assert "train.epochs 3 -> 2" in _resume_lines(capsys.readouterr().out)[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["steps"]) == (2, 6) and metrics["epoch_kept"] in (1, 2)
    assert max(_losses(out)) == 6 and (out / "model").is_dir()
    assert any(kind == "eval_test" for kind, _, _ in _records(out))


def test_a_resume_may_not_change_the_metric_that_picked_the_epoch(data, finished, capsys):
    before = _snapshot(finished)
    capsys.readouterr()
    assert _train(data, finished, "eval.ks=[3,5]", "--resume") == 2
    error = capsys.readouterr().err
    assert "eval.ks [1,3,5] -> [3,5] changes the metric that picks the epoch (P@1 -> P@3)" in error
    assert _snapshot(finished) == before


def test_evaluation_settings_and_another_test_file_do_not_block_a_resume(
    data, finished, stopped, tmp_path, deb_tags_slice, capsys
):
    _, other_test = deb_tags_slice(96, 30)
    out = _copy(stopped, tmp_path)
    settings = ("eval.batch_size=16", "eval.ks=[1,5]", "eval.propensity_a=0.6")
    capsys.readouterr()
    assert _train(data, out, *settings, "--resume", test=other_test) == 0
    assert _resume_lines(capsys.readouterr().out) == [
        f"--resume: eval.batch_size 64 -> 16, eval.ks [1,3,5] -> [1,5], eval.propensity_a 0.55 -> 0.6, "
        f"--test {data[1]} -> {other_test}: from step 7 on the run does not repeat the interrupted one"
    ]
    assert _losses(out) == _losses(finished), "training reads none of them"
    with open(other_test, "rb") as file:
        content = file.read()
    recorded = json.loads((out / "run.json").read_text())["test_file"]
    assert recorded == {
        "path": other_test,
        "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert "P@5" in metrics and "P@3" not in metrics
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--test", other_test]) == 0
    assert json.loads(capsys.readouterr().out)["P@1"] == pytest.approx(metrics["P@1"], abs=1e-12)
    assert _train(data, out, *settings, "--resume", test=other_test) == 0  # recorded: nothing changes now
    assert _resume_lines(capsys.readouterr().out) == []


@pytest.mark.parametrize("case", ["no such folder", "an empty folder", "a finished run without checkpoints"])
def test_resume_refuses_a_folder_without_a_run_to_resume(data, finished, tmp_path, capsys, case):
    out = tmp_path / "run"
    if case == "an empty folder":
        out.mkdir()
    elif case == "a finished run without checkpoints":
        out = _copy(finished, tmp_path)
        shutil.rmtree(out / "checkpoints")
    expected = {
        "no such folder": f"--resume: {out} holds no run to resume (no such folder)",
        "an empty folder": f"--resume: {out} holds no run to resume (no run.json, no checkpoint)",
        "a finished run without checkpoints": f"--resume: {out} holds a finished run without a checkpoint",
    }[case]
    before = _snapshot(out) if out.exists() else None
    capsys.readouterr()
    assert _train(data, out, "--resume") == 2
    assert expected in capsys.readouterr().err
    assert (_snapshot(out) if out.exists() else None) == before
    from megaclass.train import loop

    with pytest.raises(ValueError, match=re.escape(expected)):  # the Python API alike
        loop.train(load_config(), train_path=data[0], test_path=data[1], out_dir=str(out), resume=True)
    assert (_snapshot(out) if out.exists() else None) == before


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    for name in ("checkpoints", "model", "best", "metrics.json", "report.md", "report.png"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    capsys.readouterr()
    assert _train(data, out, "--resume") == 0
    assert (
        f"--resume: {out} holds no checkpoint yet (the run stopped before its first): starting from step 0"
        in (capsys.readouterr().out)
    )
    assert _records(out) == _records(finished)


def test_the_python_api_resumes_on_the_files_and_settings_its_run_recorded(data, finished, tmp_path):
    from megaclass.train import loop
    from megaclass.train.config import config_from_dict

    out = _copy(finished, tmp_path)
    recorded = {"train": os.path.abspath(data[0]), "test": os.path.abspath(data[1]), "valid": None}
    assert loop.resume_data_files(str(out), None, None, None) == recorded
    assert loop.resume_data_files(str(out), None, None, "v.txt")["valid"] == "v.txt"
    for name in ("checkpoints", "model", "best", "metrics.json", "report.md", "report.png"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    config = config_from_dict(loop.read_recorded_config(str(out)))
    with pytest.raises(ValueError, match="train_path is required"):
        loop.train(config, out_dir=str(out))
    assert (
        loop.train(config, out_dir=str(out), resume=True)["P@1"]
        == json.loads((finished / "metrics.json").read_text())["P@1"]
    )
    assert _records(out) == _records(finished)
    damaged_file = re.escape(f"{out / 'run.json'}: cannot read this run file")
    for damaged in ("{", "[]"):
        (out / "run.json").write_text(damaged)
        with pytest.raises(DataFormatError, match=damaged_file):
            loop.resume_data_files(str(out), None, None, None)
