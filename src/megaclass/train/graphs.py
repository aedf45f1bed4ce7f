"""The head's part of a training step captured in a CUDA graph and replayed, instead of launched op by op.

A head over 10^5..10^8 classes launches hundreds of small kernels a step (selection, gathers, the fused loss
and its gradients): on a GPU the host launching them, not the GPU, sets the pace. With ``train.cuda_graph``
the trainer copies each step's features ``(B, D)`` and targets into static buffers, replays the head's
captured forward and backward (which fill the head's parameter gradients and the features' gradient), and
sends that gradient back into the encoder eagerly: the encoder's inputs are sparse, of another size every
step. The optimizer step, clipping, ``head.after_step`` and logging stay eager.

Multi-class targets are ``(B,)``. Multi-label targets have another number of labels every step: they are
copied into padded targets of a capacity ``L_cap`` fixed for the run (:func:`label_capacity`,
:meth:`~megaclass.targets.RaggedLabels.pad_to`), whose pads the heads mask out of the loss and its
gradients; a batch with more labels runs eagerly and is counted (:attr:`HeadStepGraph.overflows`).

A captured step stays valid while the inputs' shapes and :meth:`~megaclass.heads.base.Head.graph_key` stay
the same (a rewired topology, an index rebuilt into new buffers, the auxiliary loss switched off change the
key): after a change the step runs eagerly (on the capture stream: it warms up what the capture needs, such as
compiled kernels and cached structures) and the next one is captured. Eager and replayed steps run the same
kernels on the same values (padded targets add exact zeros where unpadded ones add nothing), so a run
computes the same numbers with the graph on or off.

``train.cuda_graph``: ``auto`` (the default) captures where :func:`resolve_cuda_graph` finds nothing in the
way and runs eagerly where the capture itself fails (:class:`CaptureError`), ``on`` raises in both cases,
``off`` never captures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from megaclass.heads.base import Head
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels, Targets

__all__ = ["CaptureError", "GraphChoice", "HeadStepGraph", "label_capacity", "resolve_cuda_graph"]

_FIRST_EAGER_STEPS = 2  # before the first capture: libraries initialise lazily, kernels compile
_EAGER_STEPS = 1  # before a recapture: the head's structure changed (rebuilt caches), the shapes did not
_CAPACITY_HEADROOM = 1.25  # over the fullest batch of one epoch: another epoch's fullest rarely exceeds it
_CAPACITY_MULTIPLE = 64  # label capacities are rounded up to this


def label_capacity(row_labels: np.ndarray, batches: Sequence[np.ndarray], *, batch_size: int) -> int:
    """``L_cap``, the labels a captured multi-label step holds: the most labels in a full batch of
    ``batches`` (one epoch's row ids) plus a quarter, rounded up to a multiple of 64, and never more than the
    ``batch_size`` rows with the most labels hold together (no batch holds more). A pad costs a gather of
    one row; a batch over the capacity costs an eager step.

    Args:
        row_labels: ``(N,)`` number of labels of each training row.
        batches: row ids of each batch of an epoch; those of ``batch_size`` rows count (smaller ones run
            eagerly).

    >>> label_capacity(np.array([1, 2, 3, 9]), [np.array([0, 1]), np.array([2, 3])], batch_size=2)
    12
    """
    full = [rows for rows in batches if len(rows) == batch_size]
    fullest = max((int(row_labels[rows].sum()) for rows in full), default=0)
    most = int(np.sort(row_labels)[-batch_size:].sum()) if batch_size else 0
    rounded = -(-math.ceil(fullest * _CAPACITY_HEADROOM) // _CAPACITY_MULTIPLE) * _CAPACITY_MULTIPLE
    return min(rounded, most)


class CaptureError(RuntimeError):
    """The head's step ran eagerly but could not be captured (an op that synchronises with the host, or
    one a graph cannot hold); the message names the op's error."""


class GraphChoice(NamedTuple):
    """Whether the head's step is captured, and why (a line for the run's output)."""

    on: bool
    reason: str


