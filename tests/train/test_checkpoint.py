"""Checkpoints: exact round trips, optimizer continuation, atomic writes, pruning, and resuming from the
newest whole checkpoint past a missing pointer, a kill between two renames, truncated or altered files and
leftovers."""

import errno
import json
import os
import random
import re
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from megaclass.state_io import DamagedStateError, SavedTensor
from megaclass.train import checkpoint
from megaclass.train.checkpoint import CheckpointWarning


def test_round_trip_is_exact(tmp_path):
    state = {"w": torch.randn(3, 5), "rng": random.getstate(), "counts": np.arange(4), 7: ("a", None)}
    path = checkpoint.save_checkpoint(str(tmp_path / "ckpt"), 7, state)
    assert os.path.basename(path) == "step_000000007"
    assert checkpoint.latest_checkpoint(str(tmp_path / "ckpt")) == path
    loaded = checkpoint.load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and np.array_equal(loaded["counts"], state["counts"])
    assert loaded["rng"] == state["rng"] and loaded[7] == ("a", None)


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
    from megaclass import state_io

    blocks = state_io._byte_blocks

    def crash(*args, **kwargs):  # the first block reaches the file, then the process is killed
        yield next(blocks(*args, **kwargs))
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(state_io, "_byte_blocks", crash)
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


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest_checkpoint(str(tmp_path / "missing")) is None


def _three_checkpoints(folder: str) -> list[str]:
    return [
        checkpoint.save_checkpoint(folder, step, {"step": torch.tensor(step)}, keep=5) for step in (2, 4, 6)
    ]


def _steps(folder: str) -> list[int]:
    """Steps of the whole checkpoints in ``folder`` (each verified), oldest first."""
    found = []
    for path in checkpoint.checkpoint_folders(folder):
        found.append(int(checkpoint.load_checkpoint(path)["step"]))
    return sorted(found)


def _damage(path: str, how: str) -> None:
    if how == "truncated":
        os.truncate(path, os.path.getsize(path) - 3)
    else:  # one flipped bit, in the tensor bytes at the end
        with open(path, "r+b") as file:
            file.seek(-2, os.SEEK_END)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0x01]))


def test_missing_pointer_resumes_from_the_newest_with_a_warning(tmp_path):
    folder = str(tmp_path)
    paths = _three_checkpoints(folder)
    os.remove(os.path.join(folder, "latest.json"))
    with pytest.warns(CheckpointWarning, match="latest.json is missing"):
        path, state = checkpoint.load_newest(folder)
    assert path == paths[-1] and int(state["step"]) == 6


def test_pointer_naming_a_missing_folder_after_a_kill_between_two_renames(tmp_path, monkeypatch):
    """Step 6 saved twice (mid-epoch, then at the epoch end): a kill between moving the first save aside and
    renaming the second into place leaves ``step_6`` missing; the first save is whole and is resumed."""
    folder = str(tmp_path)
    _three_checkpoints(folder)
    real_replace = os.replace

    def replace(source, target):
        if os.path.basename(source).startswith(".tmp-step_000000006"):
            raise KeyboardInterrupt("SIGKILL stand-in")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(folder, 6, {"step": torch.tensor(6), "second": True}, keep=5)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(folder, "step_000000006"))
    with pytest.warns(CheckpointWarning, match="names step_000000006, which is missing"):
        path, state = checkpoint.load_newest(folder)
    assert os.path.basename(os.path.dirname(path)).startswith(".old-step_000000006-")
    assert int(state["step"]) == 6 and "second" not in state
    checkpoint.recover(folder)
    assert sorted(os.listdir(folder)) == ["latest.json", "step_000000002", "step_000000004", "step_000000006"]
    assert _steps(folder) == [2, 4, 6], "no whole checkpoint lost"


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_newest_falls_back_to_the_previous_one(tmp_path, how):
    folder = str(tmp_path)
    paths = _three_checkpoints(folder)
    _damage(os.path.join(paths[-1], "tensors.safetensors"), how)
    with pytest.raises(DamagedStateError):
        checkpoint.load_checkpoint(paths[-1])
    size = os.path.getsize(os.path.join(paths[-1], "tensors.safetensors"))
    why = (
        f"has {size} bytes, the manifest says {size + 3}"
        if how == "truncated"
        else "differs from its checksum"
    )
    with pytest.warns(
        CheckpointWarning, match=re.escape(f"damaged checkpoint: {paths[-1]}: tensors.safetensors ") + why
    ):
        path, state = checkpoint.load_newest(folder)
    assert path == paths[1] and int(state["step"]) == 4
    checkpoint.recover(folder)
    assert all(os.path.isdir(p) for p in paths), "nothing deleted, not even the damaged one"


