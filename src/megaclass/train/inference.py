"""Use a finished run folder: rebuild its model, evaluate it on a test file, write top-k predictions.

``megaclass eval --run runs/demo --test data/deb-tags/test_bow.txt.gz`` runs :func:`evaluate_run`;
``megaclass predict --run runs/demo --input data/deb-tags/test_bow.txt.gz --out predictions.txt --k 10`` runs
:func:`predict_run`, which writes one line per input row: ``id:score id:score ...``, best first (``--names``:
``name:score`` pairs separated by tabs). ``--run`` is a run folder or a file written by ``megaclass export``;
``--input -`` reads standard input, and input rows need no labels (see :func:`megaclass.data.xmc.read_rows`).
A damaged run folder is a :class:`~megaclass.errors.DataFormatError` naming the file, never a traceback;
nothing in it is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from megaclass.data.batch import InputSpec
from megaclass.data.loaders import SparseDataset, open_dataset, other_kind
from megaclass.data.xmc import read_label_file, read_label_names
from megaclass.errors import DataFormatError
from megaclass.heads import HeadContext, build_head
from megaclass.models import build_model
from megaclass.state_io import read_state, unflatten
from megaclass.train import checkpoint
from megaclass.train.build import resolve_device
from megaclass.train.config import RunConfig, config_from_dict
from megaclass.train.evaluate import evaluate_model, predict_batches
from megaclass.train.export import load_run_weights, read_export

__all__ = ["LoadedRun", "check_device", "evaluate_run", "load_run", "open_output", "predict_run"]

_DEVICE_NAME = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def check_device(name: str | None) -> str | None:
    """``name`` when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or None), else a ValueError."""
    if name is not None and not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"--device: unknown device {name!r}: expected auto, cpu, cuda or cuda:N")
    return name


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
    label_names: list[str] | None = None  # the name of each class, where the training file named its labels

    def open(self, path: str) -> SparseDataset:
        """Open a labelled data file the way the run's training data was opened (same featuriser, classes)."""
        from megaclass.models.text import token_source

        expected = InputSpec(**self.facts["input_spec"])
        featurized = self.featurizer is not None
        kinds = other_kind(path, expected, featurized=featurized, data_format=self.config.data.format)
        if kinds is not None:
            raise ValueError(f"{path} holds {kinds[0]}, but the run was trained on {kinds[1]}")
        dataset = open_dataset(
            path,
            data_format=self.config.data.format,
            num_classes=self.facts["num_classes"],
            featurizer=self.featurizer,
            label_names=self.label_names,
            **token_source(self.config.model),
        )
        if dataset.input_spec != expected:
            raise ValueError(f"{path}: {dataset.input_spec.mismatch(expected)}")
        return dataset

    def open_rows(self, path: str) -> Any:
        """Rows to predict on from a file or ``-`` (standard input), labels optional, as the run reads them.

        BoW runs read BoW lines (header optional); text runs (TF-IDF or token ids) read text lines, bare
        documents included; image runs read their data sets (files only).
        """
        from megaclass.data.xmc import read_rows

        spec = InputSpec(**self.facts["input_spec"])
        if spec.kind == "image":
            return self.open(path)
        where = "<stdin>" if path == "-" else path
        raw = _read_input(path)
        num_classes = int(self.facts["num_classes"])
        if spec.kind == "sparse" and self.featurizer is None:
            data = read_rows(raw, where, num_labels=num_classes, num_features=spec.num_features)
            return SparseDataset(
                data.features, data.labels, num_classes=num_classes, multilabel=True, path=where
            )
        data = read_rows(raw, where, num_labels=num_classes, label_names=self.label_names)
        if spec.kind == "sparse":
            features = self.featurizer.transform(data.texts)
            return SparseDataset(features, data.labels, num_classes=num_classes, multilabel=True, path=where)
        from megaclass.data.tokenized import TokenDataset, tokenize_texts
        from megaclass.models.text import token_source

        tokens = token_source(self.config.model)
        return TokenDataset(
            tokenize_texts(data.texts, tokens["tokenizer"], max_length=tokens["max_length"], progress=False),
            data.labels,
            num_classes=num_classes,
            multilabel=True,
            vocab_size=len(tokens["tokenizer"]),
            path=where,
            texts=data.texts,
            bucket=False,
        )


def _read_input(path: str) -> bytes:
    """The bytes of ``path``, or of standard input for ``-`` (a text stream without a byte buffer too)."""
    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)  # a replaced sys.stdin may be a text stream only
        return stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
    if os.path.isdir(path):
        raise DataFormatError(path, "is a folder: expected a file of rows, or - for standard input")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input: {path}: no such file")
    with open(path, "rb") as file:
        return file.read()


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--run: {path} is missing; is it the --out folder of a `megaclass train` run ({what})?"
        )
    return path


