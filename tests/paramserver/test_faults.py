"""What goes wrong: wrong secrets, garbage input, dead or restarted shards, a kill in the middle of a step."""

import json
import os
import shutil
import subprocess
import time

import grpc
import pytest
import torch

from megaclass.paramserver import HyperParams, ParamServerClient, ParamServerError, wire
from megaclass.paramserver.state import ShardSpec, ShardState


def _addresses(servers):
    return [f"127.0.0.1:{server.port}" for server in servers]


def test_token_is_required_on_every_call(shards):
    servers = shards(2, token="s3cret")
    for token in (None, "wrong"):
        with pytest.raises(ParamServerError, match="unauthenticated: missing or wrong token") as error:
            ParamServerClient(_addresses(servers), token=token, timeout_s=5)
        assert error.value.address in _addresses(servers) and error.value.code == "UNAUTHENTICATED"
    client = ParamServerClient(_addresses(servers), token="s3cret", timeout_s=5)
    assert client.pull(torch.tensor([0, 28])).shape == (2, 5)


def _raw_call(port, method, payload, **options):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(wire.method_path(method))  # bytes in, bytes out
    try:
        return call(payload, timeout=5, **options)
    finally:
        channel.close()


def _push(ids, grads, **fields):
    return wire.message(
        "PushGradientsRequest", ids=ids, grads=grads, step=fields.pop("step", 1), **fields
    ).SerializeToString()