def test_every_checkpoint_damaged_is_an_error_that_deletes_nothing(tmp_path):
    folder = str(tmp_path)
    paths = _three_checkpoints(folder)
    for path in paths:
        _damage(os.path.join(path, "tensors.safetensors"), "flipped")
    before = sorted(os.listdir(folder))
    with pytest.warns(CheckpointWarning), pytest.raises(DamagedStateError, match="no whole checkpoint"):
        checkpoint.load_newest(folder)
    assert sorted(os.listdir(folder)) == before


def test_leftovers_are_removed_and_whole_checkpoints_kept(tmp_path):
    folder = str(tmp_path)
    _three_checkpoints(folder)
    os.makedirs(os.path.join(folder, ".tmp-step_000000008-abc"))  # a save killed before its rename
    open(os.path.join(folder, ".tmp-xyz.json"), "w").close()  # a pointer write killed before its rename
    shutil.copytree(
        os.path.join(folder, "step_000000004"), os.path.join(folder, ".old-step_000000004-q", "x")
    )
    os.makedirs(os.path.join(folder, ".tmp-step_000000010-shards", "rank_00000"))
    path, _ = checkpoint.load_newest(folder)
    assert path.endswith("step_000000006"), "leftovers are never read"
    checkpoint.recover(folder)
    assert sorted(os.listdir(folder)) == ["latest.json", "step_000000002", "step_000000004", "step_000000006"]
    assert _steps(folder) == [2, 4, 6]


def test_pruning_keeps_whole_checkpoints_up_to_the_one_written(tmp_path):
    """After resuming from step 4 past a damaged step 6, saving step 5 removes step 2 (keep 2), not step 6
    (written again when the run gets there), and an unfinished folder does not count as one of the kept."""
    folder = str(tmp_path)
    paths = _three_checkpoints(folder)
    _damage(os.path.join(paths[-1], "tensors.safetensors"), "flipped")
    os.makedirs(os.path.join(folder, "step_000000003"))  # no manifest: not whole
    checkpoint.save_checkpoint(folder, 5, {"step": torch.tensor(5)}, keep=2)
    assert sorted(os.listdir(folder)) == [
        "latest.json",
        "step_000000003",
        "step_000000004",
        "step_000000005",
        "step_000000006",
    ]
    with open(os.path.join(folder, "latest.json")) as file:
        assert json.load(file) == {"checkpoint": "step_000000005", "step": 5}


# ------------------------------------------------------------------------- sharded checkpoints (one rank)


def _sharded_head(seed: int):
    from megaclass.heads.base import ClassShard, HeadContext
    from megaclass.heads.dense import DenseHead, DenseHeadConfig

    torch.manual_seed(seed)
    context = HeadContext(in_features=4, num_classes=7, multilabel=False)
    head = DenseHead(DenseHeadConfig(seed=seed), context, ClassShard.for_rank(7, 0, 1))
    return head, torch.optim.AdamW(head.parameters(), lr=0.1)


def _save_sharded(folder: str, step: int, head, optimizer) -> str:
    from megaclass.distributed.checkpoint import save_sharded

    path = save_sharded(
        folder,
        step,
        head=head,
        head_optimizer=optimizer,
        common={"step": step},
        private={},
        rank=0,
        world_size=1,
    )
    checkpoint.commit_checkpoint(folder, path, keep=2)
    return path


