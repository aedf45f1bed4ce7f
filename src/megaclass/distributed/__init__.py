"""Training over several processes: rank facts, the data-parallel encoder, and checkpoints of class-sharded
heads that a different number of ranks can resume (heads shard themselves: ``build_head(..., shard)``).

    torchrun --nproc-per-node 2 -m megaclass train --train train.txt --test test.txt --out runs/two
    megaclass train --nproc-per-node 2 --train train.txt --test test.txt --out runs/two
    megaclass export --run runs/two --out model.safetensors

Nothing here opens a process group at import; a single process never opens one.
"""

from megaclass.distributed.info import DistInfo, init_distributed, shutdown_distributed

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed"]
