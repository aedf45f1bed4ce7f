"""Class selectors over a head's weight rows (``exact``, ``gpu`` balanced clusters, ``annoy`` forest), the
balanced clusterings they and the label trees use, the active-class selection rule, and the recall of an
index's approximate top-k search against an exact scan (:func:`recall_at_k`).

Optional backends (annoy) load only when their selector is built.
"""

from __future__ import annotations

from typing import Any

from megaclass.index.base import ClassSelector, Metric
from megaclass.index.clustering import balanced_kmeans, balanced_kmeans_fit, hierarchical_balanced_2means
from megaclass.index.recall import recall_at_k
from megaclass.index.selection import Selection, coprime_multipliers, select_active

__all__ = [
    "ClassSelector",
    "Metric",
    "Selection",
    "balanced_kmeans",
    "balanced_kmeans_fit",
    "coprime_multipliers",
    "build_selector",
    "hierarchical_balanced_2means",
    "recall_at_k",
    "select_active",
]

SELECTOR_KINDS = ("gpu", "annoy", "exact")


def build_selector(kind: str, **options: Any) -> ClassSelector:
    """The selector registered as ``kind`` (``gpu``, ``annoy`` or ``exact``) built with ``options``.

    >>> build_selector("exact", metric="dot").metric.value
    'dot'
    """
    if kind == "gpu":
        from megaclass.index.kmeans import ClusterIndex

        return ClusterIndex(**options)
    if kind == "annoy":
        from megaclass.index.annoy_forest import AnnoySelector

        return AnnoySelector(**options)
    if kind == "exact":
        from megaclass.index.exact import ExactSelector

        return ExactSelector(**options)
    raise ValueError(f"index: unknown selector {kind!r}; expected one of {', '.join(SELECTOR_KINDS)}")