def _sharded_loader(head, optimizer):
    from megaclass.distributed.checkpoint import load_sharded

    return lambda path: load_sharded(path, head=head, head_optimizer=optimizer, rank=0, world_size=1)[0]


def test_sharded_checkpoint_falls_back_past_a_damaged_rows_file(tmp_path):
    folder = str(tmp_path)
    head, optimizer = _sharded_head(0)
    saved = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            head.weight.add_(1.0)
        saved[step] = head.weight.detach().clone()
        _save_sharded(folder, step, head, optimizer)
    assert sorted(os.listdir(folder)) == ["latest.json", "step_000000002", "step_000000003"], "pruned to 2"
    newest = os.path.join(folder, "step_000000003")
    with open(os.path.join(newest, "manifest.json")) as file:
        listed = json.load(file)["files"]
    assert {"layout.json", "rows_00000.safetensors", "common/tensors.safetensors"} <= set(listed)
    assert "rank_00000/state.json" in listed
    _damage(os.path.join(newest, "rows_00000.safetensors"), "flipped")
    fresh, fresh_optimizer = _sharded_head(1)
    before = fresh.weight.detach().clone()
    with pytest.warns(CheckpointWarning, match=re.escape(f"{newest}: rows_00000.safetensors differs")):
        path, common = checkpoint.load_newest(folder, load=_sharded_loader(fresh, fresh_optimizer))
    assert path.endswith("step_000000002") and common["step"] == 2
    assert torch.equal(fresh.weight, saved[2]) and not torch.equal(before, saved[2])


def test_sharded_step_saved_twice_keeps_a_whole_checkpoint_through_a_kill(tmp_path, monkeypatch):
    folder = str(tmp_path)
    head, optimizer = _sharded_head(0)
    _save_sharded(folder, 4, head, optimizer)
    first = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.add_(1.0)
    real_replace = os.replace

    def replace(source, target):
        if os.path.basename(source) == ".tmp-step_000000004-shards":
            raise KeyboardInterrupt("SIGKILL stand-in")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save_sharded(folder, 4, head, optimizer)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(folder, "step_000000004"))
    fresh, fresh_optimizer = _sharded_head(1)
    with pytest.warns(CheckpointWarning, match="names step_000000004, which is missing"):
        path, _ = checkpoint.load_newest(folder, load=_sharded_loader(fresh, fresh_optimizer))
    assert os.path.basename(os.path.dirname(path)).startswith(".old-step_000000004-")
    assert torch.equal(fresh.weight, first)
    checkpoint.recover(folder)
    assert sorted(os.listdir(folder)) == ["latest.json", "step_000000004"]


def test_a_sharded_save_hashes_the_rows_once_while_writing_them(tmp_path, monkeypatch):
    from megaclass import state_io

    head, optimizer = _sharded_head(0)
    read_back, fingerprint = [], state_io.piece_fingerprint

    def spy(path):
        read_back.append(path)
        return fingerprint(path)

    monkeypatch.setattr(state_io, "piece_fingerprint", spy)
    path = _save_sharded(str(tmp_path), 1, head, optimizer)
    assert not [name for name in read_back if name.endswith("rows_00000.safetensors")]  # not read again
    with open(os.path.join(path, "manifest.json")) as file:
        listed = json.load(file)["files"]["rows_00000.safetensors"]
    assert listed == fingerprint(os.path.join(path, "rows_00000.safetensors"))


