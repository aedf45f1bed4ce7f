"""Recipes resolved from the data: what ``megaclass train`` runs for the settings a user did not give.

``megaclass train --train X --test Y --out Z`` opens the data, reads its :class:`DataFacts` and calls
:func:`resolve_recipe`: the shipped preset that suits the inputs and the head and encoder types
(``presets/*.yaml``) fills every key the user did not set, then :func:`resolve_auto` replaces the ``auto``
values that depend on the data (``head.loss``, ``data.label_feature_dim``). Both are pure functions of the
config, the explicit keys and the data facts, never of the device: the same run resolves to the same config on
the CPU and a GPU, and a resumed run to the config it was started with.

An MLP recipe over sparse rows (``xmc-mlp``, ``xmc-mlp-hinge``, ``spartex``) trains long enough for each
label to see about 200 positive rows, 300 under the sparse head: its preset's epochs (tuned on a set with 150
positives a label an epoch) or more where labels have fewer positives, up to 30 (:func:`epochs_for`). The
validation split keeps the best epoch. (On a planted set with 11 positives a label an epoch, 18 epochs
against 9 gain 1.7 points P@1 under the dense head; 27 against 18 gain the sparse head 0.3 and 0.5 point P@1
on the set's BoW and text versions and lose the dense head 3.7 points P@5: benchmarks/RESULTS.md.) Over
featurised text it drops 30% of each row's n-grams in training (``model.input_dropout``).

>>> facts = DataFacts("bow", True, 15_000, num_classes=7_500, num_features=10_000, num_positives=75_000)
>>> config, description = resolve_recipe(RunConfig(), frozenset(), facts)
>>> description.split("; ")[0]
'recipe: xmc-mlp-hinge (BoW, multi-label, 15,000 documents, 7,500 labels, 10 positives a label'
>>> description.split("; ")[1:]
['20 epochs)', 'explicit settings win']
>>> config.optim.encoder.lr, config.head.loss, config.train.epochs
(0.002, 'squared_hinge', 20)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from megaclass.heads import LabelFeatures, head_class
from megaclass.heads.dense import DenseHeadConfig
from megaclass.heads.selected import SelectedHeadConfig
from megaclass.heads.sparse import SparseHeadConfig
from megaclass.models.mlp import MLPConfig
from megaclass.schema import covered, get_path, set_path
from megaclass.train.config import AUTO_LABEL_FEATURE_DIM, RunConfig, config_from_dict, config_to_dict

__all__ = [
    "DataFacts",
    "epochs_for",
    "recipe_settings",
    "resolve_auto",
    "resolve_recipe",
    "sampled_head_batch",
    "with_row_optimizer_of",
]

_INPUT_NAMES = {"bow": "BoW", "text": "text", "tokens": "tokens", "images": "images"}
# the MLP recipes, and the positive rows each label sees over their runs (epochs_for): a sparse head's label
# trains its few weights, rewired over the first two thirds of the run, and goes on gaining where a dense head
# overfits
_POSITIVES_PER_LABEL = {"xmc-mlp": 200, "xmc-mlp-hinge": 200, "spartex": 300}
_MAX_EPOCHS = 30
_MIN_SAMPLED_BATCH = 32  # sampled_head_batch lowers a batch no further
# an MLP recipe over featurised text drops this share of each row's n-grams in training: word and character
# n-grams give many columns to a word, so a row stays legible without some of them (+0.3 point P@1 on two text
# sets; on BoW rows, a column a word, it loses 2.7: benchmarks/RESULTS.md)
_TEXT_INPUT_DROPOUT = 0.3
# a sampled head's rows under an MLP recipe: SGD with momentum, HF-Softmax's rule. AdamW scales every step of
# a row to about its lr, however small the gradient: a negative row drawn now and then takes full-size steps
# where the dense softmax would barely move it (5% active: 2.2 to 2.3 points top-1 under dense with AdamW
# rows, 0.8 to 1.9 above with these, on a planted set and a deb-files slice; benchmarks/RESULTS.md)
_SGD_ROWS = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
# what the recipe line of a TF-IDF run over text points to: the pretrained encoder fine-tuned, 1.0 and 3.4
# points P@1 above the TF-IDF MLP on two natural-language sets (deb-tags' texts, deb-depends;
# benchmarks/RESULTS.md). Not the default: its run is about 13 times as long on 2 CPU cores, and a recipe is
# the same on every device.
_TRANSFORMER_HINT = (
    "natural-language text: --set model.type=transformer fine-tunes MiniLM (higher P@1, slower)"
)


@dataclass(frozen=True)
class DataFacts:
    """What a recipe is chosen by: the kind of inputs and the training file's shape."""

    inputs: Literal["bow", "text", "tokens", "images"]  # sparse BoW rows, featurised text, token ids, images
    multilabel: bool
    num_rows: int  # training rows (documents or images)
    num_classes: int
    num_features: int  # columns of sparse rows, the vocabulary of token ids; 0 for images
    num_positives: int  # label entries of the training rows (num_rows for one-label data)

    @classmethod
    def of(cls, dataset: Any) -> DataFacts:
        """The facts of an opened data set (:func:`megaclass.data.loaders.open_dataset`)."""
        kind = dataset.input_spec.kind
        if kind == "sparse":
            inputs = "text" if dataset.featurizer is not None else "bow"
        else:
            inputs = "tokens" if kind == "tokens" else "images"
        return cls(
            inputs=inputs,
            multilabel=bool(dataset.multilabel),
            num_rows=len(dataset),
            num_classes=int(dataset.num_classes),
            num_features=int(dataset.input_spec.num_features),
            num_positives=int(dataset.label_counts().sum()),
        )

    @property
    def positives_per_label(self) -> float:
        """Positive rows a label has in one epoch, on average."""
        return self.num_positives / max(1, self.num_classes)

    def describe(self) -> str:
        """``BoW, multi-label, 15,000 documents, 7,500 labels, 10 positives a label``."""
        rows = "images" if self.inputs == "images" else "documents"
        per_label = self.positives_per_label
        positives = f"{per_label:,.0f}" if per_label >= 10 else f"{per_label:.2g}"
        return (
            f"{_INPUT_NAMES[self.inputs]}, {'multi-label' if self.multilabel else 'multi-class'}, "
            f"{self.num_rows:,} {rows}, {self.num_classes:,} labels, "
            f"{positives} positives a label"
        )


