"""The trainer on gloo ranks: the same steps on 2 ranks as on 1 process with the same global batch,
checkpoints that any world size resumes (2 ranks on 1 and 3, 1 process on 2) with the same losses, the
selected heads' rows owned by one rank each, export of a sharded run, a dead rank that stops the others."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import launch_all, start, write_bow_task

BATCH = 30  # the global batch: 1, 2 and 3 ranks divide it, and the 150 training rows (5 steps an epoch)
STEPS = 10  # 2 epochs
CUT = 3  # interrupted runs stop after this step, in the middle of the first epoch

COMMON = [
    "model.type=mlp",
    "model.hidden=[16]",
    "model.dropout=0.0",
    "head.type=dense",
    "train.progress=false",
    "train.log_every=1",
    "train.epochs=2",
    "train.device=cpu",
    "optim.head.lr=0.05",
    "train.grad_clip=0.5",
    "train.valid_fraction=0",  # every row trains (no validation rows): the last epoch is kept
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_bow_task(str(tmp_path_factory.mktemp("data")), seed=0)


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _metrics(run_dir: str) -> dict[str, float]:
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as file:
        return json.load(file)


def _train(
    tmp, data, runs: list[tuple[str, int, list[str]]], *, resume: bool = False, scenario: str = "train"
) -> None:
    """Train the runs ``(name, world size, overrides)`` at once, each with the global batch ``BATCH``."""
    launches = []
    for name, world, overrides in runs:
        run_dir = os.path.join(tmp, name)
        args = [run_dir, *data, *COMMON, f"train.batch_size={BATCH}", *overrides]
        out = os.path.join(tmp, f"{name}-{world}-{'resume' if resume else 'start'}")
        os.makedirs(out, exist_ok=True)
        launches.append((out, [*args, *(["--resume"] if resume else [])], world))
    launch_all(scenario, launches, timeout_s=300)


def _cli_train(tmp, data, name: str, nproc: int, overrides: list[str]) -> subprocess.Popen:
    """``megaclass train --nproc-per-node nproc ...``: the command forwarding to torchrun."""
    overrides = [*COMMON, f"train.batch_size={BATCH}", *overrides]
    command = [sys.executable, "-m", "megaclass", "train", "--nproc-per-node", str(nproc), "--train", data[0]]
    command += ["--test", data[1], "--out", os.path.join(tmp, name), "--set", *overrides]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks over gloo, also on a machine with one GPU
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_same_losses(losses: dict[int, float], reference: dict[int, float], name: str) -> None:
    """Equal up to the float error of another reduction order (the world size changes it)."""
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), f"{name}: step {step}"


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory: pytest.TempPathFactory, data) -> tuple[str, str]:
    """Dense-head runs of one config, uninterrupted: on 2 ranks (``two``), on 1 process with the head sharded
    as one whole shard (``one``) and with the plain head (``plain``; every world size draws the same rows);
    stopped after step ``CUT``: on 2 ranks started by ``megaclass train --nproc-per-node 2`` (``cut``) and on
    1 process with the plain head (``single``, a single-process checkpoint). Returns the folder holding them
    and the command's standard output."""
    tmp = str(tmp_path_factory.mktemp("dense"))
    cut = f"train.stop_after_steps={CUT}"
    cli = _cli_train(tmp, data, "cut", 2, [cut])
    runs = [
        ("one", 1, ["distributed.shard_head=always"]),
        ("two", 2, []),
        ("plain", 1, []),
        ("single", 1, [cut]),
    ]
    _train(tmp, data, runs)
    out, err = cli.communicate(timeout=300)
    assert cli.returncode == 0, err
    return tmp, out


def test_nproc_per_node_is_taken_out_of_the_forwarded_arguments() -> None:
    from megaclass.cli import _without_nproc

    argv = ["--train", "a", "--nproc-per-node", "2", "--out", "b", "--nproc-per-node=4", "--set", "x=1"]
    assert _without_nproc(argv) == ["--train", "a", "--out", "b", "--set", "x=1"]