def _read_run_file(path: str, read: Any) -> Any:
    """``read(path)`` for a file of a run folder; what a damaged file raises becomes a DataFormatError."""
    from safetensors import SafetensorError

    try:
        return read(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        if isinstance(error, (DataFormatError, FileNotFoundError)):
            raise
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataFormatError(
            path, f"cannot read this run file ({detail}); is the run folder intact?"
        ) from None


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _read_yaml_config(path: str) -> RunConfig:
    import yaml

    with open(path, encoding="utf-8") as file:
        try:
            return config_from_dict(yaml.safe_load(file))
        except yaml.YAMLError as error:
            raise ValueError(f"invalid YAML: {str(error).splitlines()[0]}") from None


def _build(
    config: RunConfig,
    facts: dict[str, Any],
    label_counts: np.ndarray,
    state: dict[str, Any],
    featurizer: Any,
    label_names: list[str] | None,
    device: str | None,
    where: str,
) -> LoadedRun:
    """The :class:`LoadedRun` of a config, facts and weights; weights that do not fit name ``where``."""
    setting = "--device" if device else "the run's train.device (--device to choose another)"
    torch_device = resolve_device(device or config.train.device, setting=setting)
    try:
        spec = InputSpec(**facts["input_spec"])
        num_classes, multilabel = int(facts["num_classes"]), bool(facts["multilabel"])
    except (KeyError, TypeError, ValueError) as error:
        raise DataFormatError(
            where, f"run.json lacks or garbles {error}: expected the facts train writes"
        ) from None
    encoder = build_model(config.model, spec)
    context = HeadContext(
        in_features=encoder.out_features,
        num_classes=num_classes,
        multilabel=multilabel,
        label_counts=label_counts,
    )
    # on the device before the weights: a selected head's store and index are made where the head is
    encoder, head = encoder.to(torch_device), build_head(config.head, context).to(torch_device)
    try:
        encoder.load_state_dict(state["encoder"])
        head.load_state_dict(state["head"])
    except (KeyError, RuntimeError, TypeError) as error:
        detail = str(error).strip().splitlines()[0]
        raise DataFormatError(where, f"weights do not fit the run's config.yaml ({detail})") from None
    return LoadedRun(
        config,
        encoder.eval(),
        head.eval(),
        featurizer,
        facts,
        label_counts,
        torch_device,
        label_names,
    )


def load_run(run_dir: str, *, device: str | None = None) -> LoadedRun:
    """Rebuild the encoder and head of the run in ``run_dir`` from its config, facts and final weights.

    ``run_dir`` may also be a file written by ``megaclass export``. Falls back to the newest checkpoint
    when the run did not finish.
    """
    check_device(device)
    if os.path.isfile(run_dir):
        return _load_export(run_dir, device)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run: {run_dir}: no such run folder or exported file")
    config = _read_run_file(_require(os.path.join(run_dir, "config.yaml"), "config.yaml"), _read_yaml_config)
    facts_path = _require(os.path.join(run_dir, "run.json"), "run.json")
    facts = _read_run_file(facts_path, _read_json)
    counts_path = os.path.join(run_dir, str(facts.get("label_counts_file", "label_counts.npy")))
    label_counts = _read_run_file(counts_path, lambda path: np.load(path, allow_pickle=False))
    weights_dir = checkpoint.run_weights_folder(run_dir)
    state = _read_run_file(weights_dir, load_run_weights)
    names_file = facts.get("label_names_file")
    label_names = (
        None
        if names_file is None
        else _read_run_file(os.path.join(run_dir, str(names_file)), read_label_file)
    )
    featurizer = read_run_featurizer(run_dir)
    return _build(config, facts, label_counts, state, featurizer, label_names, device, weights_dir)


def read_run_featurizer(run_dir: str) -> Any:
    """The text featuriser a run fitted (its folder's ``featurizer/``), or None for a run without one.

    Raises:
        DataFormatError: the folder is damaged.
    """
    folder = os.path.join(run_dir, "featurizer")
    if not os.path.isdir(folder):
        return None
    from megaclass.data.featurizer import TextFeaturizer

    return _read_run_file(folder, lambda path: TextFeaturizer.from_state(read_state(path)))


def _load_export(path: str, device: str | None) -> LoadedRun:
    """A :class:`LoadedRun` from one file written by ``megaclass export``."""
    import yaml

    def read(file: str) -> tuple[Any, ...]:
        parts, metadata = read_export(file)
        config = config_from_dict(yaml.safe_load(metadata["config.yaml"]))
        facts = json.loads(metadata["run.json"])
        label_counts = parts["run"]["label_counts"].numpy()
        featurizer = None
        if "featurizer.json" in metadata:
            from megaclass.data.featurizer import TextFeaturizer

            tree = json.loads(metadata["featurizer.json"])
            featurizer = TextFeaturizer.from_state(unflatten(tree, parts.get("featurizer", {})))
        names = metadata.get("label_names.json")
        label_names = None if names is None else json.loads(names)
        return config, facts, label_counts, parts, featurizer, label_names

    config, facts, label_counts, parts, featurizer, label_names = _read_run_file(path, read)
    return _build(config, facts, label_counts, parts, featurizer, label_names, device, path)


def evaluate_run(
    run_dir: str, test_path: str, *, device: str | None = None, filter_labels: str | None = None
) -> dict[str, float]:
    """The ranking metrics of the run in ``run_dir`` on the data file ``test_path``.

    ``filter_labels``: a filter file of ``doc_id label_id`` pairs of ``test_path`` left out of scoring (see
    :mod:`megaclass.metrics.filtering`), in place of the run's ``eval.filter_labels``.
    """
    from megaclass.metrics.filtering import read_filter_labels

    run = load_run(run_dir, device=device)
    if filter_labels is None:
        filter_labels = run.config.eval.filter_labels
    dataset = run.open(test_path)
    if not dataset.label_counts().any():
        raise DataFormatError(
            test_path, "no row has labels: evaluation needs labelled rows (predict takes bare ones)"
        )
    label_filter = None
    if filter_labels:  # read whole before any scoring: a bad pair fails at once
        label_filter = read_filter_labels(
            filter_labels,
            num_classes=dataset.num_classes,
            num_documents=len(dataset),
            documents=f"--test {test_path}",
        )
    return evaluate_model(
        run.encoder,
        run.head,
        dataset,
        config=run.config,
        label_counts=run.label_counts,
        num_train_samples=run.facts["num_train_samples"],
        device=run.device,
        label_filter=label_filter,
    )


def predict_run(
    run_dir: str,
    input_path: str,
    out_path: str,
    *,
    k: int = 10,
    device: str | None = None,
    names: bool | str = False,
) -> tuple[int, int]:
    """Write the top-``k`` ``id:score`` pairs of each row of ``input_path`` to ``out_path`` (all the run's
    classes where it has fewer than ``k``), space-separated; with ``names``, ``name:score`` pairs separated by
    tabs (a name may hold spaces and colons: its score follows the last colon).

    Args:
        names: False: label ids; True: the run's names (those its training file's lines gave, else the
            ``labels.txt`` or ``lbl.json`` beside that file, as training reads them); a path: that file's.

    Returns:
        The number of rows written, and of labels a row.
    """
    if k <= 0:
        raise ValueError(f"--k: expected a positive number of labels, got {k}")
    run = load_run(run_dir, device=device)
    num_classes = int(run.facts["num_classes"])
    label_names = _label_names(run, names, num_classes) if names is not False else None
    k = min(k, num_classes)
    dataset = run.open_rows(input_path)
    rows = 0
    with contextlib.nullcontext(sys.stdout) if out_path == "-" else open_output(out_path) as file:
        for scores, ids, _ in predict_batches(
            run.encoder, run.head, dataset, k=k, config=run.config, device=run.device
        ):
            for row_scores, row_ids in zip(scores.tolist(), ids.tolist(), strict=False):
                kept = [(i, s) for i, s in zip(row_ids, row_scores, strict=False) if i >= 0]
                if label_names is None:
                    file.write(" ".join(f"{i}:{s:.6g}" for i, s in kept) + "\n")
                else:
                    file.write("\t".join(f"{label_names[i]}:{s:.6g}" for i, s in kept) + "\n")
            rows += ids.shape[0]
    return rows, k


def _label_names(run: LoadedRun, names: bool | str, num_classes: int) -> list[str]:
    """The run's label names for :func:`predict_run`: from the file ``names``, or (``True``) the run's own or
    those beside its training file; at least one a class."""
    if names is True and run.label_names is not None:
        where, label_names = "the run's labels.txt", run.label_names
    elif names is True:
        train_path = str(run.facts.get("train_path", ""))
        found = read_label_names(train_path) if train_path else None
        if found is None:
            raise ValueError(
                f"--names: no labels.txt or lbl.json beside the run's training file {train_path or '(none)'}"
                ": name the label file (--names FILE)"
            )
        where, label_names = f"the label file beside {train_path}", found
    else:
        if not os.path.isfile(names):
            raise ValueError(f"--names: {names}: no such label file")
        where, label_names = str(names), read_label_file(names)
    if len(label_names) < num_classes:
        raise ValueError(
            f"--names: {where} has {len(label_names):,} names, the run has {num_classes:,} classes: expected "
            "one name a class, the name of class i on line i + 1"
        )
    return label_names


def open_output(path: str, mode: str = "w") -> Any:
    """``open(path, mode)`` for an output file; a folder or an unwritable path is a ValueError naming it."""
    if os.path.isdir(path):
        raise ValueError(f"--out: {path} is a folder: expected a file path")
    try:
        return open(path, mode, encoding="utf-8")
    except OSError as error:
        raise ValueError(
            f"--out: cannot write {path} ({error.strerror or error}): expected a writable file path"
        ) from None
