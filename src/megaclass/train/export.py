"""``megaclass export --run DIR --out FILE``: one inference file from a run, whatever number of ranks ran it.

The file is safetensors: the encoder's tensors under ``encoder.<name>``, the whole (unsharded) head's under
``head.<name>``, the training label counts as ``run.label_counts``, a text run's fitted featuriser's arrays
under ``featurizer.<name>`` (its JSON tree as the ``featurizer.json`` metadata), and the run's
``config.yaml`` and ``run.json`` as metadata, so the file alone scores raw text. The final weights
(``model/``) are used when the run finished, else its newest checkpoint (a sharded checkpoint's rows are
read from its ranks' files range by range). Tensors are copied from the run's files into the export a block
at a time (:func:`megaclass.state_io.write_tensors`), so a head of 10^8 rows exports in bounded host memory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megaclass.data.xmc import read_label_file
from megaclass.distributed.checkpoint import export_head_state, is_sharded_checkpoint
from megaclass.errors import DataFormatError
from megaclass.heads import is_streamed_entry
from megaclass.state_io import RowSource, flatten, read_state, write_tensors
from megaclass.train import checkpoint

__all__ = ["export_run", "load_run_weights", "read_export", "read_run_weights"]


def _read_state(folder: str, *, stream: bool = False) -> Any:
    """:func:`~megaclass.state_io.read_state` (``stream``: every tensor left in the file as a
    :class:`~megaclass.state_io.SavedTensor`); a damaged file is a DataFormatError naming the folder."""
    from safetensors import SafetensorError

    try:
        return read_state(folder, stream=(lambda key: True) if stream else None)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataFormatError(folder, f"cannot read the saved state ({detail}); is the run intact?") from None


def read_run_weights(folder: str) -> dict[str, Any]:
    """``{"encoder": state, "head": state}`` of a run's weights folder (``model/``, or a checkpoint,
    single-process or sharded: of a checkpoint, the head's weights alone), every tensor left in the files as
    a :class:`~megaclass.state_io.RowSource` (a sharded checkpoint's head rows stacked over its ranks'
    files)."""
    if not is_sharded_checkpoint(folder):
        state = _read_state(folder, stream=True)
        head = state["head"]
        if "head_weights" in state:  # a checkpoint: its head's weights, not its rows' optimizer state
            head = {key: value for key, value in head.items() if key in state["head_weights"]}
        return {"encoder": state["encoder"], "head": head}
    common = _read_state(os.path.join(folder, "common"), stream=True)
    return {"encoder": common["encoder"], "head": export_head_state(folder)}


def load_run_weights(folder: str) -> dict[str, Any]:
    """:func:`read_run_weights` read into memory, but for the head's row-store entries, which stream into
    its store from their files (the kept weights a trainer or an inference run loads)."""
    return {
        part: {
            key: value if part == "head" and is_streamed_entry(key) else _in_memory(value)
            for key, value in state.items()
        }
        for part, state in read_run_weights(folder).items()
    }


def _in_memory(value: Any) -> Any:
    return value.read() if isinstance(value, RowSource) else value


def export_run(run_dir: str, out_path: str) -> str:
    """Write the model of the run folder ``run_dir`` as one safetensors file ``out_path``; return the path."""
    for name in ("config.yaml", "run.json"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise FileNotFoundError(
                f"--run: {run_dir} has no {name}; is it the --out folder of a training run?"
            )
    weights = read_run_weights(checkpoint.run_weights_folder(run_dir))
    flat: dict[str, Tensor | RowSource] = {}
    for part in ("encoder", "head"):
        for name, value in weights[part].items():
            if not isinstance(value, (Tensor, RowSource)):
                raise ValueError(
                    f"--run: {part} state entry {name!r} is a {type(value).__name__}, not a tensor"
                )
            flat[f"{part}.{name}"] = value
    metadata = {}
    for name in ("config.yaml", "run.json"):
        with open(os.path.join(run_dir, name), encoding="utf-8") as file:
            metadata[name] = file.read()
    try:
        counts_file = str(json.loads(metadata["run.json"]).get("label_counts_file", "label_counts.npy"))
    except (ValueError, AttributeError) as error:
        raise DataFormatError(
            os.path.join(run_dir, "run.json"), f"not the JSON train writes ({error})"
        ) from None
    counts_path = os.path.join(run_dir, counts_file)
    try:
        flat["run.label_counts"] = torch.from_numpy(np.load(counts_path, allow_pickle=False))
    except (OSError, ValueError) as error:
        raise DataFormatError(counts_path, f"cannot read the label counts ({error})") from None
    names_file = json.loads(metadata["run.json"]).get("label_names_file")
    if names_file is not None:  # the names a training file's lines gave its labels
        metadata["label_names.json"] = json.dumps(read_label_file(os.path.join(run_dir, str(names_file))))
    if os.path.isdir(os.path.join(run_dir, "featurizer")):
        tree, tensors = flatten(_read_state(os.path.join(run_dir, "featurizer")))
        flat.update({f"featurizer.{name}": value for name, value in tensors.items()})
        metadata["featurizer.json"] = json.dumps(tree)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    write_tensors(out_path, flat, metadata=metadata)
    return out_path


def read_export(path: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """``({"encoder": state, "head": state, ...}, metadata)`` of a file written by :func:`export_run`.

    The parts are the name prefixes: ``encoder``, ``head``, ``run`` and, for a text run, ``featurizer``.
    """
    from safetensors import safe_open

    parts: dict[str, dict[str, Tensor]] = {"encoder": {}, "head": {}}
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata() or {}
        for key in file.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            part, name = key.split(".", 1)
            parts.setdefault(part, {})[name] = file.get_tensor(key)
    return parts, metadata
