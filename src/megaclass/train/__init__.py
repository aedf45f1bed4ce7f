"""Training: configs, the loop, checkpoints, logs and reports; inference from a run folder.

Names load on first use, so ``import megaclass.train.<module>`` from a head or op pulls in no trainer.

>>> from megaclass.train import from_preset
>>> from_preset("xmc-mlp").model.type
'mlp'
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "EvalConfig": "config",
    "OptimConfig": "config",
    "OptimGroupConfig": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "config_from_dict": "config",
    "config_to_dict": "config",
    "from_preset": "config",
    "load_config": "config",
    "lr_at": "config",
    "LoadedRun": "inference",
    "evaluate_run": "inference",
    "load_run": "inference",
    "predict_run": "inference",
    "Trainer": "loop",
    "WeightAverage": "averaging",
    "train": "loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megaclass.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megaclass.train.{_EXPORTS[name]}"), name)
