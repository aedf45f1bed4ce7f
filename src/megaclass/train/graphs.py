"""A training step's forward and backward captured in a CUDA graph and replayed, instead of launched op by op.

A head over 10^5..10^8 classes launches hundreds of small kernels a step (selection, gathers, the fused loss
and its gradients), an MLP encoder dozens more: on a GPU the host launching them, not the GPU, sets the pace.
With ``train.cuda_graph`` the trainer copies each step's inputs and targets into static buffers and replays
the captured forward and backward, which fill the parameters' gradients. The optimizer step, clipping,
``head.after_step`` and logging stay eager.

What is captured (:class:`StepGraph`):

- the encoder's and the head's step together where the encoder reads sparse rows and says that zero-weight
  entries add nothing (:func:`whole_step_blocker`): each batch's non-zeros are copied into inputs of a
  capacity ``N_cap`` fixed for the run (:func:`batch_capacity` over the rows' non-zero counts), the pads at
  column 0 with weight 0; a batch with more non-zeros runs eagerly and is counted
  (:attr:`StepGraph.input_overflows`);
- else the head's step alone, on the encoder's features ``(B, D)``, whose gradient the trainer sends back
  into the encoder eagerly.

Multi-class targets are ``(B,)``. Multi-label targets have another number of labels every step: they are
copied into padded targets of a capacity ``L_cap`` fixed for the run (:func:`batch_capacity`,
:meth:`~megaclass.targets.RaggedLabels.pad_to`), whose pads the heads mask out of the loss and its
gradients; a batch with more labels runs eagerly and is counted (:attr:`StepGraph.overflows`).

A captured step stays valid while the inputs' shapes and :meth:`~megaclass.heads.base.Head.graph_key` stay
the same (a rewired topology, an index rebuilt into new buffers, the auxiliary loss switched off change the
key): after a change the step runs eagerly (on the capture stream: it warms up what the capture needs, such as
compiled kernels and cached structures) and the next one is captured. Eager and replayed steps run the same
kernels on the same values (pads add exact zeros where unpadded inputs add nothing), so a run computes the
same numbers with the graph on or off; with input dropout the random numbers drawn differ (the pads draw too).

``train.cuda_graph``: ``auto`` (the default) captures where :func:`resolve_cuda_graph` finds nothing in the
way and runs eagerly where the capture itself fails (:class:`CaptureError`), ``on`` raises in both cases,
``off`` never captures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from megaclass.data.batch import SparseInputs
from megaclass.heads.base import Head
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels, Targets
from megaclass.train.low_precision import head_input

__all__ = [
    "CaptureError",
    "GraphChoice",
    "StepGraph",
    "batch_capacity",
    "resolve_cuda_graph",
    "whole_step_blocker",
]

_FIRST_EAGER_STEPS = 2  # before the first capture: libraries initialise lazily, kernels compile
_EAGER_STEPS = 1  # before a recapture: the head's structure changed (rebuilt caches), the shapes did not
_CAPACITY_HEADROOM = 1.25  # over the fullest batch of one epoch: another epoch's fullest rarely exceeds it
_CAPACITY_MULTIPLE = 64  # capacities are rounded up to this


def batch_capacity(row_counts: np.ndarray, batches: Sequence[np.ndarray], *, batch_size: int) -> int:
    """The entries (labels, or input non-zeros) a captured step holds: the most in a full batch of
    ``batches`` (one epoch's row ids) plus a quarter, rounded up to a multiple of 64, and never more than the
    ``batch_size`` rows with the most hold together (no batch holds more). A pad costs a gather of one row;
    a batch over the capacity costs an eager step.

    Args:
        row_counts: ``(N,)`` number of entries of each training row.
        batches: row ids of each batch of an epoch; those of ``batch_size`` rows count (smaller ones run
            eagerly).

    >>> batch_capacity(np.array([1, 2, 3, 9]), [np.array([0, 1]), np.array([2, 3])], batch_size=2)
    12
    """
    full = [rows for rows in batches if len(rows) == batch_size]
    fullest = max((int(row_counts[rows].sum()) for rows in full), default=0)
    most = int(np.sort(row_counts)[-batch_size:].sum()) if batch_size else 0
    rounded = -(-math.ceil(fullest * _CAPACITY_HEADROOM) // _CAPACITY_MULTIPLE) * _CAPACITY_MULTIPLE
    return min(rounded, most)


class CaptureError(RuntimeError):
    """A step ran eagerly but could not be captured (an op that synchronises with the host, or one a graph
    cannot hold); the message names the op's error."""


class GraphChoice(NamedTuple):
    """Whether the step is captured, and why (a line for the run's output)."""

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


def whole_step_blocker(encoder: nn.Module, input_kind: str, *, frozen_steps: int) -> str | None:
    """Why the encoder cannot be captured with the head (None: it can): its inputs must be sparse rows it
    reads with zero-weight pads added (:attr:`pads_sparse_inputs`), and it must train from the first step."""
    if input_kind != "sparse":
        return f"the encoder reads {input_kind}, of another shape every batch"
    if not getattr(encoder, "pads_sparse_inputs", False):
        return f"{type(encoder).__name__} does not declare that padded sparse inputs compute the same"
    if frozen_steps:
        return "optim.encoder_frozen_steps: the encoder starts frozen"
    return None


class StepGraph:
    """A training step's forward and backward captured once in a CUDA graph and replayed every step (see the
    module docstring): the head's alone on static ``features (B, D)``, or, with an ``encoder``, the encoder's
    and the head's together on static sparse inputs padded to ``input_capacity`` non-zeros. Targets are
    ``(B,)``, or ragged labels padded to ``label_capacity``.

    Args:
        head: the head; its parameters' gradients are outputs of the graph.
        batch_size: ``B``; steps of another size (an epoch's smaller last batch) are left to the caller.
        autocast_dtype: the dtype of the autocast the forward runs under (None: no autocast).
        label_capacity: ``L_cap`` for multi-label targets (:func:`batch_capacity`); None: multi-class
            targets only.
        encoder: an encoder of :class:`~megaclass.data.batch.SparseInputs` that
            :attr:`pads_sparse_inputs` (its parameters' gradients are outputs too); None: the head alone.
        input_capacity: ``N_cap``, the non-zeros a captured batch holds (with ``encoder``).

    >>> graph = StepGraph(head, batch_size=64, autocast_dtype=torch.bfloat16)  # doctest: +SKIP
    >>> loss, features_grad = graph.run(features, targets)  # doctest: +SKIP
    >>> features.backward(features_grad)  # doctest: +SKIP
    >>> whole = StepGraph(head, batch_size=64, autocast_dtype=None, encoder=mlp,
    ...                   input_capacity=4096)  # doctest: +SKIP
    >>> loss, _ = whole.run(batch.inputs, batch.targets)  # doctest: +SKIP
    """

    def __init__(
        self,
        head: Head,
        *,
        batch_size: int,
        autocast_dtype: torch.dtype | None,
        label_capacity: int | None = None,
        encoder: nn.Module | None = None,
        input_capacity: int | None = None,
    ) -> None:
        if (encoder is None) != (input_capacity is None):
            raise ValueError("StepGraph: an encoder and an input capacity go together")
        self.head = head
        self.encoder = encoder
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.label_capacity = label_capacity
        self.input_capacity = input_capacity
        self.captures = 0  # graphs captured so far
        self.replays = 0  # steps replayed so far
        self.overflows = 0  # full multi-label batches with more labels than label_capacity (run eagerly)
        self.input_overflows = 0  # full batches with more non-zeros than input_capacity (run eagerly)
        self._stream: torch.cuda.Stream | None = None  # eager warm-up steps and the capture run on it
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None  # what the graph (or the one to capture) was built for
        self._eager_left = 0  # eager steps still to run before the capture
        self._features: Tensor | None = None  # head alone: (B, D) static leaf that requires grad
        self._inputs: SparseInputs | None = None  # with the encoder: inputs padded to N_cap, static
        self._targets: Targets | None = None  # (B,), or labels padded to (L_cap,): static
        self._loss: Tensor | None = None  # () static output
        self._grads: list[tuple[Tensor, Tensor]] = []  # (parameter, its static gradient)

    def fits(self, targets: Targets, inputs: SparseInputs | None = None) -> bool:
        """Whether a step on ``targets`` (and, with an encoder, ``inputs``) can be replayed: a full batch,
        multi-class ``(B,)`` targets or (with a ``label_capacity``) unpadded ragged labels that fit in it,
        and sparse inputs within ``input_capacity``. A full batch over a capacity is counted in
        :attr:`overflows` or :attr:`input_overflows`."""
        if isinstance(targets, Tensor):
            if targets.dim() != 1 or targets.shape[0] != self.batch_size:
                return False
        elif self.label_capacity is None or targets.padded or targets.batch_size != self.batch_size:
            return False
        elif targets.indices.numel() > self.label_capacity:
            self.overflows += 1
            return False
        if self.encoder is None:
            return True
        if not isinstance(inputs, SparseInputs) or inputs.batch_size != self.batch_size:
            return False
        if inputs.indices.numel() > self.input_capacity:
            self.input_overflows += 1
            return False
        return True

    def run(self, x: Tensor | SparseInputs, targets: Targets) -> tuple[Tensor, Tensor | None]:
        """The forward and backward on ``x`` (features ``(B, D)``, or the encoder's sparse inputs) and
        ``targets`` that :meth:`fits`.

        The parameters hold their gradients on return (set them to None before: a replay overwrites, it does
        not accumulate).

        Returns:
            The loss (a fresh 0-dim tensor) and the gradient of the features ``(B, D)`` (None with the
            encoder inside): a static buffer the next step overwrites, so back-propagate it before.

        Raises:
            CaptureError: the step ran eagerly but its capture failed.
        """
        key = (
            _inputs_key(x),
            x.weights.device if isinstance(x, SparseInputs) else x.device,
            _targets_key(targets),
            self.head.training,
            self.encoder is not None and self.encoder.training,
            self.head.graph_key(),
        )
        if self._stream is None:
            self._stream = torch.cuda.Stream(key[1])
        if key != self._key:
            self._prepare(key, x, targets)
        with torch.no_grad():
            self._copy_inputs(x)
            self._copy_targets(targets)
        if self._eager_left > 0:
            self._eager_left -= 1
            loss = self._eager_step()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            self.replays += 1
            for param, grad in self._grads:
                param.grad = grad
            with self._autocast():  # what the eager forward's host side computes, it computes under autocast
                self.head.after_replay()
            loss = self._loss.clone()  # a clone: the next replay overwrites the static loss
        return loss, None if self._features is None else self._features.grad

    def _parameters(self) -> list[Tensor]:
        modules = [self.head] if self.encoder is None else [self.encoder, self.head]
        return [param for module in modules for param in module.parameters() if param.requires_grad]

    def _prepare(self, key: tuple, x: Tensor | SparseInputs, targets: Targets) -> None:
        """Drop the graph (its memory goes once its outputs are dropped) and make buffers for ``key``."""
        self._graph, self._loss, self._grads = None, None, []
        self._key = key
        self._eager_left = _FIRST_EAGER_STEPS if self.captures == 0 else _EAGER_STEPS
        if isinstance(x, SparseInputs):
            capacity = self.input_capacity
            self._inputs = SparseInputs(
                torch.empty(capacity, dtype=x.indices.dtype, device=x.indices.device),
                torch.empty(x.indptr.shape, dtype=x.indptr.dtype, device=x.indptr.device),
                torch.empty(capacity, dtype=x.weights.dtype, device=x.weights.device),
            )
        else:
            self._features = torch.empty(x.shape, dtype=x.dtype, device=x.device)
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

    def _copy_inputs(self, x: Tensor | SparseInputs) -> None:
        """Copy ``x`` into the static inputs; sparse rows are padded with zero weights at column 0, in the
        last row (an encoder that :attr:`pads_sparse_inputs` adds nothing for them)."""
        if self._inputs is None:
            self._features.copy_(x)
            return
        static, count = self._inputs, x.indices.numel()
        static.indices[:count].copy_(x.indices)
        static.indices[count:].zero_()
        static.weights[:count].copy_(x.weights)
        static.weights[count:].zero_()
        static.indptr[:-1].copy_(x.indptr[:-1])
        static.indptr[-1:].fill_(self.input_capacity)

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
            if self.encoder is None:
                features = self._features
            else:
                features = head_input(self.encoder(self._inputs), self.head)  # (B, D)
            loss = self.head(features, self._targets)
        loss.backward()
        return loss.detach()

    def _eager_step(self) -> Tensor:
        """One step run eagerly on the capture stream, ordered after and before the caller's stream."""
        if self._features is not None:
            self._features.grad = None  # a leaf's gradient accumulates: start each step from none
        caller = torch.cuda.current_stream(self._stream.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            loss = self._forward_backward()
        caller.wait_stream(self._stream)
        return loss

    def _capture(self) -> None:
        """Capture one forward and backward; the gradients it creates are the graph's static outputs."""
        params = self._parameters()
        leaves = params if self._features is None else [self._features, *params]
        for leaf in leaves:
            leaf.grad = None  # captured from none, a gradient is written, not added, on each replay
        graph = torch.cuda.CUDAGraph()
        generators = self.head.graph_generators()
        for generator in generators:
            graph.register_generator_state(generator)
        caller = torch.cuda.current_stream(self._stream.device)
        try:
            # thread_local: loader threads may pin host memory while this thread captures
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._loss = self._forward_backward()
        except RuntimeError as error:
            torch.cuda.set_stream(caller)  # a capture that fails to end leaves its stream current
            try:
                _end_generator_captures(generators, self._stream)
            except RuntimeError:  # their next draw raises then; the error below names the capture's cause
                torch.cuda.set_stream(caller)
            self._loss = None
            for leaf in leaves:
                leaf.grad = None
            what = "the head's step" if self.encoder is None else "the encoder's and the head's step"
            raise CaptureError(f"{what} could not be captured: {error}") from error
        self._graph = graph
        self._grads = [(param, param.grad) for param in params if param.grad is not None]
        self.captures += 1


def _end_generator_captures(generators: Sequence[torch.Generator], stream: torch.cuda.Stream) -> None:
    """End the capture a failed one left its random generators in (the default CUDA generator's, and
    ``generators``): they stay marked as capturing, and their next draw outside a capture (a dropout of the
    eager steps that follow) raises "Offset increment outside graph capture". An empty capture with the same
    generators begins and ends theirs."""
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the CUDA graph is empty": it is meant to be
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):  # as the step's
            pass


def _inputs_key(x: Tensor | SparseInputs) -> tuple:
    """What the static inputs are made for: features' shape and dtype, or sparse rows' dtypes."""
    if isinstance(x, SparseInputs):
        return ("sparse", x.batch_size, x.indices.dtype, x.indptr.dtype, x.weights.dtype)
    return ("features", tuple(x.shape), x.dtype)


def _targets_key(targets: Targets) -> tuple:
    """What the static targets are made for: multi-class ids, or padded labels (their dtypes)."""
    if isinstance(targets, Tensor):
        return ("classes", targets.dtype)
    return ("labels", targets.indptr.dtype, targets.indices.dtype)
