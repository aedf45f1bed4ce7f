"""Rank facts, read once from the environment ``torchrun`` sets, and the process group's life cycle.

    torchrun --nproc-per-node 2 -m megaclass train --train train.txt --test test.txt --out runs/two

A process started without ``torchrun`` (or by ``torchrun --nproc-per-node 1``) is world size 1 and never opens
a process group: every collective in :mod:`megaclass.distributed` is then the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands among the ranks of a run.

    Args:
        rank: this process's global rank in ``[0, world_size)``.
        local_rank: its rank on its host (its GPU index).
        world_size: number of processes.
        is_main: rank 0: the one that logs, reports and writes run files.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    is_main: bool = True

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"DistInfo: expected 0 <= rank < world_size, got rank {self.rank} of {self.world_size}"
            )
        if self.is_main != (self.rank == 0):
            raise ValueError(
                f"DistInfo: is_main must be rank == 0, got is_main={self.is_main} at rank {self.rank}"
            )

    @property
    def distributed(self) -> bool:
        """True when there is more than one rank (a process group is needed)."""
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (set by ``torchrun``); world size 1 without them."""
        values = {}
        for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
            text = os.environ.get(name, str(default))
            try:
                values[name] = int(text)
            except ValueError:
                raise ValueError(f"environment variable {name}: expected an integer, got {text!r}") from None
        rank = values["RANK"]
        return cls(
            rank=rank, local_rank=values["LOCAL_RANK"], world_size=values["WORLD_SIZE"], is_main=rank == 0
        )


def init_distributed(info: DistInfo, *, device: torch.device, timeout_s: float = 600.0) -> torch.device:
    """Open the default process group (NCCL on CUDA, gloo on CPU) when ``info`` has several ranks.

    Args:
        info: the rank facts (world size 1 opens nothing).
        device: the requested device; ``cuda`` becomes ``cuda:<local_rank>``.
        timeout_s: how long a collective may wait for a missing rank before raising instead of hanging.

    Returns:
        The device this rank computes on.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank if info.distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if not info.distributed:
        return device
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def shutdown_distributed(*, synchronize: bool = True) -> None:
    """Close the default process group if one is open.

    With ``synchronize`` the ranks first wait for each other, so that none tears down its connections while a
    peer still uses them (gloo then aborts the peer's process); error paths pass False, as a peer may be gone.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
