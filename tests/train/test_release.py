"""A trainer releases its head's row store when it ends: once every update is applied after a finished run;
after an error without waiting, and with the error that stopped the run as the one raised."""

import pytest

from megaclass.data.synthetic import SynthConfig, synthesize
from megaclass.store.host import HostStore
from megaclass.train import Trainer, load_config
from megaclass.train.loop import train

_RUN = [
    "head.store=host", "head.sample_num=20", "head.index=exact", "model.hidden=[8]", "train.batch_size=32",
    "train.epochs=1", "train.progress=false", "train.device=cpu", "train.valid_fraction=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    paths = (str(folder / "train.txt"), str(folder / "test.txt"))
    for stream, (path, rows) in enumerate(zip(paths, (96, 32), strict=True)):
        synthesize(path, num_docs=rows, num_labels=60, num_features=100, seed=0, stream=stream,
                   config=SynthConfig(cluster_size=8))  # fmt: skip
    return paths


@pytest.fixture
def closes(monkeypatch):
    """The ``wait`` of every ``HostStore.close`` call, in order."""
    calls = []
    close = HostStore.close

    def recorded(self, *, wait=True):
        calls.append(wait)
        close(self, wait=wait)

    monkeypatch.setattr(HostStore, "close", recorded)
    return calls


def _train(task, out):
    return train(load_config(head="selected", overrides=_RUN), train_path=task[0], test_path=task[1],
                 out_dir=str(out), check_fit=False)  # fmt: skip


def test_a_finished_run_closes_its_store_after_its_updates(task, tmp_path, closes):
    assert "P@1" in _train(task, tmp_path / "run")
    assert closes == [True]


def test_a_failed_run_raises_its_own_error_over_the_stores(task, tmp_path, closes, monkeypatch):
    def fail(self):
        raise KeyboardInterrupt  # as a user's ^C mid-epoch

    def refuse(self, *, wait=True):
        closes.append(wait)
        raise OSError("the store's own error")

    monkeypatch.setattr(Trainer, "train", fail)
    monkeypatch.setattr(HostStore, "close", refuse)
    with pytest.raises(KeyboardInterrupt):
        _train(task, tmp_path / "run")
    assert closes == [False]
