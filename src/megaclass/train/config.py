"""Run configuration: one frozen dataclass per component, parsed from YAML plus ``--set key=value`` overrides.

``megaclass train --config configs/demo.yaml --set optim.head.lr=0.01 ...`` builds a :class:`RunConfig` with
:func:`load_config`. Model and head sections are parsed by their registries (``model: {type: mlp, ...}``,
``head: {type: dense, ...}``); unknown keys and wrong types raise :class:`~megaclass.schema.ConfigError`
naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from megaclass.heads import HeadConfig, head_config
from megaclass.models import ModelConfig, model_config
from megaclass.schema import ConfigError, from_dict, parse_override, set_path, to_dict

__all__ = [
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "OptimConfig",
    "OptimGroupConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "from_preset",
    "load_config",
    "load_config_and_keys",
    "load_config_file",
    "lr_at",
]


AUTO_LABEL_FEATURE_DIM = 256  # PIFA width of data.label_feature_dim=auto: enough to cluster 10^6 labels


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is read."""

    format: str = "auto"  # auto: sniffed from the file (xmc-bow header, or labels<TAB>text)
    num_classes: int = 0  # 0: taken from the training file; set it when the test file has labels train lacks
    featurizer: dict[str, Any] = field(default_factory=dict)  # text data: options of the text featuriser
    label_feature_dim: int | str = (
        "auto"  # width of the PIFA label vectors heads cluster labels by; auto: 256 when the head uses them
    )

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise ConfigError(f"data.num_classes: expected >= 0, got {self.num_classes}")
        dim = self.label_feature_dim
        if (isinstance(dim, str) and dim != "auto") or (isinstance(dim, int) and dim < 0):
            raise ConfigError(f"data.label_feature_dim: expected 'auto' or an integer >= 0, got {dim!r}")

    def label_feature_width(self, *, wanted: bool) -> int:
        """The PIFA width to compute: ``label_feature_dim``, or for ``auto`` 256 when ``wanted`` (a head
        clusters or orders labels by them), else 0 (none)."""
        if self.label_feature_dim == "auto":
            return AUTO_LABEL_FEATURE_DIM if wanted else 0
        return int(self.label_feature_dim)


