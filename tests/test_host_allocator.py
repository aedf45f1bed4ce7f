"""The host allocator keeps large freed blocks: a block made anew each step takes no fresh pages; the heap's
free pages go back to the system when asked."""

import os
import subprocess
import sys

import pytest

from megaclass.cli import main

_FAULTS = """
import resource, statistics, sys, torch
from megaclass.host_allocator import reuse_freed_blocks

def faults_per_block():  # the median over 8 blocks: now and then one block of a run takes fresh pages
    faults = []
    for value in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(1 << 24)  # 64 MiB: above glibc's largest mmap threshold
        block.fill_(value)
        assert float(block[-1]) == value
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(faults)

faults_per_block()
plain = faults_per_block()
reusing = reuse_freed_blocks()
faults_per_block()  # the first block after the switch takes its pages once
print(reusing, plain, faults_per_block())
"""


def _faults(env: dict[str, str]) -> tuple[bool, float, float]:
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    reusing, plain, reused = result.stdout.split()
    return reusing == "True", float(plain), float(reused)


glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="mallopt's settings are glibc's",
)


@glibc_only
def test_a_block_freed_and_made_again_reuses_its_pages():
    reusing, plain, reused = _faults({})
    assert reusing
    assert plain > 10_000  # 16,384 pages of 4 KiB (fewer with huge pages): each fresh block faults them in
    assert reused < plain / 100


@glibc_only
def test_the_environment_leaves_the_allocator_as_it_is():
    reusing, plain, reused = _faults({"MEGACLASS_HOST_MALLOC": "system"})
    assert not reusing
    assert reused > plain / 2


def test_a_cpu_run_reuses_freed_blocks(deb_tags_slice, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("megaclass.train.loop.reuse_freed_blocks", lambda: calls.append(True))
    train, test = deb_tags_slice(64, 16)
    argv = ["train", "--train", train, "--test", test, "--out", str(tmp_path / "run"), "--epochs", "1"]
    settings = ["train.device=cpu", "model.hidden=[8]", "train.progress=false", "train.stop_after_steps=1"]
    assert main([*argv, "--set", *settings]) == 0
    assert calls == [True]


def test_an_image_run_keeps_the_systems_allocator(fixture_dir, tmp_path, monkeypatch):
    """An image encoder's activation blocks would fragment a heap that keeps them (a larger resident peak
    than the memory plan counts): a CPU run over images does not ask for it."""
    calls = []
    monkeypatch.setattr("megaclass.train.loop.reuse_freed_blocks", lambda: calls.append(True))
    rec = os.path.join(fixture_dir, "train.rec")
    argv = ["train", "--train", rec, "--test", rec, "--out", str(tmp_path / "run"), "--epochs", "1"]
    settings = [
        "train.device=cpu", "train.progress=false", "train.stop_after_steps=1", "train.batch_size=8",
        "model.type=iresnet18", "model.layers=[1,1,1,1]", "model.widths=[8,8,8,8]", "model.embedding_size=8",
        "model.input_size=56",
    ]  # fmt: skip
    assert main([*argv, "--set", *settings]) == 0
    assert calls == []


_RELEASE = """
import ctypes
from megaclass.host_allocator import release_free_memory

def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) * 1024

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(4096)]  # 256 MiB in blocks under the mmap threshold
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
last = libc.malloc(64 << 10)  # in use at the heap's top: freeing the others leaves free pages below it
for block in blocks:
    libc.free(block)
before = resident()
release_free_memory()
print(before, resident())
"""


@glibc_only
def test_the_heaps_free_pages_go_back_to_the_system():
    result = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True)
    before, after = (int(value) for value in result.stdout.split())
    assert before - after > 200 << 20  # most of the 256 MiB freed below the block in use
