"""HF-Softmax's selector: an Annoy forest (random-projection trees, angular distance) over the class rows.

Faithful to the original's knobs (``ntrees`` trees, angular metric, ``search_k``), with one fix: the forest is
built in a background thread from a snapshot of the rows, and the previous forest keeps answering queries
until the new one is swapped in, so training never waits for a build (except for the very first one).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np
import torch
from torch import Tensor

from megaclass.index.base import THOROUGH_FACTOR, ClassSelector, Metric

__all__ = ["AnnoySelector"]


def _import_annoy():  # noqa: ANN202 - the module type is annoy's
    try:
        import annoy
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("index=annoy needs the annoy package: pip install 'megaclass[index]'") from error
    return annoy


class AnnoySelector(ClassSelector):
    """Annoy forest built in the background.

    Args:
        ntrees: trees in the forest (the original: 50); more trees, better recall, slower builds.
        search_k: nodes inspected per query (-1: Annoy's default, ``n * ntrees``).
        seed: Annoy's random seed, so a build is reproducible.
        background: build in a thread (the first build always waits).
    """

    ranks_by = (Metric.COSINE,)  # Annoy's angular forest

    def __init__(
        self, *, ntrees: int = 50, search_k: int = -1, seed: int = 0, background: bool = True
    ) -> None:
        if ntrees < 1:
            raise ValueError(f"ntrees: expected >= 1, got {ntrees}")
        self.ntrees, self.search_k, self.seed, self.background = ntrees, search_k, seed, background
        self.metric = Metric.COSINE  # angular distance is the cosine's
        self._index = None  # the serving forest
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._build_ms = 0.0
        self._swaps = 0

    def _build_forest(self, rows: np.ndarray) -> None:
        try:
            begin = time.perf_counter()
            forest = _import_annoy().AnnoyIndex(rows.shape[1], "angular")
            forest.set_seed(self.seed)
            for class_id, row in enumerate(rows):
                forest.add_item(class_id, row)
            forest.build(self.ntrees, n_jobs=1)
            with self._lock:
                self._index = forest
                self._build_ms = (time.perf_counter() - begin) * 1e3
                self._swaps += 1
        except BaseException as error:  # surfaced in the training thread by wait()/query()
            self._error = error

    def build(self, weight: Tensor, *, changed: Tensor | None = None) -> None:
        if weight.dim() != 2 or weight.shape[0] == 0:
            raise ValueError(f"weight: expected a non-empty (C, D) matrix, got {tuple(weight.shape)}")
        if self._thread is not None and self._thread.is_alive():
            return  # a build is running: the next scheduled build will take newer rows
        rows = weight.detach().float().cpu().numpy().copy()  # the snapshot the thread owns
        if not self.background or self._index is None:
            self._build_forest(rows)
            self._raise_pending()
            return
        self._thread = threading.Thread(
            target=self._build_forest, args=(rows,), daemon=True, name="annoy-build"
        )
        self._thread.start()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("background Annoy build failed") from error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self._raise_pending()

    @property
    def is_built(self) -> bool:
        return self._index is not None

    @property
    def swaps(self) -> int:
        """Finished builds so far."""
        return self._swaps

    def query(
        self, features: Tensor, n: int, *, metric: Metric | str | None = None, thorough: bool = False
    ) -> Tensor:
        if metric is not None and Metric(metric) not in self.ranks_by:
            raise ValueError(f"metric {Metric(metric).value!r}: an Annoy forest ranks by angle only")
        self._raise_pending()
        with self._lock:
            forest = self._index
        if forest is None:
            raise RuntimeError("AnnoySelector.query before build")
        out = np.full((features.shape[0], n), -1, dtype=np.int64)
        search_k = self.search_k if self.search_k > 0 else n * self.ntrees  # Annoy's default
        search_k *= THOROUGH_FACTOR if thorough else 1
        for row, vector in enumerate(features.detach().float().cpu().numpy()):
            found = forest.get_nns_by_vector(vector, n, search_k=search_k)
            out[row, : len(found)] = found
        return torch.from_numpy(out).to(features.device)

    def metrics(self) -> dict[str, float]:
        return {"index_build_ms": self._build_ms, "index_swaps": float(self._swaps)}

    def state_dict(self) -> dict[str, Tensor]:
        """The serving forest's bytes (Annoy's own file format), so a resume queries the same forest."""
        self.wait()
        if self._index is None:
            return {}
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "forest.ann")
            self._index.save(path)  # the index now serves from this file, mmapped (valid after unlink)
            data = np.fromfile(path, dtype=np.uint8)
        return {"forest": torch.from_numpy(data), "dim": torch.tensor(self._index.f)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.wait()
        if "forest" not in state:
            with self._lock:
                self._index = None
            return
        forest = _import_annoy().AnnoyIndex(int(state["dim"]), "angular")
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "forest.ann")
            state["forest"].numpy().tofile(path)
            forest.load(path, prefault=True)  # mmapped: stays readable after the folder is removed
        with self._lock:
            self._index = forest
