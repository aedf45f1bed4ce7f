"""The training loop, readable top to bottom: ``setup / train / evaluate / save_checkpoint / close``.

``megaclass train --train data/deb-tags/train_bow.txt.gz --test data/deb-tags/test_bow.txt.gz --out runs/x``
runs :func:`train`. One step is: forward (encoder, then head loss), backward, clip, optimizer step,
``head.after_step(step, epoch, lr=head_lr)``, log. The run folder ends up holding:

- ``config.yaml``: the resolved config; ``run.json``: data facts needed to rebuild the model;
- ``model/``: the final encoder and head weights (safetensors + JSON); ``featurizer/`` for text data;
- ``checkpoints/``: resumable state (``--resume``); ``log.jsonl``: every logged number;
- ``best/``: the weights of the epoch that scored best on the validation rows (kept at the end; ``model/``
  then holds the same files, hard-linked; a class-sharded run keeps each rank's rows in the layout of its
  checkpoints, and ``model/`` holds them whole);
- ``metrics.json``: the test (or, without one, validation) metrics of the kept weights, ``train_seconds``,
  ``peak_memory_bytes``;
- ``report.md`` and ``report.png``: config, metrics per epoch, and the loss and P@k curves.

The epoch kept and early stopping are decided on validation rows (``--valid`` or ``train.valid_fraction`` of
the training rows), never on the test file: its per-epoch scores are logged as ``eval_test_curve``, for the
curves only, and it is scored once at the end (``eval_test``). Without a test file the validation rows score
the kept weights at the end (``eval_valid_final``; ``valid_``-named in ``metrics.json``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megaclass.data.loaders import BatchLoader, SparseDataset, open_dataset, other_kind
from megaclass.data.verification_bin import check_verification_bin
from megaclass.data.xmc import read_label_file
from megaclass.distributed.checkpoint import (
    export_head_state,
    is_sharded_checkpoint,
    load_sharded,
    load_whole_head,
    save_sharded,
    save_sharded_weights,
    shard_head_entries,
)
from megaclass.distributed.info import DistInfo, init_distributed
from megaclass.distributed.parallel import data_parallel, encoder_state, load_encoder_state, rank_batch_size
from megaclass.errors import DataFormatError, LabelOutOfRange, RunDoesNotFit, TrainingDiverged, one_line
from megaclass.host_allocator import release_free_memory, reuse_freed_blocks
from megaclass.metrics.filtering import LabelFilter, read_filter_labels
from megaclass.models import TransformerConfig
from megaclass.schema import ConfigError, covered, get_path, set_path
from megaclass.state_io import (
    format_bytes,
    link_state,
    path_fingerprint,
    write_json_atomic,
    write_state,
    write_text_atomic,
)
from megaclass.train import checkpoint
from megaclass.train.averaging import WeightAverage
from megaclass.train.build import (
    build_modules,
    build_optimizer,
    check_fits,
    resolve_device,
    seed_everything,
)
from megaclass.train.config import RunConfig, config_from_dict, config_to_dict, featurizer_config, lr_at
from megaclass.train.evaluate import evaluate_model, predict_batches
from megaclass.train.export import load_run_weights, read_run_weights
from megaclass.train.extract import VerificationEvaluator
from megaclass.train.graphs import (
    CaptureError,
    GraphChoice,
    StepGraph,
    batch_capacity,
    resolve_cuda_graph,
    whole_step_blocker,
)
from megaclass.train.inference import read_run_featurizer
from megaclass.train.low_precision import head_input
from megaclass.train.memory import format_head_memory, head_memory, summed_over_ranks
from megaclass.train.plan import machine_memory, plan_for
from megaclass.train.progress import RunLogger, peak_memory_bytes, read_log, reset_peak_memory
from megaclass.train.recipes import DataFacts, resolve_auto, resolve_recipe
from megaclass.train.report import epoch_history, write_report
from megaclass.train.validation import EndedAtLabelPrior, held_out_rows, label_prior_share, take_rows

__all__ = [
    "LoopState",
    "Trainer",
    "keep_recorded_values",
    "read_recorded_config",
    "read_run_facts",
    "resolve_run_recipe",
    "resume_data_files",
    "resume_settings",
    "settings_given_again",
    "train",
]

_LABEL_PRIOR_SHARE = 0.95  # a model ranking the most frequent label first this often learned only the prior
_LABEL_PRIOR_MIN_ROWS = 50  # fewer validation rows tell too little to stop a run

# Settings a resumed run may change: they do not alter the numbers the run computes.
_RESUMABLE_CHANGES = {
    "train.stop_after_steps",
    "train.cpu_threads",
    "train.progress",
    "train.num_workers",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.cuda_graph",  # the same kernels run on the same values, replayed or launched one by one
    "train.background_saves",
    "distributed.timeout_s",
    "distributed.encoder",
    "distributed.shard_head",  # sharded or not, a head computes the same loss; checkpoints load either way
}

# Settings a resumed run may change on purpose, each named when it resumes: they leave what the saved state
# means as it is, and the run computes otherwise from the resumed step on. The learning-rate schedule is a
# pure function of the step over the run's total (recomputed for new train.epochs); train.patience is a
# stopping rule; evaluation reads no training state (a key ending in "." covers its section).
_RESUME_ADJUSTMENTS = (
    "optim.encoder.lr",
    "optim.head.lr",
    "optim.warmup_steps",
    "optim.warmup_fraction",
    "optim.decay",
    "optim.min_lr_ratio",
    "train.grad_clip",
    "train.epochs",
    "train.patience",
    "train.keep_within_se",
    "eval.",
)
_WARMUP_KEYS = ("optim.warmup_steps", "optim.warmup_fraction")

# What a run writes into its folder: a folder holding any of these holds a run.
_RUN_ENTRIES = (
    "config.yaml",
    "run.json",
    "label_counts.npy",
    "labels.txt",
    "featurizer",
    "checkpoints",
    "log.jsonl",
    "tensorboard",
    "best",
    "model",
    "metrics.json",
    "report.md",
    "report.png",
)


@dataclass
class LoopState:
    """Where the loop stands: saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    global_step: int = 0  # optimizer steps done in all
    epoch_loss_sum: float = 0.0  # sum of the losses of this epoch's steps so far
    train_seconds: float = 0.0  # time spent in training steps, across resumptions
    eval_seconds: float = 0.0
    # the epoch (1-based) kept, in best/epoch-N: the latest whose validation score is within the noise of the
    # top score so far (train.keep_within_se; 0: none yet), and its score: P@k at the first eval.ks
    best_epoch: int = 0
    best_score: float = 0.0
    top_epoch: int = 0  # the epoch of the highest validation score so far, and that score
    top_score: float = 0.0
    # validation evaluations since the top score (train.patience stops at this many)
    evals_since_best: int = 0
    # the run length optim.warmup_fraction is taken of once a resume changed train.epochs (0: the run's
    # total): the warm-up keeps its length in steps, so a run past it does not warm up again
    warmup_total_steps: int = 0


def rng_state() -> dict[str, Any]:
    """The state of every random generator the loop uses (torch CPU and CUDA, NumPy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted path: (old value, new value)}`` of the values that differ between two configs' plain forms
    (None where one has none), in the paths' order."""
    changes = {}
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(_config_changes(a, b, f"{path}."))
        elif a != b:
            changes[path] = (a, b)
    return changes


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value or "''"
    return json.dumps(value, separators=(",", ":"))


