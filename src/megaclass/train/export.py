"""``megaclass export --run DIR --out FILE``: one inference file from a run, whatever number of ranks ran it.

The file is safetensors: the encoder's tensors under ``encoder.<name>``, the whole (unsharded) head's under
``head.<name>``, and the run's ``config.yaml`` and ``run.json`` as metadata. The final weights (``model/``)
are used when the run finished, else its newest checkpoint (sharded checkpoints are stacked row range by row
range).
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from megaclass.distributed.checkpoint import export_head_state, is_sharded_checkpoint, write_export
from megaclass.state_io import read_state
from megaclass.train import checkpoint

__all__ = ["export_run", "read_export"]


def _run_weights(run_dir: str) -> dict[str, Any]:
    """``{"encoder": state, "head": state}`` of the run's final weights or newest checkpoint."""
    final = os.path.join(run_dir, "model")
    if os.path.isdir(final):
        state = read_state(final)
        return {"encoder": state["encoder"], "head": state["head"]}
    latest = checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if latest is None:
        raise FileNotFoundError(f"--run: {run_dir} has neither final weights (model/) nor a checkpoint")
    if not is_sharded_checkpoint(latest):
        state = read_state(latest)
        return {"encoder": state["encoder"], "head": state["head"]}
    common = read_state(os.path.join(latest, "common"))
    return {"encoder": common["encoder"], "head": export_head_state(latest)}


def export_run(run_dir: str, out_path: str) -> str:
    """Write the model of the run folder ``run_dir`` as one safetensors file ``out_path``; return the path."""
    for name in ("config.yaml", "run.json"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise FileNotFoundError(
                f"--run: {run_dir} has no {name}; is it the --out folder of a training run?"
            )
    weights = _run_weights(run_dir)
    flat: dict[str, Tensor] = {}
    for part in ("encoder", "head"):
        for name, value in weights[part].items():
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"--run: {part} state entry {name!r} is a {type(value).__name__}, not a tensor"
                )
            flat[f"{part}.{name}"] = value
    metadata = {}
    for name in ("config.yaml", "run.json"):
        with open(os.path.join(run_dir, name), encoding="utf-8") as file:
            metadata[name] = file.read()
    return write_export(out_path, flat, metadata)


def read_export(path: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """``({"encoder": state, "head": state}, metadata)`` of a file written by :func:`export_run`."""
    from safetensors import safe_open

    parts: dict[str, dict[str, Tensor]] = {"encoder": {}, "head": {}}
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata() or {}
        for key in file.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            part, name = key.split(".", 1)
            parts[part][name] = file.get_tensor(key)
    return parts, metadata