def test_a_full_disk_names_the_checkpoint_and_keeps_the_newest_whole_one(tmp_path, monkeypatch):
    folder = str(tmp_path / "checkpoints")
    first = checkpoint.save_checkpoint(folder, 1, {"w": torch.ones(3)})
    real_write = checkpoint.write_state

    def full_disk(path, state):
        real_write(path, state)  # the bytes went somewhere; the device then ran out
        shutil.rmtree(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_state", full_disk)
    with pytest.raises(OSError, match="no space left on the device writing checkpoint") as caught:
        checkpoint.save_checkpoint(folder, 2, {"w": torch.zeros(3)})
    assert caught.value.errno == errno.ENOSPC
    assert "step_000000002" in str(caught.value) and first in str(caught.value)
    assert "--resume" in str(caught.value) and "train.keep_checkpoints, now 2" in str(caught.value)
    assert checkpoint.latest_checkpoint(folder) == first
    assert torch.equal(checkpoint.load_checkpoint(first)["w"], torch.ones(3))


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def denied(path, state):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint, "write_state", denied)
    with pytest.raises(PermissionError, match="Permission denied"):
        checkpoint.save_checkpoint(str(tmp_path), 1, {"w": torch.ones(3)})


def test_short_of_room_when_the_next_checkpoint_will_not_fit(tmp_path, monkeypatch):
    folder = str(tmp_path / "checkpoints")
    path = checkpoint.save_checkpoint(folder, 1, {"w": torch.ones(1000)})
    size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    assert checkpoint.short_of_room(folder, path) is None  # this disk has room for a few KiB
    usage = shutil.disk_usage(folder)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=size - 1))
    warning = checkpoint.short_of_room(folder, path)
    assert warning is not None and "the next one will not fit" in warning and folder in warning
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=size))
    assert checkpoint.short_of_room(folder, path) is None


def test_saves_go_behind_the_steps_for_one_process_whose_state_an_eighth_of_the_host_holds():
    rule = checkpoint.saves_in_background
    assert rule(True, lambda: 100, 800, processes=1, sharded=False)
    assert not rule(True, lambda: 101, 800, processes=1, sharded=False)
    assert not rule(True, lambda: 100, 800, processes=2, sharded=False)
    assert not rule(True, lambda: 100, 800, processes=1, sharded=True)
    assert not rule(True, lambda: None, 800, processes=1, sharded=False)  # rows streamed
    assert not rule(False, lambda: 100, 800, processes=1, sharded=False)  # train.background_saves=false

    def unasked() -> int:
        raise AssertionError("the state is sized only for a run the rest of the rule allows")

    assert not rule(True, unasked, 800, processes=2, sharded=False)


def test_a_host_copy_keeps_the_values_of_when_it_was_taken():
    weight = torch.arange(6.0).reshape(2, 3)
    state = {"model": {"w": weight[:, 1:]}, "step": 3, "rows": [torch.ones(2, dtype=torch.bfloat16)]}
    copy = checkpoint.to_host(state)
    weight.add_(10.0)
    state["rows"][0].zero_()
    assert torch.equal(copy["model"]["w"], torch.tensor([[1.0, 2.0], [4.0, 5.0]]))
    assert torch.equal(copy["rows"][0], torch.ones(2, dtype=torch.bfloat16)) and copy["step"] == 3
    assert checkpoint.tensor_bytes(state) == 2 * 2 * 4 + 2 * 2
    saved = SavedTensor("unused", 0, (2, 2), torch.float32)
    assert checkpoint.tensor_bytes({"model": {"w": saved}}) is None


def test_background_saves_run_in_order_and_raise_a_failure_at_the_next_call():
    saves = checkpoint.BackgroundSaves()
    written, release = [], threading.Event()

    def slow():
        release.wait(10)
        written.append("first")

    saves.submit(slow)
    saves.check()  # in flight: no wait, nothing to raise
    assert written == []
    release.set()
    saves.submit(lambda: written.append("second"))  # waits for the first
    saves.wait()
    assert written == ["first", "second"]

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    saves.submit(full_disk)
    for _ in range(1000):
        try:
            saves.check()
        except OSError as error:
            assert error.errno == errno.ENOSPC
            break
        time.sleep(0.01)
    else:
        pytest.fail("a failed save was not raised by check()")
    saves.check()  # raised once
    saves.submit(full_disk)
    with pytest.raises(OSError, match="No space left"):
        saves.close()