@dataclass(frozen=True)
class OptimGroupConfig:
    """Optimizer settings of one parameter group (the encoder's, or the head's)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"  # adamw: decoupled weight decay, the usual default
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    weight_decay: float = 0.0  # applied to matrices only, never to biases or norm gains
    momentum: float = 0.9  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw only

    def __post_init__(self) -> None:
        if self.lr < 0 or not math.isfinite(self.lr):
            raise ConfigError(f"optim lr: expected a finite value >= 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim weight_decay: expected >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optim betas: expected two values in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class OptimConfig:
    """Two parameter groups and one learning-rate schedule shape (warm-up, then decay)."""

    encoder: OptimGroupConfig = field(default_factory=OptimGroupConfig)  # the encoder's parameters
    head: OptimGroupConfig = field(default_factory=OptimGroupConfig)  # the head's (often a larger lr)
    warmup_steps: int = 0  # linear warm-up from 0 over this many steps
    warmup_fraction: float = 0.0  # or over this fraction of all steps (the larger of the two wins)
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # shape after warm-up
    min_lr_ratio: float = 0.0  # the lr decays to this fraction of its peak at the last step
    head_state: Literal["fp32", "bf16_sr"] = "fp32"  # bf16_sr: head weights + optimizer state in bf16 (ELMO)
    encoder_frozen_steps: int = 0  # train the head alone for this many steps first (a pretrained encoder)

    def __post_init__(self) -> None:
        if self.encoder_frozen_steps < 0:
            raise ConfigError(f"optim.encoder_frozen_steps: expected >= 0, got {self.encoder_frozen_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(
                f"optim.warmup_fraction: expected a value in [0, 1], got {self.warmup_fraction}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")


def lr_at(
    step: int,
    *,
    peak: float,
    total_steps: int,
    optim: OptimConfig,
    warmup_total_steps: int | None = None,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based), a pure function of its arguments.

    Linear warm-up to ``peak`` over ``max(warmup_steps, warmup_fraction * warmup_total_steps)`` steps, then
    cosine or linear decay to ``min_lr_ratio * peak`` at step ``total_steps - 1``. ``warmup_total_steps``
    (default ``total_steps``) is the run length the warm-up fraction was taken of: a resume that changes
    ``train.epochs`` keeps the warm-up's length in steps.

    >>> lr_at(0, peak=1.0, total_steps=10, optim=OptimConfig(warmup_steps=2))
    0.5
    >>> lr_at(9, peak=1.0, total_steps=10, optim=OptimConfig(warmup_steps=2))
    0.0
    """
    warmup_total = total_steps if warmup_total_steps is None else warmup_total_steps
    warmup = max(optim.warmup_steps, int(optim.warmup_fraction * warmup_total))
    if step < warmup:
        return peak * (step + 1) / warmup
    if optim.decay == "constant":
        return peak
    span = max(total_steps - 1 - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if optim.decay == "cosine" else 1.0 - progress
    return peak * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 256  # samples per optimizer step over all ranks: each of N ranks takes batch_size / N
    # (N must divide it), so 1 and N processes take the same steps with the same learning rates
    seed: int = 0  # seeds initialisation, shuffling and dropout; a run is a pure function of it on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    bf16: bool = True  # bf16 autocast of forward passes on CUDA (ignored on CPU)
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off)
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: at epoch ends only)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep on disk
    eval_every: int = 1  # evaluate on the test set every this many epochs (and always after the last)
    log_every: int = 10  # log the mean training loss every this many steps
    num_workers: int = 0  # processes building batches (0: the training process)
    stop_after_steps: int = (
        0  # end the run (with a checkpoint) after this many steps, schedule unchanged (0: off)
    )
    progress: bool = True  # tqdm progress bars, on a terminal (output sent to a file or a pipe gets none)
    cpu_threads: int = 0  # torch intra-op threads on CPU (0: torch's default, one per core)
    # > 0: evaluate and save an EMA of the weights (e.g. 0.999); steadier on small data. It covers the
    # encoder and the head, a selected or partial_fc head's store rows too (each row caught up as it changes,
    # in float32 beside them), except rows on parameter servers
    ema_decay: float = 0.0
    valid_fraction: float = 0.05  # training rows held out to pick the epoch and stop early (0: none)
    valid_max_rows: int = 10_000  # at most this many held-out rows: enough to rank epochs, cheap to score
    patience: int = 0  # stop after this many evaluations without a better validation score (0: never)
    # the epoch kept: the latest whose validation score is within this many standard errors of the best one
    # (sqrt(p (1 - p) / rows) at the best score p): of epochs the held-out rows cannot tell apart, the one
    # trained longer; 0 keeps the best epoch itself (the later of equals)
    keep_within_se: float = 1.0
    # replay the head's forward and backward from a CUDA graph (the same kernels, without launching them one
    # by one): auto (the default) where the step can be captured (a CUDA device, one process, a head whose
    # step has static shapes and no host sync), eager elsewhere or where the capture fails; on: an error
    # where it cannot be; off: every step eager
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    # write checkpoints and kept weights in a thread while the next steps run, from a copy in host memory,
    # where the run is one process whose state is all in tensors and the copy takes at most an eighth of the
    # available host memory; false: the steps wait for each save
    background_saves: bool = True

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "keep_checkpoints", "eval_every", "log_every", "valid_max_rows")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: expected > 0, got {getattr(self, name)}")
        for name in (
            "checkpoint_every",
            "num_workers",
            "stop_after_steps",
            "grad_clip",
            "cpu_threads",
            "patience",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"train.valid_fraction: expected a value in [0, 1), got {self.valid_fraction}")
        if not (math.isfinite(self.keep_within_se) and self.keep_within_se >= 0):
            raise ConfigError(f"train.keep_within_se: expected a number >= 0, got {self.keep_within_se}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: expected a value in [0, 1), got {self.ema_decay}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ConfigError(f"train.cuda_graph: expected auto, on or off, got {self.cuda_graph!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on the test set."""

    ks: tuple[int, ...] = (1, 3, 5)  # P@k, nDCG@k, PSP@k, ... at these k
    propensity_a: float = (
        0.55  # Jain et al. 2016 propensity model A (0.55 general, 0.5 Wikipedia, 0.6 Amazon)
    )
    propensity_b: float = 1.5  # and B (1.5 general, 2.6 Amazon)
    batch_size: int = 1024  # samples per scoring batch
    filter_labels: str = ""  # XMC repository filter file ('doc_id label_id' lines) removed from scoring
    verification: tuple[str, ...] = ()  # face .bin pair sets (lfw.bin, ...) scored at every evaluation

    def __post_init__(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"eval.ks: expected one or more positive integers, got {list(self.ks)}")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size: expected > 0, got {self.batch_size}")


@dataclass(frozen=True)
class DistributedConfig:
    """Training over several processes (``torchrun --nproc-per-node N -m megaclass train ...``)."""

    encoder: Literal["ddp", "fsdp2"] = "ddp"  # fsdp2: shard the encoder's parameters too (large encoders)
    shard_head: Literal["auto", "always", "never"] = "auto"  # auto: split classes over ranks when N > 1
    timeout_s: float = 600.0  # a rank waiting longer than this on a collective raises instead of hanging

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"distributed.timeout_s: expected > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: data, encoder, head, optimizer, loop and evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: model_config({}))  # {type: mlp, ...}
    head: HeadConfig = field(default_factory=lambda: head_config({}))  # {type: dense, ...}
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def config_from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Parse a plain mapping (YAML) into a :class:`RunConfig`; missing keys take their defaults. The model
    and head sections are parsed by their registries (a name may set its own defaults: ``partial_fc``)."""
    data = dict(data or {})
    model_section = data.pop("model", None)
    head_section = data.pop("head", None)
    for name, section in (("model", model_section), ("head", head_section)):
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a mapping like {{type: ...}}, got {section!r}")
    config = from_dict(RunConfig, data)
    if config.data.featurizer:
        featurizer_config(config.data.featurizer)
    return dataclasses.replace(
        config, model=model_config(model_section), head=head_config(head_section or {})
    )


def featurizer_config(options: dict[str, Any]) -> Any:
    """The text featuriser's config from ``data.featurizer`` options, or None for its defaults."""
    if not options:
        return None
    from megaclass.data.featurizer import FeaturizerConfig

    return from_dict(FeaturizerConfig, options, where="data.featurizer")


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The plain-data form of ``config`` (for YAML and JSON); :func:`config_from_dict` inverts it."""
    return to_dict(config)


def _presets_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "presets")


def from_preset(name: str) -> RunConfig:
    """The named recipe shipped in ``megaclass/train/presets/<name>.yaml``.

    >>> from_preset("xmc-mlp").model.type
    'mlp'
    """
    path = os.path.join(_presets_dir(), f"{name}.yaml")
    if not os.path.exists(path):
        known = sorted(file[:-5] for file in os.listdir(_presets_dir()) if file.endswith(".yaml"))
        raise ConfigError(f"preset {name!r}: unknown; known: {', '.join(known)}")
    return load_config(path)


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    preset: str | None = None,
    head: str | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from a preset, a YAML file, a head name, then ``key=value`` overrides.

    Args:
        path: a YAML file whose sections are those of :class:`RunConfig`; None for the defaults.
        overrides: ``a.b=value`` strings; values are parsed as YAML (``train.epochs=3``, ``eval.ks=[1,5]``).
        preset: a preset name to start from.
        head: a registered head name; a head section of another type is replaced by ``{type: head}``.
    """
    return load_config_and_keys(path, overrides, preset=preset, head=head)[0]


def load_config_and_keys(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    preset: str | None = None,
    head: str | None = None,
) -> tuple[RunConfig, frozenset[str]]:
    """As :func:`load_config`, with the dotted keys the user set: every key of the preset (a whole recipe),
    those of the YAML file still in force, ``head.type`` for ``head`` and the overrides' keys. A recipe
    resolved from the data (:mod:`megaclass.train.recipes`) fills only the other keys.

    >>> config, keys = load_config_and_keys(overrides=["optim.head.lr=0.01"], head="sparse")
    >>> sorted(keys)
    ['head.type', 'optim.head.lr']
    """
    data: dict[str, Any] = config_to_dict(from_preset(preset)) if preset else {}
    from_file: list[str] = []
    if path is not None:
        loaded = _read_yaml(path)
        from_file = _leaf_keys(loaded)
        _merge(data, loaded)
    if head is not None:
        section = data.get("head") if isinstance(data.get("head"), dict) else {}
        same = section.get("type", "dense") == head
        data["head"] = {**section, "type": head} if same else {"type": head}  # head.type is the user's
    parsed = [parse_override(text) for text in overrides]
    # a type first (the others then set options of the new type): merged as a YAML file's, a changed one
    # replaces its section, whose options were the old type's
    for keys, value in sorted(parsed, key=lambda override: override[0][-1] != "type"):
        if keys[-1] == "type":
            _merge(data, functools.reduce(lambda inner, key: {key: inner}, reversed(keys), value))
        else:
            set_path(data, keys, value)
    try:
        config = config_from_dict(data)
    except ConfigError as error:  # an unknown key the file gave: name the file
        given = error.key is not None and any(
            key == error.key or key.startswith(f"{error.key}.") for key in from_file
        )
        if not given:
            raise
        raise ConfigError(f"{os.fspath(path)}: {error}", key=error.key) from None
    return config, frozenset(_leaf_keys(data))


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ConfigError(f"{os.fspath(path)}: invalid YAML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"{os.fspath(path)}: cannot read the config file: {detail}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{os.fspath(path)}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths of the values (not sections) in ``data``; a section given as a scalar is a leaf."""
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    """Merge ``update`` into ``base`` recursively; a changed registry ``type`` replaces the whole section."""
    for key, value in update.items():
        current = base.get(key)
        same_type = not isinstance(value, dict) or value.get("type", None) in (
            None,
            (current or {}).get("type"),
        )
        if isinstance(current, dict) and isinstance(value, dict) and same_type:
            _merge(current, value)
        else:
            base[key] = value


def load_config_file(path: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` saved as YAML at ``path`` (a run's ``config.yaml``)."""
    import yaml

    with open(path, encoding="utf-8") as file:
        return config_from_dict(yaml.safe_load(file))
