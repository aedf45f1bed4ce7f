"""Rows and queries shaped like a trained head's, and the recall of an approximate top-n."""

import torch


def trained_like(classes: int, dim: int, groups: int, batch: int, seed: int = 0):
    """Rows and queries clustered around ``groups`` directions, as class rows of a trained head are."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(groups, dim, generator=generator), dim=1)
    rows = centres[torch.randint(groups, (classes,), generator=generator)]
    rows = rows + 0.3 * torch.randn(classes, dim, generator=generator) / dim**0.5
    rows = rows * (1 + torch.rand(classes, 1, generator=generator))  # varied norms
    queries = centres[torch.randint(groups, (batch,), generator=generator)]
    return rows, queries + 0.3 * torch.randn(batch, dim, generator=generator) / dim**0.5


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (
        sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist(), strict=True)) / truth.numel()
    )
