"""What a head holds in memory, beside what a dense head of the same task would need."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["format_head_memory", "head_memory", "summed_over_ranks"]


def head_memory(
    head: nn.Module, optimizer: torch.optim.Optimizer | None, *, num_classes: int, in_features: int
) -> dict[str, int]:
    """Bytes the head holds (this rank's part when sharded) beside what a dense head would need.

    ``head_weights_bytes`` and ``head_structure_bytes`` (indices, topology, label maps) come from
    ``head.state_bytes()``; gradients are one per trainable weight; the optimizer state is measured.
    ``dense_head_total_bytes`` is an fp32 ``C x (D + 1)`` layer (weights and biases) with its gradients and
    AdamW's two moments: four times ``C (D + 1) 4`` bytes.
    """
    held = head.state_bytes()
    params = [param for param in head.parameters() if param.requires_grad]
    grads = sum(param.numel() * param.element_size() for param in params)
    state = optimizer.state if optimizer is not None else {}
    optimizer_bytes = sum(
        value.numel() * value.element_size()
        for param in params
        for value in state.get(param, {}).values()
        if isinstance(value, Tensor)
    )
    optimizer_bytes += held.get("row_optimizer", 0)  # state a head's row store keeps itself
    total = held["weights"] + held["structure"] + grads + optimizer_bytes
    dense = 4 * num_classes * (in_features + 1) * 4
    return {
        "head_weights_bytes": held["weights"],
        "head_structure_bytes": held["structure"],
        "head_grad_bytes": grads,
        "head_optimizer_bytes": optimizer_bytes,
        "head_total_bytes": total,
        "dense_head_total_bytes": dense,
    }


def summed_over_ranks(memory: dict[str, int], device: torch.device) -> dict[str, int]:
    """A sharded head's :func:`head_memory` over all ranks, each holding its classes' part (a collective);
    the dense head's figure is the whole task's already."""
    keys = [key for key in memory if key != "dense_head_total_bytes"]
    values = torch.tensor([memory[key] for key in keys], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(values)
    return {**memory, **dict(zip(keys, values.tolist(), strict=True))}


def format_head_memory(memory: dict[str, int], *, sparsity: float | None = None, ranks: int = 1) -> str:
    """One line: the head's total (weights, structure, gradients, optimizer state) beside the dense head's;
    ``ranks``: the head is sharded over that many ranks, and the figures are their sums."""
    mib = 1 << 20
    parts = ", ".join(
        f"{part} {memory[f'head_{key}_bytes'] / mib:.2f}"
        for part, key in (("weights", "weights"), ("structure", "structure"), ("gradients", "grad"))
    )
    line = (
        f"head + optimizer state {memory['head_total_bytes'] / mib:.2f} MiB"
        f"{f' over {ranks} ranks' if ranks > 1 else ''} ({parts}, "
        f"optimizer {memory['head_optimizer_bytes'] / mib:.2f}); "
        f"a dense head would need {memory['dense_head_total_bytes'] / mib:.2f} MiB"
    )
    return line if sparsity is None else f"head sparsity {100 * sparsity:.1f}%, {line}"