def epochs_for(facts: DataFacts, preset_epochs: int, positives_per_label: int) -> int:
    """Epochs of an MLP recipe: enough for each label to see about ``positives_per_label`` positive rows, at
    least the preset's and at most 30.

    >>> facts = DataFacts("bow", True, 20_000, num_classes=5_000, num_features=1, num_positives=55_000)
    >>> epochs_for(facts, 3, 200), epochs_for(facts, 3, 300)
    (19, 28)
    >>> epochs_for(dataclasses.replace(facts, num_positives=10**6), 3, 200)
    3
    """
    wanted = math.ceil(positives_per_label / max(facts.positives_per_label, 1e-9))
    return max(preset_epochs, min(_MAX_EPOCHS, wanted))


def sampled_head_batch(batch: int, active_classes: int, positives_per_row: float) -> int:
    """A sampled head's batch: one whose positives take at most about half of its ``active_classes``
    (rounded to a power of two, at least 32), so that the classes it samples are not all the batch's own.

    With 5% of 5,000 classes active (250) a batch of 256 brings about 250 distinct positives: the softmax is
    then over the batch's own classes alone; a batch of 128 leaves half the budget to other classes (on a
    planted 5,000-class set: 1.0 point top-1 more, three seeds, benchmarks/RESULTS.md).

    >>> [sampled_head_batch(256, active, per_row) for active, per_row in [(250, 1.0), (838, 1.0), (250, 4.0)]]
    [128, 256, 32]
    """
    room = active_classes / (2 * max(1.0, positives_per_row))  # rows whose positives fill half the budget
    if batch <= room:
        return batch
    return min(batch, max(_MIN_SAMPLED_BATCH, 2 ** round(math.log2(max(1.0, room)))))


@functools.cache
def _preset(name: str) -> dict[str, Any]:
    """The settings written in ``presets/<name>.yaml`` (only those: defaults are not settings)."""
    import yaml

    path = os.path.join(os.path.dirname(__file__), "presets", f"{name}.yaml")
    with open(path, encoding="utf-8") as file:
        return yaml.safe_load(file)


