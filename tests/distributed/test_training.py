"""The trainer on 2 gloo ranks: the same steps as 1 rank with the same global batch, checkpoints that 1 or
2 ranks resume with the same next loss, export of a sharded run, and a dead rank that stops the others."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from conftest import launch

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "deb-tags")
TRAIN, TEST = os.path.join(DATA, "train_bow.txt.gz"), os.path.join(DATA, "test_bow.txt.gz")
COMMON = [
    "model.type=mlp", "model.hidden=[16]", "model.dropout=0.0", "head.type=dense", "distributed.shard_head=always",
    "train.progress=false", "train.log_every=1", "train.epochs=2", "train.device=cpu", "optim.head.lr=0.05",
]


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _train(tmp, name: str, world: int, steps: int, *extra: str, resume: bool = False) -> str:
    run_dir = os.path.join(tmp, name)
    batch = 32 // world
    args = [run_dir, TRAIN, TEST, *COMMON, f"train.batch_size={batch}", f"train.stop_after_steps={steps}", *extra]
    out = os.path.join(tmp, f"{name}-{steps}-{world}")
    os.makedirs(out, exist_ok=True)
    result = launch("train", out, *args, *(["--resume"] if resume else []), world_size=world, timeout_s=240)
    assert result.codes == [0] * world, "\n".join(result.stderr)
    return run_dir


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_resume_on_any_world(tmp_path) -> None:
    tmp = str(tmp_path)
    two = _train(tmp, "two", 2, 2)
    one = _train(tmp, "one", 1, 3)
    first, reference = _losses(two), _losses(one)
    assert set(first) == {1, 2}
    for step in (1, 2):
        assert first[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    for world in (1, 2):
        copy = os.path.join(tmp, f"resume{world}")
        shutil.copytree(two, copy)
        _train(tmp, f"resume{world}", world, 3, resume=True)
        assert _losses(copy)[3] == pytest.approx(reference[3], rel=1e-5, abs=1e-6), f"resumed on {world}"
    from megaclass.distributed.export import export_run, read_export

    path = export_run(os.path.join(tmp, "resume2"), os.path.join(tmp, "model.safetensors"))
    parts, metadata = read_export(path)
    with open(os.path.join(tmp, "resume2", "run.json"), encoding="utf-8") as file:
        classes = json.load(file)["num_classes"]
    assert parts["head"]["weight"].shape[0] == classes  # every rank's rows, stacked
    assert "config.yaml" in metadata


def test_dead_rank_stops_the_others_within_the_timeout(tmp_path) -> None:
    started = time.monotonic()
    world = launch("die", str(tmp_path), "20", timeout_s=90)
    assert world.codes[1] == 3
    assert world.codes[0] != 0, "rank 0 went on after its peer died"
    assert time.monotonic() - started < 90
    assert "Error" in world.stderr[0] or "error" in world.stderr[0]
