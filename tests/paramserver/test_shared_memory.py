"""Row blocks through shared memory with shards on this machine: rows as inline ones, misuse refused."""

import contextlib
import gc
import os
import subprocess
import sys

import grpc
import pytest
import torch

from megaclass.paramserver import HyperParams, ParamServerClient, wire
from megaclass.paramserver import client as client_module
from megaclass.paramserver.shared_memory import ClientBuffer

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd on this platform")


def _addresses(servers):
    return [f"127.0.0.1:{server.port}" for server in servers]


def _plain_sgd(rows, momentum, ids, grads, *, lr, mu):
    buffer = momentum[ids].mul_(mu).add_(grads)
    momentum[ids] = buffer
    rows[ids] = rows[ids].add_(buffer, alpha=-lr)


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "copied-in-pieces-on-threads"])
def test_pushes_and_pulls_through_shared_memory_equal_inline_and_a_plain_update(
    shards, wire_dtype, mode, split, monkeypatch
):
    if split:  # every block copy cut into pieces of a row or two, on 4 threads
        monkeypatch.setattr(client_module, "_COPY_PIECE_BYTES", 40)
        monkeypatch.setattr(client_module.os, "cpu_count", lambda: 4)
    hyper = HyperParams(lr=0.1, momentum=0.9)
    groups = [shards(3, num_rows=41, dim=6, mode=mode, hyper=hyper) for _ in range(2)]
    shared = ParamServerClient(_addresses(groups[0]), timeout_s=20, wire_dtype=wire_dtype)
    inline = ParamServerClient(
        _addresses(groups[1]), timeout_s=20, wire_dtype=wire_dtype, shared_memory_mib=0
    )
    assert all(s.buffer is not None for s in shared._shards) and all(s.buffer is None for s in inline._shards)
    rows, momentum = shared.get_rows(0, 41), torch.zeros(41, 6)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        ids = torch.randperm(41, generator=generator)[: 7 * step]  # unsorted, every shard or a few
        grads = torch.randn(len(ids), 6, generator=generator)
        for client in (shared, inline):
            torch.testing.assert_close(client.pull(ids), inline.pull(ids), rtol=0, atol=0)
            client.push(ids, grads, step=step, lr=0.3)
        sent = grads.bfloat16().float() if wire_dtype == "bfloat16" else grads
        _plain_sgd(rows, momentum, ids, sent, lr=0.3, mu=0.9)
    shared.flush()
    inline.flush()
    for client in (shared, inline):
        torch.testing.assert_close(client.get_rows(0, 41), rows, rtol=0, atol=0)
        torch.testing.assert_close(client.get_rows(0, 41, field="momentum_buffer"), momentum, rtol=0, atol=0)
    expected = rows.bfloat16().float() if wire_dtype == "bfloat16" else rows
    torch.testing.assert_close(shared.pull(torch.arange(41)), expected, rtol=0, atol=0)
    assert all(not s.buffer._used for s in shared._shards)  # every range freed once applied and read
    shared.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("side_stream", [False, True])
def test_buffers_mapped_for_the_gpu_move_the_same_rows_as_the_host(shards, wire_dtype, side_stream):
    # on a side stream the copies run there: the client waits on the caller's current stream, not the default
    with torch.cuda.stream(torch.cuda.Stream()) if side_stream else contextlib.nullcontext():
        _mapped_against_host(shards, wire_dtype)


def _mapped_against_host(shards, wire_dtype):
    hyper = HyperParams(lr=0.1, momentum=0.9)
    groups = [shards(3, num_rows=41, dim=6, hyper=hyper) for _ in range(2)]
    mapped = ParamServerClient(_addresses(groups[0]), timeout_s=20, wire_dtype=wire_dtype)
    host = ParamServerClient(_addresses(groups[1]), timeout_s=20, wire_dtype=wire_dtype)
    assert mapped.map_buffers("cuda") and mapped.buffers_mapped_for(torch.device("cuda"))
    assert not host.buffers_mapped_for(torch.device("cuda"))
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 5):
        ids = torch.randperm(41, generator=generator)[: 9 * step]  # unsorted: rows put in places
        if step % 2:
            ids = ids.sort().values  # sorted: a slice a shard
        grads = torch.randn(len(ids), 6, generator=generator)
        on_gpu = mapped.pull(ids, device="cuda")
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), host.pull(ids), rtol=0, atol=0)
        on_device = grads.cuda()
        torch.cuda._sleep(10_000_000)  # a busy stream: the gradients below come after it
        # the GPU writes the gradients into the buffers once made: the push waits for both on this stream
        mapped.push(ids, on_device * 1, step=step, lr=0.3)
        host.push(ids, grads, step=step, lr=0.3)
    mapped.flush()
    host.flush()
    torch.testing.assert_close(mapped.get_rows(0, 41), host.get_rows(0, 41), rtol=0, atol=0)
    pending = mapped.pull_async(torch.arange(41))
    rows = pending.result(device="cuda")
    mapped.push(torch.tensor([4, 30]), torch.ones(2, 6, device="cuda"), step=5, lr=1.0)
    refreshed = mapped.refresh(pending, rows)  # the changed rows again, into the GPU's rows
    torch.testing.assert_close(refreshed.cpu(), mapped.pull(torch.arange(41)), rtol=0, atol=0)
    assert all(not s.buffer._used for s in mapped._shards)
    mapped.close()
    host.close()


