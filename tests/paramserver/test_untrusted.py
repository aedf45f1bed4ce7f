"""Careless or hostile requests: unauthenticated or oversized bodies, unbounded answers, secrets in ``ps``,
updates that overflow, wild steps, damaged state files, NaN queries, and servers that are down."""

import os
import subprocess
import sys
import time

import grpc
import pytest
import torch

from megaclass.paramserver import HyperParams, ParamServerClient, ParamServerError, ServerConfig, wire
from megaclass.paramserver.config import resolve_token
from megaclass.paramserver.state import ShardSpec, ShardState


def _addresses(servers):
    return [f"127.0.0.1:{server.port}" for server in servers]


def _raw_call(port, method, payload, *, token=None, timeout=20):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        return channel.unary_unary(wire.method_path(method))(payload, timeout=timeout, metadata=metadata)
    finally:
        channel.close()


def _peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


@pytest.mark.parametrize("token", [None, "wrong", "s3cret"])
def test_oversized_or_unauthenticated_requests_are_refused_unread(processes, tmp_path, token):
    """300 MiB of PullRows ids: refused without the server's peak memory growing by 64 MiB (without a token
    under a cap that would take it: the body is not read; with the token over the default 256 MiB cap)."""
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    cap = [] if token == "s3cret" else ["--max-message-mib", "400"]  # takes 400 MiB of queries
    shard = processes(
        ["--rows", "1000", "--dim", "8", "--data-dir", str(tmp_path / "s"), "--token-file", str(secret), *cap]
    )
    assert b"s3cret" not in open(f"/proc/{shard.process.pid}/cmdline", "rb").read()
    client = ParamServerClient([shard.address], token_file=str(secret), timeout_s=10)
    client.pull(torch.arange(1000))  # the server's working set for a legitimate pull
    before = _peak_rss_kib(shard.process.pid)
    payload = wire.message("PullRowsRequest", ids=b"\0" * (300 << 20)).SerializeToString()
    with pytest.raises(grpc.RpcError) as error:
        _raw_call(shard.port, "PullRows", payload, token=token)
    del payload
    if token == "s3cret":
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in error.value.details()
    else:
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _peak_rss_kib(shard.process.pid) - before < 64 * 1024
    assert client.health()[0].version == 0 and client.pull(torch.tensor([3])).shape == (1, 8)


def test_limits_default_from_the_message_cap():
    config = ServerConfig(num_rows=10**6, dim=100, shard=1, shards=4, max_message_bytes=2**20)
    limits = config.limits()
    assert limits.rows == (2**20 - 4096) // 408 and limits.queries == (2**20 - 4096) // 400
    assert limits.receive_bytes == 2**20  # a push of `rows` rows nearly fills it
    small = ServerConfig(num_rows=29, dim=5, max_rows_per_request=1000, max_queries_per_request=10).limits()
    assert small.receive_bytes == 1000 * 8 + 4096  # a pull (of repeated ids): more than a push of all 29 rows
    assert ServerConfig(num_rows=29, dim=5, max_rows_per_request=100).limits().receive_bytes > 100 * 8 + 4096
    with pytest.raises(ValueError, match="--max-rows-per-request 5000: 5000 rows of 100 float32 do not fit"):
        ServerConfig(num_rows=10**6, dim=100, max_message_bytes=2**20, max_rows_per_request=5000)
    with pytest.raises(ValueError, match="--max-step-jump 0"):
        ServerConfig(num_rows=10, dim=2, max_step_jump=0)


