"""Use a finished run folder: rebuild its model, evaluate it on a test file, write top-k predictions.

``megaclass eval --run runs/demo --test data/deb-tags/test_bow.txt.gz`` runs :func:`evaluate_run`;
``megaclass predict --run runs/demo --input data/deb-tags/test_bow.txt.gz --out predictions.txt --k 10`` runs
:func:`predict_run`, which writes one line per input row: ``id:score id:score ...``, best first.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from megaclass.data.batch import InputSpec
from megaclass.data.loaders import SparseDataset, open_dataset
from megaclass.heads import HeadContext, build_head
from megaclass.models import build_model
from megaclass.state_io import read_state
from megaclass.train import checkpoint
from megaclass.train.build import resolve_device
from megaclass.train.config import RunConfig, load_config_file
from megaclass.train.evaluate import evaluate_model, predict_batches

__all__ = ["LoadedRun", "evaluate_run", "load_run", "predict_run"]


@dataclass
class LoadedRun:
    """A run folder's model, ready for inference."""

    config: RunConfig
    encoder: nn.Module
    head: nn.Module
    featurizer: Any  # the fitted text featuriser, or None for BoW data
    facts: dict[str, Any]  # run.json: number of classes, input spec, ...
    label_counts: np.ndarray  # (C,) training label frequencies, for propensity-scored metrics
    device: torch.device

    def open(self, path: str) -> SparseDataset:
        """Open a data file the way the run's training data was opened (same featuriser, same classes)."""
        from megaclass.data.tokenized import is_raw_text, open_raw_texts
        from megaclass.models.text import token_source

        tokens = token_source(self.config.model)
        if tokens and is_raw_text(path):  # text runs also score bare documents, or standard input (-)
            return open_raw_texts(path, num_classes=self.facts["num_classes"], **tokens)
        dataset = open_dataset(
            path,
            data_format=self.config.data.format,
            num_classes=self.facts["num_classes"],
            featurizer=self.featurizer,
            **tokens,
        )
        expected = InputSpec(**self.facts["input_spec"])
        if dataset.input_spec != expected:
            raise ValueError(f"{path}: inputs {dataset.input_spec} differ from the run's {expected}")
        return dataset


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--run: {path} is missing; is it the --out folder of a `megaclass train` run ({what})?"
        )
    return path


def load_run(run_dir: str, *, device: str | None = None) -> LoadedRun:
    """Rebuild the encoder and head of the run in ``run_dir`` from its config, facts and final weights.

    Falls back to the newest checkpoint when the run did not finish.
    """
    config = load_config_file(_require(os.path.join(run_dir, "config.yaml"), "config.yaml"))
    with open(_require(os.path.join(run_dir, "run.json"), "run.json"), encoding="utf-8") as file:
        facts = json.load(file)
    label_counts = np.load(os.path.join(run_dir, facts["label_counts_file"]))
    weights_dir = os.path.join(run_dir, "model")
    if not os.path.isdir(weights_dir):
        weights_dir = checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        if weights_dir is None:
            raise FileNotFoundError(f"--run: {run_dir} has neither final weights (model/) nor a checkpoint")
    state = read_state(weights_dir)
    torch_device = resolve_device(device or config.train.device)
    encoder = build_model(config.model, InputSpec(**facts["input_spec"]))
    context = HeadContext(
        in_features=encoder.out_features,
        num_classes=facts["num_classes"],
        multilabel=facts["multilabel"],
        label_counts=label_counts,
    )
    head = build_head(config.head, context)
    encoder.load_state_dict(state["encoder"])
    head.load_state_dict(state["head"])
    featurizer = None
    if os.path.isdir(os.path.join(run_dir, "featurizer")):
        from megaclass.data.featurizer import TextFeaturizer

        featurizer = TextFeaturizer.from_state(read_state(os.path.join(run_dir, "featurizer")))
    return LoadedRun(
        config,
        encoder.to(torch_device).eval(),
        head.to(torch_device).eval(),
        featurizer,
        facts,
        label_counts,
        torch_device,
    )


def evaluate_run(run_dir: str, test_path: str, *, device: str | None = None) -> dict[str, float]:
    """The ranking metrics of the run in ``run_dir`` on the data file ``test_path``."""
    run = load_run(run_dir, device=device)
    return evaluate_model(
        run.encoder,
        run.head,
        run.open(test_path),
        config=run.config,
        label_counts=run.label_counts,
        num_train_samples=run.facts["num_train_samples"],
        device=run.device,
    )


def predict_run(
    run_dir: str, input_path: str, out_path: str, *, k: int = 10, device: str | None = None
) -> int:
    """Write the top-``k`` ``id:score`` pairs of each row of ``input_path`` to ``out_path``.

    Returns:
        The number of rows written.
    """
    if k <= 0:
        raise ValueError(f"--k: expected a positive number of labels, got {k}")
    run = load_run(run_dir, device=device)
    dataset = run.open(input_path)
    rows = 0
    with (
        contextlib.nullcontext(sys.stdout)
        if out_path == "-"
        else open(out_path, "w", encoding="utf-8") as file
    ):
        for scores, ids, _ in predict_batches(
            run.encoder, run.head, dataset, k=k, config=run.config, device=run.device
        ):
            for row_scores, row_ids in zip(scores.tolist(), ids.tolist(), strict=False):
                pairs = [f"{i}:{s:.6g}" for i, s in zip(row_ids, row_scores, strict=False) if i >= 0]
                file.write(" ".join(pairs) + "\n")
            rows += ids.shape[0]
    return rows