@pytest.mark.parametrize("dtype", ["float32", "bf16_sr"])
def test_reads_through_shared_memory_equal_inline_ones_in_blocks_of_any_size(shards, dtype):
    hyper = HyperParams(lr=0.1)
    groups = [shards(3, num_rows=50, dim=6, optimizer="adam", dtype=dtype, hyper=hyper) for _ in range(2)]
    # 1,000 bytes: blocks of (1000 // 2 - 128) // 24 = 15 rows, two a shard in flight
    shared = ParamServerClient(_addresses(groups[0]), timeout_s=20, shared_memory_mib=1000 / 2**20)
    inline = ParamServerClient(_addresses(groups[1]), timeout_s=20, shared_memory_mib=0)
    generator = torch.Generator().manual_seed(0)
    for step in (1, 2):
        ids, grads = torch.randperm(50, generator=generator)[:20], torch.randn(20, 6, generator=generator)
        for client in (shared, inline):
            client.push(ids, grads, step=step, lr=0.1)
    slots = [field for field in shared.health()[0].slots]
    assert "step" in slots  # a per-row scalar slot: (S,), read the same way
    for field in ["rows", *slots]:
        for start, stop in ((0, 50), (7, 44), (16, 17), (9, 9)):
            read = shared.get_rows(start, stop, field=field)
            torch.testing.assert_close(read, inline.get_rows(start, stop, field=field), rtol=0, atol=0)
    assert all(not s.buffer._used for s in shared._shards)  # every block's range freed once read
    shared.close()
    inline.close()


def test_a_block_without_room_travels_inline_and_dropped_prefetches_free_their_ranges(shards):
    servers = shards(1, num_rows=300, dim=8)
    client = ParamServerClient(_addresses(servers), timeout_s=20, shared_memory_mib=4096 / 2**20)
    buffer = client._shards[0].buffer
    assert buffer is not None and buffer.size == 4096
    ids = torch.arange(0, 300, 2)  # 150 rows of 32 bytes: more than the buffer holds
    torch.testing.assert_close(client.pull(ids), client.get_rows(0, 300)[ids], rtol=0, atol=0)
    client.push(ids, torch.ones(150, 8), step=1, lr=0.5)  # inline too
    pending = client.pull_async(torch.tensor([3, 5]))  # fits: a range is reserved
    assert len(buffer._used) == 1
    pending.parts[0][3].result()  # the call is done; the rows were never read
    del pending
    gc.collect()
    assert not buffer._used
    small = torch.tensor([1, 2, 299])
    client.push(small, torch.ones(3, 8), step=2, lr=0.5)
    torch.testing.assert_close(client.pull(small), client.get_rows(0, 300)[small], rtol=0, atol=0)
    pending = client.pull_async(small)
    rows = pending.result()
    assert pending.result() is rows and not buffer._used  # read once: its range is free for others


def test_shared_buffers_off_on_the_server_means_inline(shards):
    servers = shards(1, max_shared_buffers=0)
    client = ParamServerClient(_addresses(servers), timeout_s=20)
    assert client._shards[0].buffer is None
    client.push(torch.tensor([4]), torch.ones(1, 5), step=1, lr=1.0)
    assert client.pull(torch.tensor([4])).shape == (1, 5)


def _attach(port, path, nonce, **options):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(
        wire.method_path("AttachBuffer"),
        request_serializer=wire.serialize,
        response_deserializer=wire.MESSAGES["AttachBufferResponse"].FromString,
    )
    try:
        return call(wire.message("AttachBufferRequest", path=path, nonce=nonce), timeout=5, **options)
    finally:
        channel.close()


