"""Where a run's numbers go: stdout, a JSONL log (``log.jsonl``), TensorBoard when installed; peak memory."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

__all__ = ["RunLogger", "peak_memory_bytes", "reset_peak_memory"]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA allocator peak (process RSS peaks cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on ``device``, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class RunLogger:
    """Appends records to ``<out>/log.jsonl``, mirrors them to TensorBoard if installed, prints summaries.

    Args:
        out_dir: the run folder.
        enabled: False on non-main ranks: nothing is written.
        tensorboard: write TensorBoard events under ``<out>/tensorboard`` when ``tensorboard`` imports.
    """

    def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.jsonl")
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._writer = (
            self._tensorboard(os.path.join(out_dir, "tensorboard")) if enabled and tensorboard else None
        )

    @staticmethod
    def _tensorboard(folder: str) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: the JSONL log carries the same numbers
            return None
        return SummaryWriter(folder)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` of ``kind`` (``train``, ``eval``, ...) at optimizer step ``step``."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def print(self, text: str) -> None:
        """A line on stdout that does not break tqdm bars."""
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_log(path: str) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` file."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
