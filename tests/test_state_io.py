"""State folders: exact round trips of nested state, manifests that catch truncated and altered files, atomic
replacement that keeps a whole folder at every moment, and the layer's imports."""

import ast
import hashlib
import json
import os
import random
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from megaclass import state_io
from megaclass.state_io import DamagedStateError


def _nested_state():
    return {
        "weights": {"a": torch.randn(3, 5), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)},
        "dtypes": [
            torch.arange(6, dtype=torch.int64),
            torch.ones(2, dtype=torch.bool),
            torch.randn(4).to(torch.bfloat16),
            torch.randint(0, 255, (7,), dtype=torch.uint8),
        ],
        "numpy": np.arange(5, dtype=np.uint32),
        "python": random.getstate(),
        3: ("tuple", 1, 2.0, None, True),
        "view": torch.arange(12.0).reshape(3, 4)[:, 1],
    }


def _assert_equal(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_round_trip_is_exact(tmp_path):
    state = _nested_state()
    folder = state_io.write_state(str(tmp_path / "state"), state)
    assert sorted(os.listdir(folder)) == ["manifest.json", "state.json", "tensors.safetensors"]
    _assert_equal(state, state_io.read_state(folder))


def test_unstorable_value_names_its_key():
    with pytest.raises(TypeError, match="'outer.bad'"):
        state_io.flatten({"outer": {"bad": object()}})


def _pieces_checksum(data: bytes, piece: int) -> str:
    """The SHA-256 of the SHA-256 digests of ``data``'s pieces, computed here apart from the module's."""
    digests = b"".join(hashlib.sha256(data[i : i + piece]).digest() for i in range(0, len(data), piece))
    return hashlib.sha256(digests).hexdigest()


def test_manifest_holds_size_and_checksum_of_every_file(tmp_path):
    folder = state_io.write_state(str(tmp_path / "state"), {"w": torch.arange(10.0)})
    with open(os.path.join(folder, "manifest.json")) as file:
        files = json.load(file)["files"]
    assert sorted(files) == ["state.json", "tensors.safetensors"]
    for name, entry in files.items():
        with open(os.path.join(folder, name), "rb") as file:
            data = file.read()
        piece = entry["piece_bytes"]
        assert entry == {
            "size": len(data),
            "sha256_pieces": _pieces_checksum(data, piece),
            "piece_bytes": piece,
        }


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 3000, 3999])
@pytest.mark.parametrize("block", [1, 7, 1000, 2500, 1 << 20])
def test_piece_checksum_while_written_and_read_back(tmp_path, monkeypatch, size, block):
    """Pieces of 1,000 bytes: the checksum of bytes written in blocks of any size (a header first, cutting the
    pieces elsewhere) equals the one read back from the file, and the one computed here apart."""
    monkeypatch.setattr(state_io, "_READ_BYTES", 300)  # a piece read in several parts
    data = os.urandom(size)
    with ThreadPoolExecutor(2) as pool:
        digest = state_io._PieceDigest(pool, 1000)
        for start in range(0, size, block):
            for future in digest.update(np.frombuffer(data[start : start + block], dtype=np.uint8)):
                future.result()
        written = digest.fingerprint()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert written == state_io.piece_fingerprint(str(path), piece_bytes=1000)
    assert written == {"size": size, "sha256_pieces": _pieces_checksum(data, 1000), "piece_bytes": 1000}


