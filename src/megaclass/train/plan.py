"""The memory a training run will need on the GPU and in host memory, by part, before anything is allocated.

    megaclass plan --train train_bow.txt --head selected --set head.store=host \\
        --gpu-memory 139 --host-memory 128
    megaclass train --train train_bow.txt --test test_bow.txt --out runs/x --dry-run

The data's shape is read cheaply (:func:`read_data_shape`: the BoW header and a sample of lines, never the
whole file parsed; a text file's vocabulary counted by the featuriser on a sample and extrapolated by Heaps'
law); the config is resolved from it as ``megaclass train`` resolves it; :func:`plan_run` adds up each part as
a pure function of the two: the head's parts come from the head class
(:meth:`~megaclass.heads.base.Head.planned_bytes`), the encoder's from a build on the ``meta`` device (no
memory) and one forward pass there, whose saved tensors are the activations the backward keeps (and one
without gradients over an evaluation batch, whose tensors live at once are an evaluation's), in the
step's dtypes: float32, or on a GPU under ``train.bf16`` those CUDA's autocast gives them, its attention as
the GPU's fused kernels keep it (a transformer on text: built on the CPU and run on one document as long as
the data's longest, the widest batch a run pads to). A run's peak is what it holds all along
(``steady``), plus what work in the background may hold at any time (an index's cold build), plus the largest
of what a training step, an evaluation, a checkpoint save, the data loading or building the modules (beside
the held parts made by then) hold on top of it; the process's own memory (the interpreter and its libraries)
is one of the held parts. The run folder's disk is the checkpoints kept, one more while a save runs (no more
than the run writes), and the best and final weights (:meth:`MemoryPlan.disk_bytes`).
:meth:`MemoryPlan.refusal` names the part that does not fit, by how much, and the setting that shrinks it.

The plan is one process's: a run of ``N`` processes is planned as its rank 0, with its share of the global
batch and, where the head is split by class over the ranks, its share of the classes.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megaclass.data.featurizer import FeaturizerConfig, TextFeaturizer
from megaclass.data.images import open_face_dataset
from megaclass.data.lf_json import parse_lf_json_lines
from megaclass.data.loaders import detect_format
from megaclass.data.tokenized import tokenize_texts
from megaclass.data.xmc import (
    MAX_ID,
    TEXT_LABEL_IDS,
    label_field_holds_names,
    parse_bow_header,
    read_label_names,
)
from megaclass.distributed.info import DistInfo
from megaclass.distributed.parallel import rank_batch_size, shards_head
from megaclass.errors import DataFormatError
from megaclass.heads import HeadConfig, HeadContext, head_class
from megaclass.heads.base import PlanRequest
from megaclass.heads.selected import SelectedHeadConfig
from megaclass.models import build_model
from megaclass.models.mlp import MLPConfig
from megaclass.models.text import load_tokenizer, reads_tokens
from megaclass.state_io import STREAM_CHUNK_BYTES, format_bytes, free_bytes
from megaclass.train.checkpoint import saves_in_background
from megaclass.train.config import RunConfig, TrainConfig, featurizer_config
from megaclass.train.graphs import whole_step_blocker
from megaclass.train.recipes import DataFacts
from megaclass.train.validation import held_out_count

__all__ = [
    "DataShape",
    "MemoryPlan",
    "PlanPart",
    "inference_bytes",
    "machine_memory",
    "plan_run",
    "plan_device_type",
    "read_data_shape",
    "saved_tensor_bytes",
]

GIB = 1 << 30
Phase = Literal["steady", "background", "step", "rewiring", "evaluation", "checkpoint", "loading", "setup"]
_HELD: tuple[Phase, ...] = ("steady", "background")  # all along, or at any time (an index's cold build)
_TRANSIENT: tuple[Phase, ...] = ("step", "rewiring", "evaluation", "checkpoint", "loading", "setup")
_SAMPLE_BYTES = 4 << 20  # decompressed bytes of lines sampled for the per-row counts and a vocabulary
_READ_BYTES = 16 << 20  # bytes read at once when counting a text file's lines
_CUDA_CONTEXT = 1 << 29  # the CUDA context and the caching allocator's slack on the GPU
# the process's own host memory, measured on a CPU run of 500 documents, 100 labels and D 32 (torch 2.13, CPU
# build; its planned parts: 1 MiB): 225 MiB once `megaclass train` has imported what it needs, before its
# data (the interpreter and PyTorch; 240 planned, room for another build of the same), and 420 MiB at its
# end: the libraries the run loads after building its modules (Triton and SymPy through PyTorch, the
# report's Matplotlib) the rest
_PROCESS_HOST = 240 << 20
_LIBRARIES_HOST = 180 << 20
# the CUDA runtime, its libraries and compiled kernels in host memory, the process's own parts
# (_PROCESS_HOST, _LIBRARIES_HOST) included: a selected-head run of 10^5 classes on an H100 held 1.61 GiB
# through its steps and 1.82 GiB through its first evaluation, about 20 MiB of it planned parts and 0.13 GiB
# page-locked staging blocks, which the plan counts apart (`checkpoint staging block`); a sparse-head run
# held 0.2 GiB less (benchmarks/RESULTS.md, "the plan at 10^7 classes, and the host peak by phase", and
# "Host rows mapped for the GPU, second run")
_CUDA_HOST = 14 << 27
# of it, the context's host part, made before the data is read (the plan asks the GPU's memory first): 0.74
# GiB after a process's first CUDA call, the interpreter and PyTorch included; the rest comes with the
# first steps (cuBLAS, compiled kernels)
_CUDA_CONTEXT_HOST = 1 << 29
_MORE_HOST = "a host with more memory"  # the setting of a part only more host memory holds
_WEIGHTS = ("encoder weights", "head weights")
_CHECKPOINTED = (*_WEIGHTS, "encoder optimizer state", "head optimizer state", "head index", "weight average")


# ------------------------------------------------------------------------------------------- data shape


@dataclass(frozen=True)
class DataShape:
    """What the memory of a data set depends on, read without parsing it.

    Args:
        path: the file.
        inputs: ``bow`` (XMC BoW rows), ``text`` (``labels<TAB>text`` or LF JSON, featurised or tokenised) or
            ``images`` (face images: a ``.rec``, an image folder or list).
        num_rows: documents or images.
        num_features: columns of the feature rows (text: the featuriser's bound; images: their side).
        num_labels: ``C``.
        nonzeros_per_row: mean stored features a row (text: the sample's distinct n-grams a row, an upper
            bound where the file is larger than the sample).
        labels_per_row: mean labels a row.
        multilabel: whether a sampled row holds other than one label.
        text_bytes: the decompressed file's size (estimated from the sample when gzipped BoW).
        longest_line_bytes: text: the file's longest line, in bytes (0: not read).
        texts: text: every document's text (in the sample's order) where the sample holds the whole file,
            else none.
    """

    path: str
    inputs: Literal["bow", "text", "images"]
    num_rows: int
    num_features: int
    num_labels: int
    nonzeros_per_row: float
    labels_per_row: float
    multilabel: bool
    text_bytes: int
    longest_line_bytes: int = 0
    texts: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def facts(self, *, tokens: bool = False) -> DataFacts:
        """The facts a recipe is chosen by (:func:`megaclass.train.recipes.resolve_recipe`); ``tokens``: text
        read as token ids (a transformer encoder)."""
        return DataFacts(
            "tokens" if tokens and self.inputs == "text" else self.inputs,
            self.multilabel,
            self.num_rows,
            self.num_labels,
            0 if self.inputs == "images" else self.num_features,
            num_positives=round(self.num_rows * self.labels_per_row),
        )

    def array_bytes(self, tokens_per_row: int | None = None) -> int:
        """Bytes of the parsed rows in memory: CSR features (int64 offsets, int32 ids, float32 values), or
        with ``tokens_per_row`` token ids (int64 offsets, at most that many int32 ids a row), and labels
        (int64 offsets, int32 ids)."""
        rows = self.num_rows
        if self.inputs == "images":  # decoded a batch at a time: the record keys and labels stay
            return rows * (8 + 8)
        if tokens_per_row is None:
            features = (rows + 1) * 8 + round(rows * self.nonzeros_per_row) * 8
        else:
            features = (rows + 1) * 8 + rows * tokens_per_row * 4
        labels = (rows + 1) * 8 + round(rows * self.labels_per_row) * 4
        return features + labels


def _open(path: str):
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _sample_lines(path: str, *, skip_header: bool) -> tuple[list[bytes], list[int], bool]:
    """The first non-blank lines of ``path`` (about :data:`_SAMPLE_BYTES` of them), their 1-based line
    numbers and whether they are all of it."""
    with _open(path) as handle:
        if skip_header:
            handle.readline()
        lines = handle.readlines(_SAMPLE_BYTES)
        whole = not handle.read(1)
    first = 1 + skip_header
    kept = [(line, first + i) for i, line in enumerate(lines) if line.strip()]
    return [line for line, _ in kept], [number for _, number in kept], whole


def _count_and_sample_lines(path: str) -> tuple[int, int, int, list[bytes], np.ndarray, bool]:
    """``(lines, decompressed bytes, the longest line's bytes, sample, its line numbers, whole)`` of
    ``path``, streamed in pieces (no line is parsed): the sample is a uniform one of its non-blank lines
    (seeded, in a random order), about :data:`_SAMPLE_BYTES` of them; ``whole``: it holds all of them. Each
    line draws a priority and the sample keeps the lowest, as many as fit in the bytes."""
    rng = np.random.default_rng(0)
    kept: list[bytes] = []
    priorities, sizes, numbers = np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)  # numbers: 1-based
    cutoff = 1.0  # a line drawing this or more cannot enter the sample any more
    lines = size = longest = 0
    rest, last = b"", b"\n"
    with _open(path) as handle:
        while True:
            piece = handle.read(_READ_BYTES)
            first = lines + 1  # the number of the block's first line
            lines += piece.count(b"\n")
            size += len(piece)
            last = piece[-1:] or last
            block = rest + piece
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))  # (lines of the block,)
            if not piece and block:  # the last line, without a newline
                ends = np.append(ends, len(block))
            starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
            rest = block[ends[-1] + 1 :] if ends.size else block
            longest = max(longest, int((ends - starts).max(initial=0)))
            drawn = rng.random(ends.size)
            entering = np.flatnonzero((drawn < cutoff) & (ends > starts))
            if entering.size:
                held = len(kept)
                priorities = np.concatenate([priorities, drawn[entering]])
                sizes = np.concatenate([sizes, ends[entering] - starts[entering] + 1])
                numbers = np.concatenate([numbers, first + entering])
                order = np.argsort(priorities, kind="stable")
                count = max(1, int(np.searchsorted(np.cumsum(sizes[order]), _SAMPLE_BYTES, side="right")))
                if count < order.size:
                    cutoff = float(priorities[order[count]])
                order = order[:count]
                kept = [
                    kept[i] if i < held else block[starts[entering[i - held]] : ends[entering[i - held]]]
                    for i in order.tolist()
                ]
                priorities, sizes, numbers = priorities[order], sizes[order], numbers[order]
            if not piece:
                break
    blank = [i for i, line in enumerate(kept) if not line.strip()]
    if blank:  # whitespace only
        kept, numbers = [line for line in kept if line.strip()], np.delete(numbers, blank)
    return lines + (last != b"\n"), size, longest, kept, numbers, cutoff == 1.0


def _labels_of(fields: list[bytes], numbers: Sequence[int], path: str, expected: str) -> list[list[int]]:
    """The ids of each sampled line's ``l1,l2,...`` field (``numbers``: the lines' numbers in the file). The
    plan reads a file before its reader does: a field of other text (``expected`` words it as the file's
    reader does) or an id past :data:`~megaclass.data.xmc.MAX_ID` raises DataFormatError naming the first
    such line of the sample."""
    labels, bad = [], []
    for ids_field, number in zip(fields, numbers, strict=True):
        try:
            ids = [int(label) for label in ids_field.split(b",") if label.strip()]
        except ValueError:
            ids = []
            bad.append((int(number), f"{expected}, got {ids_field[:80].decode('utf-8', 'replace')!r}"))
        if ids and max(ids) > MAX_ID:
            bad.append((int(number), f"label id {max(ids)} too large: expected at most {MAX_ID}"))
        labels.append(ids)
    if bad:
        number, problem = min(bad)
        raise DataFormatError(path, problem, line=number)
    return labels


def _labels_are_names(path: str) -> bool:
    """Whether the text file ``path`` names its labels, as its reader decides: by its first labelled line
    (among its first :data:`_SAMPLE_BYTES`)."""
    with _open(path) as handle:
        for line in handle.readlines(_SAMPLE_BYTES):
            labels_field = line.split(b"\t", 1)[0] if b"\t" in line else b""
            if labels_field.strip():
                return label_field_holds_names(labels_field)
    return False


def read_data_shape(
    path: str | os.PathLike, *, num_classes: int = 0, featurizer: dict | None = None
) -> DataShape:
    """The shape of the XMC BoW, text or LF JSON file or the face images ``path``: a BoW header gives
    documents, features and labels; the first lines give the nonzeros and labels per row; a text or JSON
    file's lines are counted (not parsed); face images give their record index (or list) and first image.

    Args:
        num_classes: ``data.num_classes`` (0: the file's).
        featurizer: ``data.featurizer`` options (text data: the feature bound).

    Raises:
        DataFormatError: the format is not one of these, or the sample is malformed.
    """
    path = os.fspath(path)
    data_format = detect_format(path)
    if data_format == "xmc-bow":
        sample = _bow_sample(path)
    elif data_format in ("xmc-text", "lf-json"):
        sample = _text_sample(path, data_format, featurizer)
    else:  # face images: the record index read (one read an identity), no image decoded but the first
        dataset = open_face_dataset(path)
        return DataShape(
            path=path,
            inputs="images",
            num_rows=len(dataset),
            num_features=int(dataset.image_size or 0),
            num_labels=num_classes or dataset.num_classes,
            nonzeros_per_row=0.0,
            labels_per_row=1.0,
            multilabel=False,
            text_bytes=0,
        )
    labels = sample.labels
    return DataShape(
        path=path,
        inputs=sample.inputs,
        num_rows=sample.num_rows,
        num_features=int(sample.num_features),
        num_labels=num_classes or sample.num_labels,
        nonzeros_per_row=sample.nonzeros_per_row,
        labels_per_row=sum(len(row) for row in labels) / max(len(labels), 1),
        multilabel=any(len(row) != 1 for row in labels),
        text_bytes=int(sample.text_bytes),
        longest_line_bytes=sample.longest_line_bytes,
        texts=tuple(sample.texts) if sample.whole else (),
    )


@dataclass(frozen=True)
class _Sample:
    """What :func:`read_data_shape` reads of a BoW or text file: its counts and its sampled lines' labels."""

    inputs: Literal["bow", "text"]
    num_rows: int
    num_features: int
    num_labels: int
    nonzeros_per_row: float
    labels: list[list]  # the sampled rows' label ids (or names)
    text_bytes: int
    longest_line_bytes: int = 0
    texts: list[str] = field(default_factory=list)  # a text file's sampled documents
    whole: bool = False  # whether the sample is the whole file (then ``texts`` are all its documents)


def _bow_sample(path: str) -> _Sample:
    """A BoW file's header and a sample of its lines: nonzeros and label ids per row."""
    with _open(path) as handle:
        header = handle.readline()
    (num_rows, num_features, num_labels), _ = parse_bow_header(path, header)  # checked as the reader does
    lines, numbers, whole = _sample_lines(path, skip_header=True)
    fields, nonzeros = [], []
    for line in lines:
        tokens = line.split()
        has_labels = bool(tokens) and b":" not in tokens[0] and not line[:1].isspace()
        fields.append(tokens[0] if has_labels else b"")
        nonzeros.append(len(tokens) - has_labels)
    labels = _labels_of(fields, numbers, path, "expected an id (a non-negative integer)")
    sampled = sum(len(line) for line in lines)
    text_bytes = (
        sampled + len(header) if whole else round(len(header) + num_rows * sampled / max(len(lines), 1))
    )
    per_row = sum(nonzeros) / max(len(lines), 1)
    return _Sample("bow", num_rows, num_features, num_labels, per_row, labels, text_bytes)


def _text_sample(path: str, data_format: str, featurizer: dict | None) -> _Sample:
    """A text or LF JSON file's lines counted and a sample parsed: labels (ids or names) per row, and the
    features the featuriser would make of it (``featurizer``: ``data.featurizer``'s options)."""
    num_rows, text_bytes, longest, lines, numbers, whole = _count_and_sample_lines(path)
    named = data_format == "xmc-text" and _labels_are_names(path)
    if data_format == "xmc-text":
        fields = [line.split(b"\t", 1)[0] for line in lines]
        if named:  # names: how many the sample holds
            labels = [
                sorted({name.strip() for name in field.split(b",")}) if field.strip() else []
                for field in fields
            ]
        else:
            labels = _labels_of(fields, numbers, path, f"expected {TEXT_LABEL_IDS}")
        texts = [line.split(b"\t", 1)[-1].rstrip(b"\r").decode("utf-8", "replace") for line in lines]
    else:
        try:
            texts, indptr, ids = parse_lf_json_lines(path, lines)
        except DataFormatError as error:  # numbered in the sample: name the file's line
            line = None if error.line is None else int(numbers[error.line - 1])
            raise DataFormatError(path, error.problem, line=line) from None
        labels = [ids[start:stop].tolist() for start, stop in zip(indptr[:-1], indptr[1:], strict=True)]
    config = featurizer_config(featurizer or {}) or FeaturizerConfig()
    num_features, per_row = _featurized_size(texts, num_rows, config, whole=whole)
    names = read_label_names(path)
    if names:
        num_labels = len(names)
    elif named:
        num_labels = len({name for row in labels for name in row})
    else:
        num_labels = max((max(row) for row in labels if row), default=0) + 1
    return _Sample(
        "text", num_rows, num_features, num_labels, per_row, labels, text_bytes, longest, texts, whole
    )


def _featurized_size(
    texts: list[str], num_rows: int, config: FeaturizerConfig, *, whole: bool
) -> tuple[int, float]:
    """``(columns, stored features a row)`` of ``num_rows`` texts featurised by ``config``, from ``texts``:
    all of them (``whole``: counted exactly, as the featuriser counts) or a uniform sample of them.

    Hashed: ``n_features`` columns. A vocabulary: the n-grams of ``min_df`` or more texts, at most
    ``max_features``. Their number grows with the texts as a power law (Heaps' law, ``V(n) = K n^b``): it is
    counted on the first quarter, half and whole of the sample and extrapolated from the whole by the
    steeper of the two slopes between them (the slope flattens as ``n`` grows), and at most the sample's
    distinct n-grams scaled linearly (a corpus repeats more of its n-grams the larger it is). From a sixth
    of deb-tags' texts, or 3% of deb-files' paths, it came from 1% below to 56% above the featuriser's
    count (word, character and both n-grams, ``min_df`` 1 to 5). A row's stored features: its distinct
    n-grams (those in the vocabulary, when counted exactly)."""
    if not texts:
        return config.n_features or 1, 0.0
    featurizer = TextFeaturizer(config)
    sampled = len(texts)
    bounds = [0, sampled] if whole else sorted({0, sampled // 4, sampled // 2, sampled})
    parts = [featurizer.document_frequencies(texts[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    counts = []  # n-grams of min_df or more texts among the first bounds[1:] texts
    for end in range(1, len(parts) + 1):
        keys, df = _merged_frequencies(parts[:end])
        counts.append(int(np.count_nonzero(df >= config.min_df)))
    if config.n_features:
        return config.n_features, float(df.sum()) / sampled
    if whole:
        columns = min(counts[-1], config.max_features or counts[-1])
        return max(1, columns), float(df[df >= config.min_df].sum()) / sampled
    sizes = bounds[-len(counts) :]
    slopes = [
        math.log(max(after, 1) / max(before, 1)) / math.log(stop / start)
        for before, after, start, stop in zip(counts, counts[1:], sizes, sizes[1:], strict=False)
    ]
    growth = num_rows / sampled
    estimate = min(max(counts[-1], 1) * growth ** max(slopes, default=1.0), keys.size * growth)
    columns = min(round(estimate), config.max_features or round(estimate))
    return max(1, columns), float(df.sum()) / sampled


def _merged_frequencies(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, df)`` of several :meth:`~megaclass.data.featurizer.TextFeaturizer.document_frequencies`
    results, as of their texts together."""
    if len(parts) == 1:
        return parts[0][0], parts[0][1]
    keys, inverse = np.unique(np.concatenate([part[0] for part in parts]), return_inverse=True)
    df = np.bincount(inverse, weights=np.concatenate([part[1] for part in parts]), minlength=keys.size)
    return keys, df.astype(np.int64)


# ----------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanPart:
    """One part of a run's memory.

    Args:
        name: what it is (``head weights``, ``encoder activations``, ...).
        device_bytes: on the compute device (a GPU); folded into host memory on a CPU run.
        host_bytes: in host memory.
        phase: ``steady`` (held all along), ``background`` (held at any time: an index's cold build) or the
            phase holding it on top: ``step``, ``rewiring`` (a sparse layer's, after a step), ``evaluation``,
            ``checkpoint``, ``loading`` or ``setup`` (building the modules).
        setting: what to change when this part does not fit.
        elsewhere_bytes: held outside this process (on parameter servers), as a checkpoint writes them.
        after_setup: a held part made after the modules are built (by the first step, or libraries loaded
            then): not held while the data is read (``loading``) or the modules are built (``setup``).
    """

    name: str
    device_bytes: int
    host_bytes: int
    phase: Phase = "steady"
    setting: str = ""
    elsewhere_bytes: int = 0
    after_setup: bool = False

    @property
    def saved_bytes(self) -> int:
        """Bytes of it in a checkpoint (or a weights folder): wherever it lives."""
        return self.device_bytes + self.host_bytes + self.elsewhere_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """A run's parts and the machine's capacities; ``gpu_capacity`` is None on a CPU run."""

    parts: tuple[PlanPart, ...]
    device_type: str
    gpu_capacity: int | None
    host_capacity: int
    summary: str = ""
    # on disk while a save runs: train.keep_checkpoints + 1, or all the run writes
    checkpoints_at_once: int = 3
    weight_copies: int = 2  # the best's and a better epoch's while it is written (1: a one-epoch run)
    disk_capacity: int | None = None  # free bytes where the run folder goes (None: not asked)
    fits_with: str = ""  # where the memory does not fit: a smaller batch with which it does (plan_for)
    host_processes: int = 1  # the run's processes on this host, each holding the host parts planned here

    def checkpoint_bytes(self) -> int:
        """Bytes of one checkpoint on disk: the weights, optimizer state and index it saves."""
        return sum(p.saved_bytes for p in self.parts if p.name in _CHECKPOINTED)

    def disk_bytes(self) -> int:
        """Bytes the run folder reaches: ``train.keep_checkpoints`` checkpoints and one more while a save runs
        (a new one is whole before the oldest goes; fewer where the run writes fewer), and two copies of the
        weights: a better epoch's are whole before the previous best's go (one where there is one epoch; the
        final weights are the best's files, linked, or a copy of them)."""
        weights = sum(p.saved_bytes for p in self.parts if p.name in _WEIGHTS)
        return self.checkpoints_at_once * self.checkpoint_bytes() + self.weight_copies * weights

    def _disk_parts(self) -> str:
        """What the run folder holds at its fullest, in words."""
        count, copies = self.checkpoints_at_once, self.weight_copies
        return (
            f"{count} checkpoint{'s' * (count != 1)} of {format_bytes(self.checkpoint_bytes())} at once "
            f"while a save runs, {copies} cop{'ies' if copies != 1 else 'y'} of the weights"
        )

    def _where(self, part: PlanPart) -> tuple[int, int]:
        """``(gpu, host)`` bytes of ``part`` on this machine (a CPU run holds everything in host memory)."""
        if self.device_type == "cuda":
            return part.device_bytes, part.host_bytes
        return 0, part.device_bytes + part.host_bytes

    def peak(self, side: int) -> tuple[int, Phase]:
        """Peak bytes of ``side`` (0: GPU, 1: host, for all of :attr:`host_processes`): the steady and
        background parts plus the largest phase on top (reading the data and building the modules: on top of
        the held parts made before them)."""
        need, phase = self._process_peak(side)
        return need * (self.host_processes if side == 1 else 1), phase

    def _process_peak(self, side: int) -> tuple[int, Phase]:
        """:meth:`peak` of one process."""
        steady = sum(self._where(part)[side] for part in self.parts if part.phase in _HELD)
        phases = {
            phase: sum(self._where(p)[side] for p in self.parts if p.phase == phase) for phase in _TRANSIENT
        }
        later = sum(self._where(p)[side] for p in self.parts if p.phase in _HELD and p.after_setup)
        for before in ("loading", "setup"):
            phases[before] = max(0, phases[before] - later)
        worst = max(_TRANSIENT, key=lambda phase: phases[phase])
        return steady + phases[worst], worst

    def blamed_part(self) -> PlanPart | None:
        """The largest part of what goes past the first memory (GPU, then host) the run does not fit: what
        :meth:`refusal` names; None where the memory fits."""
        shortfall = self._shortfall()
        return None if shortfall is None else shortfall[-1]

    def _shortfall(self) -> tuple[int, str, int, int, Phase, PlanPart] | None:
        """``(side, its name, capacity, need, phase of the peak, largest part)`` of the first memory the run
        does not fit; None where both fit."""
        sides = [(0, "GPU memory", self.gpu_capacity)] if self.device_type == "cuda" else []
        for side, label, capacity in [*sides, (1, "host memory", self.host_capacity)]:
            if capacity is None:
                continue
            need, phase = self.peak(side)
            if need <= capacity:
                continue
            steady = sum(self._where(p)[side] for p in self.parts if p.phase in _HELD)
            steady *= self.host_processes if side == 1 else 1
            blamed = _HELD if steady > capacity else (phase,)  # what alone goes past the capacity
            held = [p for p in self.parts if p.phase in blamed and self._where(p)[side] > 0]
            return side, label, capacity, need, phase, max(held, key=lambda p: self._where(p)[side])
        return None

    def refusal(self) -> str | None:
        """One line naming the part that does not fit, by how much, and the setting to change (with the
        value that fits, where :func:`plan_for` found one); None if it fits."""
        shortfall = self._shortfall()
        if shortfall is not None:
            side, label, capacity, need, phase, largest = shortfall
            when = {"steady": "held all along", "background": "held while it runs in the background"}.get(
                largest.phase, f"on top at {largest.phase}"
            )
            return (
                f"the run does not fit: {label} needs {format_bytes(need)} of {format_bytes(capacity)} "
                f"({format_bytes(need - capacity)} over, at its peak: {phase}); the largest part "
                f"{when} is {largest.name} "
                f"({format_bytes(self._where(largest)[side])}); to shrink it: {largest.setting}"
                + (f" ({self.fits_with})" if self.fits_with else "")
            )
        need, free = self.disk_bytes(), self.disk_capacity
        if free is not None and need > free:
            saved = [part for part in self.parts if part.name in _CHECKPOINTED]
            largest = max(saved, key=lambda part: part.saved_bytes)
            return (
                f"the run does not fit: disk needs {format_bytes(need)} of {format_bytes(free)} "
                f"free ({format_bytes(need - free)} over): {self._disk_parts()}; the largest part of a "
                f"checkpoint is {largest.name} ({format_bytes(largest.saved_bytes)}); "
                f"to shrink it: {largest.setting}, train.keep_checkpoints, or --out on a disk with more room"
            )
        return None

    def format(self) -> str:
        """The plan as a table: each part on the GPU and in host memory, the peaks and the capacities."""
        gpu = self.device_type == "cuda"
        lines = [self.summary] if self.summary else []
        lines.append(f"{'part':<30} {'phase':<11} {'GPU' if gpu else '':>11} {'host':>11}  setting")
        for part in self.parts:
            device, host = self._where(part)
            if device or host:
                shown = format_bytes(device) if gpu else ""
                lines.append(
                    f"{part.name:<30} {part.phase:<11} {shown:>11} {format_bytes(host):>11}  {part.setting}"
                )
        for side, label, capacity in [(0, "GPU", self.gpu_capacity)] * gpu + [
            (1, "host", self.host_capacity)
        ]:
            need, phase = self.peak(side)
            of = "unknown" if capacity is None else format_bytes(capacity)
            each = self.host_processes if side == 1 and self.host_processes > 1 else 0
            apiece = f"; {each} processes of {format_bytes(need // each)}" if each else ""
            lines.append(f"peak {label}: {format_bytes(need)} (at {phase}{apiece}) of {of}")
        free = "" if self.disk_capacity is None else f" of {format_bytes(self.disk_capacity)} free"
        lines.append(f"disk: {format_bytes(self.disk_bytes())}{free} ({self._disk_parts()})")
        lines.append("the run fits" if self.refusal() is None else "the run does not fit")
        return "\n".join(lines)


def plan_device_type(config: RunConfig, *, gpu_memory: float | None = None) -> str:
    """``cuda`` or ``cpu``: ``train.device``, where ``auto`` is a GPU when one is here or ``gpu_memory`` is
    given (a plan for another machine)."""
    device = config.train.device
    if device == "auto":
        return "cuda" if gpu_memory is not None or torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def machine_memory(
    device_type: str, *, gpu_memory: float | None = None, host_memory: float | None = None
) -> tuple[int | None, int]:
    """``(GPU, host)`` capacities in bytes: ``gpu_memory`` / ``host_memory`` GiB where given, else this
    machine's GPU total memory (None without one) and available host memory (``MemAvailable``)."""
    gpu = None
    if gpu_memory is not None:
        gpu = round(gpu_memory * GIB)
    elif device_type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if host_memory is not None:
        return gpu, round(host_memory * GIB)
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return gpu, int(line.split()[1]) * 1024
    except OSError:
        pass
    return gpu, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _moments(name: str, momentum: float) -> int:
    """Weight-sized tensors a torch optimizer keeps: Adam's two moments, SGD's momentum buffer."""
    if name == "sgd":
        return 1 if momentum > 0 else 0
    return 2


# What CUDA's bf16 autocast runs in bf16 and what in float32 (torch.amp's op lists), by the name of the
# function an encoder calls: the ops its encoders reach; any other keeps its inputs' dtype.
_AUTOCAST_LOW = frozenset(
    {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
     "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "mv", "prelu",
     "scaled_dot_product_attention"}
)  # fmt: skip
_AUTOCAST_FLOAT32 = frozenset(
    {"layer_norm", "group_norm", "softmax", "log_softmax", "normalize", "norm", "pow", "exp", "log",
     "rsqrt", "softplus", "cumsum", "cross_entropy", "nll_loss", "binary_cross_entropy_with_logits",
     "mse_loss", "cosine_similarity"}
)  # fmt: skip


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention that saves for its backward what a GPU's fused kernels (flash,
    memory-efficient) keep: the query, key, value, mask and output, and a float32 log-sum-exp a query row;
    never the ``(T, T)`` probabilities nor their dropout mask, which the math kernel of a CPU run keeps."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, options):  # autograd's protocol; untyped there
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, **options
        )
        log_sum_exp = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, attn_mask, out, log_sum_exp)
        return out


_ATTENTION_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


class _GpuLike(TorchFunctionMode):
    """A GPU step's saved tensors on any device (the plan's ``meta`` and CPU passes). ``autocast``: CUDA's
    bf16 autocast: the inputs of the ops it runs in bf16 cast to bf16, of those it runs in float32 to
    float32, above autograd as autocast casts, so the tensors saved for the backward have the GPU step's
    dtypes; a parameter is cast once a pass, as autocast caches its casts: ``weight_casts`` holds them (the
    backward keeps them, once for the batch). ``fused_attention``: attention saves what the GPU's fused
    kernels save (:class:`_FusedAttention`)."""

    def __init__(self, *, autocast: bool, fused_attention: bool) -> None:
        super().__init__()
        self.autocast, self.fused_attention = autocast, fused_attention
        self.weight_casts: dict[int, torch.Tensor] = {}  # by the parameter's id
        self._cast_ids: set[int] = set()  # the casts' own ids (each held in weight_casts)

    def is_weight_cast(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._cast_ids

    def _cast(self, value: object, dtype: torch.dtype) -> object:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        if isinstance(value, torch.nn.Parameter):
            cast = self.weight_casts.get(id(value))
            if cast is None:
                cast = self.weight_casts[id(value)] = value.to(dtype)
                self._cast_ids.add(id(cast))
            return cast
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol; untyped there
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast and name in _AUTOCAST_LOW:
            dtype = torch.bfloat16
        elif self.autocast and name in _AUTOCAST_FLOAT32:
            dtype = torch.float32
        else:
            dtype = None
        if dtype is not None:
            args = tuple(self._cast(value, dtype) for value in args)
            kwargs = {key: self._cast(value, dtype) for key, value in kwargs.items()}
        if self.fused_attention and name == "scaled_dot_product_attention":
            options = {**dict(zip(_ATTENTION_ARGS, args, strict=False)), **kwargs}
            tensors = [options.pop(key, None) for key in _ATTENTION_ARGS[:4]]
            return _FusedAttention.apply(*tensors, options)
        return func(*args, **kwargs)


def saved_tensor_bytes(
    encoder: torch.nn.Module, inputs: object, *, autocast: bool, fused_attention: bool = False
) -> tuple[int, int]:
    """``(batch, weight_casts)``: the bytes of the tensors one forward pass of ``encoder`` over ``inputs``
    saves for its backward, its output counted twice (it and its gradient), its parameters not; with
    ``autocast``, as under CUDA's bf16 autocast, the bf16 copies of the weights apart (``weight_casts``: made
    once a step, whatever the batch); with ``fused_attention``, attention as a GPU's fused kernels save it
    (both: :class:`_GpuLike`)."""
    parameters = {id(p) for p in encoder.parameters()}
    mode = _GpuLike(autocast=autocast, fused_attention=fused_attention)  # neither: a pass as it runs
    saved: list[int] = []
    casts: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if mode.is_weight_cast(base):
            casts[id(base)] = base.numel() * base.element_size()
        elif id(base) not in parameters:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with hooks, mode:
        features = encoder(inputs)
    return sum(saved) + 2 * features.numel() * features.element_size(), sum(casts.values())


class _LiveBytes(TorchDispatchMode):
    """The most bytes the tensors made under it hold at once (a storage counted once, until the last of its
    tensors is freed), ``ignored`` storages (a module's parameters and buffers) aside."""

    def __init__(self, ignored: set[int]) -> None:
        super().__init__()
        self.ignored = ignored
        self.live = self.peak = 0
        self._tensors: dict[int, int] = {}  # live tensors a storage, by its storage's handle
        self._bytes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._tensors[key] -= 1
        if not self._tensors[key]:
            del self._tensors[key]
            self.live -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # torch's protocol; untyped there
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.ignored:
                continue
            if key not in self._tensors:
                self._tensors[key], self._bytes[key] = 0, storage.nbytes()
                self.live += self._bytes[key]
                self.peak = max(self.peak, self.live)
            self._tensors[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def inference_bytes(
    encoder: torch.nn.Module, inputs: object, *, autocast: bool, fused_attention: bool = False
) -> int:
    """The most bytes a forward pass of ``encoder`` over ``inputs`` without gradients (an evaluation's)
    holds at once beside its weights, its output included; ``autocast`` and ``fused_attention`` as
    :func:`saved_tensor_bytes` takes them."""
    held = {t.untyped_storage()._cdata for t in (*encoder.parameters(), *encoder.buffers())}
    mode = _GpuLike(autocast=autocast, fused_attention=fused_attention)
    with torch.no_grad(), mode, _LiveBytes(held) as live:
        encoder(inputs)
    return live.peak


def _encoder_parts(
    config: RunConfig,
    shape: DataShape,
    batch: int,
    token_widths: tuple[int, int] | None,
    *,
    eval_batch: int,
    device_type: str,
) -> tuple[list[PlanPart], int, bool]:
    """The encoder's parts, its output width ``D`` and whether a captured step holds it with the head
    (:func:`~megaclass.train.graphs.whole_step_blocker`), from one forward pass of a ``batch``-row input whose
    tensors saved for the backward are its activations, and one without gradients of an ``eval_batch``-row
    input (:func:`inference_bytes`): an MLP over sparse rows or a face encoder built on the ``meta`` device
    (no memory); a transformer over token ids (``token_widths``: the widest training and evaluation batches,
    :func:`_token_width`) built on the CPU and run on one document of that many tokens, its activations
    counted ``batch`` times over (the bf16 copies of its weights under autocast once, the attention as a
    GPU's fused kernels keep it: :func:`saved_tensor_bytes`), its evaluation's from one and two documents."""
    encoder, kind, (setting, smaller) = _planned_encoder(config, shape, tokens=token_widths is not None)
    copies = batch if token_widths is not None else 1  # a transformer's pass runs on one document
    train_width, eval_width = token_widths if token_widths is not None else (0, 0)
    rows = 1 if token_widths is not None else batch
    inputs, input_bytes = _encoder_inputs(shape, token_widths, rows, train_width)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in encoder.parameters())
    trained = sum(p.numel() * p.element_size() for p in trainable)
    grads, kept, row_update = _gradient_bytes(encoder, inputs, config, trained, device_type=device_type)
    gpu = device_type == "cuda"
    like_gpu = {"autocast": gpu and config.train.bf16, "fused_attention": gpu}
    per_batch, weight_casts = saved_tensor_bytes(encoder, inputs, **like_gpu)
    activations = copies * (per_batch + input_bytes) + weight_casts
    encoder.eval()
    eval_inputs, eval_input_bytes = _encoder_inputs(shape, token_widths, eval_batch, eval_width)
    if token_widths is not None:  # from one and two documents: the weights' casts once, the rest a document
        one, two = (
            inference_bytes(encoder, _encoder_inputs(shape, token_widths, n, eval_width)[0], **like_gpu)
            for n in (1, 2)
        )
        evaluation = one + (eval_batch - 1) * (two - one)
    else:
        evaluation = inference_bytes(encoder, eval_inputs, **like_gpu)
    evaluation += eval_input_bytes
    optimizer = config.optim.encoder
    parts = [  # a torch optimizer makes its state at its first step
        PlanPart("encoder weights", weights, 0, setting=smaller),
        PlanPart("encoder gradients", grads, 0, setting=smaller, after_setup=True),
        PlanPart(
            "encoder optimizer state",
            _moments(optimizer.name, optimizer.momentum) * trained,
            0,
            setting="optim.encoder.name=sgd",
            after_setup=True,
        ),
        PlanPart("encoder activations", activations, 0, "step", setting),
        PlanPart("encoder evaluation", evaluation, 0, "evaluation", "eval.batch_size"),
        PlanPart("encoder row update", row_update, 0, "step", "train.batch_size"),
        PlanPart("encoder gradient kept", kept, 0, setting="model.sparse_grad=true", after_setup=True),
    ]
    blocker = whole_step_blocker(encoder, kind, frozen_steps=config.optim.encoder_frozen_steps)
    return parts, int(encoder.out_features), blocker is None


def _planned_encoder(
    config: RunConfig, shape: DataShape, *, tokens: bool
) -> tuple[torch.nn.Module, str, tuple[str, str]]:
    """The run's encoder, its input kind and the settings that shrink its activations and its weights: on
    the ``meta`` device, but a transformer (built on the CPU in training mode, so dropout's masks count)."""
    from megaclass.data.batch import InputSpec

    if shape.inputs == "images":
        with torch.device("meta"):
            encoder = build_model(config.model, InputSpec(kind="image"))
        return encoder, "image", ("train.batch_size", "model.type (a smaller encoder)")
    if tokens:
        encoder = build_model(config.model, InputSpec(kind="tokens")).train()
        setting = "model.max_length, train.batch_size or model.gradient_checkpointing=true"
        return encoder, "tokens", (setting, "model.pretrained (a smaller encoder)")
    with torch.device("meta"):
        encoder = build_model(config.model, InputSpec(kind="sparse", num_features=shape.num_features))
    return encoder, "sparse", ("train.batch_size", "model.hidden (a smaller encoder)")


def _encoder_inputs(
    shape: DataShape, token_widths: tuple[int, int] | None, rows: int, width: int = 0
) -> tuple[object, int]:
    """An encoder input of ``rows`` rows (tokens: documents of ``width``) and the bytes of its batch."""
    from megaclass.data.batch import SparseInputs
    from megaclass.data.tokenized import TokenInputs

    if shape.inputs == "images":
        side = shape.num_features
        # the decoded uint8 batch and its float32 form
        return torch.zeros(rows, 3, side, side, device="meta"), rows * 3 * side * side * (1 + 4)
    if token_widths is not None:
        ids = torch.zeros(rows, width, dtype=torch.int64)
        return TokenInputs(ids, torch.ones_like(ids)), rows * width * 8 * 2  # ids and mask, int64
    stored = max(1, round(rows * shape.nonzeros_per_row))
    indices, offsets = (torch.zeros(n, dtype=torch.int64, device="meta") for n in (stored, rows + 1))
    values = torch.zeros(stored, dtype=torch.float32, device="meta")
    return SparseInputs(indices, offsets, values), stored * (8 + 4) + (rows + 1) * 8


def _gradient_bytes(
    encoder: torch.nn.Module, inputs: object, config: RunConfig, trained: int, *, device_type: str
) -> tuple[int, int, int]:
    """``(gradients, gradient kept, row update)`` bytes of an encoder whose ``trained`` parameters take
    ``trained`` bytes. An MLP's first layer updated by rows has a gradient row per non-zero of the batch and
    an optimizer step over the rows it touched; a CPU run over sparse rows with a dense first-layer gradient
    keeps the last step's freed blocks for reuse (:func:`megaclass.host_allocator.reuse_freed_blocks`), so
    that gradient, made anew each step, holds the pages of two."""
    from megaclass.data.batch import SparseInputs

    if getattr(encoder, "sparse_gradient", False):
        table, nonzeros = encoder.embedding, inputs.indices.numel()  # (F, H0), the batch's non-zeros
        grads = trained + nonzeros * (table.shape[1] * table.element_size() + 8)
        grads -= table.numel() * table.element_size()
        # its optimizer's step on the rows a batch touched (at most its non-zeros), in float32: the gradient
        # summed by row and the rows that move, the weights, the moments and Adam's denominator (SGD's
        # decayed gradient), beside the gradient itself
        moments = _moments(config.optim.encoder.name, config.optim.encoder.momentum)
        return grads, 0, (4 + moments) * min(nonzeros, table.shape[0]) * table.shape[1] * 4
    if device_type == "cpu" and isinstance(inputs, SparseInputs) and encoder.embedding.requires_grad:
        return trained, encoder.embedding.numel() * encoder.embedding.element_size(), 0  # the last step's
    return trained, 0, 0


def _takes_tokens(config: RunConfig, shape: DataShape) -> bool:
    """Whether the encoder reads token ids: a text encoder on text data, as the run reads it."""
    return shape.inputs == "text" and reads_tokens(config.model)


def _token_widths(config: RunConfig, shape: DataShape, others: Sequence[DataShape]) -> tuple[int, int]:
    """The widest training batch of token ids and the widest of the files evaluated (the held-out rows
    among them): :func:`_token_width` of each, with one tokenizer."""
    tokenizer = load_tokenizer(config.model)
    train = _token_width(config, shape, tokenizer)
    return train, max([train, *(_token_width(config, other, tokenizer) for other in others)])


def _token_width(config: RunConfig, shape: DataShape, tokenizer: Any) -> int:
    """The widest batch of token ids a run over ``shape`` makes (a batch is padded to its longest row): its
    longest document tokenised, where the sample holds the whole file; else ``model.max_length``, or fewer
    where the file's longest line is shorter (a token holds a byte or more of its text, beside the special
    tokens)."""
    max_length = config.model.max_length
    if shape.texts:
        tokens = tokenize_texts(shape.texts, tokenizer, max_length=max_length, progress=False)
        return max(1, int(np.diff(tokens.indptr).max()))
    return min(max_length, shape.longest_line_bytes + tokenizer.num_special_tokens_to_add())


_HEAD_PARTS: dict[str, tuple[str, Phase]] = {
    "weights": ("head weights", "steady"),
    "gradients": ("head gradients", "steady"),
    "optimizer": ("head optimizer state", "steady"),
    "index": ("head index", "steady"),
    "index build": ("head index build", "background"),
    "activations": ("head activations", "step"),
    "rewiring": ("head rewiring", "rewiring"),
    "evaluation": ("head evaluation", "evaluation"),
    "checkpoint": ("head state dict copies", "checkpoint"),
    "initialisation": ("head initialisation", "setup"),
}


def plan_run(
    config: RunConfig,
    shape: DataShape,
    *,
    device_type: str,
    gpu_capacity: int | None,
    host_capacity: int,
    others: tuple[DataShape, ...] = (),
    disk_capacity: int | None = None,
    world_size: int = 1,
    host_processes: int = 1,
) -> MemoryPlan:
    """The memory plan of training ``config`` (resolved) on data of ``shape`` on a ``device_type`` device.

    Args:
        others: the shapes of the test (and validation) files, held in memory too.
        disk_capacity: free bytes where the run folder goes (None: the disk is not checked).
        world_size: processes of the run: the plan is rank 0's, with its share of each global batch and,
            where ``distributed.shard_head`` splits the head by class, its share of the classes.
        host_processes: those of them on this host: the host's peak is theirs together, each as rank 0.
    """
    dist = DistInfo(world_size=world_size)
    if dist.distributed and isinstance(config.model, MLPConfig):  # as the trainer builds it under DDP
        config = replace(config, model=replace(config.model, sparse_grad=False))
    rows = max(1, shape.num_rows)  # no batch holds more than the data
    batch = min(rank_batch_size(config, dist), -(-rows // world_size))
    widths = _token_widths(config, shape, others) if _takes_tokens(config, shape) else None
    # an evaluation scores the held-out rows and each other file, a batch of at most eval.batch_size
    loop = config.train
    held_out = held_out_count(rows, fraction=loop.valid_fraction, max_rows=loop.valid_max_rows)
    eval_batch = max(1, min(config.eval.batch_size, max([held_out, *(other.num_rows for other in others)])))
    parts, dim, whole_step = _encoder_parts(
        config, shape, batch, widths, eval_batch=eval_batch, device_type=device_type
    )
    classes = shape.num_labels
    if shards_head(config, dist):
        classes = -(-classes // world_size)  # rank 0's range: the first ranks take the remainder
    context = HeadContext(in_features=dim, num_classes=classes, multilabel=shape.multilabel)
    request = PlanRequest(
        batch=batch,
        eval_batch=config.eval.batch_size,
        device_type=device_type,
        optimizer_moments=_moments(config.optim.head.name, config.optim.head.momentum),
        low_precision=config.optim.head_state == "bf16_sr",
        feature_bytes=2 if device_type == "cuda" and config.train.bf16 else 4,
    )
    head = head_class(config.head).planned_bytes(config.head, context, request)
    for key, planned in head.items():
        name, phase = _HEAD_PARTS[key]
        parts.append(PlanPart(name, planned.device, planned.host, phase, planned.setting, planned.elsewhere))
    if config.train.ema_decay:
        parts.append(_average_part(config.head, parts, classes, dim))
    # state_io streams saved tensors to their files from where they live: GPU tensors through one
    # page-locked block of STREAM_CHUNK_BYTES, which torch's pinned-memory cache keeps from the first save
    # on; host tensors without a copy
    on_gpu = device_type == "cuda" and any(part.device_bytes for part in parts if part.name in _CHECKPOINTED)
    if on_gpu:
        parts.append(
            PlanPart("checkpoint staging block", 0, STREAM_CHUNK_BYTES, setting=_MORE_HOST, after_setup=True)
        )
    parts += _data_parts(config, shape, others, widths)
    if device_type == "cuda":
        parts = _cuda_parts(config, parts, whole_step=whole_step)
    parts += [
        PlanPart("interpreter and PyTorch", 0, _PROCESS_HOST, setting=_MORE_HOST),
        PlanPart("libraries a run loads", 0, _LIBRARIES_HOST, setting=_MORE_HOST, after_setup=True),
    ]
    parts += _background_save_part(
        config, parts, host_capacity, processes=world_size, sharded=shards_head(config, dist)
    )
    process = "one process" if world_size == 1 else f"rank 0 of {world_size} processes, {classes:,} classes"
    summary = (
        f"memory plan: {config.head.type} head, {shape.num_labels:,} classes x D {dim}, {shape.num_rows:,} "
        f"rows, batch {batch}, on {device_type} ({process})"
    )
    return MemoryPlan(
        tuple(parts),
        device_type,
        gpu_capacity,
        host_capacity,
        summary,
        checkpoints_at_once=_checkpoints_at_once(config.train, shape.num_rows),
        weight_copies=min(2, config.train.epochs),
        disk_capacity=disk_capacity,
        host_processes=host_processes,
    )


def _data_parts(
    config: RunConfig,
    shape: DataShape,
    others: tuple[DataShape, ...],
    widths: tuple[int, int] | None,
) -> list[PlanPart]:
    """The host memory of the data sets, their labels and metrics, and a checkpoint's block from servers."""
    from_servers = isinstance(config.head, SelectedHeadConfig) and config.head.store.startswith("ps://")
    saved = 2 * STREAM_CHUNK_BYTES if from_servers else 0  # a block pulled from the servers, and its messages
    width = int(config.data.label_feature_dim) if config.data.label_feature_dim != "auto" else 0
    data = sum(each.array_bytes(None if widths is None else widths[1]) for each in (shape, *others))
    largest_file = max([shape, *others], key=lambda s: s.text_bytes)
    metrics = 2 * shape.num_labels * 8  # the propensities and their inverses, while the metrics are made
    return [
        PlanPart("data sets in memory", 0, data, setting="a host with more memory (data is held in memory)"),
        PlanPart("label counts", 0, shape.num_labels * 8, setting=_MORE_HOST),
        PlanPart("label features (PIFA)", 0, shape.num_labels * width * 4, setting="data.label_feature_dim"),
        PlanPart("data file being parsed", 0, 2 * largest_file.text_bytes, "loading", "a smaller data file"),
        PlanPart("evaluation metrics", 0, metrics, "evaluation", _MORE_HOST),
        PlanPart("checkpoint block", 0, saved, "checkpoint", _MORE_HOST),
    ]


def _cuda_parts(config: RunConfig, parts: list[PlanPart], *, whole_step: bool) -> list[PlanPart]:
    """``parts`` as a GPU run holds them: a captured step's parts held between steps, an eager step beside
    it, the CUDA context and runtime."""
    # a captured step's activations stay in the graph's memory pool (rows pulled over the network, or
    # gathered on the host beside a weight average, are never captured)
    store = config.head.store if isinstance(config.head, SelectedHeadConfig) else "gpu"
    pulled = store.startswith("ps://") or (store == "host" and config.train.ema_decay > 0)
    if config.train.cuda_graph != "off" and not pulled:
        # the head's step always; the encoder's where the whole step is captured (else it runs eagerly,
        # its activations freed after each step)
        uncaptured = set() if whole_step else {"encoder activations", "encoder row update"}
        held = [part.phase == "step" and part.name not in uncaptured for part in parts]
        parts = [replace(p, phase="steady") if h else p for p, h in zip(parts, held, strict=True)]
        # the graph's gradients are its outputs, held between steps too; a step run eagerly beside it (an
        # epoch's smaller last batch, a batch over the capture's capacities) makes its own of those and
        # of the captured activations, from the allocator's other memory
        captured = {"head gradients", "head activations"}
        captured |= {"encoder gradients", "encoder activations"} if whole_step else set()
        eager = sum(part.device_bytes for part in parts if part.name in captured)
        parts = [
            *parts,
            PlanPart("eager step beside the captured one", eager, 0, "step", "train.cuda_graph=off"),
        ]
    # the measured whole, less what any run holds
    runtime = _CUDA_HOST - _CUDA_CONTEXT_HOST - _PROCESS_HOST - _LIBRARIES_HOST
    return [
        *parts,
        PlanPart("CUDA context", _CUDA_CONTEXT, _CUDA_CONTEXT_HOST, setting="a larger GPU"),
        PlanPart("CUDA runtime", 0, runtime, setting=_MORE_HOST, after_setup=True),
    ]


def _average_part(head: HeadConfig, parts: list[PlanPart], classes: int, dim: int) -> PlanPart:
    """The weight average (``train.ema_decay``): a copy of the encoder's and the head's weights where they
    live; of a selected head's store rows, float32 and a step count a row beside them (on parameter servers,
    by the shards: none here, its rows in checkpoints)."""
    held = {part.name: part for part in parts}
    encoder, head_weights = held["encoder weights"], held["head weights"]
    device, host = encoder.device_bytes, encoder.host_bytes
    rows, elsewhere = classes * (dim * 4 + 8), 0
    if not isinstance(head, SelectedHeadConfig):  # the head's parameters, as they are held
        device, host = device + head_weights.device_bytes, host + head_weights.host_bytes
    elif head.store == "host":
        host += rows
    elif not head.store.startswith("ps://"):
        device += rows
    else:  # kept by the shards, read into checkpoints as float32
        elsewhere = classes * dim * 4
    return PlanPart("weight average", device, host, setting="train.ema_decay=0", elsewhere_bytes=elsewhere)


def _background_save_part(
    config: RunConfig, parts: list[PlanPart], host_capacity: int, *, processes: int, sharded: bool
) -> list[PlanPart]:
    """The host copy a save behind the steps holds from the first save on (a checkpoint and the kept
    weights, :func:`~megaclass.train.checkpoint.saves_in_background`); none where saves are synchronous
    (rows on parameter servers are read into a checkpoint, not copied)."""
    streamed = isinstance(config.head, SelectedHeadConfig) and config.head.store.startswith("ps://")
    # a checkpoint and the kept weights, counted whether or not validation rows keep an epoch's (as the
    # disk's plan counts the weights)
    copy = sum(part.saved_bytes for part in parts if part.name in _CHECKPOINTED)
    copy += sum(part.saved_bytes for part in parts if part.name in _WEIGHTS)
    copy_bytes = (lambda: None) if streamed else (lambda: copy)
    enabled = config.train.background_saves
    if not saves_in_background(enabled, copy_bytes, host_capacity, processes=processes, sharded=sharded):
        return []
    setting = "train.background_saves=false"
    return [PlanPart("background save copy", 0, copy, setting=setting, after_setup=True)]


def _checkpoints_at_once(train: TrainConfig, rows: int) -> int:
    """Checkpoints on disk at once while a save runs: ``keep_checkpoints + 1``, or every checkpoint the run
    writes where that is fewer (one at each epoch's end, one every ``checkpoint_every`` steps; the steps
    counted with every row trained, an upper bound)."""
    steps = train.epochs * -(-rows // train.batch_size)
    saves = train.epochs + (steps // train.checkpoint_every if train.checkpoint_every else 0)
    return min(train.keep_checkpoints + 1, saves)


def plan_for(
    config: RunConfig,
    train_path: str,
    *,
    other_paths: tuple[str, ...] = (),
    resolve: Callable[[RunConfig, DataFacts], RunConfig],
    gpu_memory: float | None = None,
    host_memory: float | None = None,
    out_dir: str | None = None,
    world_size: int = 1,
    host_processes: int = 1,
) -> MemoryPlan:
    """The plan of ``config`` on the files given: their shapes read, the config resolved from the training
    file's facts by ``resolve`` (as ``megaclass train`` resolves it), the capacities of this machine or those
    given in GiB, and the free disk space where ``out_dir`` goes (when given); ``world_size`` and
    ``host_processes`` as :func:`plan_run` takes them."""
    options = dict(num_classes=config.data.num_classes, featurizer=config.data.featurizer)
    shape = read_data_shape(train_path, **options)
    resolved = resolve(config, shape.facts(tokens=_takes_tokens(config, shape)))
    others = tuple(
        read_data_shape(path, **{**options, "num_classes": shape.num_labels}) for path in other_paths
    )
    device_type = plan_device_type(resolved, gpu_memory=gpu_memory)
    gpu, host = machine_memory(device_type, gpu_memory=gpu_memory, host_memory=host_memory)
    plan_of = functools.partial(
        plan_run,
        shape=shape,
        device_type=device_type,
        gpu_capacity=gpu,
        host_capacity=host,
        others=others,
        disk_capacity=None if out_dir is None else free_bytes(out_dir),
        world_size=world_size,
        host_processes=host_processes,
    )
    plan = plan_of(resolved)
    blamed = plan.blamed_part()
    if blamed is not None and blamed.setting in _BATCH_SETTINGS:
        plan = replace(plan, fits_with=_fitting_batch(resolved, blamed.setting, plan_of, shape.num_rows))
    return plan


_BATCH_SETTINGS = ("train.batch_size", "eval.batch_size")


def _fitting_batch(
    config: RunConfig, setting: str, plan_of: Callable[[RunConfig], MemoryPlan], rows: int
) -> str:
    """The largest of ``setting``'s halvings (a batch size; a training batch from the ``rows`` it takes at
    most) with which ``config``'s memory fits, in words."""
    section, key = setting.split(".")
    batch = getattr(getattr(config, section), key)
    batch = (min(batch, rows) if setting == "train.batch_size" else batch) // 2
    while batch >= 1:
        smaller = replace(config, **{section: replace(getattr(config, section), **{key: batch})})
        if plan_of(smaller).blamed_part() is None:
            return f"{setting}={batch} fits"
        batch //= 2
    return f"no {setting} fits"
