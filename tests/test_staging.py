import pytest
import torch

from megaclass import staging
from megaclass.staging import blocks_to_device, copy_rows_

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_copy_rows_converts_on_the_cpu_and_refuses_other_shapes():
    source = torch.randn(7, 3)
    destination = torch.empty(7, 3, dtype=torch.bfloat16)
    assert torch.equal(copy_rows_(destination, source), source.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"shapes differ: \(7, 3\) and \(3, 7\)"):
        copy_rows_(destination, source.T)


@pytest.mark.parametrize(
    ("rows", "row_shape", "dtype"),
    [(3, (5,), torch.float32), (1, (), torch.int64), (4, (2, 3), torch.bfloat16), (50, (10,), torch.float64)],
)
def test_page_locked_buffers_are_cut_from_blocks_of_one_size(monkeypatch, rows, row_shape, dtype):
    blocks = []

    def page_locked_bytes(size):  # the CPU build has no page-locked memory: the block as it is asked for
        blocks.append(torch.zeros(size, dtype=torch.uint8))
        return blocks[-1]

    monkeypatch.setattr(staging, "_page_locked_bytes", page_locked_bytes)
    monkeypatch.setattr(staging, "STAGING_BYTES", 256)
    buffer = staging.page_locked(rows, row_shape, dtype)
    assert buffer.shape == (rows, *row_shape) and buffer.dtype == dtype and buffer.is_contiguous()
    size = buffer.numel() * buffer.element_size()
    assert [len(block) for block in blocks] == [max(size, 256)]  # one size, unless a buffer needs more
    buffer.fill_(1)
    assert buffer.untyped_storage().data_ptr() == blocks[0].data_ptr()
    assert torch.equal(blocks[0][:size].view(dtype), torch.ones(buffer.numel(), dtype=dtype))


@pytest.mark.parametrize("block_rows", [1, 3, 7, 10])
def test_blocks_to_device_yields_every_block_in_order(block_rows):
    rows = torch.randn(7, 4)
    blocks = list(blocks_to_device(rows, "cpu", block_rows))
    starts = range(0, 7, block_rows)
    assert [len(block) for block in blocks] == [min(block_rows, 7 - start) for start in starts]
    assert torch.equal(torch.cat(blocks), rows)


def test_blocks_to_device_slices_any_row_source():
    class Rows:  # a sized object whose slices are tensors, as an index's row reader
        shape = (5, 2)

        def __getitem__(self, rows: slice) -> torch.Tensor:
            return torch.arange(10.0).view(5, 2)[rows]

    assert torch.equal(torch.cat(list(blocks_to_device(Rows(), "cpu", 2))), torch.arange(10.0).view(5, 2))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_rows_from_a_gpu_into_pageable_memory_a_block_at_a_time(monkeypatch, dtype):
    monkeypatch.setattr(staging, "STAGING_BYTES", 3 * 16 * 4)  # blocks of 3 rows (2 bytes a value: 6)
    source = torch.randn(11, 16, device="cuda")
    destination = torch.empty(11, 16, dtype=dtype)
    copy_rows_(destination, source)
    assert torch.equal(destination, source.cpu().to(dtype))
    columns = torch.randn(16, 11, device="cuda").T  # not contiguous
    assert torch.equal(copy_rows_(torch.empty(11, 16), columns), columns.cpu())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("block_rows", [2, 3, 4, 7, 50])
def test_blocks_to_device_reuses_a_buffer_only_after_its_copy(monkeypatch, block_rows):
    monkeypatch.setattr(staging, "STAGING_BYTES", 3 * 8 * 4)  # buffers of 3 rows: blocks cross in pieces
    rows = torch.randn(50, 8)
    torch.cuda._sleep(50_000_000)  # the copies wait behind this on the stream while the host fills buffers
    blocks = list(blocks_to_device(rows, "cuda", block_rows))
    assert [len(block) for block in blocks] == [min(block_rows, 50 - s) for s in range(0, 50, block_rows)]
    assert all(block.is_cuda for block in blocks)
    assert torch.equal(torch.cat(blocks).cpu(), rows)


def test_map_to_device_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="a contiguous host tensor and a CUDA device, got a contiguous cpu"):
        staging.map_to_device(torch.zeros(3, 2), "cpu")
    with pytest.raises(ValueError, match="got a non-contiguous cpu tensor"):
        staging.map_to_device(torch.zeros(3, 2).T, "cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (1000, 3), (7, 5, 2)])
def test_map_to_device_is_the_host_memory_seen_from_the_gpu(dtype, shape):
    host = torch.arange(torch.Size(shape).numel()).to(dtype).view(shape)
    mapped = staging.map_to_device(host, "cuda")
    assert mapped.is_cuda and mapped.dtype == dtype and mapped.shape == host.shape
    assert torch.equal(mapped.cpu(), host)  # read by the GPU
    if host.numel():
        assert mapped.data_ptr() == host.data_ptr()  # the same memory, not a copy
        mapped[0] = 3  # written by the GPU ...
        torch.cuda.synchronize()
        assert bool((host[0] == 3).all())  # ... and seen by the host
        host[-1] = 5  # written by the host ...
        assert bool((mapped[-1] == 5).all())  # ... and seen by the GPU
    del mapped  # unlocked: locking it again succeeds
    if host.numel():
        again = staging.map_to_device(host, "cuda")
        assert again is not None and torch.equal(again.cpu(), host)


@pytest.mark.gpu
@cuda
def test_map_to_device_warns_and_gives_none_where_cuda_will_not_lock():
    host = torch.zeros(1000)
    mapped = staging.map_to_device(host, "cuda")
    with pytest.warns(RuntimeWarning, match="could not page-lock 0.00 GiB of host memory"):
        assert staging.map_to_device(host, "cuda") is None  # locked already
    assert float((torch.ones(3, device="cuda") * 2).sum()) == 6.0  # the refusal leaves later CUDA work be
    assert mapped.is_cuda
