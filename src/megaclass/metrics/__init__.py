"""Evaluation metrics: ranking metrics of extreme classification (P@k, nDCG@k, PSP@k, ...)."""

from megaclass.metrics.ranking import RankingMetrics, propensity

__all__ = ["RankingMetrics", "propensity"]
