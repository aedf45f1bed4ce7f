"""Calls over a shard's Unix socket: what gRPC would answer, refused for strangers, never a hang."""

import os
import threading
import time

import pytest
import torch

from megaclass.paramserver import ParamServerClient, wire
from megaclass.paramserver import local_socket as local
from megaclass.paramserver.local_socket import LocalCallError, LocalChannel, LocalListener

pytestmark = pytest.mark.skipif(
    not (local.available() and hasattr(os, "memfd_create")), reason="no abstract Unix sockets here"
)


def _echo(data, time_left):
    return "OK", data


def _listener(**handlers):
    options = {"token": handlers.pop("token", None), "max_bytes": handlers.pop("max_bytes", 1 << 26)}
    options["max_connections"] = handlers.pop("max_connections", 8)
    return LocalListener({"Echo": _echo, **handlers}, **options)


def _call(channel, method, data=b"", *, timeout=5.0):
    call = channel.call(method, data, timeout=timeout, parse=bytes)
    return None if call is None else call.result()


def test_frames_of_any_size_come_back_whole():
    listener = _listener()
    channel = LocalChannel(listener.name, None, connect_timeout_s=2)
    try:
        for size in (0, 1, 3 << 20, 9 << 20 | 7):  # past the socket's buffer: sent and read in pieces
            data = os.urandom(size)
            assert _call(channel, "Echo", data) == data
        calls = [channel.call("Echo", bytes([i]), timeout=5, parse=bytes) for i in range(3)]
        assert [call.result() for call in reversed(calls)] == [b"\x02", b"\x01", b"\x00"]  # 3 connections
    finally:
        channel.close()
        listener.close()


def test_a_handlers_status_and_details_reach_the_caller():
    listener = _listener(Refuse=lambda data, time_left: ("FAILED_PRECONDITION", b"server restarted"))
    channel = LocalChannel(listener.name, None, connect_timeout_s=2)
    try:
        with pytest.raises(LocalCallError) as error:
            _call(channel, "Refuse")
        assert error.value.code().name == "FAILED_PRECONDITION"
        assert error.value.details() == "server restarted"
        with pytest.raises(LocalCallError, match="UNIMPLEMENTED: no method 'Nothing'"):
            _call(channel, "Nothing")
        assert _call(channel, "Echo", b"still served") == b"still served"
    finally:
        channel.close()
        listener.close()


def test_the_deadline_reaches_the_handler_and_bounds_the_wait():
    seen = []

    def slow(data, time_left):
        seen.append(time_left)
        time.sleep(1.0)
        return "OK", b""

    listener = _listener(Slow=slow)
    channel = LocalChannel(listener.name, None, connect_timeout_s=2)
    try:
        start = time.monotonic()
        with pytest.raises(LocalCallError, match="DEADLINE_EXCEEDED"):
            _call(channel, "Slow", timeout=0.3)
        assert time.monotonic() - start < 0.9
        assert 0 < seen[0] <= 0.3
        assert _call(channel, "Echo", b"x") == b"x"  # on a fresh connection: the late answer is not read
    finally:
        channel.close()
        listener.close()


def test_a_wrong_token_or_another_user_gets_no_connection(monkeypatch):
    listener = _listener(token="s3cret")
    try:
        assert (
            LocalChannel(listener.name, "wrong", connect_timeout_s=2).call(
                "Echo", b"", timeout=2, parse=bytes
            )
            is None
        )
        assert (
            LocalChannel(listener.name, None, connect_timeout_s=2).call("Echo", b"", timeout=2, parse=bytes)
            is None
        )
        assert _call(LocalChannel(listener.name, "s3cret", connect_timeout_s=2), "Echo", b"ok") == b"ok"
        monkeypatch.setattr(local.os, "geteuid", lambda: os.getuid() + 1)  # as if the peer were someone else
        assert (
            LocalChannel(listener.name, "s3cret", connect_timeout_s=2).call(
                "Echo", b"", timeout=2, parse=bytes
            )
            is None
        )
    finally:
        listener.close()


def test_an_oversized_request_is_refused_unread():
    listener = _listener(max_bytes=1000)
    channel = LocalChannel(listener.name, None, connect_timeout_s=2)
    try:
        with pytest.raises(
            LocalCallError, match="RESOURCE_EXHAUSTED: a request of 2009 bytes, over the 1000"
        ):
            _call(channel, "Echo", bytes(2000))
        assert _call(channel, "Echo", bytes(10)) == bytes(
            10
        )  # the same connection, read past the refused one
        assert len(channel._idle) == 1
    finally:
        listener.close()


def test_a_closed_listener_answers_unavailable_and_refuses_new_connections():
    started, release = threading.Event(), threading.Event()

    def held(data, time_left):
        started.set()
        release.wait(5)
        return "OK", b""

    listener = _listener(Held=held)
    channel = LocalChannel(listener.name, None, connect_timeout_s=2)
    call = channel.call("Held", b"", timeout=5, parse=bytes)
    started.wait(5)
    listener.close()
    release.set()
    with pytest.raises(LocalCallError, match="UNAVAILABLE"):
        call.result()
    assert channel.call("Echo", b"", timeout=2, parse=bytes) is None  # the caller goes over gRPC


def _addresses(servers):
    return [f"127.0.0.1:{server.port}" for server in servers]


def test_a_client_on_the_shards_machine_calls_over_the_socket(shards):
    servers = shards(2)
    client = ParamServerClient(_addresses(servers), timeout_s=10)
    try:
        assert all(state.local is not None for state in client._shards)
        ids = torch.tensor([1, 5, 20, 27])
        before = client.pull(ids)
        client.push(ids, torch.ones(4, 5), step=1, lr=0.5)
        assert torch.allclose(client.pull(ids), before - 0.5)
        with pytest.raises(ValueError, match=r"ids\[1\] = 29 is outside \[0, 29\)"):  # refused as over gRPC
            client.pull(torch.tensor([0, 29]))
        request, call = client._issue(0, "HealthRequest", wire.message("HealthRequest"))
        assert isinstance(call, local.LocalCall)
    finally:
        client.close()


def test_a_client_goes_over_grpc_when_the_shard_takes_no_more_connections(shards):
    servers = shards(1)
    servers[0].local.close()  # as a shard whose local connections are all taken
    client = ParamServerClient(_addresses(servers), timeout_s=10)
    try:
        ids = torch.tensor([2, 3])
        before = client.pull(ids)
        client.push(ids, torch.ones(2, 5), step=1, lr=1.0)
        assert torch.allclose(client.pull(ids), before - 1.0)
    finally:
        client.close()
