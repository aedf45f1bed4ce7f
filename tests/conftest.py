"""Shared test setup: Triton runs in its interpreter when there is no GPU (and on the GPU when there is one:
``device_for``); every test starts from a fixed seed on one intra-op thread."""

import gzip
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: pytest-xdist runs a worker per core, and contended OpenMP threads make
    small ops a hundred times slower. Restored after tests (the trainer sets its own thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device_for():
    """``device_for(impl) -> torch.device``: where a test of ``impl`` puts its tensors. Triton kernels run on
    the GPU when there is one (the interpreter is switched on only without CUDA); everything else on the CPU.
    """

    def device(impl: str) -> torch.device:
        return torch.device("cuda" if str(impl) == "triton" and torch.cuda.is_available() else "cpu")

    return device


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def deb_tags_slice(repo_root, tmp_path_factory):
    """``make(train_rows, test_rows) -> (train, test)``: the first rows of the embedded deb-tags BoW files,
    written with a matching header to a fresh folder."""
    data = os.path.join(repo_root, "data", "deb-tags")

    def write(source: str, target: str, rows: int) -> str:
        with gzip.open(source, "rt") as file:
            header = file.readline().split()
            lines = [file.readline() for _ in range(rows)]
        with open(target, "w") as file:
            file.write(f"{rows} {header[1]} {header[2]}\n")
            file.writelines(lines)
        return target

    def make(train_rows: int, test_rows: int) -> tuple[str, str]:
        folder = tmp_path_factory.mktemp("deb_tags_slice")
        return (
            write(os.path.join(data, "train_bow.txt.gz"), str(folder / "train.txt"), train_rows),
            write(os.path.join(data, "test_bow.txt.gz"), str(folder / "test.txt"), test_rows),
        )

    return make
