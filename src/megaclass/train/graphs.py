"""The head's part of a training step captured in a CUDA graph and replayed, instead of launched op by op.

A head over 10^5..10^8 classes launches hundreds of small kernels a step (selection, gathers, the fused loss
and its gradients): on a GPU the host launching them, not the GPU, sets the pace. With ``train.cuda_graph``
the trainer copies each step's features ``(B, D)`` and targets ``(B,)`` into static buffers, replays the
head's captured forward and backward (which fill the head's parameter gradients and the features'
gradient), and sends that gradient back into the encoder eagerly: the encoder's inputs are sparse, of another
size every step. The optimizer step, clipping, ``head.after_step`` and logging stay eager.

A captured step stays valid while the inputs' shapes and :meth:`~megaclass.heads.base.Head.graph_key` stay
the same (a rewired topology, an index rebuilt into new buffers, the auxiliary loss switched off change the
key): after a change the step runs eagerly (on the capture stream: it warms up what the capture needs, such as
compiled kernels and cached structures) and the next one is captured. Eager and replayed steps run the same
kernels on the same values, so a run computes the same numbers with the graph on or off.

``train.cuda_graph``: ``auto`` captures where :func:`resolve_cuda_graph` finds nothing in the way, ``on``
raises where something is, ``off`` never captures.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from megaclass.heads.base import Head
from megaclass.schema import ConfigError
from megaclass.targets import Targets

__all__ = ["GraphChoice", "HeadStepGraph", "resolve_cuda_graph"]

_FIRST_EAGER_STEPS = 2  # before the first capture: libraries initialise lazily, kernels compile
_EAGER_STEPS = 1  # before a recapture: the head's structure changed (rebuilt caches), the shapes did not


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
    """The head's forward and backward on static ``features (B, D)`` and ``targets (B,)``, captured once in a
    CUDA graph and replayed every step (see the module docstring).

    Args:
        head: the head; its parameters' gradients are outputs of the graph.
        batch_size: ``B``; steps of another size (an epoch's smaller last batch) are left to the caller.
        autocast_dtype: the dtype of the autocast the head's forward runs under (None: no autocast).

    >>> graph = HeadStepGraph(head, batch_size=64, autocast_dtype=torch.bfloat16)  # doctest: +SKIP
    >>> loss, features_grad = graph.run(features, targets)  # doctest: +SKIP
    >>> features.backward(features_grad)  # doctest: +SKIP
    """

    def __init__(self, head: Head, *, batch_size: int, autocast_dtype: torch.dtype | None) -> None:
        self.head = head
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.captures = 0  # graphs captured so far
        self.replays = 0  # steps replayed so far
        self._stream: torch.cuda.Stream | None = None  # eager warm-up steps and the capture run on it
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None  # what the graph (or the one to capture) was built for
        self._eager_left = 0  # eager steps still to run before the capture
        self._features: Tensor | None = None  # (B, D) static leaf that requires grad
        self._targets: Tensor | None = None  # (B,) static
        self._loss: Tensor | None = None  # () static output
        self._grads: list[tuple[Tensor, Tensor]] = []  # (parameter, its static gradient)

    def fits(self, targets: Targets) -> bool:
        """Whether a step on ``targets`` can be replayed: multi-class ``(B,)`` targets of the full batch."""
        return isinstance(targets, Tensor) and targets.dim() == 1 and targets.shape[0] == self.batch_size

    def run(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The head's forward and backward on ``features (B, D)`` and ``targets (B,)``.

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
            targets.dtype,
            self.head.training,
            self.head.graph_key(),
        )
        if key != self._key:
            self._prepare(key, features, targets)
        with torch.no_grad():
            self._features.copy_(features)
            self._targets.copy_(targets)
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

    def _prepare(self, key: tuple, features: Tensor, targets: Tensor) -> None:
        """Drop the graph (its memory goes once its outputs are dropped) and make buffers for ``key``."""
        self._graph, self._loss, self._grads = None, None, []
        self._key = key
        self._eager_left = _FIRST_EAGER_STEPS if self.captures == 0 else _EAGER_STEPS
        self._features = torch.empty(features.shape, dtype=features.dtype, device=features.device)
        self._features.requires_grad_(True)
        self._targets = torch.empty(targets.shape, dtype=targets.dtype, device=targets.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(features.device)

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
        # thread_local: loader threads may pin host memory while this thread captures
        with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            self._loss = self._forward_backward()
        self._graph = graph
        self._grads = [(param, param.grad) for param in params if param.grad is not None]
        self.captures += 1