def recipe_settings(config: RunConfig, facts: DataFacts) -> tuple[str, str, dict[str, Any]]:
    """The recipe for ``facts`` under ``config``'s encoder and head types: the shipped preset it starts from,
    what it changes of it (``""``: nothing; the recipe's name is ``<preset> with <change>``) and its settings.

    Images: ``hfsoftmax``. A transformer encoder: ``xmc-transformer`` (its own encoder lr, warm-up and
    clipping), with the ``spartex`` head section under a sparse head and the squared hinge for multi-label
    rows under the dense head (as ``xmc-mlp-hinge``: on deb-tags text +0.3 point P@1 and +0.5 P@5 over BCE,
    benchmarks/RESULTS.md). Sparse rows (BoW, text) under the MLP:
    ``spartex`` with a sparse head (intermediate layer, auxiliary loss, each label its own inputs);
    ``xmc-mlp-hinge`` for multi-label rows under the dense head (each label scored apart, as one-vs-rest);
    else ``xmc-mlp`` (a softmax: one-label data, the sampled heads, whose rows train by SGD with momentum).
    """
    if facts.inputs == "images":
        return "hfsoftmax", "", copy.deepcopy(_preset("hfsoftmax"))
    sparse_head = config.head.type == "sparse"
    one_vs_rest = facts.multilabel and config.head.type == "dense"  # each label scored apart
    if config.model.type == "transformer":
        settings = copy.deepcopy(_preset("xmc-transformer"))
        if sparse_head:
            settings["head"] = copy.deepcopy(_preset("spartex")["head"])
            return "xmc-transformer", "the spartex head", settings
        if one_vs_rest:
            settings["head"]["loss"] = _preset("xmc-mlp-hinge")["head"]["loss"]
            return "xmc-transformer", "the squared hinge", settings
        return "xmc-transformer", "", settings
    if sparse_head:
        preset = "spartex"
    elif one_vs_rest:
        preset = "xmc-mlp-hinge"
    else:
        preset = "xmc-mlp"
    settings = copy.deepcopy(_preset(preset))
    if isinstance(config.head, SelectedHeadConfig):
        settings["optim"]["head"] = dict(_SGD_ROWS)
        return preset, "SGD rows", settings
    return preset, "", settings


def _mlp_head_group(kind: str) -> dict[str, Any]:
    """The head's optimizer settings of an MLP recipe for optimizer ``kind`` that the user chose over the
    recipe's: SGD rows' (:data:`_SGD_ROWS`), ``xmc-mlp``'s AdamW, or that kind with its defaults."""
    if kind == _SGD_ROWS["name"]:
        return dict(_SGD_ROWS)
    adamw = _preset("xmc-mlp")["optim"]["head"]
    return dict(adamw) if adamw["name"] == kind else {"name": kind}