def test_the_global_batch_is_split_evenly_over_the_ranks() -> None:
    from megaclass.distributed.info import DistInfo
    from megaclass.distributed.parallel import rank_batch_size
    from megaclass.schema import ConfigError
    from megaclass.train.config import load_config

    config = load_config(None, ["train.batch_size=30"])
    assert [rank_batch_size(config, DistInfo(world_size=n)) for n in (1, 2, 3, 5)] == [30, 15, 10, 6]
    with pytest.raises(
        ConfigError, match=r"train.batch_size=30 .* 4 ranks.* 4 does not divide it.* 28 or 32"
    ):
        rank_batch_size(config, DistInfo(world_size=4))


@pytest.mark.parametrize(("rows", "world"), [(150, 2), (150, 3), (64, 4), (7, 7)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_take_slices_of_one_process_batches(rows: int, world: int, drop_last: bool) -> None:
    """Rank r's rows of a step are the r-th slice of the batch one process draws with the global batch size
    (here the number of ranks divides the number of rows: no batch is topped up)."""
    import numpy as np

    from megaclass.data.loaders import BatchLoader

    def loader(rank: int, world_size: int, batch_size: int) -> BatchLoader:
        return BatchLoader(
            list(range(rows)), batch_size=batch_size, seed=4, drop_last=drop_last, rank=rank,
            world_size=world_size,
        )  # fmt: skip

    for global_batch in (world, 6 * world, 8 * world):
        single = loader(0, 1, global_batch)
        ranks = [loader(rank, world, global_batch // world) for rank in range(world)]
        assert {r.steps_per_epoch() for r in ranks} == {single.steps_per_epoch()}
        for epoch in (0, 3):
            parts = [r.epoch_rows(epoch) for r in ranks]
            for step, rows_of_step in enumerate(single.epoch_rows(epoch)):
                together = np.concatenate([part[step] for part in parts])
                assert np.array_equal(together, rows_of_step), (global_batch, epoch, step)


@pytest.mark.slow
def test_two_ranks_take_the_steps_of_one_process(dense_runs) -> None:
    tmp, cli_output = dense_runs
    opening = cli_output.splitlines()[:2]  # the recipe line, then the data and batch line
    assert any("2 ranks x 15 samples = global batch 30" in line for line in opening), cli_output
    one, two = _losses(os.path.join(tmp, "one")), _losses(os.path.join(tmp, "two"))
    assert set(one) == set(two) == set(range(1, STEPS + 1))
    _assert_same_losses(two, one, "2 ranks")  # clipped by the global gradient norm, the encoder on the mean
    p1_one, p1_two = _metrics(os.path.join(tmp, "one"))["P@1"], _metrics(os.path.join(tmp, "two"))["P@1"]
    assert abs(p1_one - p1_two) < 0.005, (p1_one, p1_two)
    # the same config with the defaults (shard_head auto: an unsharded head on one process) starts alike too
    _assert_same_losses(two, _losses(os.path.join(tmp, "plain")), "1 process, unsharded")
    # the head's memory is the whole head's, summed over the ranks' parts (the second rank's AdamW keeps its
    # own step count of the weight and of the bias: 4 bytes each)
    whole, summed = _metrics(os.path.join(tmp, "plain")), _metrics(os.path.join(tmp, "two"))
    for part, more in (("weights", 0), ("grad", 0), ("optimizer", 8), ("total", 8)):
        assert summed[f"head_{part}_bytes"] == whole[f"head_{part}_bytes"] + more, part


@pytest.mark.slow
def test_runs_resume_on_any_number_of_ranks(dense_runs, data) -> None:
    """2 ranks (a sharded checkpoint) resume on 1 process with the plain head, on 3 ranks and on 2 under
    FSDP2, and go on with the uninterrupted 2-rank run's losses; 1 process (a single-process checkpoint)
    resumes on 2 ranks with a sharded head and goes on with the uninterrupted 1-process run's losses."""
    tmp, _ = dense_runs
    for source, name in (("cut", "on1"), ("cut", "on3"), ("cut", "fsdp"), ("single", "on2")):
        shutil.copytree(os.path.join(tmp, source), os.path.join(tmp, name))
    runs = [
        ("on1", 1, ["distributed.shard_head=never"]),  # a change a resume may make
        ("on3", 3, []),
        ("fsdp", 2, ["distributed.encoder=fsdp2"]),
        ("on2", 2, []),
    ]
    _train(tmp, data, runs, resume=True)
    for name, reference in (("on1", "two"), ("on3", "two"), ("fsdp", "two"), ("on2", "plain")):
        resumed = _losses(os.path.join(tmp, name))
        assert set(resumed) == set(range(1, STEPS + 1)), name
        _assert_same_losses(resumed, _losses(os.path.join(tmp, reference)), name)
        p1 = _metrics(os.path.join(tmp, reference))["P@1"]
        assert _metrics(os.path.join(tmp, name))["P@1"] == pytest.approx(p1, abs=1e-6), name
    _check_finished_and_exported(os.path.join(tmp, "on3"), os.path.join(tmp, "model.safetensors"), data)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["partial_fc", "selected"])
def test_selected_heads_keep_each_row_on_one_rank_and_resume_on_one_process(tmp_path, data, head) -> None:
    """On 2 ranks every rank's rows at the end are the saved model's rows of its range, and its encoder and
    replicated head state the saved ones; a run stopped on 2 ranks resumes on 1 process from exactly its
    checkpoint's rows and finishes."""
    from megaclass.distributed.checkpoint import read_sharded_head_state
    from megaclass.state_io import read_state
    from megaclass.train.checkpoint import latest_checkpoint

    tmp = str(tmp_path)
    options = [f"head.type={head}", "optim.head.lr=0.5"]
    if head == "selected":
        options += ["head.sample_num=8", "head.interval=2"]  # an index over the rows, rebuilt every 2 steps
    _train(
        tmp,
        data,
        [("full", 2, options), ("cut", 2, [*options, f"train.stop_after_steps={CUT}"])],
        scenario="views",
    )
    model = read_state(os.path.join(tmp, "full", "model"))
    assert set(model["head"]) == {"store.weight"}  # the weights alone, as a single process keeps them
    ranges = []
    for rank in (0, 1):
        view = read_state(os.path.join(tmp, "full-2-start", f"final-rank{rank}"))
        start, stop, rows = view["range"]
        ranges.append((start, stop))
        assert rows == 29
        for key, value in view["encoder"].items():
            assert torch.equal(value, model["encoder"][key]), f"rank {rank}: encoder {key}"
        for key, value in view["head"].items():
            kind = view["layout"].get(key)
            if key not in model["head"]:  # training state (row optimizer state, index, RNG), not weights
                assert key.startswith(("store.optim.", "selection.", "index.")), key
            elif kind == "rows":
                assert torch.equal(value, model["head"][key][start:stop]), f"rank {rank}: head {key}"
            elif kind is None:  # replicated
                assert torch.equal(value, model["head"][key]), f"rank {rank}: head {key}"
    assert ranges == [(0, 15), (15, 29)]
    cut_dir = os.path.join(tmp, "cut")
    saved, _ = read_sharded_head_state(latest_checkpoint(os.path.join(cut_dir, "checkpoints")), 0, 29)
    _train(tmp, data, [("cut", 1, options)], resume=True, scenario="views")
    resumed = read_state(os.path.join(tmp, "cut-1-resume", "setup-rank0"))
    assert resumed["range"] == [0, 29, 29]
    for key, kind in resumed["layout"].items():
        if kind == "rows":
            assert torch.equal(resumed["head"][key], saved[key]), f"resumed head {key}"
    losses = _losses(cut_dir)
    assert set(losses) == set(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for loss in losses.values())
    assert 0 <= _metrics(cut_dir)["P@1"] <= 1


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
    overrides = [*COMMON, "train.batch_size=16", "distributed.timeout_s=5"]  # 8 samples on each rank
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
