"""The encoder data-parallel (DDP, or FSDP2 for large encoders), the head class-sharded or replicated.

:func:`data_parallel` wraps the trainer's modules for a world of ``N`` ranks; with one rank it wraps nothing.
A class-sharded head needs no wrapper: its rows' gradients are complete on their owner. A replicated head
(``distributed.shard_head: never``) is wrapped in DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from megaclass.distributed.info import DistInfo
from megaclass.heads import Head
from megaclass.schema import ConfigError

__all__ = [
    "DataParallel",
    "data_parallel",
    "encoder_state",
    "load_encoder_state",
    "rank_batch_size",
    "shards_head",
]


def shards_head(config: Any, dist: DistInfo) -> bool:
    """Whether the run's head is split by class over the ranks (``distributed.shard_head`` of ``config``):
    ``auto`` whenever there are several ranks (every head shards)."""
    mode = config.distributed.shard_head
    if mode == "never":
        return False
    return mode == "always" or dist.distributed


def rank_batch_size(config: Any, dist: DistInfo) -> int:
    """Samples per step on each rank: ``train.batch_size`` of ``config`` is the global batch, and each of the
    ``N`` ranks takes ``batch_size / N`` of it (the same global batches, so the same steps, on any ``N``).

    Raises:
        ConfigError: ``N`` does not divide the global batch.
    """
    global_batch, world = config.train.batch_size, dist.world_size
    if global_batch % world:
        lower = max(global_batch // world * world, world)
        raise ConfigError(
            f"train.batch_size={global_batch} is the global batch, split evenly over the {world} ranks, and "
            f"{world} does not divide it: pass a multiple of {world} (e.g. {lower} or {lower + world})"
        )
    return global_batch // world


@dataclass
class DataParallel:
    """What the training step calls, and the gradient clipping that knows which gradients are sharded.

    Attributes:
        encoder: the module the step runs the inputs through (DDP / FSDP2 wrapper, or the encoder itself).
        head: the module the step computes the loss with (DDP wrapper of a replicated head, or the head).
        encoder_module: the unwrapped encoder. head_module: the unwrapped head.
        sharded_head: the head holds a different class range on each rank.
        dist: the rank facts.
    """

    encoder: nn.Module
    head: nn.Module
    encoder_module: nn.Module
    head_module: nn.Module
    sharded_head: bool
    dist: DistInfo

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale every gradient so the global norm (over all ranks' shards) is at most ``max_norm``.

        Returns:
            The global norm before clipping (a 0-dim device tensor; no host sync).
        """
        grads = [p.grad for p in (*self.encoder_module.parameters(), *self.head_module.parameters())]
        head_grads = {id(p.grad) for p in self.head_module.parameters() if p.grad is not None}
        present = [grad for grad in grads if grad is not None]
        if not present:
            return torch.zeros(())
        device = present[0].device
        sharded = torch.zeros((), dtype=torch.float32, device=device)  # squares of disjoint pieces per rank
        replicated = torch.zeros((), dtype=torch.float32, device=device)  # squares every rank holds alike
        for grad in grads:
            if grad is None:
                continue
            local = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP2 shards are DTensors
            if local.is_sparse:
                local = local.coalesce().values()  # a row's entries summed before squaring
            square = local.float().square().sum()
            if hasattr(grad, "to_local") or (self.sharded_head and id(grad) in head_grads):
                sharded += square
            else:
                replicated += square
        if self.dist.distributed:
            import torch.distributed as dist

            dist.all_reduce(sharded)
        total = torch.sqrt(sharded + replicated)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for grad in grads:
            if grad is None:
                continue
            # a sparse tensor's mul_ swaps in new values; a replayed step graph writes into the old ones
            (grad._values() if grad.is_sparse else grad).mul_(scale)
        return total


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _shard_units(module: nn.Module) -> list[nn.Module]:
    """The direct children with parameters; a container without a forward (``ModuleList``, ``ModuleDict``)
    stands for its children, since FSDP2 wraps a unit's forward."""
    units = []
    for child in module.children():
        if not _has_parameters(child):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            units += _shard_units(child)
        else:
            units.append(child)
    return units