def resolve_recipe(
    config: RunConfig, explicit_keys: Collection[str], facts: DataFacts
) -> tuple[RunConfig, str]:
    """``config`` with every key outside ``explicit_keys`` (dotted, as
    :func:`~megaclass.train.config.load_config_and_keys` gives them) taken from the recipe for ``facts``, and
    its ``auto`` values resolved (:func:`resolve_auto`); returns it and the one-line description to print.

    A recipe's ``model`` or ``head`` section is left out when the user chose another type for it; an MLP
    recipe's ``optim.head`` group, when the user named another optimizer for it, is that optimizer's
    (:func:`_mlp_head_group`), never the settings of the one it replaced.
    """
    preset, change, settings = recipe_settings(config, facts)
    why = facts.describe()
    mlp_recipe = preset in _POSITIVES_PER_LABEL
    if mlp_recipe and not covered("train.epochs", explicit_keys):
        epochs = epochs_for(facts, settings["train"]["epochs"], _POSITIVES_PER_LABEL[preset])
        settings["train"]["epochs"] = epochs
        why += f"; {epochs} epochs"
    user = config_to_dict(config)
    for section in ("model", "head"):
        recipe_type = settings.get(section, {}).get("type")
        if covered(f"{section}.type", explicit_keys) and recipe_type != user[section]["type"]:
            del settings[section]
    head_kind = user["optim"]["head"]["name"]
    if (
        mlp_recipe
        and covered("optim.head.name", explicit_keys)
        and settings["optim"]["head"]["name"] != head_kind
    ):
        settings["optim"]["head"] = _mlp_head_group(head_kind)  # not the other optimizer's lr and decay
        change = ""  # the only change of an MLP recipe is its SGD rows: the user's optimizer replaces them
    text_mlp = mlp_recipe and facts.inputs == "text" and "model" in settings
    if text_mlp and not covered("model.input_dropout", explicit_keys):
        settings["model"]["input_dropout"] = _TEXT_INPUT_DROPOUT
        why += f"; input dropout {_TEXT_INPUT_DROPOUT}"
    for key in sorted(explicit_keys):
        set_path(settings, key.split("."), copy.deepcopy(get_path(user, key.split("."))))
    resolved = config_from_dict(settings)
    row_optimizer_set = covered("head.optimizer", explicit_keys, inside=True)
    if isinstance(resolved.head, SelectedHeadConfig) and not row_optimizer_set:
        resolved = dataclasses.replace(resolved, head=with_row_optimizer_of(resolved.head, resolved))
    if isinstance(resolved.head, SelectedHeadConfig) and not covered("train.batch_size", explicit_keys):
        active = resolved.head.active_classes(facts.num_classes)
        per_row = facts.num_positives / max(1, facts.num_rows)
        batch = sampled_head_batch(resolved.train.batch_size, active, per_row)
        if active < facts.num_classes and batch != resolved.train.batch_size:  # else every class is active
            resolved = dataclasses.replace(
                resolved, train=dataclasses.replace(resolved.train, batch_size=batch)
            )
            why += f"; batch {batch}, about half the {active:,} active classes"
    name = f"{preset} with {change}" if change else preset
    description = f"recipe: {name} ({why}); explicit settings win"
    if text_mlp and not covered("model.type", explicit_keys):
        description += f"; {_TRANSFORMER_HINT}"
    return resolve_auto(resolved, facts), description


def with_row_optimizer_of(head: SelectedHeadConfig, config: RunConfig) -> SelectedHeadConfig:
    """``head`` with the row optimizer that ``optim.head`` names (kind, momentum, betas, weight decay),
    wherever its rows live: parameter servers must run that optimizer (``serve --optimizer``), and a store
    on servers running another refuses to start.

    The trainer hands a row-sparse head ``optim.head``'s scheduled lr, so its rows must be trained by that
    optimizer: a recipe tuned for AdamW at lr 0.005 gives an SGD row optimizer about 100x too small a step
    (on deb-tags, SGD shards under the default recipe: P@1 0.7910 against 0.8066 with AdamW shards).
    """
    group = config.optim.head
    return dataclasses.replace(
        head,
        optimizer=dataclasses.replace(
            head.optimizer,
            kind=group.name,
            momentum=group.momentum if group.name == "sgd" else head.optimizer.momentum,
            betas=group.betas,
            weight_decay=group.weight_decay,
        ),
    )


def resolve_auto(config: RunConfig, facts: DataFacts) -> RunConfig:
    """``config`` with the ``auto`` values that the data decides written out: ``head.loss`` (``bce``
    multi-label, ``softmax`` multi-class), ``data.label_feature_dim`` (256 when the head uses PIFA label
    vectors and the inputs can make them, else 0) and an MLP's ``model.sparse_grad`` (from its number of
    input features). Device-dependent ``auto`` values (``train.device``, kernel choices) stay as they are."""
    head = config.head
    if isinstance(head, (DenseHeadConfig, SparseHeadConfig)) and head.loss == "auto":
        head = dataclasses.replace(head, loss="bce" if facts.multilabel else "softmax")
    data = config.data
    if data.label_feature_dim == "auto":
        wanted = head_class(head).label_features(head) is not LabelFeatures.UNUSED
        dim = AUTO_LABEL_FEATURE_DIM if wanted and facts.inputs != "images" else 0
        data = dataclasses.replace(data, label_feature_dim=dim)
    model = config.model
    if isinstance(model, MLPConfig) and model.sparse_grad == "auto":
        model = dataclasses.replace(model, sparse_grad=model.resolved_sparse_grad(facts.num_features))
    return dataclasses.replace(config, model=model, head=head, data=data)