F32 = wire.encode_array(torch.ones(1, 5))
BAD_REQUESTS = {
    "garbage bytes": ("PushGradients", b"\xff\xfe\x00garbage\x12"),
    "truncated message": (
        "PullRows",
        wire.message("PullRowsRequest", ids=b"\0" * 64).SerializeToString()[:7],
    ),
    "ids not whole int64": ("PullRows", wire.message("PullRowsRequest", ids=b"\0" * 12).SerializeToString()),
    "id out of range": (
        "PullRows",
        wire.message("PullRowsRequest", ids=wire.encode_ids([3, 29])).SerializeToString(),
    ),
    "negative id": ("PushGradients", _push(wire.encode_ids([-1]), F32)),
    "grads wrong shape": ("PushGradients", _push(wire.encode_ids([1, 2]), F32)),
    "grads wrong bytes": (
        "PushGradients",
        _push(wire.encode_ids([1]), wire.message("Array", dtype="float32", shape=[1, 5], data=b"1")),
    ),
    "grads bad dtype": (
        "PushGradients",
        _push(wire.encode_ids([1]), wire.message("Array", dtype="int8", shape=[1, 5], data=b"12345")),
    ),
    "grads NaN": (
        "PushGradients",
        _push(wire.encode_ids([1]), wire.encode_array(torch.full((1, 5), float("nan")))),
    ),
    "duplicate ids": ("PushGradients", _push(wire.encode_ids([1, 1]), wire.encode_array(torch.ones(2, 5)))),
    "step 0": ("PushGradients", _push(wire.encode_ids([1]), F32, step=0)),
    "unknown trainer": ("PushGradients", _push(wire.encode_ids([1]), F32, trainer=3)),
    "unknown field": (
        "SetRows",
        wire.message(
            "SetRowsRequest", ids=wire.encode_ids([1]), values=F32, field="nope"
        ).SerializeToString(),
    ),
    "range outside shard": ("GetRows", wire.message("GetRowsRequest", start=10, stop=40).SerializeToString()),
    "query wrong width": (
        "QueryNearest",
        wire.message(
            "QueryNearestRequest", features=wire.encode_array(torch.ones(2, 4)), n=1
        ).SerializeToString(),
    ),
    "query NaN": (
        "QueryNearest",
        wire.message(
            "QueryNearestRequest",
            features=wire.encode_array(torch.tensor([[0, 1, float("nan"), 0, 0.0]])),
            n=1,
        ).SerializeToString(),
    ),
    "query inf": (
        "QueryNearest",
        wire.message(
            "QueryNearestRequest", features=wire.encode_array(torch.full((2, 5), -float("inf"))), n=1
        ).SerializeToString(),
    ),
    "query n 0": ("QueryNearest", wire.message("QueryNearestRequest", features=F32, n=0).SerializeToString()),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_invalid_argument_and_change_nothing(shards, case):
    (server,) = shards(1)
    before = ParamServerClient(_addresses([server]), timeout_s=5).get_rows(0, 29)
    method, payload = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as error:
        _raw_call(server.port, method, payload)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    client = ParamServerClient(_addresses([server]), timeout_s=5)  # still serving
    torch.testing.assert_close(client.get_rows(0, 29), before, rtol=0, atol=0)
    assert client.health()[0].version == 0


def test_client_side_errors_name_the_problem(shards):
    client = ParamServerClient(_addresses(shards(2)), timeout_s=5)
    with pytest.raises(ValueError, match=r"ids\[1\] = 29 is outside \[0, 29\)"):
        client.pull(torch.tensor([0, 29]))
    with pytest.raises(ValueError, match="grads: shape"):
        client.push(torch.tensor([1, 2]), torch.ones(3, 5), step=1)
    with pytest.raises(ValueError, match="unique"):
        client.push(torch.tensor([20, 20]), torch.ones(2, 5), step=1)


def test_unreachable_server_fails_within_the_deadline(shards):
    servers = shards(2)
    client = ParamServerClient(_addresses(servers), timeout_s=1.5)
    dead = _addresses(servers)[1]
    servers[1].stop(0)
    start = time.monotonic()
    with pytest.raises(ParamServerError, match="unreachable") as error:
        client.pull(torch.tensor([1, 27]))
    assert time.monotonic() - start < 4
    assert error.value.address == dead and dead in str(error.value)
    with pytest.raises(ParamServerError, match="127.0.0.1:9"):
        ParamServerClient(["127.0.0.1:9"], timeout_s=0.5)


def test_close_after_an_error_does_not_wait_for_a_lost_shard(shards):
    servers = shards(2)
    client = ParamServerClient(_addresses(servers), timeout_s=30, connect_timeout_s=0.5)
    servers[1].stop(0)
    client.push(torch.tensor([1, 27]), torch.ones(2, 5), step=1, wait=False)  # never acknowledged by shard 1
    start = time.monotonic()
    client.close(wait=False)
    assert time.monotonic() - start < 5, "the push's acknowledgement was waited for"


def test_ranges_must_tile_the_rows(shards):
    first = shards(2, num_rows=10, dim=2)
    with pytest.raises(ValueError, match="held by no shard"):
        ParamServerClient(_addresses(first[:1]), timeout_s=5)
    other = shards(1, num_rows=10, dim=3)
    with pytest.raises(ValueError, match="serves"):
        ParamServerClient(_addresses([first[0], other[0]]), timeout_s=5)


def _spec(**changes):
    return ShardSpec(
        **{
            "num_rows": 12,
            "dim": 3,
            "row_start": 4,
            "row_stop": 12,
            "optimizer": "sgd",
            "trainers": 1,
            **changes,
        }
    )


def _crash_after(calls, message):
    """A stand-in that lets ``calls - 1`` calls of the function it wraps through, then raises (a kill)."""

    def wrap(function):
        seen = [0]

        def crashing(*args, **kwargs):
            seen[0] += 1
            if seen[0] >= calls:
                raise KeyboardInterrupt(message)
            return function(*args, **kwargs)

        return crashing

    return wrap


@pytest.mark.parametrize("dtype", ["float32", "bf16_sr"])
@pytest.mark.parametrize("durable", [False, True])
@pytest.mark.parametrize("first", [[0, 5], [0, 1, 3, 4, 5, 6, 7]])  # shorter / longer record
@pytest.mark.parametrize("average_decay", [0.0, 0.9])
@pytest.mark.parametrize("killed", ["updating", "writing", "committing"])
def test_an_interrupted_update_is_all_or_nothing_after_restart(
    tmp_path, monkeypatch, first, durable, dtype, average_decay, killed
):
    """A process dying while it updates the record leaves the pre-step state after restart; dying once the
    record is complete (while it is written into the maps, or at the commit) leaves the state of the
    uninterrupted update: bit for bit in either row dtype, the weight average too, also when the journal
    still holds the tail of a longer earlier record."""
    import megaclass.paramserver.state as state_module

    hyper = HyperParams(lr=1.0, momentum=0.9)
    spec = _spec(dtype=dtype, average_decay=average_decay)
    runs = {}
    for name in ("plain", "killed"):
        runs[name] = ShardState(tmp_path / name, spec, hyper, durable=durable)
        runs[name].apply(torch.tensor(first), torch.ones(len(first), 3), lr=1.0, step=1, trainers=[0])
    before = runs["killed"]
    rows, versions = before.rows.clone(), before.versions.clone()
    slots = {name: tensor.clone() for name, tensor in before.state.items()}
    second = (torch.tensor([5, 2, 7]), torch.full((3, 3), 4.0))
    runs["plain"].apply(*second, lr=1.0, step=2, trainers=[0])
    target, calls = {
        "updating": ("put_held_", 1),  # the record updated, not yet complete: the maps untouched
        "writing": ("put_rows_", 2),  # the rows written into the maps, their state not yet
        "committing": ("put_rows_", 2 + len(slots)),  # the rows and their state written, not their versions
    }[killed]
    monkeypatch.setattr(state_module, target, _crash_after(calls, killed)(getattr(state_module, target)))
    with pytest.raises(KeyboardInterrupt):
        before.apply(*second, lr=1.0, step=2, trainers=[0])
    if killed == "writing":
        assert not torch.equal(before.rows, rows)  # half written in the memory maps
    monkeypatch.undo()
    reopened = ShardState(tmp_path / "killed", spec, hyper)
    plain = runs["plain"]
    after = (plain.rows, plain.state, plain.versions, 2)
    expected, expected_slots, expected_versions, expected_step = (
        (rows, slots, versions, 1) if killed == "updating" else after
    )
    expected_version = int(expected_versions.max())
    torch.testing.assert_close(reopened.rows, expected, rtol=0, atol=0)
    assert set(reopened.state) == set(expected_slots)
    for name, tensor in expected_slots.items():
        torch.testing.assert_close(reopened.state[name], tensor, rtol=0, atol=0)
    assert (reopened.version, reopened.applied_step) == (expected_version, expected_step)
    assert reopened.trainer_steps() == [expected_step]
    assert torch.equal(reopened.versions, expected_versions)
    reopened.apply(torch.tensor([5]), torch.ones(1, 3), lr=1.0, step=3)
    assert reopened.version == expected_version + 1


def test_a_refused_update_leaves_no_record_to_replay(tmp_path):
    """An update whose result is not finite writes nothing, and a restart finds nothing to write again."""
    spec, hyper = _spec(), HyperParams(lr=1.0, momentum=0.9)
    state = ShardState(tmp_path, spec, hyper)
    state.apply(torch.tensor([0, 5]), torch.ones(2, 3), lr=1.0, step=1)
    rows, version = state.rows.clone(), state.version
    with pytest.raises(ValueError, match="non-finite"):
        state.apply(
            torch.tensor([1, 5]), torch.tensor([[1.0, 2.0, 3.0], [float("inf"), 0.0, 0.0]]), lr=1.0, step=2
        )
    assert torch.equal(state.rows, rows) and state.version == version
    del state  # killed: no clean close
    reopened = ShardState(tmp_path, spec, hyper)
    torch.testing.assert_close(reopened.rows, rows, rtol=0, atol=0)
    assert (reopened.version, reopened.applied_step) == (version, 1)


def test_a_record_of_old_values_restores_them(tmp_path):
    """A journal holding the touched rows' old values and the old header (an earlier release's record) is
    written back on restart: the state before its interrupted update."""
    from megaclass.paramserver.state import _JOURNAL

    spec, hyper = _spec(), HyperParams(lr=1.0, momentum=0.9)
    state = ShardState(tmp_path, spec, hyper)
    state.apply(torch.tensor([0, 5]), torch.ones(2, 3), lr=1.0, step=1)
    rows, slots, versions = state.rows.clone(), state.state["momentum_buffer"].clone(), state.versions.clone()
    touched = torch.tensor([5, 2, 7])
    record = state._record(touched, state.version + 1, step=1)  # the rows' current values
    record["head"][2:] = state.header
    record["versions"].copy_(versions[touched])
    state.header[_JOURNAL] = state.version + 1  # the marker set, then the maps half updated, then killed
    state.rows[touched] += 1.0
    reopened = ShardState(tmp_path, spec, hyper)
    torch.testing.assert_close(reopened.rows, rows, rtol=0, atol=0)
    torch.testing.assert_close(reopened.state["momentum_buffer"], slots, rtol=0, atol=0)
    assert torch.equal(reopened.versions, versions) and (reopened.version, reopened.applied_step) == (1, 1)


def test_a_truncated_journal_is_refused(tmp_path, monkeypatch):
    """A complete record whose file was cut short is refused at restart, not written back with zeros."""
    import megaclass.paramserver.state as state_module

    spec, hyper = _spec(), HyperParams(lr=1.0, momentum=0.9)
    state = ShardState(tmp_path, spec, hyper)
    monkeypatch.setattr(state_module, "put_rows_", _crash_after(1, "killed")(state_module.put_rows_))
    with pytest.raises(KeyboardInterrupt):
        state.apply(torch.tensor([0, 5, 6]), torch.ones(3, 3), lr=1.0, step=1)
    monkeypatch.undo()
    os.truncate(tmp_path / "journal.bin", 100)
    with pytest.raises(RuntimeError, match="journal.bin: 100 bytes, but its record of 3 rows needs"):
        ShardState(tmp_path, spec, hyper)


def test_set_field_is_recorded_and_replayed(tmp_path, monkeypatch):
    """An overwrite of one field killed while it is written is completed by the restart."""
    import megaclass.paramserver.state as state_module

    spec, hyper = _spec(), HyperParams(lr=1.0, momentum=0.9)
    state = ShardState(tmp_path, spec, hyper)
    state.apply(torch.tensor([0, 5]), torch.ones(2, 3), lr=1.0, step=1)
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    monkeypatch.setattr(state_module, "put_rows_", _crash_after(2, "killed")(state_module.put_rows_))
    with pytest.raises(KeyboardInterrupt):
        state.set_field("momentum_buffer", torch.tensor([2, 6]), values)
    monkeypatch.undo()
    reopened = ShardState(tmp_path, spec, hyper)
    torch.testing.assert_close(
        reopened.state["momentum_buffer"][torch.tensor([2, 6])], values, rtol=0, atol=0
    )
    assert reopened.version == 2 and reopened.applied_step == 1
    assert reopened.versions[torch.tensor([2, 6])].tolist() == [2, 2]


def test_state_survives_restart_and_rejects_other_settings(tmp_path):
    state = ShardState(tmp_path, _spec(), HyperParams(lr=0.1))
    state.apply(torch.tensor([1]), torch.ones(1, 3), lr=0.5, step=3)
    state.set_hyper(HyperParams(lr=0.7))
    rows = state.rows.clone()
    snapshot = state.snapshot()
    state.close()
    again = ShardState(tmp_path, _spec(), HyperParams(lr=0.1))
    torch.testing.assert_close(again.rows, rows, rtol=0, atol=0)
    assert again.applied_step == 3 and again.hyper.lr == 0.7
    restored = ShardState(shutil.copytree(snapshot, tmp_path / "copy"), _spec(), HyperParams())
    torch.testing.assert_close(restored.rows, rows, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dim is 3 but the server was started with 4"):
        ShardState(tmp_path, _spec(dim=4), HyperParams())
    with pytest.raises(ValueError, match="dtype is 'float32' but the server was started with 'bf16_sr'"):
        ShardState(tmp_path, _spec(dtype="bf16_sr"), HyperParams())


def test_a_shard_reopened_with_another_average_decay_is_refused(tmp_path):
    ShardState(tmp_path, _spec(average_decay=0.9), HyperParams()).close()
    with pytest.raises(ValueError, match="average_decay is 0.9 but the server was started with 0.99"):
        ShardState(tmp_path, _spec(average_decay=0.99), HyperParams())
    with pytest.raises(ValueError, match="average_decay is 0.9 but the server was started with 0.0"):
        ShardState(tmp_path, _spec(), HyperParams())
    with pytest.raises(ValueError, match="--average-decay"):
        ShardState(tmp_path / "none", _spec(), HyperParams()).average_at(slice(0, 2), 1)


def test_a_shard_written_before_row_dtypes_opens_as_float32(tmp_path):
    ShardState(tmp_path, _spec(), HyperParams(lr=0.1)).close()
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["dtype"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert ShardState(tmp_path, _spec(), HyperParams()).rows.dtype == torch.float32


def test_tls(shards, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    servers = shards(2, tls_cert=str(cert), tls_key=str(key), token="t")
    client = ParamServerClient(_addresses(servers), tls_ca=str(cert), token="t", timeout_s=10)
    assert client.pull(torch.tensor([2, 20])).shape == (2, 5)
    with pytest.raises(ParamServerError):
        ParamServerClient(_addresses(servers), token="t", timeout_s=1)  # plaintext to a TLS port


def test_a_port_in_use_is_a_clear_error(shards):
    (first,) = shards(1)
    with pytest.raises(OSError, match=rf"--port: could not bind .*:{first.port}: the port is in use"):
        shards(1, port=first.port)


@pytest.mark.slow
def test_kill_a_shard_mid_training_and_restart_it(processes, tmp_path):
    """SIGKILL a shard holding a half-complete barrier; restarted, it gets the lost pushes again.

    Two trainers (driven from this thread), two shard processes, sync SGD with momentum. Shard 1 is killed
    after trainer 0 pushed step 4 (trainer 1 not yet), and again right after step 7 was applied. The final
    rows equal an uninterrupted run's.
    """
    common = ["--rows", "40", "--dim", "6", "--trainers", "2", "--lr", "0.3", "--momentum", "0.9"]
    shard = [
        processes([*common, "--shard", f"{i}/2", "--data-dir", str(tmp_path / f"s{i}"), "--seed", "3"])
        for i in (0, 1)
    ]
    addresses = [s.address for s in shard]
    clients = [ParamServerClient(addresses, trainer=rank, timeout_s=60) for rank in (0, 1)]
    # pushes go through shared memory: the lost ones are sent again from it, inline, to the new process
    assert all(state.buffer is not None for client in clients for state in client._shards)
    reference = torch.nn.Parameter(clients[0].get_rows(0, 40).double())
    sgd = torch.optim.SGD([reference], lr=0.3, momentum=0.9)  # every row touched: dense SGD is the truth
    generator = torch.Generator().manual_seed(0)

    def restart(index):
        shard[index].kill()
        shard[index] = processes(
            [*common, "--shard", f"{index}/2", "--data-dir", str(tmp_path / f"s{index}"), "--seed", "3"],
            port=shard[index].port,
        )

    for step in range(1, 10):
        grads = [torch.randn(40, 6, generator=generator) for _ in (0, 1)]
        clients[0].push(torch.arange(40), grads[0], step=step)
        if step == 4:
            restart(1)  # trainer 0's step-4 push to shard 1 is lost with the process
        clients[1].push(torch.arange(40), grads[1], step=step)
        for client in clients:
            client.pull(torch.arange(40))
        if step == 7:
            restart(1)
        reference.grad = ((grads[0] + grads[1]) / 2).double()
        sgd.step()
    clients[0].flush()
    torch.testing.assert_close(clients[1].get_rows(0, 40), reference.detach().float(), rtol=1e-5, atol=1e-6)
    health = clients[0].health()
    assert [h.applied_step for h in health] == [9, 9]
    paths = clients[0].snapshot()
    assert [step for _, step in paths] == [9, 9]