def _resume_adjustments(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The changes from config ``old`` (a checkpoint's) to ``new`` that a resume makes on purpose, as
    ``{path: (old value, new value)}``.

    Raises:
        ConfigError: another change alters what the saved state means, or what the run computes.
    """
    changes = {c: values for c, values in _config_changes(old, new).items() if c not in _RESUMABLE_CHANGES}
    refused = [
        c
        for c in changes
        if not any(c == key or (key.endswith(".") and c.startswith(key)) for key in _RESUME_ADJUSTMENTS)
    ]
    if refused:
        # a section of another type (head.type, model.type) is named with its values, first, and alone
        retyped = [c[: -len("type")] for c in refused if c.endswith(".type")]
        named = [
            f"{c} {_format_value(changes[c][0])} -> {_format_value(changes[c][1])}"
            for c in refused
            if c.endswith(".type")
        ]
        named += [c for c in refused if not c.startswith(tuple(retyped))]
        raise ConfigError(
            f"--resume: the config differs from the checkpoint's in {', '.join(named)}; "
            "a resumed run must compute what the interrupted one would have"
        )
    return changes


def keep_recorded_values(
    recorded: dict[str, Any], config: RunConfig, explicit_keys: Collection[str]
) -> tuple[RunConfig, dict[str, tuple[Any, Any]]]:
    """``config`` with the keys outside ``explicit_keys`` given the values of ``recorded`` (a resumed run's
    ``config.yaml``: a run started under another version's defaults, or with settings not given again,
    continues as it began), and ``{key: (recorded value, value replaced)}``. A section of another type than
    the record's takes the record's whole, unless a key in it is explicit; an explicit key, a section of
    another type with an explicit key, and a key one side lacks are left as they are (a resume compares
    them: :func:`_resume_adjustments`)."""
    resolved = config_to_dict(config)
    given = functools.partial(covered, keys=explicit_keys, inside=True)  # a key, its section or one within
    changes = {
        path: values
        for path, values in _config_changes(recorded, resolved).items()
        if path not in _RESUMABLE_CHANGES and None not in values
    }
    retyped: tuple[str, ...] = ()  # sections of another type than the record's: taken whole, or left whole
    kept = {}
    for path in changes:
        section = path[: -len(".type")]
        if not path.endswith(".type") or f"{section}.".startswith(retyped):
            continue
        if not given(section):
            whole = get_path(recorded, section.split("."))
            set_path(resolved, section.split("."), copy.deepcopy(whole))
            kept[path] = changes[path]
        retyped += (f"{section}.",)
    for path, values in changes.items():
        if not given(path) and not path.startswith(retyped):
            set_path(resolved, path.split("."), values[0])
            kept[path] = values
    return (config_from_dict(resolved) if kept else config), kept


def settings_given_again(
    recorded: dict[str, Any], started_with: Collection[str], config: RunConfig, explicit_keys: Collection[str]
) -> tuple[RunConfig, frozenset[str]]:
    """A resume's config and explicit keys with the settings the run was given (``started_with``: the keys
    its ``run.json`` records, their values in ``recorded``, its ``config.yaml``) given again where this
    command sets none of them (but those of this command alone: ``train.stop_after_steps``, ...): the recipe
    resolves as it did for the run, and a resume names only what this version resolves otherwise. A
    section's type is given again with its whole section."""

    def set_now(key: str) -> bool:  # the key, a section or key within it, or the type of a section above
        parts = key.split(".")
        sections = (".".join(parts[:end]) for end in range(1, len(parts)))
        return covered(key, explicit_keys, inside=True) or any(f"{s}.type" in explicit_keys for s in sections)

    again = [key for key in started_with if not set_now(key) and key not in _RESUMABLE_CHANGES]
    again.sort(key=lambda key: not key.endswith(".type"))
    resolved, given = config_to_dict(config), set(explicit_keys)
    for key in again:  # the types' sections first, then the keys within them
        path = key.split(".")[: -1 if key.endswith(".type") else None]
        with contextlib.suppress(KeyError, TypeError):  # a key the record lacks: left to the recipe
            set_path(resolved, path, copy.deepcopy(get_path(recorded, path)))
            given.add(key)
    return (config_from_dict(resolved) if len(given) > len(explicit_keys) else config), frozenset(given)


def resume_settings(
    recorded: dict[str, Any], run_facts: dict[str, Any], config: RunConfig, explicit_keys: Collection[str]
) -> tuple[RunConfig, frozenset[str], dict[str, tuple[Any, Any]]]:
    """A resume's config and explicit keys: the settings its run was given given again
    (:func:`settings_given_again`, the keys its ``run.json``, ``run_facts``, records) and the values of its
    ``config.yaml`` (``recorded``) kept (:func:`keep_recorded_values`); with what was kept."""
    started_with = run_facts.get("explicit_keys") or ()
    config, keys = settings_given_again(recorded, started_with, config, explicit_keys)
    config, kept = keep_recorded_values(recorded, config, keys)
    return config, keys, kept


_NO_RECIPE = "recipe: none (the config is used as given)"


def resolve_run_recipe(
    config: RunConfig,
    explicit_keys: Collection[str] | None,
    facts: DataFacts,
    recorded: dict[str, Any] | None = None,
) -> tuple[RunConfig, str]:
    """:func:`~megaclass.train.recipes.resolve_recipe`, then, for a resume (``recorded``: the run's
    ``config.yaml``), :func:`keep_recorded_values`; returns the config and the recipe line to print, which
    names each value the run keeps. ``explicit_keys`` None: the config as given, its ``auto`` values
    resolved (:func:`~megaclass.train.recipes.resolve_auto`)."""
    if explicit_keys is None:
        return resolve_auto(config, facts), _NO_RECIPE
    config, recipe = resolve_recipe(config, explicit_keys, facts)
    if recorded is None:
        return config, recipe
    config, kept = keep_recorded_values(recorded, config, explicit_keys)
    if kept:
        recipe += "; resumed with the run's own " + ", ".join(
            f"{path}={_format_value(old)} (now {_format_value(new)})" for path, (old, new) in kept.items()
        )
    return config, recipe


def read_run_facts(out_dir: str) -> dict[str, Any]:
    """The ``run.json`` of the run in ``out_dir`` (empty without one); one that cannot be read raises
    :class:`DataFormatError`."""
    path = os.path.join(out_dir, "run.json")
    try:
        with open(path, encoding="utf-8") as file:
            facts = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise DataFormatError(path, f"cannot read this run file ({one_line(error)})") from None
    if not isinstance(facts, dict):
        raise DataFormatError(path, f"cannot read this run file (a {type(facts).__name__}, not a mapping)")
    return facts


def resume_data_files(
    out_dir: str, train_path: str | None, test_path: str | None, valid_path: str | None
) -> dict[str, str | None]:
    """``{"train", "test", "valid"}`` paths of a resume: those given, else those the run's ``run.json``
    records (its validation file only where neither ``train_path`` nor ``valid_path`` is given; None where
    it records none)."""
    given = {"train": train_path, "test": test_path, "valid": valid_path}
    if train_path is not None and test_path is not None:
        return given
    facts = read_run_facts(out_dir)
    taken = ("train", "test", "valid") if train_path is None and valid_path is None else ("train", "test")
    for kind in taken:
        entry = facts.get(f"{kind}_file")
        if given[kind] is None and isinstance(entry, dict) and "path" in entry:
            given[kind] = entry["path"]
    return given


def read_recorded_config(out_dir: str) -> dict[str, Any] | None:
    """The plain form of the ``config.yaml`` of the run in ``out_dir`` (None without one)."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    import yaml

    with open(path, encoding="utf-8") as file:
        recorded = yaml.safe_load(file)
    return recorded if isinstance(recorded, dict) else None


class Trainer:
    """Trains an encoder and a head on one data set and evaluates on another; see the module docstring.

    Args:
        config: the run's config.
        train_path: the training data file.
        test_path: the test data file (scored at the end with the kept weights; every ``train.eval_every``
            epochs for the curves); None: the validation rows score the run at the end.
        out_dir: the run folder. One that holds a run is refused unless ``resume`` or ``overwrite``.
        resume: continue from the newest whole checkpoint in ``out_dir`` (from step 0 when the run stopped
            before its first; refused where ``out_dir`` holds no run). The learning rates and their
            schedule, ``train.grad_clip``, ``train.epochs``, ``train.patience``, ``eval.*`` and ``test_path``
            may change; keys outside ``explicit_keys`` keep the values the run recorded.
        overwrite: replace the run that ``out_dir`` holds (its files are removed once every input checks out).
        valid_path: validation data; None holds out ``train.valid_fraction`` of the training rows.
        explicit_keys: the dotted config keys the user set
            (:func:`~megaclass.train.config.load_config_and_keys`); the recipe resolved from the data fills
            the others (:mod:`megaclass.train.recipes`). None: ``config`` is used as given (its ``auto``
            values are still resolved). A resume gives again the keys its run recorded where none of these
            sets them (:func:`settings_given_again`).
        check_fit: refuse a run whose memory plan does not fit this machine before its data is read whole
            (:class:`~megaclass.errors.RunDoesNotFit`; not a resume, nor a rank of a distributed run).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        train_path: str,
        test_path: str | None = None,
        out_dir: str,
        resume: bool = False,
        overwrite: bool = False,
        valid_path: str | None = None,
        explicit_keys: Collection[str] | None = None,
        check_fit: bool = True,
    ):
        if resume and overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
        self.config = config
        self.train_path = os.fspath(train_path)
        self.test_path = None if test_path is None else os.fspath(test_path)
        self.valid_path = None if valid_path is None else os.fspath(valid_path)
        self.explicit_keys = None if explicit_keys is None else frozenset(explicit_keys)
        self.check_fit = check_fit
        self.recipe = _NO_RECIPE
        self.out_dir = os.fspath(out_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.state = LoopState()
        self.device = resolve_device(config.train.device)
        self.dist = DistInfo.from_env()  # rank facts, read once
        self.history: list[dict[str, Any]] = []
        self._resume_changes: dict[str, tuple[Any, Any]] = {}  # what a resume changes on purpose
        self._verifier: VerificationEvaluator | None = None  # built at the first verification
        self._saves = checkpoint.BackgroundSaves()
        self._background: bool | None = None  # saves behind the steps: decided at the first save
        self._best_to_write: tuple[str, dict[str, Any]] | None = None  # a save behind the steps writes it

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Open the data, build the encoder, head and optimizers, and restore a checkpoint when resuming.

        Nothing in the run folder changes before every input checks out: the folder (free, or ``resume`` /
        ``overwrite``; writable), the data (opens and parses; when resuming, the run's own files), the config
        (fits the data; when resuming, the checkpoint's).
        """
        dist = self.dist
        self._check_run_folder()
        if self._keep_recorded_values():  # a resumed run is set up as it recorded, on its device too
            self.device = resolve_device(self.config.train.device)
        config = self.config
        if self.explicit_keys is None:  # the config as given: a recipe fills nothing that sets widths
            check_fits(config)
        if self.check_fit and not self.resume and not dist.distributed:
            self._check_memory_plan()  # before the seed and the peak's start (it may build an encoder)
        self.device = init_distributed(dist, device=self.device, timeout_s=config.distributed.timeout_s)
        reset_peak_memory(self.device)
        if config.train.cpu_threads:
            torch.set_num_threads(config.train.cpu_threads)
        seed_everything(config.train.seed)
        self.train_data, self.valid_data, self.test_data = self._open_data()  # resolves self.config
        config = self.config
        self.label_filter = self._read_eval_inputs()
        self._check_data_files()
        self._check_resumed_config()  # before the modules: a changed head type is named as such
        release_free_memory()  # what the parse and a featuriser fit freed: not kept beside the modules
        self.encoder, self.head = build_modules(config, self.train_data, device=self.device, dist=dist)
        self.head.materialize()  # a store on parameter servers connects, and is checked, now
        self.kernels = self._resolve_kernels()
        self.parallel = data_parallel(self.encoder, self.head, config=config, dist=dist, device=self.device)
        self.optimizers = self._build_optimizers()
        self.average = self._weight_average()
        if self.device.type == "cpu" and self.train_data.input_spec.kind == "sparse":
            # an MLP's first-layer gradient, made anew each step: its pages kept (3.4x on deb-tags' texts,
            # +12% resident peak); an image encoder's many activation blocks would fragment the heap instead
            # (+29% peak for 2.2x: past what the memory plan counts), so those keep the system's allocator
            reuse_freed_blocks()
        self.loader = BatchLoader(  # rank r's rows of each step: the r-th slice of the global batch
            self.train_data,
            batch_size=rank_batch_size(config, dist),
            seed=config.train.seed,
            num_workers=config.train.num_workers,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        self.total_steps = config.train.epochs * self.loader.steps_per_epoch()
        graph = resolve_cuda_graph(  # before the folder changes: train.cuda_graph=on may be refused
            config.train.cuda_graph,
            head=self.head,
            device=self.device,
            multilabel=self.train_data.multilabel,
            world_size=dist.world_size,
        )
        self.step_graph = self._step_graph() if graph.on else None
        if self.step_graph is not None:
            graph = GraphChoice(True, self._graph_reason(self.step_graph))
        resumed = self._restore_newest() if self.resume else None
        if dist.distributed:
            import torch.distributed as collectives

            collectives.barrier()  # every rank has checked and read the folder before rank 0 writes
        if dist.is_main:
            if resumed is None:
                self._clear_previous_run()
            checkpoint.recover(self._checkpoint_dir())  # leftovers of a killed save
            self._write_run_files()
        self.logger = RunLogger(self.out_dir, enabled=dist.is_main)  # logs and reports: rank 0 only
        if resumed is not None:
            self._restore_log(resumed)
        elif self.resume:
            self.logger.print(
                f"--resume: {self.out_dir} holds no checkpoint yet (the run stopped before its first): "
                "starting from step 0"
            )
        self._bind_head_optimizer()
        self._graph_choice = graph  # shown in the run's opening line on CUDA
        self._bar: Any = None  # the epoch's progress bar (None: off)
        self._test_curve: tuple[int, dict[str, float]] | None = None  # (epoch, its test scores), the last
        self._window_started = time.perf_counter()  # when the log window began

    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer | None]:
        """The encoder's optimizer and the head's (None for a module without trainable parameters)."""
        optim = self.config.optim
        return {
            "encoder": build_optimizer(self.encoder, optim.encoder),
            "head": build_optimizer(
                self.head,
                optim.head,
                low_precision=optim.head_state == "bf16_sr",
                seed=self.config.train.seed,
            ),
        }

    def _step_graph(self, *, whole: bool = True) -> StepGraph:
        """The captured step: the encoder's and the head's where :func:`~megaclass.train.graphs.
        whole_step_blocker` finds nothing in the way (and ``whole``), else the head's alone. Capacities for
        multi-label targets and sparse inputs are read from the first epoch's batches
        (:func:`~megaclass.train.graphs.batch_capacity`), the same on a resume."""
        batch_size, batches = self.loader.batch_size, self.loader.epoch_rows(0)
        labels = None
        if self.train_data.multilabel:
            labels = batch_capacity(self.train_data.labels.row_lengths(), batches, batch_size=batch_size)
        encoder, inputs = None, None
        if whole and self._whole_step_blocker() is None:
            encoder = self.parallel.encoder
            row_nonzeros = self.train_data.features.row_lengths()  # (N,)
            inputs = batch_capacity(row_nonzeros, batches, batch_size=batch_size)
        return StepGraph(
            self.head,
            batch_size=batch_size,
            autocast_dtype=torch.bfloat16 if self.config.train.bf16 else None,
            label_capacity=labels,
            encoder=encoder,
            input_capacity=inputs,
        )

    def _whole_step_blocker(self) -> str | None:
        return whole_step_blocker(
            self.encoder,
            self.train_data.input_spec.kind,
            frozen_steps=self.config.optim.encoder_frozen_steps,
        )

    def _graph_reason(self, graph: StepGraph, why_not_whole: str | None = None) -> str:
        """What replays, for the run's opening line; ``why_not_whole``: why the encoder runs eagerly (by
        default :meth:`_whole_step_blocker`'s reason)."""
        if graph.encoder is not None:
            return "the encoder's and the head's forward and backward replay from a CUDA graph"
        why_not_whole = why_not_whole or self._whole_step_blocker()
        replays = "the head's forward and backward replay from a CUDA graph"
        return f"{replays}, the encoder's run eagerly: {why_not_whole}"

    def _weight_average(self) -> WeightAverage | None:
        """The EMA of the weights that ``train.ema_decay`` asks for (None when off)."""
        decay = self.config.train.ema_decay
        if not decay:
            return None
        self.head.take_rewired()  # a rewiring head starts tracking the connections it rewires
        rows = {f"head.{name}": average for name, average in self.head.average_rows(decay).items()}
        return WeightAverage({"encoder": self.encoder, "head": self.head}, decay=decay, rows=rows)

    def _average_text(self) -> str:
        """What the weight average covers, naming the head's row-store weights it leaves as trained."""
        averaged = {name for name, _ in self.head.named_parameters()}
        averaged |= {name[len("head.") :] for name in self.average.rows}
        weights = self.head.weights_state_dict()
        left = [
            name
            for name, kind in self.head.state_layout().items()
            if kind == "rows"
            and name in weights
            and name not in averaged
            and weights[name].dtype.is_floating_point
        ]
        decay = self.config.train.ema_decay
        text = f"weight average (train.ema_decay={decay:g}): the encoder and the head"
        if not left:
            return f"{text} are evaluated and kept averaged"
        return (
            f"{text}'s parameters are evaluated and kept averaged; the rows its store updates elsewhere "
            f"({', '.join(left)}) are evaluated and kept as trained (parameter servers average them when "
            f"started with --average-decay {decay:g})"
        )

    def _averaged(self) -> contextlib.AbstractContextManager:
        """Inside: the modules hold the averaged weights (when ``train.ema_decay`` is on)."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()

    def _bind_head_optimizer(self) -> None:
        """Give the head its optimizer and the run's length (a rewiring head resets the state of new
        connections and anneals to the last step)."""
        if self.optimizers["head"] is not None:
            self.head.bind_optimizer(self.optimizers["head"], total_steps=self.total_steps)

    def _open_data(self) -> tuple[Any, Any | None, Any]:
        """The training rows, the validation rows (None when there are none) and the test set. Resolves the
        config from the training file's facts on the way (:mod:`megaclass.train.recipes`)."""
        from megaclass.models.text import token_source

        data_config = self.config.data
        tokens = token_source(self.config.model)  # transformer encoders read text as cached token ids
        train_data = open_dataset(
            self.train_path,
            data_format=data_config.format,
            num_classes=data_config.num_classes or None,
            # a resumed run reads its texts through the featuriser it fitted, never one fitted again
            featurizer=read_run_featurizer(self.out_dir) if self.resume and self._has_checkpoints() else None,
            featurizer_config=featurizer_config(data_config.featurizer),
            **tokens,
        )
        facts = DataFacts.of(train_data)
        # a resume keeps its recorded values where this version's recipe resolves them otherwise
        self.config, self.recipe = resolve_run_recipe(
            self.config, self.explicit_keys, facts, self._recorded_config
        )
        check_fits(self.config)  # before the test and validation files are read

        def open_more(path: str, flag: str) -> Any:
            spec, featurized = train_data.input_spec, train_data.featurizer is not None
            kinds = other_kind(path, spec, featurized=featurized, data_format=data_config.format)
            if kinds is not None:
                raise ConfigError(
                    f"{flag} {path} holds {kinds[0]}, but --train {self.train_path} holds {kinds[1]}: give "
                    "every file of a run in one format"
                )
            try:
                data = open_dataset(
                    path,
                    data_format=data_config.format,
                    num_classes=train_data.num_classes,
                    featurizer=train_data.featurizer,
                    label_names=train_data.label_names,  # a test file's names read by --train's
                    **tokens,
                )
            except LabelOutOfRange as error:  # a label the training file lacks: say how to make room for it
                problem = (
                    f"{error.problem}: the run has --train's {train_data.num_classes} labels; --set "
                    "data.num_classes=N makes room for ids below N"
                )
                raise DataFormatError(error.path, problem, line=error.line) from None
            if data.input_spec != train_data.input_spec:
                raise ConfigError(f"{flag} {path}: {data.input_spec.mismatch(train_data.input_spec)}")
            return data

        test_data = None if self.test_path is None else open_more(self.test_path, "--test")
        if self.valid_path is not None:
            return train_data, open_more(self.valid_path, "--valid"), test_data
        loop = self.config.train
        held_out = held_out_rows(
            len(train_data), fraction=loop.valid_fraction, max_rows=loop.valid_max_rows, seed=loop.seed
        )
        if held_out.size == 0:
            return train_data, None, test_data
        trained_on = np.ones(len(train_data), dtype=bool)
        trained_on[held_out] = False
        kept = np.flatnonzero(trained_on)  # disjoint from the held-out rows, in order
        return take_rows(train_data, kept), take_rows(train_data, held_out), test_data

    def _read_eval_inputs(self) -> LabelFilter | None:
        """Check the files the evaluations read before the run starts (they are read after an epoch): the
        ``eval.verification`` sets open as pickled pairs (their first bytes), and ``eval.filter_labels`` is
        read whole, its pairs checked against the test file. Returns that filter (None without one)."""
        evaluation = self.config.eval
        for path in evaluation.verification:
            try:
                check_verification_bin(path)
            except DataFormatError as error:
                raise ConfigError(f"eval.verification: {error}") from None
        if not evaluation.filter_labels:
            return None
        if self.test_data is None:
            raise ConfigError("eval.filter_labels: its pairs name rows of the test file; pass --test")
        try:
            return read_filter_labels(
                evaluation.filter_labels,
                num_classes=self.test_data.num_classes,
                num_documents=len(self.test_data),
                documents=f"--test {self.test_path}",
            )
        except DataFormatError as error:
            raise ConfigError(f"eval.filter_labels: {error}") from None

    def _checkpoint_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    def _check_run_folder(self) -> None:
        """Refuse a folder that holds a run unless resuming or overwriting, and one that cannot be written;
        reads only."""
        held = [name for name in _RUN_ENTRIES if os.path.lexists(os.path.join(self.out_dir, name))]
        if held and not (self.resume or self.overwrite):
            raise ValueError(
                f"--out {self.out_dir} holds a run ({', '.join(held)}): pass --resume to continue it or "
                "--overwrite to replace it"
            )
        if self.resume:
            self._check_resumable()
        existing = os.path.abspath(self.out_dir)
        while not os.path.exists(existing):  # the folder is made later: its nearest existing parent decides
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ValueError(f"--out {self.out_dir}: {existing} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise ValueError(f"--out {self.out_dir}: cannot write in {existing} ({error.strerror})") from None

    def _check_memory_plan(self) -> None:
        """Refuse a run whose memory plan (:func:`~megaclass.train.plan.plan_for`: the data's shape from a
        sample of it) does not fit this machine's GPU or host memory, before the data is read whole. Not
        checked: a resume (its run was checked, or started anyway), the ranks of a distributed run (they could
        disagree on the host's free memory: the command that starts them checks), the disk (a run says when
        its next checkpoint will not fit)."""

        def resolve(config: RunConfig, facts: DataFacts) -> RunConfig:
            return resolve_run_recipe(config, self.explicit_keys, facts)[0]

        others = tuple(path for path in (self.test_path, self.valid_path) if path is not None)
        plan = plan_for(self.config, self.train_path, other_paths=others, resolve=resolve)
        refusal = plan.refusal()
        if refusal is not None:
            raise RunDoesNotFit(refusal)

    def _check_resumable(self) -> None:
        """Refuse ``resume`` where ``out_dir`` holds nothing to continue: no folder, no run, or a finished
        run whose checkpoints are gone. A run stopped before its first checkpoint starts from step 0."""
        out = self.out_dir
        if not os.path.lexists(out):
            raise ValueError(f"--resume: {out} holds no run to resume (no such folder)")
        if not os.path.isdir(out):
            raise ValueError(f"--resume: {out} holds no run to resume (a file, not a folder)")
        if self._has_checkpoints():
            return
        if os.path.isdir(os.path.join(out, "model")):
            raise ValueError(
                f"--resume: {out} holds a finished run without a checkpoint (checkpoints/ holds none): it "
                "cannot be continued or extended; pass --overwrite to start it anew"
            )
        if not os.path.exists(os.path.join(out, "run.json")):
            raise ValueError(f"--resume: {out} holds no run to resume (no run.json, no checkpoint)")

    def _has_checkpoints(self) -> bool:
        return bool(checkpoint.checkpoint_folders(self._checkpoint_dir()))

    def _check_label_names(self, facts: dict[str, Any]) -> None:
        """Refuse a resume whose training file names its labels otherwise than the run's ``labels.txt`` (a
        ``labels.txt`` put beside the file since gives the names other ids)."""
        names_file = facts.get("label_names_file")
        recorded = None
        if names_file is not None:
            recorded = read_label_file(os.path.join(self.out_dir, str(names_file)))
        if recorded != self.train_data.label_names:
            run, now = (
                f"{len(names)} names" if names is not None else "ids"
                for names in (recorded, self.train_data.label_names)
            )
            if recorded is not None:
                run += f" ({os.path.join(self.out_dir, str(names_file))})"
            raise ValueError(
                f"--resume: the run's labels are {run}, --train {self.train_path} now gives {now}; give the "
                "run's labelling, or --overwrite"
            )

    @functools.cached_property
    def _recorded_config(self) -> dict[str, Any] | None:
        """The plain form of the ``config.yaml`` of the run a resume continues (None when not resuming),
        read once."""
        return read_recorded_config(self.out_dir) if self.resume else None

    def _keep_recorded_values(self) -> dict[str, tuple[Any, Any]]:
        """On resume, :func:`resume_settings` into the config and explicit keys; returns what it kept."""
        if self._recorded_config is None or self.explicit_keys is None:
            return {}
        self.config, self.explicit_keys, kept = resume_settings(
            self._recorded_config, self._recorded_facts, self.config, self.explicit_keys
        )
        return kept

    def _check_resumed_config(self) -> None:
        """Refuse a resume whose config differs from the run's ``config.yaml`` in more than
        :func:`_resume_adjustments` allows, before anything is built from it (the checkpoint's config is
        checked again when it is read). Reads only."""
        if self._recorded_config is not None and self._has_checkpoints():  # else it starts from step 0
            _resume_adjustments(self._recorded_config, config_to_dict(self.config))

    @functools.cached_property
    def _recorded_facts(self) -> dict[str, Any]:
        """The ``run.json`` of the run in ``out_dir`` (empty when there is none), read once."""
        return read_run_facts(self.out_dir)

    def _resolve_kernels(self) -> dict[str, str]:
        """The head's ops' implementations for this run's batches (``impl=auto`` resolved by the ops' fixed
        rules); a resume that would run others is refused: it would not compute what the run did."""
        config = self.config
        batch = config.train.batch_size if self.head.sharded else rank_batch_size(config, self.dist)
        autocast = config.train.bf16 and self.device.type == "cuda"
        kernels = self.head.kernels(
            batch=batch,
            device_type=self.device.type,
            dtype=torch.bfloat16 if autocast else torch.float32,
        )
        if self.resume:
            recorded = self._recorded_facts.get("kernels", kernels)  # runs from before the record: as now
            if recorded != kernels:
                raise ConfigError(
                    f"--resume: the run computed with {recorded}, this one would with {kernels} (device "
                    f"{self.device.type}); resume on the same kind of device, or set head.impl to the run's"
                )
        return kernels

    def _check_data_files(self) -> None:
        """Fingerprint the data (size and SHA-256, for ``run.json``; an image folder's of its listing); when
        resuming, refuse files other than those that ``run.json`` recorded."""
        # absolute paths: a resume that names no data takes them from any folder
        self.data_files = {
            "train_file": {"path": os.path.abspath(self.train_path), **path_fingerprint(self.train_path)},
        }
        if self.test_path is not None:
            test = {"path": os.path.abspath(self.test_path), **path_fingerprint(self.test_path)}
            self.data_files["test_file"] = test
        if self.valid_path is not None:
            valid = {"path": os.path.abspath(self.valid_path), **path_fingerprint(self.valid_path)}
            self.data_files["valid_file"] = valid
        facts = self._recorded_facts
        if not self.resume or not facts:
            return
        self._check_label_names(facts)
        for key, flag in (("train_file", "--train"), ("test_file", "--test"), ("valid_file", "--valid")):
            recorded, current = facts.get(key), self.data_files.get(key)
            if key == "valid_file" and (recorded is None) != (current is None):
                raise ValueError(
                    "--resume: the run was started "
                    + ("with --valid" if recorded is not None else "without --valid")
                    + "; pass the same validation data, or --overwrite to start anew"
                )
            if recorded is None:  # a run folder from before data fingerprints, or a run without --test
                continue
            if key == "test_file" and current is None:  # training never reads it: the resume goes without
                self._resume_changes[flag] = (recorded["path"], "none")
                continue
            same = (recorded["size"], recorded["sha256"]) == (current["size"], current["sha256"])
            if key == "test_file" and not same:  # training never reads it: run.json records the new one
                before, after = recorded["path"], current["path"]
                if before == after:
                    before, after = (f"{before} (sha256 {f['sha256'][:12]})" for f in (recorded, current))
                self._resume_changes[flag] = (before, after)
                continue
            if not same:
                raise ValueError(
                    f"--resume: {flag} {current['path']} ({current['size']} bytes, sha256 "
                    f"{current['sha256'][:12]}) is not the run's {recorded['path']} "
                    f"({recorded['size']} bytes, sha256 {recorded['sha256'][:12]}); pass that file, or "
                    "--overwrite to start anew"
                )

    def _clear_previous_run(self) -> None:
        """A fresh run in a used folder starts from nothing: the previous run's files go (nothing else)."""
        for name in _RUN_ENTRIES:
            path = os.path.join(self.out_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)

    def _write_run_files(self) -> None:
        """``config.yaml``, ``run.json`` and the featuriser: what :func:`load_run` needs besides weights.
        ``run.json`` also records the data files' fingerprints, which a resumed run must match."""
        import yaml

        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "config.yaml"), "w", encoding="utf-8") as file:
            yaml.safe_dump(config_to_dict(self.config), file, sort_keys=False)
        data = self.train_data
        facts = {
            "format": self.config.data.format,
            "train_path": self.train_path,
            "num_classes": data.num_classes,
            "multilabel": data.multilabel,
            "input_spec": dataclasses.asdict(data.input_spec),
            "num_train_samples": len(data),
            "num_valid_samples": 0 if self.valid_data is None else len(self.valid_data),
            "label_counts_file": "label_counts.npy",
            **({"label_names_file": "labels.txt"} if data.label_names is not None else {}),
            "kernels": self.kernels,
            # the settings given (a resume's too): given again to a resume that sets none of them
            "explicit_keys": None if self.explicit_keys is None else sorted(self.explicit_keys),
            **self.data_files,
        }
        write_json_atomic(os.path.join(self.out_dir, "run.json"), facts)
        np.save(os.path.join(self.out_dir, "label_counts.npy"), data.label_counts())
        if data.label_names is not None:  # the id of each name: inference reads named labels by them
            write_text_atomic(
                os.path.join(self.out_dir, "labels.txt"), "".join(f"{n}\n" for n in data.label_names)
            )
        if data.featurizer is not None:
            write_state(os.path.join(self.out_dir, "featurizer"), data.featurizer.state_dict())

    # ------------------------------------------------------------------------------------------------ train

    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; evaluate, checkpoint, write ``metrics.json`` and the report."""
        config = self.config.train
        self.logger.print(self.recipe)
        valid = "no validation rows" if self.valid_data is None else f"{len(self.valid_data)} validation rows"
        self.logger.print(
            f"train {self.train_path}: {len(self.train_data)} samples ({valid}), "
            f"{self.train_data.num_classes} classes "
            f"({'multi-label' if self.train_data.multilabel else 'one label each'}); "
            f"{self._batch_text()}, {self.total_steps} steps on {self.device}"
            + "".join(f"; {op}: {impl}" for op, impl in self.kernels.items())
            + (
                f"; cuda graph {'on' if self._graph_choice.on else 'off'} ({self._graph_choice.reason})"
                if self.device.type == "cuda"
                else ""
            )
            + (
                f"; multi-label targets padded to {self.step_graph.label_capacity} labels a batch"
                if self.step_graph is not None and self.step_graph.label_capacity is not None
                else ""
            )
            + (
                f"; inputs padded to {self.step_graph.input_capacity} non-zeros a batch"
                if self.step_graph is not None and self.step_graph.encoder is not None
                else ""
            )
        )
        if self.average is not None:
            self.logger.print(self._average_text())
        if self._patience_spent() and self.state.epoch < config.epochs:  # resumed after an early stop
            self.logger.print(
                f"early stop: no better validation {self._selection_metric()} in "
                f"{self.state.evals_since_best} evaluations (train.patience={config.patience}); a higher "
                "train.patience trains on"
            )
        stopped = False
        while self.state.epoch < config.epochs and not stopped and not self._patience_spent():
            epoch = self.state.epoch
            stopped = not self.train_epoch(epoch)
            if stopped:
                break
            self._finish_epoch(epoch)
        if stopped:
            peak = format_bytes(peak_memory_bytes(self.device))
            self.logger.print(
                f"stopped after step {self.state.global_step} (train.stop_after_steps); peak memory {peak}"
            )
            return {}
        return self._finish_run()

    def _batch_text(self) -> str:
        """How each step's global batch is split, e.g. ``2 ranks x 128 samples = global batch 256``."""
        world, global_batch = self.dist.world_size, self.config.train.batch_size
        if world == 1:
            return f"1 process x {global_batch} samples = global batch {global_batch}"
        return f"{world} ranks x {global_batch // world} samples = global batch {global_batch}"

    def train_epoch(self, epoch: int) -> bool:
        """Steps of ``epoch`` from where the state stands; False if the run stops before the epoch ends."""
        config = self.config.train
        steps = self.loader.steps_per_epoch()
        window: list[Tensor] = []
        batches = self.loader.epoch(epoch, start_step=self.state.step_in_epoch)
        last = time.perf_counter()
        for batch in self._progress(batches, epoch, steps):
            window.append(self.train_step(batch))
            step = self.state.global_step
            checkpoint_due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            stop_due = bool(config.stop_after_steps) and step >= config.stop_after_steps
            if (
                len(window) == config.log_every
                or self.state.step_in_epoch == steps
                or checkpoint_due
                or stop_due
            ):
                self._log_losses(window, epoch)  # one host sync per log window
                window = []
            now = time.perf_counter()
            self.state.train_seconds += now - last
            if checkpoint_due or stop_due:
                self.save_checkpoint()
            if stop_due:
                return False
            last = time.perf_counter()
        return True

    def train_step(self, batch: Any) -> Tensor:
        """One optimizer step on ``batch``; returns the (detached, device) loss."""
        batch = batch.to(self.device, non_blocking=True)
        lrs = self._set_learning_rates(self.state.global_step)
        frozen = self.state.global_step < self.config.optim.encoder_frozen_steps  # head-only warm-up
        for optimizer in self._optimizers():
            optimizer.zero_grad(set_to_none=True)
        # full batches replay the captured step (multi-label targets and sparse inputs padded to their
        # capacities); an epoch's smaller last batch, or one over a capacity, runs eagerly
        graph = self.step_graph
        loss = None
        if graph is not None and graph.fits(batch.targets, batch.inputs):
            try:
                loss = self._replay(graph, batch, frozen=frozen)
            except CaptureError as error:
                self._capture_failed(graph, error)
        beside_graph = loss is None and graph is not None  # its own gradients, beside the graph's
        if loss is None:
            with self._autocast():
                with torch.no_grad() if frozen else contextlib.nullcontext():
                    features = self.parallel.encoder(batch.inputs)  # (B, D)
                loss = self.parallel.head(head_input(features, self.head), batch.targets)
            loss.backward()
        if self.config.train.grad_clip > 0:
            self.parallel.clip_grad_norm_(self.config.train.grad_clip)
        for optimizer in self._optimizers():
            optimizer.step()
            if beside_graph:  # dropped once applied: an evaluation or a save after it holds two sets
                optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.step_in_epoch += 1
        fraction = self.state.epoch + self.state.step_in_epoch / self.loader.steps_per_epoch()
        self.head.after_step(self.state.global_step, fraction, lr=lrs["head"])
        if self.average is not None:
            for name, mask in self.head.take_rewired().items():  # connections rewired by this step
                self.average.restart(f"head.{name}", mask)
            self.average.update(step=self.state.global_step)
        return loss.detach()

    def _replay(self, graph: StepGraph, batch: Any, *, frozen: bool) -> Tensor:
        """The step's forward and backward through ``graph``: the whole step, or the head's after the
        encoder's eager forward (its gradient sent back into the encoder, eagerly, unless frozen)."""
        if graph.encoder is not None:
            return graph.run(batch.inputs, batch.targets)[0]
        with self._autocast():
            with torch.no_grad() if frozen else contextlib.nullcontext():
                features = self.parallel.encoder(batch.inputs)  # (B, D)
            x = head_input(features, self.head)
        loss, x_grad = graph.run(x, batch.targets)
        if x.requires_grad:
            x.backward(x_grad)
        return loss

    def _capture_failed(self, graph: StepGraph, error: CaptureError) -> None:
        """After a failed capture the step runs eagerly and the run goes on with the head's step alone
        captured (when the whole step was), else eagerly; ``train.cuda_graph=on`` makes the latter an
        error naming the way out."""
        step = self.state.global_step + 1
        if graph.encoder is not None:
            self.step_graph = self._step_graph(whole=False)
            self._graph_choice = GraphChoice(True, self._graph_reason(self.step_graph, str(error)))
            self.logger.print(f"cuda graph: the head's step alone from step {step}: {error}")
            return
        if self.config.train.cuda_graph == "on":
            raise ConfigError(f"train.cuda_graph=on: {error}; use auto or off") from error
        self.step_graph = None
        self._graph_choice = GraphChoice(False, str(error))
        self.logger.print(f"cuda graph off from step {step}: {error}")

    def _graph_counts(self) -> dict[str, int]:
        """The full batches run eagerly so far because they were over a captured step's label capacity
        (multi-label targets) or input capacity (sparse inputs)."""
        graph, counts = self.step_graph, {}
        if graph is not None and graph.label_capacity is not None:
            counts["graph_label_overflows"] = graph.overflows
        if graph is not None and graph.encoder is not None:
            counts["graph_input_overflows"] = graph.input_overflows
        return counts

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for optimizer in self.optimizers.values() if optimizer is not None]

    def _set_learning_rates(self, step: int) -> dict[str, float]:
        """Set each group's lr from the schedule (a pure function of the step)."""
        lrs = {}
        for name, optimizer in self.optimizers.items():
            group_config = getattr(self.config.optim, name)
            lrs[name] = lr_at(
                step,
                peak=group_config.lr,
                total_steps=self.total_steps,
                optim=self.config.optim,
                warmup_total_steps=self.state.warmup_total_steps or None,
            )
            for group in optimizer.param_groups if optimizer is not None else []:
                group["lr"] = lrs[name]
        return lrs

    def _autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.config.train.bf16 and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _progress(self, batches: Iterator[Any], epoch: int, steps: int) -> Iterator[Any]:
        self._window_started = time.perf_counter()  # the epoch's first window: evaluation does not count
        if not self.config.train.progress:
            return batches
        from tqdm import tqdm

        self._bar = tqdm(
            batches,
            total=steps,
            initial=self.state.step_in_epoch,
            desc=f"epoch {epoch + 1}/{self.config.train.epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=None,  # on a terminal only: redirected output keeps the logged lines alone
        )
        return self._bar

    def _log_losses(self, window: list[Tensor], epoch: int) -> None:
        self._saves.check()  # a save behind the steps that failed stops the run now, not at the next save
        losses = torch.stack(window).float().cpu().tolist()  # deliberate host sync, once per log window
        # timed after that sync: the window's steps have run on the device, not only been launched (a
        # checkpoint written between windows counts in the next one)
        now = time.perf_counter()
        steps_per_s = len(window) / max(now - self._window_started, 1e-9)
        self._window_started = now
        bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
        if bad is not None:
            step = self.state.global_step - len(losses) + bad + 1
            raise TrainingDiverged(
                f"the loss is {losses[bad]} at step {step} (epoch {epoch + 1}): training diverged; lower "
                f"optim.*.lr, lengthen optim.warmup_fraction or set train.grad_clip, then --resume from the "
                f"last checkpoint (none is written from this state)"
            )
        self.state.epoch_loss_sum += sum(losses)
        lr = lr_at(
            self.state.global_step - 1,
            peak=1.0,
            total_steps=self.total_steps,
            optim=self.config.optim,
            warmup_total_steps=self.state.warmup_total_steps or None,
        )
        head_metrics = {f"head/{name}": value for name, value in self.head.metrics().items()}  # syncs: a log
        self.logger.log(
            "train",
            self.state.global_step,
            {
                "epoch": epoch,
                "loss": sum(losses) / len(losses),
                "losses": losses,
                "lr_scale": lr,
                "steps_per_s": round(steps_per_s, 3),
                **head_metrics,
                **self._graph_counts(),
            },
        )
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", steps_per_s=f"{steps_per_s:.1f}")

    def _finish_epoch(self, epoch: int) -> None:
        """Log the epoch's mean loss; when due, score the validation rows (keeping the best epoch's weights)
        and the test file (for the curves only); checkpoint, and move the state to the next epoch."""
        train_loss = self.state.epoch_loss_sum / max(self.state.step_in_epoch, 1)
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss}
        self.logger.log("epoch", self.state.global_step, record)
        last = epoch + 1 == self.config.train.epochs
        line = f"epoch {epoch + 1}: train loss {train_loss:.4f}"
        if last or (epoch + 1) % self.config.train.eval_every == 0:
            if self.valid_data is not None:
                valid = self.evaluate(self.valid_data, verification=False)
                self.logger.log("eval_valid", self.state.global_step, {"epoch": epoch + 1, **valid})
                self._track_best(epoch + 1, valid)
                line += f"  valid {_precisions(valid)}"
            if self.test_data is not None:
                test = self.evaluate(self.test_data)
                self._test_curve = (epoch + 1, test)
                self.logger.log("eval_test_curve", self.state.global_step, {"epoch": epoch + 1, **test})
                line += f"  test (curve) {_precisions(test)}"
        self.logger.print(line)
        self.state = dataclasses.replace(self.state, epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0)
        self.save_checkpoint(tidy_best=True)
        if self._patience_spent() and epoch + 1 < self.config.train.epochs:
            self.logger.print(
                f"early stop: no better validation {self._selection_metric()} in "
                f"{self.state.evals_since_best} evaluations (train.patience)"
            )

    def _selection_metric(self) -> str:
        """The metric that picks the epoch: P@k at the first ``eval.ks``."""
        return f"P@{self.config.eval.ks[0]}"

    def _keeps_best(self) -> bool:
        """Whether the best epoch's weights are kept: validation rows exist."""
        return self.valid_data is not None

    def _best_dir(self, epoch: int) -> str:
        return os.path.join(self.out_dir, "best", f"epoch-{epoch}")

    def _track_best(self, epoch: int, valid: dict[str, float]) -> None:
        """Count ``epoch``'s validation score against the top score so far, and keep the epoch when its score
        is within the noise of the top (:meth:`_noise`): its weights go to ``best/epoch-N`` (written whole or
        not at all) before the checkpoint that records it."""
        score = valid[self._selection_metric()]
        state = self.state
        top_epoch, top = state.top_epoch, state.top_score
        if not top_epoch:  # none yet, or a checkpoint written before the top was recorded apart
            top_epoch, top = state.best_epoch, state.best_score
        if top_epoch and score <= top:
            state.evals_since_best += 1
        else:
            top_epoch, top, state.evals_since_best = epoch, score, 0
        state.top_epoch, state.top_score = top_epoch, top
        if state.best_epoch and score < top - self._noise(top):
            return
        if self._keeps_best():
            self._save_best(epoch)
        state.best_epoch, state.best_score = epoch, score

    def _noise(self, score: float) -> float:
        """``train.keep_within_se`` standard errors of a validation score ``score``: ``sqrt(p (1 - p) / n)``
        over the ``n`` held-out rows, the spread of a P@1 over that many rows (a P@k of larger k spreads
        less)."""
        spread = math.sqrt(score * (1.0 - score) / len(self.valid_data))  # P@k lies in [0, 1]
        return self.config.train.keep_within_se * spread

    def _save_best(self, epoch: int) -> None:
        """Write the weights just evaluated to ``best/epoch-N``: whole from rank 0, or, for a sharded head,
        each rank's rows in the layout of a sharded checkpoint (collective). A run that saves behind its
        steps copies them now and writes them before the checkpoint that records them."""
        behind = self._saves_in_background()
        if behind:
            self._saves.wait()  # one copy at a time: the save before this one has ended
        with self._averaged():  # the evaluated weights are kept
            if self.head.sharded:
                encoder, _ = encoder_state(self.parallel, None)  # collective under FSDP2; rank 0's is written
                save_sharded_weights(
                    self._best_dir(epoch),
                    head=self.head,
                    encoder=encoder,
                    rank=self.dist.rank,
                    world_size=self.dist.world_size,
                )
                return
            state = self._model_state(weights_only=True)
            if behind:
                self._best_to_write = (self._best_dir(epoch), checkpoint.to_host(state))
                return
        if self.dist.is_main:
            write_state(self._best_dir(epoch), state)

    def _tidy_best(self, best_epoch: int) -> None:
        """Remove the kept weights of epochs other than ``best_epoch``, the one the checkpoint just written
        calls best (rank 0)."""
        folder = os.path.join(self.out_dir, "best")
        if not self.dist.is_main or not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            if name != f"epoch-{best_epoch}":
                path = os.path.join(folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def _patience_spent(self) -> bool:
        patience = self.config.train.patience
        return patience > 0 and self.state.evals_since_best >= patience

    def _best_on_disk(self) -> bool:
        """Whether the best epoch's weights are kept and in ``best/``; says so when the checkpoint names a
        best epoch whose weights were not written (the run then ends with the last epoch's)."""
        if not (self._keeps_best() and self.state.best_epoch):
            return False
        if os.path.isdir(self._best_dir(self.state.best_epoch)):
            return True
        self.logger.print(
            f"{self._best_dir(self.state.best_epoch)} is missing: the last epoch's weights are kept"
        )
        return False

    def _restore_best(self) -> None:
        """Put the kept epoch's weights in the modules on every rank; they are the final model (an EMA is in
        them). When the last epoch is kept and no average is kept, the modules hold them already: nothing is
        read."""
        if self.state.best_epoch != self.state.epoch or self.average is not None:
            self._load_weights(self._best_dir(self.state.best_epoch))
        self.average = None
        self.logger.print(self._kept_line())

    def _kept_line(self) -> str:
        """``kept epoch N: validation P@k X``, and the best epoch's score where the kept one is lower."""
        state = self.state
        line = f"kept epoch {state.best_epoch}: validation {self._selection_metric()} {state.best_score:.4f}"
        if state.top_epoch and state.best_score < state.top_score:
            within = self.config.train.keep_within_se
            line += (
                f", within {within:g} standard error{'' if within == 1 else 's'} "
                f"({self._noise(state.top_score):.4f}) of epoch {state.top_epoch}'s {state.top_score:.4f} "
                "(train.keep_within_se)"
            )
        return line

    def _check_label_prior(self) -> None:
        """Stop a run whose model ranks the most frequent training label first on (almost) every validation
        row: it learned the label prior only, which is no result to report."""
        if self.valid_data is None or len(self.valid_data) < _LABEL_PRIOR_MIN_ROWS:
            return
        with self._averaged():
            batches = predict_batches(
                self.encoder, self.head, self.valid_data, k=1, config=self.config, device=self.device
            )
            top = np.concatenate([ids[:, 0].numpy() for _, ids, _ in batches])  # (N,)
        counts = self.train_data.label_counts()
        share = label_prior_share(top, counts, len(self.train_data))
        if share >= _LABEL_PRIOR_SHARE:
            raise EndedAtLabelPrior(
                f"training ended at the label prior: the model ranks label {int(np.argmax(counts))}, the "
                f"most frequent training label, first for {100 * share:.0f}% of the validation rows; "
                f"{self._label_prior_advice()}"
            )

    def _label_prior_advice(self) -> str:
        """What to change after a run ended at the label prior, from the run's own settings."""
        optim, train = self.config.optim, self.config.train
        pretrained = isinstance(self.config.model, TransformerConfig) and bool(self.config.model.pretrained)
        rates = f"optim.encoder.lr now {optim.encoder.lr:g}"
        if pretrained:
            rates += "; 5e-5 suits a pretrained transformer"
        else:
            rates += f", optim.head.lr {optim.head.lr:g}"
        advice = [f"lower the learning rates ({rates})"]
        if optim.warmup_fraction < 0.1:
            advice.append(f"lengthen the warm-up (optim.warmup_fraction=0.1, now {optim.warmup_fraction:g})")
        advice.append(f"raise train.epochs (now {train.epochs})")
        return f"{', '.join(advice[:-1])} or {advice[-1]}"

    def _load_weights(self, path: str) -> None:
        """Load the kept weights in folder ``path`` into the encoder and head, whichever layout holds them
        (a sharded run's or a whole one's) and however this run shards the head."""

        if is_sharded_checkpoint(path):  # each rank reads its rows
            dist = self.dist
            common, _ = load_sharded(
                path, head=self.head, head_optimizer=None, rank=dist.rank, world_size=dist.world_size
            )
            load_encoder_state(self.parallel, None, common["encoder"], None)
            return
        kept = load_run_weights(path)
        load_encoder_state(self.parallel, None, kept["encoder"], None)
        load_whole_head(self.head, None, state=kept["head"], optimizer_state=None, weights_only=True)

    def _finish_run(self) -> dict[str, Any]:
        """Keep the best epoch's weights, check them, score the test file with them (or take the scores their
        epoch's end gave, where this process computed them), and write the final weights, ``metrics.json`` and
        the report (rank 0; the others return no metrics)."""

        self._saves.wait()  # the last save's checkpoint and kept weights are on disk
        kept_on_disk = self._best_on_disk()  # best/epoch-N is the final model
        if kept_on_disk:
            self._restore_best()
        self._check_label_prior()
        kept_epoch = self.state.best_epoch if kept_on_disk else self.state.epoch
        metrics = self._final_scores(kept_epoch)
        linked = kept_on_disk and not is_sharded_checkpoint(self._best_dir(self.state.best_epoch))
        if not kept_on_disk:
            with self._averaged():  # the final model is the evaluated one
                model_state = self._model_state(weights_only=True)  # collective under FSDP2
        memory = head_memory(
            self.head,
            self.optimizers["head"],
            num_classes=self.train_data.num_classes,
            in_features=self.encoder.out_features,
        )
        ranks = self.dist.world_size if self.head.sharded else 1
        if ranks > 1:  # each rank holds its classes' part: the run reports the whole head
            memory = summed_over_ranks(memory, self.device)
        if not self.dist.is_main:
            return {}
        if kept_on_disk and not linked:  # a sharded run's kept rows, whole, left in their files until written
            model_state = read_run_weights(self._best_dir(self.state.best_epoch))
        records = read_log(self.logger.path)
        if self.state.best_epoch:
            metrics[f"valid_{self._selection_metric()}"] = self.state.best_score
        metrics.update(
            epoch_kept=kept_epoch,
            train_seconds=round(self.state.train_seconds, 3),
            eval_seconds=round(self.state.eval_seconds, 3),
            peak_memory_bytes=peak_memory_bytes(self.device),
            epochs=self.state.epoch,
            steps=self.state.global_step,
            num_classes=self.train_data.num_classes,
            device=str(self.device),
        )
        metrics.update({f"head/{name}": value for name, value in self.head.metrics().items()})
        metrics.update(memory)
        self.logger.print(format_head_memory(memory, sparsity=metrics.get("head/sparsity"), ranks=ranks))
        model_dir = os.path.join(self.out_dir, "model")
        if linked:
            link_state(self._best_dir(self.state.best_epoch), model_dir)  # its files, linked: written once
        else:
            write_state(model_dir, model_state)
        write_json_atomic(os.path.join(self.out_dir, "metrics.json"), metrics)
        with open(os.path.join(self.out_dir, "config.yaml"), encoding="utf-8") as file:
            config_yaml = file.read()
        write_report(
            self.out_dir,
            config_yaml=config_yaml,
            metrics=metrics,
            history=epoch_history(records),
            ks=self.config.eval.ks,
            head_memory=memory,
        )
        return metrics

    def _final_scores(self, kept_epoch: int) -> dict[str, float]:
        """The kept weights' scores, logged and printed: on the test file (those their epoch's end gave,
        where this process computed them), else as ``valid_``-named scores on the validation rows (none
        without either)."""
        if self.test_data is None:
            if self.valid_data is None:
                self.logger.print(
                    "no --test and no validation rows (train.valid_fraction 0): the run is not scored"
                )
                return {}
            scores = self.evaluate(self.valid_data)  # collective for a sharded head
            self.logger.log("eval_valid_final", self.state.global_step, {"epoch": kept_epoch, **scores})
            self.logger.print(f"validation (epoch {kept_epoch}; no --test): {_precisions(scores)}")
            return {f"valid_{name}": value for name, value in scores.items()}
        if self._test_curve is not None and self._test_curve[0] == kept_epoch:
            scores = dict(self._test_curve[1])  # the kept weights, scored at their epoch's end
        else:
            scores = self.evaluate(self.test_data)  # collective for a sharded head
        self.logger.log("eval_test", self.state.global_step, {"epoch": kept_epoch, **scores})
        self.logger.print(f"test (epoch {kept_epoch}): {_precisions(scores)}")
        return scores

    # --------------------------------------------------------------------------------------------- evaluate

    def evaluate(self, dataset: SparseDataset, *, verification: bool = True) -> dict[str, float]:
        """Ranking metrics of the current model on ``dataset`` (P@k, nDCG@k, PSP@k, ...), and the face
        verification sets of ``eval.verification`` when ``verification``. The pairs of ``eval.filter_labels``
        name test rows: they are left out on the test set only."""
        started = time.perf_counter()
        label_counts = self.train_data.label_counts()
        with self._averaged():
            metrics = evaluate_model(
                self.encoder,
                self.head,
                dataset,
                config=self.config,
                label_counts=label_counts,
                num_train_samples=len(self.train_data),
                device=self.device,
                label_filter=self.label_filter if dataset is self.test_data else None,
            )
        if verification and self.config.eval.verification:
            metrics.update(self._verification())
        self.state.eval_seconds += time.perf_counter() - started
        return metrics

    def _verification(self) -> dict[str, float]:
        """Face verification on the ``eval.verification`` ``.bin`` sets (loaded and decoded on first use)."""
        if self._verifier is None:
            self._verifier = VerificationEvaluator(
                self.config.eval.verification, batch_size=self.config.eval.batch_size
            )
        results = self._verifier(self.encoder, device=self.device)
        for name, result in results.items():
            self.logger.print(result.format(name))
        return VerificationEvaluator.flatten(results)

    # -------------------------------------------------------------------------------------------- checkpoint

    def _model_state(self, *, weights_only: bool = False) -> dict[str, Any]:
        """Encoder and head state; ``weights_only``: what inference needs (kept and final weights), which for
        a head keeping its rows' optimizer state is a fraction of a checkpoint's."""
        if not self.head.sharded:
            head = self.head.weights_state_dict() if weights_only else self.head.state_dict()
            return {"encoder": self.encoder.state_dict(), "head": head}

        latest = checkpoint.latest_checkpoint(self._checkpoint_dir())  # the final checkpoint, just written
        encoder_weights, _ = encoder_state(self.parallel, None)
        if not self.dist.is_main:
            return {}
        head = export_head_state(latest, averaged=self.average is not None)  # the evaluated weights
        return {"encoder": encoder_weights, "head": head}

    def save_checkpoint(self, *, tidy_best: bool = False) -> None:
        """Write all needed to continue exactly: weights, optimizers, loop state, RNG states, config; then
        (``tidy_best``) remove the kept weights the checkpoint no longer calls best. Behind the steps where
        :meth:`_saves_in_background`."""
        best_epoch = self.state.best_epoch
        if self.head.sharded:
            self._save_distributed_checkpoint()
        elif self._saves_in_background():
            self._save_behind(tidy_best=tidy_best)
            return
        else:
            self._save_single_checkpoint()
        if tidy_best:
            self._tidy_best(best_epoch)

    def _checkpoint_state(self, *, average: bool = True) -> dict[str, Any]:
        """What a single-process checkpoint holds (its tensors where they live); without the weight average's
        state (``average`` false), which its :meth:`~megaclass.train.averaging.WeightAverage.state_dict`
        brings up to date first."""
        state = {
            **self._model_state(),
            "optimizers": {
                name: opt.state_dict() for name, opt in self.optimizers.items() if opt is not None
            },
            "loop": dataclasses.asdict(self.state),
            "rng": rng_state(),
            "config": config_to_dict(self.config),
            "log_bytes": self._log_bytes(),
            "head_weights": sorted(self.head.weights_state_dict()),  # what an export of it keeps
        }
        if self.average is not None and average:
            state["average"] = self.average.state_dict()
        return state

    def _saves_in_background(self) -> bool:
        """Whether saves are written behind the steps (:func:`checkpoint.saves_in_background`), decided at the
        run's first save: the state's size is the same at every save of a run."""
        if self._background is None:

            def copy_bytes() -> int | None:  # a checkpoint and the kept weights (the average: a copy more)
                state = checkpoint.tensor_bytes(self._checkpoint_state(average=False))
                weights = checkpoint.tensor_bytes(self._model_state(weights_only=True)) or 0
                copies = (self.average is not None) + self._keeps_best()
                return None if state is None else state + copies * weights

            self._background = checkpoint.saves_in_background(
                self.config.train.background_saves,
                copy_bytes,
                machine_memory("cpu")[1],
                processes=self.dist.world_size,
                sharded=self.head.sharded,
            )
        return self._background

    def _save_behind(self, *, tidy_best: bool) -> None:
        """Copy the checkpoint's state (and the kept weights not yet written) into host memory and write them
        in the saves' thread, in the order a synchronous save does."""
        self._saves.wait()  # one copy at a time: the save before this one has ended
        state, best = checkpoint.to_host(self._checkpoint_state()), self._best_to_write
        self._best_to_write = None
        folder, step = self._checkpoint_dir(), self.state.global_step
        keep, best_epoch = self.config.train.keep_checkpoints, self.state.best_epoch

        def save() -> None:
            if best is not None:
                write_state(*best)
            path = checkpoint.save_checkpoint(folder, step, state, keep=keep)
            self._warn_if_short_of_room(path)
            if tidy_best:
                self._tidy_best(best_epoch)

        self._saves.submit(save)

    def _save_single_checkpoint(self) -> None:
        """A checkpoint of a replicated head, written by rank 0 while the others wait."""
        state = self._checkpoint_state()
        if self.dist.distributed:
            import torch.distributed as dist

            # every rank's state_dict flushed its own pushes: a parameter server's rows hold still until
            # rank 0 has read them
            dist.barrier()
        if self.dist.is_main:  # a replicated head: every rank holds the same state
            path = checkpoint.save_checkpoint(
                self._checkpoint_dir(), self.state.global_step, state, keep=self.config.train.keep_checkpoints
            )
            self._warn_if_short_of_room(path)
        if self.dist.distributed:
            import torch.distributed as dist

            dist.barrier()  # the others wait for rank 0's checkpoint

    def _save_distributed_checkpoint(self) -> None:
        """A checkpoint any world size resumes (:mod:`megaclass.distributed.checkpoint`); collective."""

        encoder_weights, encoder_optimizer = encoder_state(self.parallel, self.optimizers["encoder"])
        common = {
            "encoder": encoder_weights,
            "optimizers": {"encoder": encoder_optimizer} if encoder_optimizer is not None else {},
            "loop": dataclasses.asdict(self.state),
            "config": config_to_dict(self.config),
            "global_batch": self.config.train.batch_size,
            "log_bytes": self._log_bytes(),
        }
        head_average = None
        if self.average is not None:  # the encoder's whole, as its weights; the head's rows by rank
            with self.average.swapped("encoder"):
                common["average"], _ = encoder_state(self.parallel, None)  # collective under FSDP2
            head_average = self.average.state_dict("head")
        path = save_sharded(
            self._checkpoint_dir(),
            self.state.global_step,
            head=self.head,
            head_optimizer=self.optimizers["head"],
            common=common,
            private={"rng": rng_state()},
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            head_average=head_average,
        )
        if self.dist.is_main:
            checkpoint.commit_checkpoint(
                self._checkpoint_dir(), path, keep=self.config.train.keep_checkpoints
            )
            self._warn_if_short_of_room(path)

    def _warn_if_short_of_room(self, path: str) -> None:
        """Say so, one checkpoint ahead, when the next checkpoint will not fit on the disk (rank 0)."""
        warning = checkpoint.short_of_room(self._checkpoint_dir(), path)
        if warning is not None:
            self.logger.print(warning)

    def _log_bytes(self) -> int:
        """The log's length now (rank 0; 0 elsewhere): a resumed run cuts it back to this."""
        return os.path.getsize(self.logger.path) if self.dist.is_main else 0

    def _load_checkpoint(self, path: str) -> dict[str, Any]:
        """Read checkpoint ``path`` by its own format, whatever this run's world size and head sharding: a
        sharded one (loaded here) or a single-process one (loaded by :meth:`_restore`)."""

        if is_sharded_checkpoint(path):
            return self._restore_distributed(path)
        return checkpoint.load_checkpoint(path)

    def _restore_distributed(self, path: str) -> dict[str, Any]:
        """Load a sharded checkpoint written by any world size into this run's head, sharded or not; returns
        its common state (config, loop state)."""

        common, private = load_sharded(
            path,
            head=self.head,
            head_optimizer=self.optimizers["head"],
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        load_encoder_state(
            self.parallel, self.optimizers["encoder"], common["encoder"], common["optimizers"].get("encoder")
        )
        if self.average is not None:
            self._load_average(
                encoder=common["average"], head=common["head_average"], step=common["loop"]["global_step"]
            )
        if private is not None:
            common["rng"] = private["rng"]
        if common["global_batch"] != self.config.train.batch_size:
            raise ConfigError(
                f"--resume: the checkpoint's global batch is {common['global_batch']} samples, this run's "
                f"train.batch_size is {self.config.train.batch_size}"
            )
        # the global batch decides; checkpoints that recorded train.batch_size per rank say the same thing
        common["config"]["train"]["batch_size"] = self.config.train.batch_size
        return common

    def _restore_newest(self) -> str | None:
        """Restore the newest whole checkpoint, past damaged ones; returns its folder (None: there is none).
        Reads only."""
        found = checkpoint.load_newest(self._checkpoint_dir(), load=self._load_checkpoint)
        if found is None:
            return None
        path, state = found
        self._restore(state)
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from the checkpoint ``state``: refuse config changes that alter what it means, then load
        weights, optimizers, loop position and RNG states; the changes a resume makes on purpose
        (:data:`_RESUME_ADJUSTMENTS`) are named when the run resumes."""
        loop = LoopState(**state["loop"])
        changes = _resume_adjustments(state["config"], config_to_dict(self.config))
        self._check_resumed_position(loop, changes)
        if "head" in state:  # a single-process checkpoint
            self._restore_whole(state)
        self.state = loop
        changed = set(changes)
        if changed & set(_WARMUP_KEYS):  # a new warm-up is taken of the run's (new) total
            self.state.warmup_total_steps = 0
        elif "train.epochs" in changed and not self.state.warmup_total_steps:
            self.state.warmup_total_steps = changes["train.epochs"][0] * self.loader.steps_per_epoch()
        self._resume_changes = {**changes, **self._resume_changes}  # the config's, then --test's
        if "rng" in state:  # absent when the world size changed: each rank keeps its fresh seeded state
            set_rng_state(state["rng"])
        self._resumed_log_bytes = state.get("log_bytes")

    def _check_resumed_position(self, loop: LoopState, changes: dict[str, tuple[Any, Any]]) -> None:
        """Refuse a resume whose changes contradict the checkpoint's position: an end before its step (the
        weights are past it), or another metric to pick the epoch by once one was kept."""
        steps = self.loader.steps_per_epoch()
        if loop.global_step > self.total_steps:
            raise ConfigError(
                f"--resume: train.epochs={self.config.train.epochs} ends at step {self.total_steps}, before "
                f"the checkpoint's step {loop.global_step}; pass train.epochs >= "
                f"{-(-loop.global_step // steps)}"
            )
        if "eval.ks" in changes and loop.best_epoch:
            old, new = changes["eval.ks"]
            if old[0] != new[0]:
                raise ConfigError(
                    f"--resume: eval.ks {_format_value(old)} -> {_format_value(new)} changes the metric "
                    f"that picks the epoch (P@{old[0]} -> P@{new[0]}), by which the run kept epoch "
                    f"{loop.best_epoch}; keep {old[0]} first in eval.ks"
                )

    def _restore_whole(self, state: dict[str, Any]) -> None:
        """Load a single-process checkpoint's weights and optimizers, on any number of ranks (a sharded head
        takes its rows)."""

        optimizers = state["optimizers"]
        load_encoder_state(
            self.parallel,
            self.optimizers["encoder"],
            state["encoder"],
            optimizers.get("encoder"),
            by_index=True,
        )
        load_whole_head(
            self.head, self.optimizers["head"], state=state["head"], optimizer_state=optimizers.get("head")
        )
        if self.average is not None:
            average = state["average"]
            part = {name: {} for name in ("encoder", "head")}
            for key, value in average.items():
                name, _, rest = key.partition(".")
                part[name][rest] = value
            self._load_average(
                encoder={**state["encoder"], **part["encoder"]},  # its buffers: the checkpoint's
                head=shard_head_entries(self.head, part["head"]),
                step=state["loop"]["global_step"],
            )

    def _load_average(self, *, encoder: dict[str, Any], head: dict[str, Any], step: int) -> None:
        """Restore the weight average saved after optimizer step ``step``: ``encoder`` a whole encoder state
        holding the averaged weights (loaded as the encoder's weights are, under any wrapper), ``head`` the
        averages of this rank's head parameters and rows by name."""

        with self.average.swapped("encoder"):
            load_encoder_state(self.parallel, None, encoder, None)
        self.average.load_state_dict(head, part="head", step=step)

    def _restore_log(self, path: str) -> None:
        """Cut the log back to what it held when the checkpoint at ``path`` was saved: the resumed run writes
        the rest again (checkpoints without the length: the records after its step go)."""
        if self.dist.is_main:
            size = self._resumed_log_bytes
            if size is not None and os.path.getsize(self.logger.path) >= size:
                os.truncate(self.logger.path, size)
            else:
                _truncate_log(self.logger.path, self.state.global_step)
        where = os.path.join(self._checkpoint_dir(), os.path.basename(path))  # put back in place if moved
        step, epochs = self.state.global_step, self.config.train.epochs
        if self.state.epoch >= epochs:  # trained to its end: its end is made again
            self.logger.print(
                f"resumed from {where}, step {step}: the run has trained all {epochs} "
                f"epoch{'s' * (epochs != 1)}; it is scored and its final weights written again (a higher "
                "train.epochs trains it on)"
            )
        else:
            self.logger.print(f"resumed from {where} at epoch {self.state.epoch + 1}, step {step}")
        if self._resume_changes:
            named = ", ".join(
                f"{name} {_format_value(old)} -> {_format_value(new)}"
                for name, (old, new) in self._resume_changes.items()
            )
            self.logger.print(
                f"--resume: {named}: from step {step} on the run does not repeat the interrupted one"
            )
            changes = {name: list(values) for name, values in self._resume_changes.items()}
            self.logger.log("resume", step, {"changes": changes})

    def close(self, *, failed: bool = False) -> None:
        """Release the head's row store (page-locked rows, threads, connections) and close the logs. After an
        error (``failed``) the store's updates in flight are not waited for, and its errors are not raised
        over the first: the run resumes from its last checkpoint. A save still being written is finished
        first (after an error too: its state is from before it)."""
        with contextlib.ExitStack() as closing:  # the saves, then the head, then the logs, whatever raises
            closing.callback(self.logger.close)
            if hasattr(self, "head"):
                closing.callback(self._close_head, failed)
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                self._saves.close()

    def _close_head(self, failed: bool) -> None:
        if failed:
            with contextlib.suppress(Exception):
                self.head.close(wait=False)
        else:
            self.head.close()


def _precisions(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in metrics.items() if name.startswith("P@"))


def _truncate_log(path: str, step: int) -> None:
    """Drop log records written after checkpoint ``step``: the resumed run writes them again."""
    kept = [record for record in read_log(path) if record["step"] <= step]
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in kept)