def test_attach_refuses_files_that_are_not_a_sealed_buffer_of_the_client(shards, tmp_path):
    (server,) = shards(1, token="s3cret")
    auth = {"metadata": (("authorization", "Bearer s3cret"),)}
    buffer = ClientBuffer(8192)
    plain = tmp_path / "plain"
    plain.write_bytes(buffer.nonce + bytes(8192))  # right nonce, but its size could shrink under the map
    cases = [
        (str(plain), buffer.nonce, "not a memory file with its size sealed"),
        (buffer.path, b"x" * 32, "does not start with the nonce"),
        (str(tmp_path / "missing"), buffer.nonce, "cannot open it here"),
        (buffer.path, b"short", "expected 16 to 64"),
    ]
    for path, nonce, message in cases:
        with pytest.raises(grpc.RpcError) as error:
            _attach(server.port, path, nonce, **auth)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        _attach(server.port, buffer.path, buffer.nonce)  # no token
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _attach(server.port, buffer.path, buffer.nonce, **auth).bytes == 8192
    buffer.close()


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"buffer": 12345, "buffer_offset": 64}, "FAILED_PRECONDITION", "is not attached here"),
        ({"buffer_offset": "end"}, "INVALID_ARGUMENT", "not inside the buffer"),
        ({"buffer_offset": 100}, "INVALID_ARGUMENT", "at a multiple of 64"),
        ({"buffer_offset": 0}, "INVALID_ARGUMENT", "not inside the buffer"),
    ],
)
def test_requests_naming_a_bad_buffer_range_are_refused_and_change_nothing(shards, fields, code, message):
    (server,) = shards(1)
    client = ParamServerClient(_addresses([server]), timeout_s=20)
    state = client._shards[0]
    before = client.get_rows(0, 29)
    fields = {"buffer": state.buffer_id, **fields}
    if fields["buffer_offset"] == "end":
        fields["buffer_offset"] = state.buffer.size  # the 40 bytes would lie past its end
    push = wire.message("PushGradientsRequest", ids=wire.encode_ids([1, 2]), step=1, **fields)
    push.grads.dtype, push.grads.shape[:] = "float32", [2, 5]
    pull = wire.message("PullRowsRequest", ids=wire.encode_ids([1, 2]), buffer_bytes=40, **fields)
    for method, request in (("PushGradients", push), ("PullRows", pull)):
        call = state.stubs[method]
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=5)
        assert error.value.code().name == code and message in error.value.details()
    torch.testing.assert_close(client.get_rows(0, 29), before, rtol=0, atol=0)
    assert client.health()[0].version == 0


def test_the_buffer_of_a_client_that_died_is_detached_and_its_place_reused(shards):
    (server,) = shards(1, max_shared_buffers=1)
    script = (
        "import time\n"
        "from megaclass.paramserver import ParamServerClient\n"
        f"client = ParamServerClient(['127.0.0.1:{server.port}'], timeout_s=20)\n"
        "print('attached' if client._shards[0].buffer is not None else 'inline', flush=True)\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "attached"
        assert server.service.drop_orphaned_buffers() == 0  # its owner runs
    finally:
        process.kill()  # no detach: the server's map is all that holds its memory
        process.wait()
    assert len(server.service._shared) == 1
    client = ParamServerClient(_addresses(servers=[server]), timeout_s=20)  # the one place: taken back
    assert client._shards[0].buffer is not None and len(server.service._shared) == 1
    client.push(torch.tensor([3]), torch.ones(1, 5), step=1, lr=1.0)
    assert client.pull(torch.tensor([3])).shape == (1, 5)
    client.close()
    assert server.service.drop_orphaned_buffers() == 0 and not server.service._shared


def test_a_client_dropped_without_close_leaves_no_memory_behind(shards):
    (server,) = shards(1)
    client = ParamServerClient(_addresses(servers=[server]), timeout_s=20)
    path = client._shards[0].buffer.path
    assert os.path.exists(path) and len(server.service._shared) == 1
    assert server.service.drop_orphaned_buffers() == 0  # its descriptor names the file
    del client
    gc.collect()
    assert not os.path.exists(path)  # the client's descriptor is closed: only the server's map is left
    assert server.service.drop_orphaned_buffers() == 1 and not server.service._shared


def test_a_stopped_shard_maps_no_clients_memory(shards):
    (server,) = shards(1)
    client = ParamServerClient(_addresses(servers=[server]), timeout_s=20)
    assert len(server.service._shared) == 1
    server.stop(0)
    assert not server.service._shared
    assert os.path.exists(client._shards[0].buffer.path)  # the client's own, until it closes or drops it
