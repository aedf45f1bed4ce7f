"""Checkpoints of a parameter-server head: rows and optimizer state stream from the servers to the file and
back a block at a time, are one state of the servers, and restore the head bit for bit."""

import json
import os

import pytest
import torch

from megaclass import state_io
from megaclass.cli import main
from megaclass.heads import HeadContext, build_head, head_config
from megaclass.ops.row_average import ema_decay_at
from megaclass.paramserver import HyperParams, ParamServerClient, ParamServerError
from megaclass.store import paramserver as ps_store
from megaclass.train import checkpoint
from megaclass.train.averaging import WeightAverage

NUM_ROWS, DIM = 61, 6
ROW_BYTES = 4 * DIM
BLOCK_ROWS = 5  # rows per block of the save and of the load, made small to count them
DECAY = 0.8  # of the shards' weight average
OPTIMIZERS = {
    # name: (server optimizer, its hyper-parameters, the head's optimizer)
    "sgd-momentum": ("sgd", HyperParams(lr=0.5, momentum=0.9), {"kind": "sgd", "momentum": 0.9}),
    "adagrad": ("adagrad", HyperParams(lr=0.5), {"kind": "adagrad"}),
}


def _servers(shards, name, *, seed):
    optimizer, hyper, _ = OPTIMIZERS[name]
    return shards(3, num_rows=NUM_ROWS, dim=DIM, optimizer=optimizer, hyper=hyper, seed=seed)


def _url(servers):
    return "ps://" + ",".join(f"127.0.0.1:{server.port}" for server in servers)


def _head(servers, name, **options):
    # index none: the shards' exact query may run before the last push is applied (timing, not state)
    options = {
        "type": "selected",
        "sample_num": 12,
        "index": "none",
        "interval": 2,
        "coverage_every": 0,
        **options,
    }
    config = head_config({**options, "store": _url(servers), "optimizer": OPTIMIZERS[name][2]})
    return build_head(config, HeadContext(in_features=DIM, num_classes=NUM_ROWS, multilabel=False))


def head_rows(head):
    """The head's row averages, by the names a trainer's weight average gives them."""
    return {f"head.{name}": average for name, average in head.average_rows(DECAY).items()}


def _fields(servers, store):
    """Every field the servers keep, read whole by a client of their own: ``{key: tensor}``."""
    client = ParamServerClient([f"127.0.0.1:{server.port}" for server in servers], timeout_s=20)
    fields = {"weight": client.get_rows(0, NUM_ROWS)}
    fields.update({f"optim.{slot}": client.get_rows(0, NUM_ROWS, field=slot) for slot in store.slots})
    client.close()
    return fields


def _block_rows(row_shape, block_bytes=BLOCK_ROWS * ROW_BYTES):
    """Rows of ``row_shape`` float32 values in a block of ``block_bytes``."""
    return max(1, block_bytes // (4 * torch.Size(row_shape).numel()))


def _batches():
    """Six batches of 4 samples: features and one label each."""
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, DIM, generator=generator), torch.randint(NUM_ROWS, (4,), generator=generator))
        for _ in range(6)
    ]


def _assert_both_train_on_alike(train_head, batches, original, resumed):
    """``(head, servers)`` pairs trained on from step 4: the same losses, the same state on the servers."""
    (head, first), (again, second) = original, resumed
    assert train_head(again, batches, 4) == train_head(head, batches, 4)
    trained = _fields(first, head.store)
    for key, tensor in _fields(second, again.store).items():
        assert torch.equal(tensor, trained[key]), key
    head.store.close()
    again.store.close()


