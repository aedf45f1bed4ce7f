"""Index configs: validation, and the selector each one builds (``build_index``, ``build_selector``)."""

from dataclasses import dataclass, field

import pytest
import torch

from megaclass.index import build_selector
from megaclass.index.config import (
    AnnoyIndexConfig,
    ClusterIndexConfig,
    ExactIndexConfig,
    IndexConfig,
    NoIndexConfig,
    build_index,
)
from megaclass.index.exact import ExactSelector
from megaclass.index.kmeans import ClusterIndex
from megaclass.schema import ConfigError, from_dict

CPU = torch.device("cpu")


@dataclass(frozen=True)
class _Holder:
    index: IndexConfig = field(default_factory=NoIndexConfig)


def test_none_builds_no_selector():
    assert build_index(NoIndexConfig(), metric="dot", device=CPU, seed=0, chunk_size=8) is None


def test_exact_config_builds_an_exact_scan_with_the_metric_and_chunk():
    selector = build_index(ExactIndexConfig(), metric="dot", device=CPU, seed=0, chunk_size=7)
    assert isinstance(selector, ExactSelector)
    assert selector.metric.value == "dot" and selector.chunk_size == 7
    weight, features = torch.randn(20, 4), torch.randn(3, 4)
    selector.build(weight)
    assert torch.equal(selector.query(features, 5), (features @ weight.T).topk(5, dim=1).indices)


@pytest.mark.parametrize(
    "dtype, row_dtype", [("auto", None), ("int8", torch.int8), ("float32", torch.float32)]
)
def test_gpu_config_builds_a_cluster_index_with_its_settings(dtype, row_dtype):
    config = ClusterIndexConfig(leaf_size=8, probes=3, dtype=dtype)
    selector = build_index(config, metric="cosine", device=CPU, seed=5, chunk_size=8)
    assert isinstance(selector, ClusterIndex)
    assert (selector.leaf_size, selector.probes, selector.seed) == (8, 3, 5)
    assert selector.recall_target == 0.92 and selector.scan_when_cheaper
    assert selector.metric.value == "cosine"
    if row_dtype is not None:
        assert selector.row_dtype == row_dtype
    rows = torch.randn(40, 6)
    selector.build(rows)
    probe = rows[[2, 17]] * 3  # a row's own direction finds it first
    assert selector.query(probe, 1)[:, 0].tolist() == [2, 17]


def test_annoy_config_passes_its_settings():
    pytest.importorskip("annoy")
    selector = build_index(
        AnnoyIndexConfig(ntrees=3, search_k=9), metric="cosine", device=CPU, seed=2, chunk_size=8
    )
    assert (selector.ntrees, selector.search_k, selector.seed) == (3, 9, 2)


@pytest.mark.parametrize(
    "config, options, message",
    [
        (ClusterIndexConfig, {"leaf_size": 0}, "leaf_size"),
        (ClusterIndexConfig, {"probes": 0}, "probes"),
        (ClusterIndexConfig, {"scan_when_cheaper": "no"}, "scan_when_cheaper"),
        (AnnoyIndexConfig, {"ntrees": 0}, "ntrees"),
    ],
)
def test_bad_values_are_config_errors(config, options, message):
    with pytest.raises(ConfigError, match=message):
        config(**options)


def test_a_scalar_names_the_type_with_its_defaults():
    assert from_dict(_Holder, {"index": "exact"}).index == ExactIndexConfig()
    assert from_dict(_Holder, {"index": {"type": "gpu", "probes": 4}}).index == ClusterIndexConfig(probes=4)
    with pytest.raises(ConfigError):
        from_dict(_Holder, {"index": {"type": "faiss"}})


def test_unknown_selector():
    with pytest.raises(ValueError, match="unknown selector 'faiss'"):
        build_selector("faiss")


def test_gpu_config_defaults_are_automatic_and_checked():
    selector = build_index(
        ClusterIndexConfig(recall_target=0.8), metric="dot", device=CPU, seed=0, chunk_size=8
    )
    assert (selector.leaf_size, selector.probes, selector.recall_target) == (None, None, 0.8)
    config = from_dict(_Holder, {"index": {"type": "gpu", "leaf_size": 40, "probes": "auto"}})
    assert (config.index.leaf_size, config.index.probes) == (40, "auto")
    searched = from_dict(_Holder, {"index": {"type": "gpu", "scan_when_cheaper": False}}).index
    assert not build_index(searched, metric="dot", device=CPU, seed=0, chunk_size=8).scan_when_cheaper
    for bad in ({"leaf_size": 0}, {"probes": "many"}, {"recall_target": 1.5}):
        with pytest.raises(ConfigError):
            from_dict(_Holder, {"index": {"type": "gpu", **bad}})
