"""``python -m megaclass train`` killed with SIGKILL at chosen renames (in the thread that writes the saves
behind the steps), then ``--resume``: the resumed run logs the uninterrupted run's numbers exactly and no
whole checkpoint is lost. Saves behind the steps write what synchronous ones write, and one that fails
stops the run with every earlier checkpoint whole.

The kill point is set by a ``sitecustomize`` hook that only this test puts on the child's path: it wraps
``os.replace`` and kills the process at the n-th rename matching a pattern, before it happens.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

from megaclass.cli import main
from megaclass.state_io import DamagedStateError, flatten, read_state, verify_manifest
from megaclass.train import checkpoint
from megaclass.train.checkpoint import CheckpointWarning, checkpoint_folders

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_HOOK = '''
import fnmatch
import os
import signal

_pattern, _count = os.environ["KILL_AT_REPLACE"].rsplit("#", 1)
_seen = 0
_replace = os.replace


def _replace_or_die(source, target, *args, **kwargs):
    """SIGKILL at the n-th rename whose "source -> target" (base names) matches the pattern, before it."""
    global _seen
    names = f"{os.path.basename(os.fspath(source))} -> {os.path.basename(os.fspath(target))}"
    if fnmatch.fnmatchcase(names, _pattern):
        _seen += 1
        if _seen == int(_count):
            os.kill(os.getpid(), signal.SIGKILL)
    return _replace(source, target, *args, **kwargs)


os.replace = _replace_or_die
'''

# 96 rows in batches of 32: 3 steps an epoch, 9 in all. Checkpoints at steps 2, 3, 4, 6 (twice: every 2 steps,
# then the epoch end), 8 and 9; pointer moves after each save: 2, 3, 4, 6, 6, 8, 9.
_ARGS = [
    "--no-fit-check",  # not what these tests check: a busy machine's free memory must not refuse them
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
    "train.cpu_threads=1",
    "train.log_every=1",
    "train.progress=false",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=20",
    "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def data(deb_tags_slice):
    return deb_tags_slice(96, 40)


def _argv(data, out, *extra):
    train, test = data
    return ["train", "--train", train, "--test", test, "--out", str(out), *_ARGS, *extra]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(_argv(data, out)) == 0
    return out


def _records(out) -> list[tuple]:
    """The log without wall-clock numbers: (kind, step, values) of every record."""
    with open(os.path.join(out, "log.jsonl")) as file:
        records = [json.loads(line) for line in file]
    clock = ("time", "steps_per_s")
    return [(r.pop("kind"), r.pop("step"), {k: v for k, v in r.items() if k not in clock}) for r in records]


def _whole_steps(out) -> set[int]:
    """Steps of the checkpoints under ``out`` (moved-aside ones included) whose files match their manifest."""
    steps = set()
    for path in checkpoint_folders(os.path.join(out, "checkpoints")):
        try:
            verify_manifest(path)
        except DamagedStateError:
            continue
        steps.add(int(os.path.basename(path).split("_")[1]))
    return steps


def _kill_at(data, out, hook_dir, repo_root, pattern: str) -> None:
    env = dict(os.environ, KILL_AT_REPLACE=pattern)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(hook_dir), os.path.join(repo_root, "src"), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [sys.executable, "-m", "megaclass", *_argv(data, out)], env=env, capture_output=True, text=True
    )
    assert result.returncode == -signal.SIGKILL, f"not killed at {pattern}: {result.stderr[-2000:]}"


@pytest.mark.parametrize(
    ("pattern", "whole_at_kill", "resumed_step", "warning"),
    [
        pytest.param(  # step_6 moved aside, its second save not yet in place; the pointer names step_6
            ".tmp-step_000000006-* -> step_000000006#2",
            {2, 3, 4, 6},
            6,
            "names step_000000006, which is missing",
            id="between-the-two-renames-of-a-step-saved-twice",
        ),
        pytest.param(
            ".tmp-step_000000004-* -> step_000000004#1", {2, 3}, 3, None, id="before-a-checkpoint-rename"
        ),
        pytest.param(".tmp-*.json -> latest.json#4", {2, 3, 4, 6}, 6, None, id="before-the-pointer-moves"),
        pytest.param(
            ".tmp-*.json -> metrics.json#1", {2, 3, 4, 6, 8, 9}, 9, None, id="after-the-final-weights"
        ),
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_numbers(
    data, uninterrupted, repo_root, tmp_path, capsys, pattern, whole_at_kill, resumed_step, warning
):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_HOOK)
    out = tmp_path / "run"
    _kill_at(data, out, hook_dir, repo_root, pattern)
    assert _whole_steps(out) == whole_at_kill
    assert not (out / "metrics.json").exists()

    capsys.readouterr()
    if warning is None:
        assert main(_argv(data, out, "--resume")) == 0
    else:
        with pytest.warns(CheckpointWarning, match=warning):
            assert main(_argv(data, out, "--resume")) == 0
    # killed once trained to the end: resumed at its last step, which it says
    assert re.search(
        rf"step_{resumed_step:09d}(, step {resumed_step}: the run has trained all| at epoch)",
        capsys.readouterr().out,
    )
    assert _records(out) == _records(uninterrupted)
    with open(out / "metrics.json") as a, open(uninterrupted / "metrics.json") as b:
        resumed, full = json.load(a), json.load(b)
    assert {k: v for k, v in resumed.items() if "@" in k} == {k: v for k, v in full.items() if "@" in k}
    assert _whole_steps(out) == {2, 3, 4, 6, 8, 9} >= whole_at_kill, "no whole checkpoint lost"
    assert not [name for name in os.listdir(out / "checkpoints") if name.startswith((".tmp-", ".old-"))]


def _tensors(folder) -> dict[str, torch.Tensor]:
    _, tensors = flatten(read_state(str(folder)))
    return tensors


def test_saves_behind_the_steps_write_what_the_steps_waiting_for_them_write(data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(data, out, "train.background_saves=false")) == 0  # extends the --set list
    assert _records(out) == _records(uninterrupted)
    steps = sorted(os.listdir(out / "checkpoints"))
    assert steps == sorted(os.listdir(uninterrupted / "checkpoints"))
    for name in [*(os.path.join("checkpoints", step) for step in steps if step.startswith("step_")), "best"]:
        if name == "best":
            (kept,) = os.listdir(out / "best")
            assert os.listdir(uninterrupted / "best") == [kept]
            name = os.path.join("best", kept)
        ours, theirs = _tensors(out / name), _tensors(uninterrupted / name)
        assert ours.keys() == theirs.keys()
        different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
        assert not different, f"{name}: {different[:3]}"


def test_a_save_behind_the_steps_that_fails_stops_the_run_and_loses_no_whole_checkpoint(
    data, uninterrupted, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    real_save, calls = checkpoint.save_checkpoint, []

    def full_disk_at_the_third(folder, step, state, *, keep):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:  # step 4's, while the steps after it run
            raise OSError(errno.ENOSPC, f"no space left on the device writing checkpoint step {step}")
        return real_save(folder, step, state, keep=keep)

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk_at_the_third)
    assert main(_argv(data, out)) == 2
    assert "no space left on the device writing checkpoint step 4" in capsys.readouterr().err
    assert _whole_steps(out) == {2, 3}
    assert all(name.startswith("checkpoint") for name in calls), calls  # the saves' thread wrote them
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert main(_argv(data, out, "--resume")) == 0
    assert _records(out) == _records(uninterrupted)
    assert _whole_steps(out) == {2, 3, 4, 6, 8, 9}