def train(
    config: RunConfig,
    *,
    train_path: str | None = None,
    test_path: str | None = None,
    out_dir: str,
    resume: bool = False,
    overwrite: bool = False,
    valid_path: str | None = None,
    explicit_keys: Collection[str] | None = None,
    check_fit: bool = True,
) -> dict[str, Any]:
    """Train and evaluate as :class:`Trainer` does; returns the final metrics (empty if stopped early, and on
    ranks other than 0). Under ``torchrun`` a rank whose peers stop raises instead of waiting for ever.
    ``train_path`` is required, except that a ``resume`` takes the files its run recorded where none are given
    (:func:`resume_data_files`); without ``test_path`` the validation rows score the run. A run whose memory
    plan does not fit this machine is refused before it starts (:class:`~megaclass.errors.RunDoesNotFit`),
    unless ``check_fit`` is False.

    >>> from megaclass.train import from_preset
    >>> metrics = train(from_preset("xmc-mlp"), train_path="data/deb-tags/train_bow.txt.gz",
    ...                 test_path="data/deb-tags/test_bow.txt.gz", out_dir="runs/demo")  # doctest: +SKIP
    >>> metrics = train(from_preset("xmc-mlp"), out_dir="runs/demo", resume=True)  # doctest: +SKIP
    """
    from megaclass.distributed.info import shutdown_distributed

    if train_path is None and not resume:
        raise ValueError("train: train_path is required (a resume takes its run's files)")
    if resume and (train_path is None or test_path is None):
        files = resume_data_files(out_dir, train_path, test_path, valid_path)
        train_path, test_path, valid_path = files["train"], files["test"], files["valid"]
    if train_path is None:
        raise ValueError(f"train: resume: {out_dir} records no training file; pass train_path")

    trainer = Trainer(
        config,
        train_path=train_path,
        test_path=test_path,
        out_dir=out_dir,
        resume=resume,
        overwrite=overwrite,
        valid_path=valid_path,
        explicit_keys=explicit_keys,
        check_fit=check_fit,
    )
    finished = False
    try:
        trainer.setup()
        metrics = trainer.train()
        finished = True
        return metrics
    except RuntimeError as error:
        dist = trainer.dist
        if not dist.distributed:
            raise
        raise RuntimeError(
            f"rank {dist.rank} of {dist.world_size}: training stopped: a collective failed, so another rank "
            f"stopped or did not answer within distributed.timeout_s={config.distributed.timeout_s:g} s "
            f"({error})"
        ) from error
    finally:
        if hasattr(trainer, "logger"):
            trainer.close(failed=not finished)
        shutdown_distributed(synchronize=finished)