def _record(monkeypatch, owner, name, calls, size):
    """Wrap method ``owner.name`` to append ``size(*args, **kwargs)`` to ``calls`` before each call."""
    original = getattr(owner, name)

    def recorded(self, *args, **kwargs):
        calls.append(size(*args, **kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_ps_head_checkpoint_streams_and_resumes_bit_for_bit(
    shards, monkeypatch, tmp_path, name, train_head
):
    batches = _batches()
    first = _servers(shards, name, seed=1)
    head = _head(first, name)
    train_head(head, batches[:3], 1)

    pulls = []  # (field, rows) of every read from the servers
    _record(
        monkeypatch, ParamServerClient, "get_rows", pulls, lambda a, b, **k: (k.get("field", "rows"), b - a)
    )
    state = {"head": head.state_dict(), "step": 3}
    assert all(rows == 1 for _, rows in pulls)  # state_dict pulls nothing but a row of each field's shape
    pulls.clear()
    monkeypatch.setitem(state_io.write_state.__kwdefaults__, "chunk_bytes", BLOCK_ROWS * ROW_BYTES)
    path = checkpoint.save_checkpoint(str(tmp_path / "ck"), 3, state)
    monkeypatch.undo()
    expected = _fields(first, head.store)
    store_keys = {key for key in head.state_dict() if key.startswith("store.")}
    assert set(expected) == {key.removeprefix("store.") for key in store_keys}
    assert (name == "adagrad") == ("optim.step" in expected)  # a per-row scalar slot
    for key, tensor in expected.items():  # one block of rows at a time, each row read once
        field = "rows" if key == "weight" else key.removeprefix("optim.")
        sizes = [rows for pulled, rows in pulls if pulled == field]
        assert max(sizes) == _block_rows(tensor.shape[1:]) and sum(sizes) == NUM_ROWS, key

    second = _servers(shards, name, seed=2)  # other rows, zero state: all overwritten from the file
    resumed = _head(second, name)
    loaded = checkpoint.load_checkpoint(path)
    assert all(isinstance(loaded["head"][key], state_io.SavedTensor) for key in store_keys)
    writes, reads = [], []
    monkeypatch.setattr(ps_store, "LOAD_BLOCK_BYTES", BLOCK_ROWS * ROW_BYTES)
    _record(
        monkeypatch, ParamServerClient, "set_rows", writes, lambda ids, values, **k: (k["field"], len(ids))
    )
    _record(monkeypatch, state_io.SavedTensor, "read_rows", reads, lambda a, b: b - a)
    resumed.load_state_dict(loaded["head"])
    monkeypatch.undo()
    for key, tensor in expected.items():  # one block of rows at a time from the file to the servers
        field = "rows" if key == "weight" else key.removeprefix("optim.")
        sizes = [rows for written, rows in writes if written == field]
        assert max(sizes) == _block_rows(tensor.shape[1:]) and sum(sizes) == NUM_ROWS, key
    assert max(reads) == max(_block_rows(tensor.shape[1:]) for tensor in expected.values())
    for key, tensor in _fields(second, resumed.store).items():
        assert torch.equal(tensor, expected[key]), key  # bit for bit

    _assert_both_train_on_alike(train_head, batches[3:], (head, first), (resumed, second))


def test_a_checkpoint_the_servers_change_under_is_refused(shards, monkeypatch, tmp_path):
    servers = _servers(shards, "sgd-momentum", seed=1)
    store = ps_store.ParamServerStore(_url(servers), timeout_s=20)
    state = {"head": {f"store.{key}": value for key, value in store.state_dict().items()}, "step": 1}
    original = ParamServerClient.get_rows

    def update_after_the_first_block(self, *args, **kwargs):
        rows = original(self, *args, **kwargs)
        if not store.client.last_pushed_step:  # another trainer's step lands in the middle of the save
            store.push(torch.arange(0, NUM_ROWS, 7), torch.ones(9, DIM), step=1, lr=0.5)
            store.flush()
        return rows

    monkeypatch.setattr(ParamServerClient, "get_rows", update_after_the_first_block)
    monkeypatch.setitem(state_io.write_state.__kwdefaults__, "chunk_bytes", BLOCK_ROWS * ROW_BYTES)
    with pytest.raises(
        ParamServerError, match=r"rows changed while being read \(version 1, read from version 0"
    ):
        checkpoint.save_checkpoint(str(tmp_path / "ck"), 1, state)
    assert checkpoint.latest_checkpoint(str(tmp_path / "ck")) is None
    assert not [entry for entry in os.listdir(tmp_path / "ck") if not entry.startswith(".")]
    store.close()


def test_kept_weights_load_the_servers_rows_alone(shards, tmp_path, train_head):
    """A parameter-server head's weights (``weights_state_dict``: rows, no optimizer slot) written and read
    back into another head overwrite that head's servers' rows and leave their optimizer state."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, DIM, generator=generator), torch.randint(NUM_ROWS, (4,), generator=generator))
        for _ in range(3)
    ]
    first, second = _servers(shards, "sgd-momentum", seed=1), _servers(shards, "sgd-momentum", seed=2)
    head, other = _head(first, "sgd-momentum"), _head(second, "sgd-momentum")
    train_head(head, batches, 1)
    train_head(other, batches[:1], 1)
    weights = head.weights_state_dict()
    assert set(weights) == {"store.weight"}
    state_io.write_state(str(tmp_path / "weights"), weights)
    slots_before = _fields(second, other.store)
    other.load_state_dict(state_io.read_state(str(tmp_path / "weights"), stream=lambda key: True))
    after, trained = _fields(second, other.store), _fields(first, head.store)
    assert torch.equal(after["weight"], trained["weight"])
    for key, tensor in after.items():
        assert key == "weight" or torch.equal(tensor, slots_before[key]), key
    head.store.close()
    other.store.close()


def test_bf16_shards_restored_from_a_checkpoint_train_on_bit_for_bit(shards, tmp_path, train_head):
    batches = _batches()
    optimizer, hyper, _ = OPTIMIZERS["sgd-momentum"]

    def servers():  # the same seed: the same stochastic rounding of the same step
        return shards(
            3, num_rows=NUM_ROWS, dim=DIM, optimizer=optimizer, hyper=hyper, seed=1, dtype="bf16_sr"
        )

    first = servers()
    head = _head(first, "sgd-momentum", store_dtype="bf16_sr")
    train_head(head, batches[:3], 1)
    path = checkpoint.save_checkpoint(str(tmp_path / "ck"), 3, {"head": head.state_dict(), "step": 3})
    expected = _fields(first, head.store)
    second = servers()
    resumed = _head(second, "sgd-momentum", store_dtype="bf16_sr")
    train_head(resumed, batches[5:], 1)  # other rows and momentum, all overwritten from the file
    resumed.load_state_dict(checkpoint.load_checkpoint(path)["head"])
    for key, tensor in _fields(second, resumed.store).items():
        assert torch.equal(tensor, expected[key]), key
    _assert_both_train_on_alike(train_head, batches[3:], (head, first), (resumed, second))


def test_rows_on_servers_that_keep_no_average_are_left_out_of_a_weight_average(shards):
    """Shards started without ``--average-decay`` keep no average of their rows: the head averages none
    there (the trainer then says they are kept as trained)."""
    head = _head(_servers(shards, "adagrad", seed=0), "adagrad")
    assert head.average_rows(0.9) == {} and head.store.start_average(0.9) is None
    head.store.close()


def _averaged_servers(shards, *, seed, decay=DECAY):
    optimizer, hyper, _ = OPTIMIZERS["sgd-momentum"]
    return shards(
        3, num_rows=NUM_ROWS, dim=DIM, optimizer=optimizer, hyper=hyper, seed=seed, average_decay=decay
    )


def _plain_ema(snapshots, decay=DECAY):
    """``snapshots[0]`` (the start) averaged with ``snapshots[t]`` after each step ``t``, in float64."""
    average = snapshots[0].double()
    for step, rows in enumerate(snapshots[1:], start=1):
        rate = ema_decay_at(decay, step)
        average = rate * average + (1 - rate) * rows.double()
    return average


def test_the_servers_average_of_the_rows_is_evaluated_saved_and_resumed(shards, tmp_path, train_head):
    """Shards started with ``--average-decay`` keep the rows' average: swapped in, every read of the store
    gives it (a plain EMA of every row after every step), no update is taken; it is saved a block at a time
    with the checkpoint, and a resumed run averages on as the uninterrupted one."""
    batches = _batches()
    first = _averaged_servers(shards, seed=1)
    head = _head(first, "sgd-momentum")
    average = WeightAverage({"head": head}, decay=DECAY, rows=head_rows(head))
    snapshots = [_fields(first, head.store)["weight"]]
    for step, batch in enumerate(batches[:4], start=1):
        train_head(head, [batch], step)
        average.update(step=step)
        snapshots.append(_fields(first, head.store)["weight"])
    expected = _plain_ema(snapshots)
    with average.swapped():
        torch.testing.assert_close(head.store.read(0, NUM_ROWS).double(), expected)
        ids = torch.tensor([60, 0, 17, 33])
        torch.testing.assert_close(head.store.pull(ids).double(), expected[ids])
        torch.testing.assert_close(head.store.rows()[0:NUM_ROWS].double(), expected)
        assert torch.equal(head.store.state_dict()["weight"].read(), head.store.read(0, NUM_ROWS))
        with pytest.raises(RuntimeError, match="swap"):
            head.store.push(ids, torch.ones(4, DIM), step=5, lr=0.1)
    assert torch.equal(head.store.read(0, NUM_ROWS), snapshots[-1])  # the trained rows back

    state = {"head": head.state_dict(), "average": average.state_dict(), "step": 4}
    assert isinstance(state["average"]["head.store.weight"], ps_store.ServerRows)
    path = checkpoint.save_checkpoint(str(tmp_path / "ck"), 4, state)
    second = _averaged_servers(shards, seed=2)  # other rows: all overwritten from the file
    resumed = _head(second, "sgd-momentum")
    again = WeightAverage({"head": resumed}, decay=DECAY, rows=head_rows(resumed))
    loaded = checkpoint.load_checkpoint(path)
    resumed.load_state_dict(loaded["head"])
    again.load_state_dict(loaded["average"], step=4)
    for run, weights in ((head, average), (resumed, again)):
        train_head(run, batches[4:], 5)
        weights.update(step=6)
    saved = [weights.state_dict()["head.store.weight"].read() for weights in (average, again)]
    torch.testing.assert_close(saved[1], saved[0])
    head.store.close()
    resumed.store.close()


def test_an_average_the_servers_kept_before_this_run_starts_over_from_its_rows(shards, train_head):
    batches = _batches()
    servers = _averaged_servers(shards, seed=1)
    earlier = _head(servers, "sgd-momentum")
    train_head(earlier, batches[:3], 1)  # another run's steps
    earlier.store.close()
    head = _head(servers, "sgd-momentum")
    average = WeightAverage({"head": head}, decay=DECAY, rows=head_rows(head))
    start = _fields(servers, head.store)["weight"]
    train_head(head, batches[3:4], 1)  # this run's first step
    average.update(step=1)
    now = _fields(servers, head.store)["weight"]
    torch.testing.assert_close(
        average.state_dict()["head.store.weight"].read().double(), _plain_ema([start, now])
    )
    head.store.close()


def test_an_average_of_another_decay_than_the_servers_is_refused(shards):
    head = _head(_averaged_servers(shards, seed=0), "sgd-momentum")
    with pytest.raises(
        ValueError, match=r"decay 0.8 \(--average-decay\); start them with --average-decay 0.9"
    ):
        head.average_rows(0.9)
    head.store.close()


def test_a_run_on_servers_that_keep_the_average_evaluates_and_keeps_it(
    shards, deb_tags_slice, tmp_path, capsys
):
    """Through the trainer: the run says the head's rows are averaged, evaluates and keeps their average
    (the kept weights are the checkpoint's average, not its rows), and ``eval`` of the run scores as it
    did."""
    train, test = deb_tags_slice(200, 50)
    with open(train) as file:
        num_labels = int(file.readline().split()[2])
    servers = shards(
        2, num_rows=num_labels, dim=32, optimizer="sgd", hyper=HyperParams(lr=0.01), average_decay=0.5
    )  # SGD: the sampled heads' rows under the recipe
    out = tmp_path / "run"
    argv = [
        "train",
        "--train",
        train,
        "--test",
        test,
        "--out",
        str(out),
        "--epochs",
        "2",
        "--head",
        "selected",
    ]
    settings = ["model.hidden=[32]", "train.batch_size=32", "train.progress=false", "head.sample_num=40"]
    settings += [f"head.store={_url(servers)}", "head.index=gpu", "train.ema_decay=0.5"]
    settings += ["train.valid_fraction=0"]  # the last epoch kept: the newest checkpoint's
    assert main([*argv, "--set", *settings]) == 0
    assert "the encoder and the head are evaluated and kept averaged" in capsys.readouterr().out
    kept = state_io.read_state(str(out / "model"))["head"]["store.weight"]
    newest = state_io.read_state(checkpoint.latest_checkpoint(str(out / "checkpoints")))
    assert torch.equal(kept, newest["average"]["head.store.weight"])
    assert not torch.equal(kept, newest["head"]["store.weight"])
    with open(out / "metrics.json") as file:
        metrics = json.load(file)
    assert main(["eval", "--run", str(out), "--test", test]) == 0
    assert json.loads(capsys.readouterr().out)["P@1"] == pytest.approx(metrics["P@1"], abs=1e-6)


def test_servers_that_do_not_fit_the_run_refuse_it_before_its_folder_changes(
    shards, deb_tags_slice, tmp_path, capsys
):
    train, test = deb_tags_slice(100, 20)
    with open(train) as file:
        num_labels = int(file.readline().split()[2])
    servers = shards(1, num_rows=num_labels, dim=64, optimizer="sgd", hyper=HyperParams(lr=0.01))
    out = tmp_path / "run"
    argv = ["train", "--train", train, "--test", test, "--out", str(out), "--head", "selected"]
    settings = ["model.hidden=[32]", "train.progress=false", f"head.store={_url(servers)}"]
    assert main([*argv, "--set", *settings]) == 2
    assert f"the servers hold {num_labels} x 64 rows, need {num_labels} x 32" in capsys.readouterr().err
    assert not out.exists()