def resolve_cuda_graph(
    setting: Literal["auto", "on", "off"],
    *,
    head: Head,
    device: torch.device,
    multilabel: bool,
    world_size: int,
) -> GraphChoice:
    """Decide ``train.cuda_graph`` for ``head`` on ``device``.

    Raises:
        ConfigError: ``setting`` is ``on`` and the step cannot be captured (the message says why).

    >>> from megaclass.heads import HeadContext, build_head, head_config
    >>> head = build_head(head_config({"type": "dense"}), HeadContext(8, 100, multilabel=False))
    >>> resolve_cuda_graph("auto", head=head, device=torch.device("cpu"), multilabel=False, world_size=1).on
    False

    ``targets_static`` of :meth:`~megaclass.heads.base.Head.capture_blocker` is False for multi-label data:
    the head then gets padded targets (:meth:`~megaclass.targets.RaggedLabels.pad_to`).
    """
    if setting == "off":
        return GraphChoice(False, "train.cuda_graph=off")
    if device.type != "cuda":
        blocker = f"the device is {device.type}: CUDA graphs need a CUDA device"
    elif world_size > 1:
        blocker = f"{world_size} processes: the head's gradients are reduced over ranks inside its backward"
    else:
        blocker = head.capture_blocker(targets_static=not multilabel)
    if blocker is None:
        return GraphChoice(True, "the head's forward and backward replay from a CUDA graph")
    if setting == "on":
        raise ConfigError(
            f"train.cuda_graph=on: the head's step cannot be captured: {blocker}; use auto or off"
        )
    return GraphChoice(False, blocker)