def _fully_shard(encoder: nn.Module) -> nn.Module:
    """FSDP2: each direct child with parameters is its own unit (all-gathered just in time), then the root."""
    from torch.distributed.fsdp import fully_shard

    for unit in _shard_units(encoder):
        fully_shard(unit)
    fully_shard(encoder)
    return encoder


def data_parallel(
    encoder: nn.Module, head: Head, *, config: Any, dist: DistInfo, device: torch.device
) -> DataParallel:
    """Wrap ``encoder`` (``distributed.encoder``: ddp or fsdp2) and, unless it is class-sharded, ``head``.

    Build the optimizers after this call: FSDP2 replaces the encoder's parameters with sharded ones.
    """
    sharded = head.sharded
    if not dist.distributed:
        return DataParallel(encoder, head, encoder, head, sharded, dist)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    if config.distributed.encoder == "fsdp2" and not sharded:
        raise ConfigError(
            "distributed.encoder=fsdp2 needs a class-sharded head (distributed.shard_head auto or always)"
        )
    trainable = any(p.requires_grad for p in encoder.parameters())
    if not trainable:
        wrapped_encoder = encoder
    elif config.distributed.encoder == "fsdp2":
        wrapped_encoder = _fully_shard(encoder)
    else:
        wrapped_encoder = DistributedDataParallel(encoder, device_ids=device_ids)
    wrapped_head = head
    if not sharded and any(p.requires_grad for p in head.parameters()):
        wrapped_head = DistributedDataParallel(head, device_ids=device_ids, find_unused_parameters=True)
    return DataParallel(wrapped_encoder, wrapped_head, encoder, head, sharded, dist)


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in its state-dict order."""
    names = {id(param): name for name, param in module.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _named_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``state`` (by default ``optimizer.state_dict()``) keyed by parameter name, as
    ``get_optimizer_state_dict`` writes it."""
    order = _parameter_names(module, optimizer)
    state = optimizer.state_dict() if state is None else state
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {order[i]: value for i, value in state["state"].items()}, "param_groups": groups}


def _indexed_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`_named_optimizer_state` for this ``optimizer``."""
    index = {name: i for i, name in enumerate(_parameter_names(module, optimizer))}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in named["param_groups"]]
    return {"state": {index[n]: value for n, value in named["state"].items()}, "param_groups": groups}


def encoder_state(
    parallel: DataParallel, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The whole encoder's ``(state_dict, optimizer state_dict keyed by parameter name)``, the same for DDP,
    FSDP2 and one process (so a run resumes under another wrapper); collective under FSDP2."""
    module = parallel.encoder_module
    if not _is_fsdp(module):
        return module.state_dict(), None if optimizer is None else _named_optimizer_state(module, optimizer)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    optim_state = None if optimizer is None else get_optimizer_state_dict(module, optimizer, options=options)
    return model_state, optim_state


def load_encoder_state(
    parallel: DataParallel,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, Any],
    optim_state: dict[str, Any] | None,
    *,
    by_index: bool = False,
) -> None:
    """Load what :func:`encoder_state` returned (on any world size) into the encoder and its optimizer.

    ``by_index``: ``optim_state`` is keyed as ``optimizer.state_dict()`` keys it (a single-process
    checkpoint's; the optimizer is built the same way under every wrapper) instead of by parameter name.
    """
    if by_index and optimizer is not None and optim_state is not None:
        optim_state = _named_optimizer_state(parallel.encoder_module, optimizer, optim_state)
    module = parallel.encoder_module
    if not _is_fsdp(module):
        module.load_state_dict(model_state)
        if optimizer is not None and optim_state is not None:
            optimizer.load_state_dict(_indexed_optimizer_state(module, optimizer, optim_state))
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model_state, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(module, optimizer, optim_state, options=options)
