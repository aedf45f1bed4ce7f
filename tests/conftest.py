"""Shared test setup: Triton runs in its interpreter when there is no GPU; every test starts from a fixed seed
on one intra-op thread."""

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


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