class HeadStepGraph:
    """The head's forward and backward on static ``features (B, D)`` and targets (``(B,)``, or ragged labels
    padded to ``label_capacity``), captured once in a CUDA graph and replayed every step (see the module
    docstring).

    Args:
        head: the head; its parameters' gradients are outputs of the graph.
        batch_size: ``B``; steps of another size (an epoch's smaller last batch) are left to the caller.
        autocast_dtype: the dtype of the autocast the head's forward runs under (None: no autocast).
        label_capacity: ``L_cap`` for multi-label targets (:func:`label_capacity`); None: multi-class
            targets only.

    >>> graph = HeadStepGraph(head, batch_size=64, autocast_dtype=torch.bfloat16)  # doctest: +SKIP
    >>> loss, features_grad = graph.run(features, targets)  # doctest: +SKIP
    >>> features.backward(features_grad)  # doctest: +SKIP
    """

    def __init__(
        self,
        head: Head,
        *,
        batch_size: int,
        autocast_dtype: torch.dtype | None,
        label_capacity: int | None = None,
    ) -> None:
        self.head = head
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.label_capacity = label_capacity
        self.captures = 0  # graphs captured so far
        self.replays = 0  # steps replayed so far
        self.overflows = 0  # full multi-label batches with more labels than label_capacity (run eagerly)
        self._stream: torch.cuda.Stream | None = None  # eager warm-up steps and the capture run on it
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None  # what the graph (or the one to capture) was built for
        self._eager_left = 0  # eager steps still to run before the capture
        self._features: Tensor | None = None  # (B, D) static leaf that requires grad
        self._targets: Targets | None = None  # (B,), or labels padded to (L_cap,): static
        self._loss: Tensor | None = None  # () static output
        self._grads: list[tuple[Tensor, Tensor]] = []  # (parameter, its static gradient)

    def fits(self, targets: Targets) -> bool:
        """Whether a step on ``targets`` can be replayed: targets of the full batch, multi-class ``(B,)`` or
        (with a ``label_capacity``) unpadded ragged labels that fit in it. A full batch over the capacity is
        counted in :attr:`overflows`."""
        if isinstance(targets, Tensor):
            return targets.dim() == 1 and targets.shape[0] == self.batch_size
        if self.label_capacity is None or targets.padded or targets.batch_size != self.batch_size:
            return False
        if targets.indices.numel() > self.label_capacity:
            self.overflows += 1
            return False
        return True

    def run(self, features: Tensor, targets: Targets) -> tuple[Tensor, Tensor]:
        """The head's forward and backward on ``features (B, D)`` and ``targets`` that :meth:`fits`.

        The head's parameters hold their gradients on return (set them to None before: a replay overwrites,
        it does not accumulate).

        Returns:
            The loss (a fresh 0-dim tensor) and the gradient of ``features`` ``(B, D)``: a static buffer the
            next step overwrites, so back-propagate it before.
        """
        key = (
            tuple(features.shape),
            features.dtype,
            features.device,
            _targets_key(targets),
            self.head.training,
            self.head.graph_key(),
        )
        if self._stream is None:
            self._stream = torch.cuda.Stream(features.device)
        if key != self._key:
            self._prepare(key, features, targets)
        with torch.no_grad():
            self._features.copy_(features)
            self._copy_targets(targets)
        if self._eager_left > 0:
            self._eager_left -= 1
            return self._eager_step(), self._features.grad
        if self._graph is None:
            self._capture()
        self._graph.replay()
        self.replays += 1
        for param, grad in self._grads:
            param.grad = grad
        with self._autocast():  # what the eager forward's host side computes, it computes under autocast
            self.head.after_replay()
        return self._loss.clone(), self._features.grad  # a clone: the next replay overwrites the static loss

    def _prepare(self, key: tuple, features: Tensor, targets: Targets) -> None:
        """Drop the graph (its memory goes once its outputs are dropped) and make buffers for ``key``."""
        self._graph, self._loss, self._grads = None, None, []
        self._key = key
        self._eager_left = _FIRST_EAGER_STEPS if self.captures == 0 else _EAGER_STEPS
        self._features = torch.empty(features.shape, dtype=features.dtype, device=features.device)
        self._features.requires_grad_(True)
        if isinstance(targets, Tensor):
            self._targets = torch.empty(targets.shape, dtype=targets.dtype, device=targets.device)
        else:
            assert self.label_capacity is not None, "ragged targets need a label capacity"
            indptr, indices = targets.indptr, targets.indices
            self._targets = RaggedLabels(
                torch.empty(indptr.shape, dtype=indptr.dtype, device=indptr.device),
                torch.empty(self.label_capacity, dtype=indices.dtype, device=indices.device),
                padded=True,
            )

    def _copy_targets(self, targets: Targets) -> None:
        """Copy ``targets`` into the static ones; ragged labels are padded on the way
        (:meth:`~megaclass.targets.RaggedLabels.pad_to`)."""
        static = self._targets
        if isinstance(static, Tensor):
            static.copy_(targets)
            return
        static.indptr.copy_(targets.indptr)
        targets.pad_to(self.label_capacity, out=static.indices)

    def _autocast(self) -> torch.autocast:
        dtype, enabled = self.autocast_dtype or torch.bfloat16, self.autocast_dtype is not None
        # no autocast cache: a cast cached across the capture's end would leave the graph a freed tensor
        return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)

    def _forward_backward(self) -> Tensor:
        with self._autocast():
            loss = self.head(self._features, self._targets)
        loss.backward()
        return loss.detach()

    def _eager_step(self) -> Tensor:
        """One step run eagerly on the capture stream, ordered after and before the caller's stream."""
        self._features.grad = None  # a leaf's gradient accumulates: start each step from none
        caller = torch.cuda.current_stream(self._features.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            loss = self._forward_backward()
        caller.wait_stream(self._stream)
        return loss

    def _capture(self) -> None:
        """Capture one forward and backward; the gradients it creates are the graph's static outputs."""
        params = [param for param in self.head.parameters() if param.requires_grad]
        self._features.grad = None  # captured from none, a gradient is written, not added, on each replay
        for param in params:
            param.grad = None
        graph = torch.cuda.CUDAGraph()
        for generator in self.head.graph_generators():
            graph.register_generator_state(generator)
        caller = torch.cuda.current_stream(self._features.device)
        try:
            # thread_local: loader threads may pin host memory while this thread captures
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._loss = self._forward_backward()
        except RuntimeError as error:
            torch.cuda.set_stream(caller)  # a capture that fails to end leaves its stream current
            self._loss = None
            for param in [self._features, *params]:
                param.grad = None
            raise CaptureError(f"the head's step could not be captured: {error}") from error
        self._graph = graph
        self._grads = [(param, param.grad) for param in params if param.grad is not None]
        self.captures += 1


def _targets_key(targets: Targets) -> tuple:
    """What the static targets are made for: multi-class ids, or padded labels (their dtypes)."""
    if isinstance(targets, Tensor):
        return ("classes", targets.dtype)
    return ("labels", targets.indptr.dtype, targets.indices.dtype)
