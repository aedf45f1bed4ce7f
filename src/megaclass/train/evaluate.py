"""Scoring a model on a data set: ranking metrics, and top-``k`` predictions in file order.

megaclass eval --run runs/demo --test data/deb-tags/test_bow.txt.gz
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from megaclass.data.loaders import BatchLoader, SparseDataset
from megaclass.metrics.filtering import LabelFilter
from megaclass.train.config import RunConfig
from megaclass.train.low_precision import head_input

__all__ = ["evaluate_model", "predict_batches"]


@torch.no_grad()
def evaluate_model(
    encoder: nn.Module,
    head: nn.Module,
    dataset: SparseDataset,
    *,
    config: RunConfig,
    label_counts: np.ndarray,
    num_train_samples: int,
    device: torch.device,
    label_filter: LabelFilter | None = None,
) -> dict[str, float]:
    """Ranking metrics of ``encoder`` + ``head`` on ``dataset``; propensities from the training labels.

    ``label_filter``: ``(doc_id, label_id)`` pairs of ``dataset``'s rows left out of predictions and targets
    alike (XMC repository filter files, :func:`~megaclass.metrics.filtering.read_filter_labels`).
    """
    from megaclass.metrics.ranking import RankingMetrics, propensity

    propensities = propensity(
        label_counts, num_train_samples, a=config.eval.propensity_a, b=config.eval.propensity_b
    )
    metrics = RankingMetrics(dataset.num_classes, ks=config.eval.ks, propensities=propensities)
    del propensities  # the metrics keep their inverses: one (C,) array held, not two
    k = max(config.eval.ks)
    spare = label_filter.max_per_doc if label_filter is not None else 0
    first_row, top, recall = 0, min(k, dataset.num_classes), None
    for _, ids, batch in predict_batches(encoder, head, dataset, k=k + spare, config=config, device=device):
        if first_row == 0 and head.topk_is_approximate():  # the ranking comes from an index's search
            recall = _topk_recall(encoder, head, batch.inputs, top, device, config.train.bf16)
        targets = batch.targets
        if label_filter is not None:
            ids, targets = label_filter.apply(ids, targets, first_row=first_row, k=k)
        metrics.update(ids, targets)
        first_row += ids.shape[0]
    scores = {name: float(value) for name, value in metrics.compute().items()}
    if recall is not None:  # how much of the exact top-k the search holds, on the first batch
        scores[f"topk_recall@{top}"] = recall
    return scores


def _topk_recall(
    encoder: nn.Module, head: nn.Module, inputs: Any, k: int, device: torch.device, bf16: bool
) -> float:
    """:meth:`~megaclass.heads.base.Head.topk_recall` of the features of ``inputs`` (models in eval mode)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        return head.topk_recall(head_input(encoder(inputs.to(device)), head), k)


@torch.no_grad()
def predict_batches(
    encoder: nn.Module,
    head: nn.Module,
    dataset: SparseDataset,
    *,
    k: int,
    config: RunConfig,
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor, Any]]:
    """``(scores (B, k), ids (B, k), batch)`` on the CPU, in file order; ids past ``C``: -1, scores -inf."""
    encoder.eval()
    head.eval()
    loader = BatchLoader(dataset, batch_size=config.eval.batch_size, shuffle=False)
    top = min(k, dataset.num_classes)
    enabled = config.train.bf16 and device.type == "cuda"
    try:
        for batch in loader.epoch(0):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                features = encoder(batch.inputs.to(device))  # (B, D)
                scores, ids = head.topk(head_input(features, head), top)  # (B, k)
            scores, ids = scores.float().cpu(), ids.cpu()
            if top < k:
                pad = k - top
                scores = torch.cat(
                    [scores, scores.new_full((scores.shape[0], pad), float("-inf"))], 1
                )  # (B, k)
                ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)  # (B, k)
            yield scores, ids, batch
    finally:
        encoder.train()
        head.train()