@pytest.mark.parametrize("offset", [0, 1, 999, 1000, 2345])
@pytest.mark.parametrize("chunk", [7, 1000, 2500, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_a_contiguous_tensor_is_cut_where_the_files_pieces_begin(offset, chunk, dtype):
    """A tensor at file offset ``offset`` goes to the checksum in blocks of at most ``chunk`` bytes; where a
    chunk holds a whole piece (1,000 bytes), every block after the first starts at a piece's start, so that
    the whole pieces are hashed by the pool and the checksum is the file's."""
    tensor = (torch.randn(37, 83) > 0).to(dtype) if dtype == torch.bool else torch.randn(37, 83).to(dtype)
    head = os.urandom(offset)
    blocks = list(state_io._byte_blocks(tensor, chunk, offset=offset, piece_bytes=1000))
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert b"".join(block.tobytes() for block in blocks) == data
    starts = np.cumsum([offset] + [len(block) for block in blocks])[:-1]
    assert all(len(block) <= chunk for block in blocks)
    if chunk >= 1000:
        assert all(start % 1000 == 0 for start in starts[1:])
    with ThreadPoolExecutor(2) as pool:
        digest = state_io._PieceDigest(pool, 1000)
        digest.update(np.frombuffer(head, dtype=np.uint8))
        submitted = [future for block in blocks for future in digest.update(block)]
        written = digest.fingerprint()
    whole = len(range(-(-offset // 1000) * 1000, offset + len(data) - 999, 1000))  # pieces inside the tensor
    assert len(submitted) == (whole if chunk >= 1000 else 0)  # hashed by the pool, not here
    assert written["sha256_pieces"] == _pieces_checksum(head + data, 1000)


def test_a_manifest_of_whole_file_digests_still_verifies(tmp_path):
    """Manifests written before piece checksums (each file's whole SHA-256) are checked as they were."""
    folder = state_io.write_state(str(tmp_path / "state"), {"w": torch.arange(10.0)})
    files = {
        name: state_io.file_fingerprint(os.path.join(folder, name))
        for name in ("state.json", "tensors.safetensors")
    }
    state_io.write_json_atomic(os.path.join(folder, "manifest.json"), {"files": files})
    state_io.verify_manifest(folder)
    with open(os.path.join(folder, "tensors.safetensors"), "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 1]))
    with pytest.raises(state_io.DamagedStateError, match="differs from its checksum"):
        state_io.verify_manifest(folder)


def test_manifest_covers_nested_folders(tmp_path):
    folder = tmp_path / "sharded"
    state_io.write_state(str(folder / "common"), {"x": torch.ones(2)})
    (folder / "layout.json").write_text("{}")
    state_io.write_manifest(str(folder))
    with open(folder / "manifest.json") as file:
        names = sorted(json.load(file)["files"])
    assert names == [
        "common/manifest.json",
        "common/state.json",
        "common/tensors.safetensors",
        "layout.json",
    ]
    state_io.verify_manifest(str(folder))
    (folder / "common" / "state.json").write_text("{}")
    with pytest.raises(DamagedStateError, match="common/state.json"):
        state_io.verify_manifest(str(folder))


def _damage(path: str, how: str) -> None:
    if how == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "flipped":  # one bit of one byte in the middle
        with open(path, "r+b") as file:
            file.seek(os.path.getsize(path) // 2)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0x10]))
    else:
        os.remove(path)


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("truncated", r"tensors.safetensors has \d+ bytes, the manifest says \d+"),
        ("flipped", "tensors.safetensors differs from its checksum"),
        ("removed", "tensors.safetensors is missing"),
    ],
)
def test_damaged_files_are_named(tmp_path, how, expected):
    folder = state_io.write_state(str(tmp_path / "state"), {"w": torch.randn(64)})
    _damage(os.path.join(folder, "tensors.safetensors"), how)
    with pytest.raises(DamagedStateError, match=expected):
        state_io.read_state(folder)
    with pytest.raises(DamagedStateError, match=expected):
        state_io.verify_manifest(folder)


def test_missing_or_unreadable_manifest(tmp_path):
    folder = state_io.write_state(str(tmp_path / "state"), {"w": torch.ones(2)})
    manifest = os.path.join(folder, "manifest.json")
    with open(manifest, "w") as file:
        file.write('{"files": ')
    with pytest.raises(DamagedStateError, match="unreadable"):
        state_io.verify_manifest(folder)
    os.remove(manifest)
    with pytest.raises(DamagedStateError, match="no manifest.json"):
        state_io.verify_manifest(folder)
    assert torch.equal(state_io.read_state(folder)["w"], torch.ones(2)), "no manifest: read as is"


def test_overwrite_state_folder_leaves_no_leftovers(tmp_path):
    folder = str(tmp_path / "model")
    state_io.write_state(folder, {"w": torch.ones(2)})
    state_io.write_state(folder, {"w": torch.zeros(2)})
    assert torch.equal(state_io.read_state(folder)["w"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["model"]


def test_a_kill_between_the_renames_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    folder = str(tmp_path / "step_000000004")
    state_io.write_state(folder, {"w": torch.ones(2)})
    real_replace = os.replace

    def replace(source, target):
        if os.path.basename(source).startswith(".tmp-step_"):
            raise KeyboardInterrupt("killed between the renames")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        state_io.write_state(folder, {"w": torch.zeros(2)})
    monkeypatch.undo()
    (aside,) = [entry for entry in os.listdir(tmp_path) if entry.startswith(".old-step_000000004-")]
    moved = os.path.join(tmp_path, aside, "step_000000004")
    state_io.verify_manifest(moved)
    assert torch.equal(state_io.read_state(moved)["w"], torch.ones(2))


def test_file_fingerprint_streams_large_files(tmp_path):
    path = tmp_path / "data.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read
    path.write_bytes(data)
    assert state_io.file_fingerprint(str(path)) == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_folder_fingerprint_follows_its_listing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.jpg").write_bytes(b"12345")
    (tmp_path / "b.jpg").write_bytes(b"xy")
    first = state_io.path_fingerprint(str(tmp_path))
    listing = b"a/0.jpg\t5\nb.jpg\t2\n"
    assert first == {"size": 7, "sha256": hashlib.sha256(listing).hexdigest()}
    (tmp_path / "b.jpg").rename(tmp_path / "c.jpg")
    assert state_io.path_fingerprint(str(tmp_path)) != first
    assert state_io.path_fingerprint(str(tmp_path / "c.jpg")) == state_io.file_fingerprint(
        str(tmp_path / "c.jpg")
    )


def _imported_modules(repo_root: str, path: str) -> set[str]:
    with open(os.path.join(repo_root, "src", "megaclass", path)) as file:
        tree = ast.parse(file.read())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "megaclass":  # from megaclass import staging
            modules |= {f"megaclass.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    return modules


def test_state_io_sits_on_the_bottom_layer(repo_root):
    """``state_io`` imports only torch, numpy, safetensors, ``megaclass.errors`` and ``megaclass.staging``
    (and the standard library); both checkpoint modules take their I/O from it; the sharded one imports
    nothing of train/."""
    allowed = {"torch", "numpy", "safetensors", "__future__", *sys.stdlib_module_names}
    outside = {
        module
        for module in _imported_modules(repo_root, "state_io.py")
        if module.split(".")[0] not in allowed and module not in ("megaclass.errors", "megaclass.staging")
    }
    assert not outside, f"state_io imports {sorted(outside)}"
    for path in ("train/checkpoint.py", "distributed/checkpoint.py"):
        assert "megaclass.state_io" in _imported_modules(repo_root, path), path
    upward = {
        m
        for m in _imported_modules(repo_root, "distributed/checkpoint.py")
        if m.startswith("megaclass.train")
    }
    assert not upward, f"distributed/checkpoint.py imports {sorted(upward)}"


# ------------------------------------------------------------------------------------ streamed tensors


def _tensors():
    return {
        "rows": torch.randn(37, 5),
        "bf16": torch.randn(9, 3).to(torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "view": torch.arange(40.0).reshape(5, 8)[:, 1::2],  # not contiguous
        "parameter": torch.nn.Parameter(torch.randn(6, 4)).T,  # not contiguous, and needs its gradient
        "flags": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("chunk_bytes", [1, 16, 1 << 20])
def test_write_tensors_is_a_safetensors_file_hashed_while_written(tmp_path, chunk_bytes):
    from safetensors import safe_open

    path = str(tmp_path / "t.safetensors")
    tensors = _tensors()
    fingerprint = state_io.write_tensors(path, tensors, metadata={"a": "b"}, chunk_bytes=chunk_bytes)
    assert fingerprint == state_io.piece_fingerprint(path)
    with safe_open(path, framework="pt") as file:
        assert file.metadata() == {"a": "b"}
        assert sorted(file.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            _assert_equal(tensor, file.get_tensor(name), name)
    _assert_equal(tensors, state_io.read_tensors(path))
    assert os.listdir(tmp_path) == ["t.safetensors"]  # the temporary file was renamed


def test_read_tensors_reads_files_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "t.safetensors")
    tensors = {name: value.contiguous() for name, value in _tensors().items()}
    save_file(tensors, path)
    loaded = state_io.read_tensors(path)
    _assert_equal(tensors, {name: loaded[name] for name in tensors})


def test_one_element_or_none_seen_through_a_stride_of_zero_is_written_as_its_value(tmp_path):
    # contiguous by torch's rule (a dimension of one or none has any stride), but no byte view of it exists
    tensors = {
        "scalar": torch.tensor(7.0).expand(1, 1),
        "ids": torch.tensor(3).expand(1),
        "none": torch.from_numpy(np.unique(np.zeros(0, np.int64))),  # a featuriser's empty vocabulary
    }
    assert tensors["scalar"].stride() == (0, 0) and tensors["none"].stride() == (0,)
    assert tensors["scalar"].is_contiguous() and tensors["none"].is_contiguous()
    path = str(tmp_path / "t.safetensors")
    state_io.write_tensors(path, tensors)
    _assert_equal({name: value.clone() for name, value in tensors.items()}, state_io.read_tensors(path))


def test_a_written_tensors_last_block_is_let_go_before_the_next_tensors_first(tmp_path):
    # a staging block still referenced when the next tensor's is made would be a second block beside it
    alive = []

    def blocks(count):
        for _ in range(count):
            block = np.arange(2500, dtype=np.uint8)
            alive.append(weakref.ref(block))
            yield block

    with open(tmp_path / "f", "wb") as file, ThreadPoolExecutor(2) as pool:
        digest = state_io._PieceDigest(pool, 1000)
        state_io._write_blocks(file, digest, blocks(3))
        assert [ref() for ref in alive] == [None] * 3
        state_io._write_blocks(file, digest, blocks(1))
        assert digest.size == 4 * 2500
    assert os.path.getsize(tmp_path / "f") == 4 * 2500


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tensors_are_written_through_page_locked_blocks_of_one_size(tmp_path):
    stats = torch.cuda.memory.host_memory_stats
    torch.zeros(1, device="cuda")  # the context first: the statistics are empty until the allocator's
    first = torch.empty(1, pin_memory=True)  # first block, and this one is held to the end
    if "allocated_bytes.current" not in stats():
        pytest.skip("this torch's pinned-memory statistics name no allocated_bytes.current")
    path = str(tmp_path / "t.safetensors")
    tensors = {name: tensor.cuda() for name, tensor in _tensors().items()}
    tensors |= {  # tensors of 24, 96 and 512 KiB, and one of 4 MiB written in blocks of 1 MiB
        f"rows{n}": torch.randn(n, 1024, device="cuda") for n in (6, 24, 128, 1024)
    }
    tensors["columns"] = torch.randn(1024, 300, device="cuda").T  # not contiguous: blocks of rows
    before = stats()["allocated_bytes.current"]
    state_io.write_tensors(path, tensors, chunk_bytes=1 << 20)
    # torch keeps a freed page-locked block by its size: blocks of one size leave one behind at most
    assert stats()["allocated_bytes.current"] - before <= 1 << 20
    assert first.is_pinned()
    for name, tensor in state_io.read_tensors(path).items():
        _assert_equal(tensors[name].cpu(), tensor, name)


def test_streamed_tensors_are_read_by_row_range_and_copied_into_place(tmp_path):
    path = str(tmp_path / "t.safetensors")
    tensors = _tensors()
    state_io.write_tensors(path, tensors)
    saved = state_io.read_tensors(path, stream=lambda name: name != "flags")
    assert isinstance(saved["flags"], torch.Tensor)
    rows = saved["rows"]
    assert isinstance(rows, state_io.SavedTensor)
    assert (rows.shape, rows.dtype, rows.dim(), len(rows)) == ((37, 5), torch.float32, 2, 37)
    assert rows.numel() == 185
    assert torch.equal(rows[3:11], tensors["rows"][3:11])
    assert torch.equal(rows[30:], tensors["rows"][30:])
    assert rows[5:2].shape == (0, 5)
    assert torch.equal(saved["scalar"].read(), tensors["scalar"])
    with pytest.raises(TypeError, match="row range"):
        rows[3]
    for chunk_bytes in (1, 20, 1 << 20):  # blocks of one row, of a few, and all at once
        target = torch.zeros(37, 5)  # contiguous, same dtype: read straight into it
        state_io.copy_into_(target, rows, chunk_bytes=chunk_bytes)
        assert torch.equal(target, tensors["rows"])
        converted = torch.zeros(37, 5, dtype=torch.float64)  # another dtype: through a block
        state_io.copy_into_(converted, rows, chunk_bytes=chunk_bytes)
        assert torch.equal(converted, tensors["rows"].double())
        strided = torch.zeros(5, 37).T  # not contiguous: through a block
        state_io.copy_into_(strided, rows, chunk_bytes=chunk_bytes)
        assert torch.equal(strided, tensors["rows"])
    bf16 = torch.zeros(9, 3, dtype=torch.bfloat16)
    state_io.copy_into_(bf16, saved["bf16"])
    assert torch.equal(bf16, tensors["bf16"])
    with pytest.raises(ValueError, match=r"expected shape \(36, 5\), got \(37, 5\)"):
        state_io.copy_into_(torch.zeros(36, 5), rows)


def test_a_streamed_copy_is_written_again_block_by_block(tmp_path):
    first, second = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    state_io.write_tensors(first, _tensors(), metadata={"k": "v"})
    saved = state_io.read_tensors(first, stream=lambda name: True)
    assert state_io.write_tensors(second, saved, metadata={"k": "v"}, chunk_bytes=8) == (
        state_io.piece_fingerprint(first)
    )


class _CountingSource(state_io.RowSource):
    """Rows of ``tensor`` handed out a block at a time, each block's row count recorded."""

    def __init__(self, tensor, *, shape=None):
        self.tensor, self.blocks = tensor, []
        self.shape, self.dtype = torch.Size(tensor.shape if shape is None else shape), tensor.dtype

    def read_rows(self, start, stop):
        self.blocks.append(stop - start)
        return self.tensor.reshape(-1, *self.tensor.shape[1:])[start:stop].clone()


def test_any_row_source_is_written_and_copied_block_by_block(tmp_path):
    rows, scalar = torch.randn(37, 5), torch.tensor(4.5)
    source = _CountingSource(rows)
    assert (source.shape, source.dim(), len(source), source.numel(), source.row_bytes) == (
        (37, 5),
        2,
        37,
        185,
        20,
    )
    state = {"head": {"store.weight": source, "scalar": _CountingSource(scalar)}, "step": 3}
    folder = state_io.write_state(str(tmp_path / "s"), state, chunk_bytes=3 * 20)  # blocks of 3 rows
    assert source.blocks == [3] * 12 + [1]
    loaded = state_io.read_state(folder)
    assert torch.equal(loaded["head"]["store.weight"], rows) and torch.equal(loaded["head"]["scalar"], scalar)
    target, source.blocks = torch.zeros(37, 5, dtype=torch.float64), []
    state_io.copy_into_(target, source, chunk_bytes=8 * 20)
    assert torch.equal(target, rows.double()) and source.blocks == [8] * 4 + [5]
    with pytest.raises(ValueError, match=r"rows \[0, 3\) came as torch.float32 of shape \(3, 5\), expected"):
        _CountingSource(rows, shape=(37, 4))[0:3]  # a source whose rows are not what it says


def test_stacked_rows_read_each_part_only_where_asked(tmp_path):
    """Row ranges of tensors and files stacked: any block reads the parts it spans and nothing else, and
    the whole is written block by block as the tensors concatenated would be."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, 3, 2, generator=generator) for n in (7, 1, 12, 5)]
    path = str(tmp_path / "part.safetensors")
    state_io.write_tensors(path, {"rows": tensors[2]})
    saved = state_io.read_tensors(path, stream=lambda name: True)["rows"]
    counting = _CountingSource(tensors[3])
    ranges = [(tensors[0], 2, 7), (tensors[1], 0, 1), (saved, 3, 12), (saved, 5, 5), (counting, 0, 4)]
    stacked = state_io.StackedRows(ranges)
    expected = torch.cat([tensors[0][2:7], tensors[1], tensors[2][3:12], tensors[3][:4]])
    assert (tuple(stacked.shape), stacked.dtype, len(stacked)) == ((19, 3, 2), torch.float32, 19)
    for start, stop in [(0, 19), (0, 5), (4, 7), (5, 6), (6, 15), (15, 19), (18, 19), (9, 9)]:
        assert torch.equal(stacked[start:stop], expected[start:stop]), (start, stop)
    assert counting.blocks == [4, 4, 1]  # read only for the blocks reaching past row 15
    counting.blocks = []
    folder = state_io.write_state(str(tmp_path / "s"), {"rows": stacked}, chunk_bytes=4 * 24)  # blocks of 4
    assert torch.equal(state_io.read_state(folder)["rows"], expected) and counting.blocks == [1, 3]
    assert torch.equal(stacked.read(), expected)
    with pytest.raises(ValueError, match="does not stack"):
        state_io.StackedRows([(tensors[0], 0, 7), (torch.zeros(3, 2, 2), 0, 3)])
    with pytest.raises(ValueError, match="does not stack"):
        state_io.StackedRows([(tensors[0], 0, 7), (tensors[1].double(), 0, 1)])
    with pytest.raises(ValueError, match=r"rows \[2, 9\) outside a part of 7"):
        state_io.StackedRows([(tensors[0], 2, 9)])


def test_truncated_tensor_files_are_named(tmp_path):
    path = str(tmp_path / "t.safetensors")
    state_io.write_tensors(path, {"rows": torch.randn(64, 4)})
    saved = state_io.read_tensors(path, stream=lambda name: True)["rows"]
    size = os.path.getsize(path)
    os.truncate(path, size - 16)
    with pytest.raises(DamagedStateError, match="'rows' takes bytes"):
        state_io.read_tensors(path)
    with pytest.raises(DamagedStateError, match="ends inside tensor data"):
        saved[60:64]
    with open(path, "wb") as file:
        file.write(b"\x08" + b"\x00" * 7 + b"{broken}")
    with pytest.raises(DamagedStateError, match="unreadable safetensors header"):
        state_io.read_tensors(path)


def test_read_state_streams_the_keys_it_is_told_to(tmp_path):
    state = {"head": {"store.weight": torch.randn(6, 2), "step": torch.tensor(3)}, "n": 1}
    folder = state_io.write_state(str(tmp_path / "s"), state)
    loaded = state_io.read_state(folder, stream=lambda key: key.startswith("head.store."))
    assert isinstance(loaded["head"]["store.weight"], state_io.SavedTensor)
    assert isinstance(loaded["head"]["step"], torch.Tensor)
    assert torch.equal(loaded["head"]["store.weight"].read(), state["head"]["store.weight"])


_BOUNDED_SAVE = """
import re, sys, torch
from megaclass import state_io

def peak_growth(action):
    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts at the current RSS
    before = kib("VmRSS")
    action()
    return (kib("VmHWM") - before) * 1024

folder = sys.argv[1]
rows = torch.randn(1 << 22, 16)  # 256 MiB
state = {"head": {"store.weight": rows}, "step": 3}
saved = peak_growth(lambda: state_io.write_state(folder, state, chunk_bytes=8 << 20))
stream = lambda key: key.startswith("head.store.")
loaded = peak_growth(
    lambda: state_io.copy_into_(
        rows, state_io.read_state(folder, stream=stream)["head"]["store.weight"], chunk_bytes=8 << 20
    )
)
streamed = state_io.read_state(folder, stream=stream)["head"]["store.weight"]
half = len(rows) // 2
stacked = state_io.StackedRows([(streamed, half, len(rows)), (streamed, 0, half)])
restacked = peak_growth(
    lambda: state_io.write_state(folder + "-stacked", {"rows": stacked}, chunk_bytes=8 << 20)
)
print(saved, loaded, restacked, rows.numel() * 4)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_saving_and_loading_rows_take_one_block_of_host_memory_not_a_copy(tmp_path):
    """The peak RSS growth of writing and reading back 256 MiB of rows, and of writing them again as stacked
    ranges of the file, stays under 64 MiB (8 MiB blocks and the interpreter's own); any whole copy of the
    rows would show 256 MiB or more."""
    import subprocess
    import sys

    script = tmp_path / "bounded.py"
    script.write_text(_BOUNDED_SAVE)
    # a fixed threshold: freed blocks of a MiB or more go back to the system at once, so the peak measures
    # what the code holds, not the heap the C allocator keeps after raising its threshold (16 to 83 MiB)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MALLOC_MMAP_THRESHOLD_": "1048576"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
    )
    saved, loaded, restacked, rows_bytes = (int(x) for x in result.stdout.split())
    assert saved < rows_bytes // 4, f"save grew the RSS by {saved} bytes for {rows_bytes} of rows"
    assert loaded < rows_bytes // 4, f"load grew the RSS by {loaded} bytes for {rows_bytes} of rows"
    assert restacked < rows_bytes // 4, f"stacked rows grew the RSS by {restacked} bytes for {rows_bytes}"


def test_written_files_get_the_umask_mode_not_a_private_one(tmp_path):
    from megaclass.state_io import write_tensors

    previous = os.umask(0o022)
    try:
        write_tensors(str(tmp_path / "w.safetensors"), {"w": torch.ones(3)})
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644  # readable by a serving process


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "copies"])
def test_link_state_is_the_state_under_a_second_name(tmp_path, monkeypatch, links):
    source = state_io.write_state(str(tmp_path / "best"), {"w": torch.arange(6.0).view(2, 3), "step": 4})
    if not links:

        def no_links(*args):
            raise OSError("this file system makes no hard links")

        monkeypatch.setattr(state_io.os, "link", no_links)
    state_io.write_state(str(tmp_path / "model"), {"stale": torch.zeros(1)})  # replaced whole
    folder = state_io.link_state(source, str(tmp_path / "model"))
    state = state_io.read_state(folder)  # its manifest checks out
    assert (
        torch.equal(state["w"], torch.arange(6.0).view(2, 3)) and state["step"] == 4 and "stale" not in state
    )
    same_file = [
        os.path.samefile(os.path.join(folder, name), os.path.join(source, name))
        for name in os.listdir(source)
    ]
    assert sorted(os.listdir(folder)) == sorted(os.listdir(source)) and all(same_file) == links
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary left
