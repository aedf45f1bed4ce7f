"""A class-sharded run keeps the epoch that scored best on the validation rows, as a whole one does: each
rank writes its rows of the best epoch's weights, every rank ends with them, the test file is scored with
them and ``model/`` holds them; a killed run resumes (on as many ranks or on one process) to the same end.
With a weight average each rank averages its own rows (and, under FSDP2, its encoder shards), and the kept
weights are the best epoch's average.

The worker's ``best-2`` scenario makes epoch 2 of 3 score best on the validation rows, whatever the model
scores, so that the kept weights are not the last epoch's.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import exported_head, launch_all, write_bow_task

BATCH = 24  # the global batch: 120 training rows (30 held out for validation), 5 steps an epoch
BEST = 2  # the epoch the scenario makes best, of 3
CUT = 12  # interrupted runs stop after this step, in epoch 3 (after the best epoch's weights are written)

COMMON = [
    "model.type=mlp",
    "model.hidden=[16]",
    "model.dropout=0.0",
    "head.type=dense",
    "train.progress=false",
    "train.epochs=3",
    "train.device=cpu",
    "optim.head.lr=0.5",
    "train.valid_fraction=0.2",
    f"train.batch_size={BATCH}",
    "train.keep_checkpoints=3",  # every epoch's end stays, to compare with
]
SCORES = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")
SELECTED = ["head.type=selected", "head.sample_num=8", "head.index=gpu", "optim.head.lr=0.05"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_bow_task(str(tmp_path_factory.mktemp("data")), seed=1)


def _train(tmp: str, data, runs: list[tuple[str, int, list[str]]], *, resume: bool = False) -> None:
    """Train the runs ``(name, world size, overrides)`` at once under the ``best-2`` scenario; each rank's
    views go to ``<name>-<world>-<start|resume>/``."""
    launches = []
    for name, world, overrides in runs:
        args = [os.path.join(tmp, name), *data, *COMMON, *overrides, *(["--resume"] if resume else [])]
        out = os.path.join(tmp, f"{name}-{world}-{'resume' if resume else 'start'}")
        os.makedirs(out, exist_ok=True)
        launches.append((out, args, world))
    launch_all(f"best-{BEST}", launches, timeout_s=120)


def _records(run_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as file:
        return [record for record in map(json.loads, file) if record["kind"] == kind]


def _metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as file:
        return json.load(file)


def _checkpoint(run_dir: str, epoch: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{epoch * 5:09d}")


def _model(run_dir: str) -> dict:
    from megaclass.state_io import read_state

    return read_state(os.path.join(run_dir, "model"))


def _assert_close(a: dict, b: dict, where: str, *, exact: bool = False) -> None:
    assert set(a) == set(b), where
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), f"{where} {key}"
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{where} {key}")


def _assert_kept_the_best_epoch(run_dir: str) -> None:
    """The run kept epoch ``BEST``: ``metrics.json``, the final test scores and the curve's at that epoch
    agree, and ``best/`` holds that epoch alone."""
    metrics = _metrics(run_dir)
    assert metrics["epoch_kept"] == BEST and metrics["epochs"] == 3
    assert metrics["valid_P@1"] == pytest.approx(0.5 + 0.1 * BEST)
    (final,) = _records(run_dir, "eval_test")
    curve = {record["epoch"]: record for record in _records(run_dir, "eval_test_curve")}
    assert final["epoch"] == BEST and sorted(curve) == [1, 2, 3]
    for key in SCORES:
        assert metrics[key] == final[key] == curve[BEST][key], key
    assert any(curve[3][key] != curve[BEST][key] for key in SCORES), "the last epoch scores otherwise"
    assert os.listdir(os.path.join(run_dir, "best")) == [f"epoch-{BEST}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data) -> str:
    """Dense-head runs on 2 ranks: uninterrupted (``two``), and stopped after step ``CUT`` (``cut``), then
    resumed on 2 ranks and (a copy, ``cut-on1``) on 1 process with the plain head."""
    tmp = str(tmp_path_factory.mktemp("best"))
    _train(tmp, data, [("two", 2, []), ("cut", 2, [f"train.stop_after_steps={CUT}"])])
    assert not os.path.exists(os.path.join(tmp, "cut", "metrics.json"))
    assert os.listdir(os.path.join(tmp, "cut", "best")) == [f"epoch-{BEST}"]
    shutil.copytree(os.path.join(tmp, "cut"), os.path.join(tmp, "cut-on1"))
    _train(tmp, data, [("cut", 2, []), ("cut-on1", 1, ["distributed.shard_head=never"])], resume=True)
    return tmp


@pytest.mark.slow
def test_a_sharded_run_ends_with_the_best_epochs_weights_on_every_rank(runs, data) -> None:
    from megaclass.state_io import read_state
    from megaclass.train.inference import evaluate_run

    run_dir = os.path.join(runs, "two")
    _assert_kept_the_best_epoch(run_dir)
    best = os.path.join(run_dir, "best", f"epoch-{BEST}")
    with open(os.path.join(best, "layout.json"), encoding="utf-8") as file:
        layout = json.load(file)
    assert (layout["world_size"], layout["ranges"], layout["weights_only"]) == (2, [[0, 15], [15, 29]], True)
    assert sorted(name for name in os.listdir(best) if name.endswith(".safetensors")) == [
        "rows_00000.safetensors",
        "rows_00001.safetensors",
    ]
    model = _model(run_dir)
    for epoch in (BEST, 3):  # the best epoch's end, and the last's (other weights)
        saved = read_state(os.path.join(_checkpoint(run_dir, epoch), "common"))["encoder"]
        head = exported_head(_checkpoint(run_dir, epoch))
        same = epoch == BEST
        assert torch.equal(model["head"]["weight"], head["weight"]) is same, epoch
        assert all(torch.equal(model["encoder"][key], saved[key]) for key in saved) is same, epoch
    _assert_close(model["head"], exported_head(best), "best/", exact=True)
    for rank, (first, last) in enumerate(layout["ranges"]):  # what each rank ends with: its rows of them
        kept = read_state(os.path.join(runs, "two-2-start", f"kept-rank{rank}"))
        assert kept["range"] == [first, last, 29]
        for key in ("weight", "bias"):
            assert torch.equal(kept["head"][key], model["head"][key][first:last]), f"rank {rank}: {key}"
        _assert_close(kept["encoder"], model["encoder"], f"rank {rank}: encoder", exact=True)
    assert evaluate_run(run_dir, data[1])["P@1"] == pytest.approx(_metrics(run_dir)["P@1"])


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_to_the_same_kept_weights(runs) -> None:
    """Resumed on 2 ranks it ends as the uninterrupted run; on 1 process (the plain head reading the
    sharded run's kept rows) the same up to the float error of another reduction order."""
    reference = _model(os.path.join(runs, "two"))
    for name, exact in (("cut", True), ("cut-on1", False)):
        run_dir = os.path.join(runs, name)
        _assert_kept_the_best_epoch(run_dir)
        model = _model(run_dir)
        for part in ("encoder", "head"):
            _assert_close(model[part], reference[part], f"{name}: {part}", exact=exact)
        metrics, full = _metrics(run_dir), _metrics(os.path.join(runs, "two"))
        for key in SCORES:
            assert metrics[key] == pytest.approx(full[key], abs=1e-6), f"{name}: {key}"


@pytest.fixture(scope="module")
def averaged_runs(tmp_path_factory: pytest.TempPathFactory, data) -> str:
    """Runs with a weight average: on 2 ranks (``two``), on 1 process with the plain head (``one``), on 2
    ranks stopped after step 8, in epoch ``BEST``, then resumed with an FSDP2 encoder (``fsdp``), and on 1
    process stopped after step 3 and resumed on 2 ranks (``on2``: the average cut to each rank's rows); on 2
    ranks without validation rows (``last``), and so with a selected head (``selected``: each rank averages
    its store's rows)."""
    tmp = str(tmp_path_factory.mktemp("averaged"))
    ema = ["train.ema_decay=0.5"]
    runs = [
        ("two", 2, ema),
        ("one", 1, ema),
        ("fsdp", 2, [*ema, "train.stop_after_steps=8"]),
        ("on2", 1, [*ema, "train.stop_after_steps=3"]),
        ("last", 2, [*ema, "train.valid_fraction=0"]),
        ("selected", 2, [*ema, "train.valid_fraction=0", *SELECTED]),
    ]
    _train(tmp, data, runs)
    _train(tmp, data, [("fsdp", 2, [*ema, "distributed.encoder=fsdp2"]), ("on2", 2, ema)], resume=True)
    return tmp


@pytest.mark.slow
def test_each_rank_averages_its_own_rows_and_the_average_is_kept(averaged_runs) -> None:
    """The kept weights are the best epoch's average (saved in that epoch's checkpoint beside the trained
    rows), the same on 2 ranks, on 1 process, resumed under FSDP2 (which averages, swaps in, saves and
    restores its encoder shards) and resumed on 2 ranks from a single-process checkpoint."""
    from megaclass.state_io import read_state

    two = os.path.join(averaged_runs, "two")
    model = _model(two)
    checkpoint = _checkpoint(two, BEST)
    averaged = exported_head(checkpoint, averaged=True)
    _assert_close(model["head"], averaged, "head", exact=True)
    assert not torch.equal(averaged["weight"], exported_head(checkpoint)["weight"])  # not the trained
    saved = read_state(os.path.join(checkpoint, "common"))
    _assert_close(model["encoder"], saved["average"], "encoder", exact=True)
    assert not torch.equal(saved["average"]["embedding"], saved["encoder"]["embedding"])
    curves = {}
    for name in ("two", "one", "fsdp", "on2"):
        run_dir = os.path.join(averaged_runs, name)
        _assert_kept_the_best_epoch(run_dir)
        other = _model(run_dir)
        for part in ("encoder", "head"):
            _assert_close(other[part], model[part], f"{name}: {part}")
        curves[name] = {r["epoch"]: r for r in _records(run_dir, "eval_test_curve")}
    for name in ("one", "fsdp", "on2"):  # every epoch's average scored alike
        for epoch, record in curves["two"].items():
            for key in SCORES:
                assert curves[name][epoch][key] == pytest.approx(record[key], abs=1e-6), (name, epoch, key)


@pytest.mark.slow
def test_without_validation_rows_a_sharded_run_ends_with_the_last_epochs_average(averaged_runs) -> None:
    from megaclass.state_io import read_state
    from megaclass.train.checkpoint import latest_checkpoint

    run_dir = os.path.join(averaged_runs, "last")
    assert _metrics(run_dir)["epoch_kept"] == 3 and not os.path.exists(os.path.join(run_dir, "best"))
    model, latest = _model(run_dir), latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    _assert_close(model["head"], exported_head(latest, averaged=True), "head", exact=True)
    assert not torch.equal(model["head"]["weight"], exported_head(latest)["weight"])  # not the trained
    _assert_close(
        model["encoder"], read_state(os.path.join(latest, "common"))["average"], "encoder", exact=True
    )


@pytest.mark.slow
def test_a_sharded_selected_heads_final_rows_are_the_average_of_its_ranks_rows(averaged_runs) -> None:
    """Each rank's store averages its rows; the final model's rows are the last checkpoint's average of
    them, stacked over the ranks (the trained rows are another matrix)."""
    from megaclass.train.checkpoint import latest_checkpoint

    run_dir = os.path.join(averaged_runs, "selected")
    model, latest = _model(run_dir), latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    averaged, trained = exported_head(latest, averaged=True), exported_head(latest)
    assert set(model["head"]) == set(averaged) == {"store.weight"}
    assert torch.equal(model["head"]["store.weight"], averaged["store.weight"])
    assert not torch.equal(averaged["store.weight"], trained["store.weight"])