def test_calls_over_the_limits_are_refused_and_the_client_splits(shards):
    (server,) = shards(1, max_rows_per_request=4, max_queries_per_request=3, hyper=HyperParams(lr=1.0))
    cases = {
        "PullRows": wire.message("PullRowsRequest", ids=wire.encode_ids(range(5))),
        "PushGradients": wire.message(
            "PushGradientsRequest",
            ids=wire.encode_ids(range(5)),
            grads=wire.encode_array(torch.ones(5, 5)),
            step=1,
        ),
        "SetRows": wire.message(
            "SetRowsRequest", ids=wire.encode_ids(range(5)), values=wire.encode_array(torch.ones(5, 5))
        ),
        "GetRows": wire.message("GetRowsRequest", start=0, stop=5),
    }
    for method, request in cases.items():
        with pytest.raises(grpc.RpcError) as error:
            _raw_call(server.port, method, request.SerializeToString())
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 4 (--max-rows-per-request" in error.value.details(), error.value.details()
    query = wire.message("QueryNearestRequest", features=wire.encode_array(torch.ones(4, 5)), n=1)
    with pytest.raises(grpc.RpcError) as error:
        _raw_call(server.port, "QueryNearest", query.SerializeToString())
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 3 (--max-queries-per-request" in error.value.details()

    client = ParamServerClient(_addresses([server]), timeout_s=10)
    assert client.health()[0].version == 0  # nothing above was applied
    rows = client.get_rows(0, 29)  # 8 calls
    ids = torch.tensor([28, 3, 3, 0, 17, 5, 9, 22, 11, 28, 1])
    torch.testing.assert_close(client.pull(ids), rows[ids], rtol=0, atol=0)
    client.set_rows(torch.arange(29), rows * 2)
    torch.testing.assert_close(client.get_rows(0, 29), rows * 2, rtol=0, atol=0)
    features = torch.randn(10, 5)
    scores, found = client.query_nearest(features, 2)
    expected_scores, expected_ids = (features @ (rows * 2).T).topk(2, dim=1)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(found, expected_ids)
    with pytest.raises(ValueError, match="at most 4 in one call"):
        client.push(torch.arange(5), torch.ones(5, 5), step=1)
    assert client.health()[0].version == 8  # the eight set_rows calls only


def test_token_sources(tmp_path):
    secret, empty = tmp_path / "secret", tmp_path / "empty"
    secret.write_text("  abc\n")
    empty.write_text("\n")
    assert resolve_token(None, None, environ={}) is None
    assert resolve_token(None, str(secret), environ={}) == "abc"
    assert resolve_token("abc", str(secret), environ={"MEGACLASS_PS_TOKEN": "abc"}) == "abc"
    assert resolve_token(None, None, environ={"MEGACLASS_PS_TOKEN": "xyz"}) == "xyz"
    with pytest.raises(
        ValueError, match=r"--token-file .*secret and MEGACLASS_PS_TOKEN give different tokens"
    ):
        resolve_token(
            None, str(secret), environ={"MEGACLASS_PS_TOKEN": "xyz"}, names=("--token", "--token-file")
        )
    with pytest.raises(ValueError, match="token and token_file .* give different"):
        resolve_token("xyz", str(secret), environ={})
    with pytest.raises(ValueError, match="the file is empty"):
        resolve_token(None, str(empty), environ={})
    with pytest.raises(ValueError, match="cannot read the token"):
        resolve_token(None, str(tmp_path / "missing"), environ={})


def test_server_and_clients_take_the_token_from_a_file_or_the_environment(shards, tmp_path, monkeypatch):
    from megaclass.store.paramserver import ParamServerStore

    servers = shards(2, token="abc")
    secret = tmp_path / "secret"
    secret.write_text("abc\n")
    url = "ps://" + ",".join(_addresses(servers))
    assert ParamServerClient(_addresses(servers), token_file=str(secret)).pull(torch.tensor([1])).shape == (
        1,
        5,
    )
    assert ParamServerStore(f"{url}?token_file={secret}&connect_timeout_s=2").pull(
        torch.tensor([1])
    ).shape == (1, 5)
    monkeypatch.setenv("MEGACLASS_PS_TOKEN", "abc")
    assert ParamServerStore(url).pull(torch.tensor([28])).shape == (1, 5)
    monkeypatch.setenv("MEGACLASS_PS_TOKEN", "other")
    with pytest.raises(ValueError, match="give different tokens"):
        ParamServerStore(f"{url}?token_file={secret}")
    with pytest.raises(ValueError, match="unknown option 'token'"):
        ParamServerStore(f"{url}?token=abc")

    import argparse

    from megaclass.paramserver.config import add_serve_arguments, config_from_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    arguments = ["--rows", "4", "--dim", "2", "--data-dir", str(tmp_path / "d"), "--token-file", str(secret)]
    with pytest.raises(ValueError, match="--token-file .* and MEGACLASS_PS_TOKEN give different tokens"):
        config_from_arguments(parser.parse_args(arguments))
    monkeypatch.delenv("MEGACLASS_PS_TOKEN")
    assert config_from_arguments(parser.parse_args(arguments)).token == "abc"
    with pytest.raises(ValueError, match="cannot read the token"):
        config_from_arguments(parser.parse_args([*arguments[:-1], str(tmp_path / "missing")]))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_update_that_would_overflow_is_refused_whole(shards, mode):
    (server,) = shards(1, mode=mode, hyper=HyperParams(lr=1.0, momentum=0.9))
    client = ParamServerClient(_addresses([server]), timeout_s=10)
    before = client.get_rows(0, 29)
    grads = torch.ones(3, 5)
    grads[2, 4] = 3e38  # finite, but lr 10 takes row 9 to -inf
    with pytest.raises(ValueError, match="would make rows of row 9 non-finite .*nothing was applied"):
        client.push(torch.tensor([0, 4, 9]), grads, step=1, lr=10.0)
    torch.testing.assert_close(client.get_rows(0, 29), before, rtol=0, atol=0)
    torch.testing.assert_close(client.get_rows(0, 29, field="momentum_buffer"), torch.zeros(29, 5))
    health = client.health()[0]
    assert (health.version, health.applied_step, list(health.trainer_steps)) == (0, 0, [0])
    if mode == "sync":
        with pytest.raises(ValueError, match="step 1 was refused"):
            client.pull(torch.tensor([0]), min_step=1)
    client.push(torch.tensor([0]), torch.ones(1, 5), step=2, lr=1.0)  # training can go on
    torch.testing.assert_close(client.pull(torch.tensor([0])), before[:1] - 1.0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_step_far_past_the_last_is_refused(shards, mode):
    (server,) = shards(1, mode=mode, max_step_jump=100, hyper=HyperParams(lr=1.0, momentum=0.0))
    client = ParamServerClient(_addresses([server]), timeout_s=10)
    before = client.get_rows(0, 29)
    with pytest.raises(
        ValueError, match=r"step 4611686018427387904 .* at most 100 is allowed \(--max-step-jump\)"
    ):
        client.push(torch.tensor([1]), torch.ones(1, 5), step=2**62)
    assert client.health()[0].version == 0
    client.push(torch.tensor([1]), torch.ones(1, 5), step=100, lr=1.0)  # not taken for a retry
    torch.testing.assert_close(client.get_rows(1, 2), before[1:2] - 1.0)


def _spec():
    return ShardSpec(num_rows=12, dim=3, row_start=4, row_stop=12, optimizer="sgd", trainers=1)


def _closed_state(folder):
    state = ShardState(folder, _spec(), HyperParams(lr=0.1, momentum=0.9))
    state.apply(torch.tensor([1, 6]), torch.ones(2, 3), lr=0.5, step=1)
    state.close()
    return folder


def test_truncated_missing_or_damaged_state_files_refuse_to_start(tmp_path):
    folder = _closed_state(tmp_path / "truncated")
    os.truncate(folder / "rows.f32", 40)
    with pytest.raises(ValueError, match=r"rows.f32: 40 bytes but 8 rows of this shard need 96; .*truncated"):
        ShardState(folder, _spec(), HyperParams())
    folder = _closed_state(tmp_path / "missing")
    os.remove(folder / "momentum_buffer.f32")
    with pytest.raises(ValueError, match="momentum_buffer.f32: missing"):
        ShardState(folder, _spec(), HyperParams())
    folder = _closed_state(tmp_path / "damaged")
    with open(folder / "rows.f32", "r+b") as rows:
        rows.seek(13)
        rows.write(b"\x7f")
    with pytest.raises(ValueError, match="rows.f32: its checksum differs"):
        ShardState(folder, _spec(), HyperParams())
    folder = _closed_state(tmp_path / "intact")
    reopened = ShardState(folder, _spec(), HyperParams())  # checked, then the checksums are dropped
    assert reopened.version == 1 and not os.path.exists(folder / "checksums.json")


def test_server_process_on_a_truncated_shard_does_not_start(processes, tmp_path):
    args = ["--rows", "50", "--dim", "4", "--data-dir", str(tmp_path / "s")]
    shard = processes(args)
    shard.terminate()
    shard.stop()
    os.truncate(tmp_path / "s" / "rows.f32", 100)
    with pytest.raises(RuntimeError, match=r"(?s)did not start.*rows.f32: 100 bytes but 50 rows .* need 800"):
        processes(args)


def test_unreachable_or_unauthenticated_fail_fast_in_one_line(shards):
    servers = shards(1, token="abc")
    start = time.monotonic()
    with pytest.raises(
        ParamServerError, match=r"^parameter server 127.0.0.1:9: unreachable for 1 s"
    ) as error:
        ParamServerClient(["127.0.0.1:9"], connect_timeout_s=1)
    assert time.monotonic() - start < 3 and error.value.address == "127.0.0.1:9"
    with pytest.raises(
        ParamServerError, match=f"^parameter server {_addresses(servers)[0]}: unauthenticated"
    ):
        ParamServerClient(_addresses(servers), token="wrong")


def test_eval_of_a_parameter_server_run_prints_one_line(shards, tmp_path, deb_tags_slice):
    """``megaclass eval --run`` of a ``store=ps://`` run: servers down or a wrong token, one line, exit 2."""
    train, test = deb_tags_slice(40, 10)
    header = open(train).readline().split()
    # the recipe's row optimizer is optim.head's, SGD: the servers run it
    (server,) = shards(1, num_rows=int(header[2]), dim=16, token="abc", optimizer="sgd", hyper=HyperParams())
    secret = tmp_path / "secret"
    secret.write_text("abc")
    run = tmp_path / "run"
    store = f"ps://127.0.0.1:{server.port}?token_file={secret}&connect_timeout_s=2"
    command = [sys.executable, "-m", "megaclass"]
    trained = subprocess.run(
        [*command, "train", "--train", train, "--test", test, "--out", str(run), "--epochs", "1",
         "--head", "selected", "--set", f"head.store={store}", "--set", "model.hidden=[16]"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if trained.returncode != 0:
        raise AssertionError(trained.stderr[-2000:])
    secret.write_text("wrong")
    for expected in (f"127.0.0.1:{server.port}: unauthenticated", f"127.0.0.1:{server.port}: unreachable"):
        start = time.monotonic()
        out = subprocess.run(
            [*command, "eval", "--run", str(run), "--test", test], capture_output=True, text=True, timeout=60
        )
        assert time.monotonic() - start < 20
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        (line,) = [line for line in out.stderr.splitlines() if "megaclass eval: error:" in line]
        assert expected in line, out.stderr
        server.stop(0)
