"""One intra-op thread: the cores are shared by test workers, and contended OpenMP spinning makes small ops
a hundred times slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
