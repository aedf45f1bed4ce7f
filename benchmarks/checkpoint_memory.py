"""Host memory a checkpoint save and load of a row store take beyond the store itself.

    python benchmarks/checkpoint_memory.py --rows 2000000 --dim 64 --optimizer adamw --store host
    python benchmarks/checkpoint_memory.py --rows 100000000 --dim 64 --store gpu    # a GPU host

Builds a row store (``host``: host memory, ``gpu``: the GPU), pushes one update, then saves it with
the trainer's :func:`~megaclass.train.checkpoint.save_checkpoint` and loads it back into the store
(:func:`~megaclass.train.checkpoint.load_checkpoint`, ``load_state_dict``). Each phase's extra host memory is
the rise of the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the
phase) over its resident set when the phase began. Linux only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import process_memory, reset_peak_memory  # noqa: E402
from megaclass.ops.row_optimizers import RowOptimizerConfig  # noqa: E402
from megaclass.store import build_store  # noqa: E402
from megaclass.train import checkpoint  # noqa: E402

_MIB = 1 << 20


def _measured(phase) -> tuple[float, int]:
    """``(seconds, extra bytes)`` of ``phase()``: the peak resident set's rise over the resident set at its
    start."""
    reset_peak_memory()
    start = process_memory("VmRSS")
    began = time.perf_counter()
    phase()
    return time.perf_counter() - began, max(0, process_memory("VmHWM") - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw", "adagrad"])
    parser.add_argument("--store", default="host", choices=["host", "gpu"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bf16_sr"])
    parser.add_argument(
        "--folder", default=None, help="the checkpoint goes into a temporary folder in it, made if missing"
    )
    args = parser.parse_args()
    device = "cuda" if args.store == "gpu" else "cpu"
    store = build_store(
        args.store,
        num_rows=args.rows,
        dim=args.dim,
        device=device,
        optimizer=RowOptimizerConfig(kind=args.optimizer),
        **({"dtype": args.dtype} if args.dtype != "float32" else {}),  # a tree before bf16 stores runs too
    )
    ids = torch.arange(0, args.rows, max(1, args.rows // 1000), device=device)
    store.push(ids, torch.randn(len(ids), args.dim, device=device), step=1, lr=0.1)
    store.flush()
    rows_bytes, state_bytes = store.held_bytes()
    if args.folder is not None:
        Path(args.folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = ""

        def save() -> None:
            nonlocal path
            path = checkpoint.save_checkpoint(folder, 1, {"head": {"store": store.state_dict()}})

        def load() -> None:
            store.load_state_dict(checkpoint.load_checkpoint(path)["head"]["store"])

        save_s, save_extra = _measured(save)
        load_s, load_extra = _measured(load)
    held = rows_bytes + state_bytes
    print(f"\n{args.rows:,} x {args.dim} rows, {args.optimizer}, {args.dtype}, {args.store} store\n")
    print("| store MiB | save s | save extra MiB | load s | load extra MiB |")
    print("|---|---|---|---|---|")
    cells = [f"{held / _MIB:.0f}", f"{save_s:.1f}", f"{save_extra / _MIB:.0f}", f"{load_s:.1f}"]
    print("| " + " | ".join([*cells, f"{load_extra / _MIB:.0f}"]) + " |")


if __name__ == "__main__":
    main()
