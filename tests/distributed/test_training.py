"""The trainer on 2 gloo ranks: the same steps as 1 rank with the same global batch, checkpoints that 1 or
2 ranks resume with the same next loss, export of a sharded run, and a dead rank that stops the others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import launch, port_taken, start, wait

COMMON = [
    "model.type=mlp",
    "model.hidden=[16]",
    "model.dropout=0.0",
    "model.layer_norm=false",  # fully_shard refuses the MLP's ModuleList of LayerNorms (no forward)
    "head.type=dense",
    "distributed.shard_head=always",
    "train.progress=false",
    "train.log_every=1",
    "train.epochs=2",
    "train.device=cpu",
    "optim.head.lr=0.05",
    "train.grad_clip=0.5",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A small multi-label BoW task in the XMC repository format: (train path, test path)."""
    import numpy as np

    rng = np.random.default_rng(0)
    paths = []
    for name, rows in (("train.txt", 150), ("test.txt", 40)):
        lines = [f"{rows} 40 29"]
        for _ in range(rows):
            labels = ",".join(str(x) for x in sorted(rng.choice(29, rng.integers(1, 4), replace=False)))
            columns = sorted(rng.choice(40, 5, replace=False))
            lines.append(labels + " " + " ".join(f"{c}:{rng.random():.4f}" for c in columns))
        path = tmp_path_factory.mktemp("data") / name
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths[0], paths[1]


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _train(tmp, data, runs: list[tuple[str, int, int, str]], *, resume: bool = False) -> None:
    """Train the runs ``(name, world size, steps, encoder wrapper)`` at once (global batch 32 each)."""
    launches = []
    for name, world, steps, encoder in runs:
        run_dir = os.path.join(tmp, name)
        args = [run_dir, *data, *COMMON, f"train.batch_size={32 // world}", f"train.stop_after_steps={steps}",
                f"distributed.encoder={encoder}"]  # fmt: skip
        out = os.path.join(tmp, f"{name}-{steps}-{world}")
        os.makedirs(out, exist_ok=True)
        launches.append((out, [*args, *(["--resume"] if resume else [])], world))
    running = [start("train", out, *args, world_size=world, timeout_s=240) for out, args, world in launches]
    for (out, args, world), process in zip(launches, running, strict=True):
        result = wait(process)
        if port_taken(result):
            result = launch("train", out, *args, world_size=world, timeout_s=240)
        assert not any(result.codes), "\n".join(result.stderr)


def _cli_train(tmp, data, name: str, nproc: int, steps: int) -> subprocess.Popen:
    """``megaclass train --nproc-per-node nproc ...``: the command forwarding to torchrun."""
    overrides = [*COMMON, f"train.batch_size={32 // nproc}", f"train.stop_after_steps={steps}"]
    command = [sys.executable, "-m", "megaclass", "train", "--nproc-per-node", str(nproc), "--train", data[0]]
    command += ["--test", data[1], "--out", os.path.join(tmp, name), "--set", *overrides]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks over gloo, also on a machine with one GPU
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_nproc_per_node_is_taken_out_of_the_forwarded_arguments() -> None:
    from megaclass.cli import _without_nproc

    argv = ["--train", "a", "--nproc-per-node", "2", "--out", "b", "--nproc-per-node=4", "--set", "x=1"]
    assert _without_nproc(argv) == ["--train", "a", "--out", "b", "--set", "x=1"]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_resume_on_any_world(tmp_path, data) -> None:
    tmp = str(tmp_path)
    cli = _cli_train(tmp, data, "two", 2, 2)
    _train(tmp, data, [("one", 1, 3, "ddp"), ("fsdp", 2, 2, "fsdp2")])
    _, err = cli.communicate(timeout=240)
    assert cli.returncode == 0, err
    two = os.path.join(tmp, "two")
    reference = _losses(os.path.join(tmp, "one"))
    for name in ("two", "fsdp"):  # clipped by the global gradient norm, the encoder stepped on the mean
        losses = _losses(os.path.join(tmp, name))
        assert set(losses) == {1, 2}
        for step in (1, 2):
            assert losses[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (name, step)
    for world in (1, 2):
        shutil.copytree(two, os.path.join(tmp, f"resume{world}"))
    _train(tmp, data, [("resume1", 1, 3, "ddp"), ("resume2", 2, 0, "fsdp2")], resume=True)  # 2: to the end
    for world in (1, 2):
        resumed = _losses(os.path.join(tmp, f"resume{world}"))
        assert resumed[3] == pytest.approx(reference[3], rel=1e-5, abs=1e-6), f"resumed on {world}"
    _check_finished_and_exported(os.path.join(tmp, "resume2"), os.path.join(tmp, "model.safetensors"), data)


def _check_finished_and_exported(run_dir: str, out_path: str, data: tuple[str, str]) -> None:
    """A finished sharded run has plain final weights (read by ``megaclass eval``) and exports to a file."""
    from megaclass.cli import main
    from megaclass.train.export import read_export
    from megaclass.train.inference import evaluate_run

    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as file:
        metrics = json.load(file)
    assert evaluate_run(run_dir, data[1])["P@1"] == pytest.approx(metrics["P@1"])  # one process, whole head
    assert main(["export", "--run", run_dir, "--out", out_path]) == 0
    parts, metadata = read_export(out_path)
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as file:
        classes = json.load(file)["num_classes"]
    assert parts["head"]["weight"].shape[0] == classes  # every rank's rows, stacked
    assert "config.yaml" in metadata and "run.json" in metadata


@pytest.mark.parametrize("failure", ["exit", "hang"])
def test_a_failed_rank_stops_the_others_with_a_clear_error(tmp_path, data, failure: str) -> None:
    run_dir = os.path.join(tmp_path, "run")
    overrides = [*COMMON, "train.batch_size=16", "distributed.timeout_s=5"]
    running = start(failure, str(tmp_path), run_dir, *data, *overrides)
    try:
        _, err = running.processes[0].communicate(timeout=80)  # a hung rank 0 fails the test here
    finally:
        for process in running.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert running.processes[0].returncode != 0, "rank 0 went on after its peer failed"
    assert "rank 0 of 2: training stopped: a collective failed" in err, err
