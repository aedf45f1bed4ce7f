"""Nearest-class queries answered by the shards' own indexes, and the selected head on ``store=ps`` with its
index on the shards or on the trainer."""

from __future__ import annotations

import pytest
import torch

from megaclass.heads import HeadContext, build_head, head_config
from megaclass.paramserver import HyperParams, ParamServerClient


def _addresses(servers):
    return [f"127.0.0.1:{server.port}" for server in servers]


def _truth(features, rows, metric, n):
    if metric == "cosine":
        scores = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(rows, dim=1).T
    else:
        scores = features @ rows.T
    return scores.topk(n, dim=1)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("num_shards, num_rows, n", [(1, 37, 5), (3, 200, 3), (2, 23, 20)])
def test_shard_indexes_answer_like_an_exact_scan(shards, metric, num_shards, num_rows, n):
    """Shards this small are one cluster each: the index finds exactly the scan's rows, scores exact."""
    servers = shards(num_shards, num_rows=num_rows, dim=7)
    client = ParamServerClient(_addresses(servers), timeout_s=30)
    rows = client.get_rows(0, num_rows)
    features = torch.randn(6, 7)
    scores, ids = client.query_nearest(features, n, metric=metric, max_index_age=10)
    expected_scores, expected_ids = _truth(features, rows, metric, n)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, expected_ids), (ids, expected_ids)
    client.close()


def test_shard_index_refreshes_rows_updated_over_max_age_ago(shards):
    servers = shards(2, num_rows=60, dim=5, hyper=HyperParams(lr=1.0, momentum=0.0))
    client = ParamServerClient(_addresses(servers), timeout_s=30)
    features = torch.randn(1, 5)
    client.query_nearest(features, 1, max_index_age=1)  # builds both indexes at version 0
    target = 41
    client.push(torch.tensor([target]), -100.0 * features, step=1, lr=1.0)  # row 41 += 100 * feature
    client.push(torch.tensor([target]), torch.zeros(1, 5), step=2, lr=1.0)  # version 2: over age 1
    scores, ids = client.query_nearest(features, 1, max_index_age=1)
    assert int(ids[0, 0]) == target
    row = client.pull(torch.tensor([target]))
    torch.testing.assert_close(scores, features @ row.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_index_age -1"):
        client.query_nearest(features, 1, max_index_age=-1)
    client.close()


def test_cpu_index_queries_features_in_blocks(shards, monkeypatch):
    """Features queried a few at a time (small candidate blocks) give the one-block answer."""
    from megaclass.index.kmeans import ClusterIndex
    from megaclass.paramserver import server

    monkeypatch.setattr(server, "_CPU_QUERY_BYTES", 1)  # one feature per block
    blocks = []
    query = ClusterIndex.query
    monkeypatch.setattr(
        ClusterIndex, "query", lambda self, f, n, **kw: blocks.append(len(f)) or query(self, f, n, **kw)
    )
    servers = shards(2, num_rows=40, dim=7)
    client = ParamServerClient(_addresses(servers), timeout_s=30)
    rows = client.get_rows(0, 40)
    features = torch.randn(9, 7)
    scores, ids = client.query_nearest(features, 3, metric="cosine", max_index_age=10)
    assert blocks == [1] * 18  # 9 features, one at a time, on each of the 2 shards
    expected_scores, expected_ids = _truth(features, rows, "cosine", 3)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, expected_ids)
    client.close()


def test_one_shard_index_answers_both_metrics(shards):
    """The index a cosine query built answers a dot query too (its rows ranked by the dot product): one
    index a shard, whichever metrics its clients ask for."""
    servers = shards(2, num_rows=60, dim=6)
    client = ParamServerClient(_addresses(servers), timeout_s=30)
    rows = client.get_rows(0, 60) * torch.linspace(0.2, 3.0, 60)[:, None]  # unequal norms
    client.set_rows(torch.arange(60), rows)
    features = torch.randn(5, 6)
    client.query_nearest(features, 4, metric="cosine", max_index_age=10, probes=10**6)
    indexes = [server.service._index[0] for server in servers]
    scores, ids = client.query_nearest(features, 4, metric="dot", max_index_age=10, probes=10**6)
    assert [server.service._index[0] for server in servers] == indexes  # the same index, not a second one
    expected_scores, expected_ids = _truth(features, rows, "dot", 4)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, expected_ids)
    client.close()


def test_index_probes_are_split_between_shards(shards):
    """A query's probes count over all shards: each searches its share (at least one), 0 its default."""
    from megaclass.index.kmeans import DEFAULT_PROBES
    from megaclass.paramserver import wire

    servers = shards(3, num_rows=90, dim=5)
    client = ParamServerClient(_addresses(servers), timeout_s=30)
    features = torch.randn(4, 5)
    rows = client.get_rows(0, 90)
    for probes, per_shard in [(8, 3), (2, 1), (0, DEFAULT_PROBES)]:
        scores, ids = client.query_nearest(features, 2, max_index_age=10, probes=probes)
        assert [server.service._index[0].probes for server in servers] == [per_shard] * 3
        assert bool((ids >= 0).all())
        torch.testing.assert_close(scores, (features[:, None, :] * rows[ids]).sum(2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="probes -1"):
        client.query_nearest(features, 2, max_index_age=10, probes=-1)
    request = wire.message(
        "QueryNearestRequest", features=wire.encode_array(features), n=2, max_index_age=10, probes=-1
    )
    with pytest.raises(ValueError, match="probes -1"):
        servers[0].service.query_nearest(request, None)
    client.close()


def _run(head, batches):
    losses = []
    for step, (features, targets) in enumerate(batches, start=1):
        loss = head(features, targets)
        loss.backward()
        head.after_step(step, 0.0, lr=0.5)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("index", ["none", "gpu", "exact"])
def test_selected_head_on_ps_never_pulls_the_matrix(shards, monkeypatch, index):
    from megaclass.index.kmeans import DEFAULT_PROBES

    num_rows, dim = 97, 6
    servers = shards(2, num_rows=num_rows, dim=dim, hyper=HyperParams(lr=0.5, momentum=0.9))
    url = "ps://" + ",".join(_addresses(servers))
    context = HeadContext(in_features=dim, num_classes=num_rows, multilabel=False)
    options = {"type": "selected", "sample_num": 12, "index": index, "interval": 2, "coverage_every": 0}
    options["index_on"] = "shards"
    batches = [(torch.randn(4, dim), torch.randint(num_rows, (4,))) for _ in range(5)]

    def refuse(*args, **kwargs):
        raise AssertionError("the head read whole rows ranges from the parameter server")

    monkeypatch.setattr(ParamServerClient, "get_rows", refuse)
    head = build_head(head_config({**options, "store": url}), context)
    store = head.materialize()
    assert head.selector is None  # the shards answer nearest-class queries
    queries = []
    query = store.query_nearest
    monkeypatch.setattr(store, "query_nearest", lambda *a, **k: queries.append(k) or query(*a, **k))
    losses = _run(head, batches)
    if index == "none":
        assert queries == []
    else:
        age = 0 if index == "exact" else 2
        assert queries and all(q["max_index_age"] == age for q in queries)
        assert all(q["probes"] == DEFAULT_PROBES for q in queries)  # the head's probes, split by the client
        assert head.metrics()["neighbour_classes"] > 0
    monkeypatch.undo()
    if index == "none":  # the same random selection: the same losses and rows as rows in host memory
        host = build_head(head_config({**options, "store": "host"}), context)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(_run(host, batches)))
        store.flush()
        rows, expected = store.read(0, num_rows), host.store.read(0, num_rows)
        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)
    store.close()


def test_selected_head_on_ps_asks_the_shards_for_the_logits_metric_in_its_topk(shards, monkeypatch):
    num_rows, dim = 97, 6
    servers = shards(2, num_rows=num_rows, dim=dim, hyper=HyperParams(lr=0.5, momentum=0.9))
    context = HeadContext(in_features=dim, num_classes=num_rows, multilabel=False)
    options = {"type": "selected", "sample_num": 12, "index": "gpu", "topk_search": "index"}
    options.update(coverage_every=0, index_on="shards")
    head = build_head(head_config({**options, "store": "ps://" + ",".join(_addresses(servers))}), context)
    store = head.materialize()
    metrics = []
    query = store.query_nearest

    def asked(*args, **options):
        metrics.append((options["metric"], options["max_index_age"]))
        return query(*args, **options)

    monkeypatch.setattr(store, "query_nearest", asked)
    features, targets = torch.randn(4, dim), torch.randint(num_rows, (4,))
    head(features, targets).backward()  # the selection asks by its metric: cosine by default
    scores, ids = head.topk(features, 3)
    # the top-k by what the logits are, from indexes refreshed with every update (selection: interval steps)
    assert metrics == [("cosine", head.config.interval), ("dot", 1)]
    rows = store.read(0, num_rows)
    assert torch.equal(ids, (features @ rows.T).topk(3, dim=1).indices)  # shards this small: exact
    store.close()


def test_selected_head_on_ps_with_the_index_on_the_trainer_trains_as_on_the_host(shards, monkeypatch):
    """The trainer's index over the servers' rows (the default at this size) selects what one over the same
    rows in host memory does: the cold build reads the rows a block at a time, warm builds pull the rows the
    head pushed, and the shards are never asked for neighbours."""
    num_rows, dim = 97, 6
    servers = shards(2, num_rows=num_rows, dim=dim, hyper=HyperParams(lr=0.5, momentum=0.9))
    context = HeadContext(in_features=dim, num_classes=num_rows, multilabel=False)
    options = {"type": "selected", "sample_num": 12, "index": "gpu", "interval": 2, "coverage_every": 0}
    batches = [(torch.randn(4, dim), torch.randint(num_rows, (4,))) for _ in range(7)]
    head = build_head(head_config({**options, "store": "ps://" + ",".join(_addresses(servers))}), context)
    store = head.materialize()
    assert head.selector is not None
    monkeypatch.setattr(store, "query_nearest", None)  # never asked
    taken = []
    source = type(store.rows())
    take = source.take
    monkeypatch.setattr(source, "take", lambda self, ids: taken.append(len(ids)) or take(self, ids))
    losses = _run(head, batches)
    host = build_head(head_config({**options, "store": "host"}), context)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_run(host, batches)))
    assert taken and all(0 < count <= 12 * 2 for count in taken)  # the rows of two steps, pulled by ids
    assert head.metrics()["neighbour_classes"] > 0
    store.flush()
    torch.testing.assert_close(store.read(0, num_rows), host.store.read(0, num_rows), rtol=1e-5, atol=1e-6)
    scores, ids = head.topk(batches[0][0], 3)
    torch.testing.assert_close(scores, host.topk(batches[0][0], 3)[0], rtol=1e-5, atol=1e-6)
    store.close()


def test_where_a_parameter_server_run_keeps_its_index():
    from megaclass.schema import ConfigError

    def config(**options):
        return head_config({"type": "selected", "store": "ps://127.0.0.1:1", **options})

    assert config().index_on_trainer(10**6, 512)  # 5 x 10^8 values: the trainer
    assert not config().index_on_trainer(10**8, 64)  # 6.4 x 10^9: the shards
    assert config(index_on="trainer").index_on_trainer(10**8, 64)
    assert not config(index_on="shards").index_on_trainer(10, 4)
    assert not config(index="exact").index_on_trainer(10, 4)  # an exact scan runs on the shards
    assert head_config({"type": "selected", "index_on": "shards"}).index_on_trainer(10, 4)  # no servers
    with pytest.raises(ConfigError, match="index_on=trainer"):
        config(index="exact", index_on="trainer")


def test_index_device_is_checked(tmp_path):
    from megaclass.paramserver import ServerConfig, serve

    with pytest.raises(ValueError, match="--index-device 'tpu'"):
        ServerConfig(num_rows=4, dim=2, data_dir=str(tmp_path), index_device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            serve(ServerConfig(num_rows=4, dim=2, data_dir=str(tmp_path), index_device="cuda"))


def test_a_shard_answers_while_its_first_index_builds_in_the_background(shards, monkeypatch):
    """A CPU shard's first cold build runs in a thread (from 2^15 rows; here from any): its queries find no
    rows until the index is in, then the index's."""
    import threading
    import time

    from megaclass.index import kmeans

    monkeypatch.setattr(kmeans, "_BACKGROUND_MIN_ROWS", 1)
    gate, cold = threading.Event(), kmeans.ClusterIndex._cold

    def held(self, state, cancel=None):
        gate.wait(30)
        cold(self, state, cancel)

    monkeypatch.setattr(kmeans.ClusterIndex, "_cold", held)
    servers = shards(1, num_rows=40, dim=7)
    client = ParamServerClient(_addresses(servers), timeout_s=30)
    features = torch.randn(5, 7)
    scores, ids = client.query_nearest(features, 3, metric="cosine", max_index_age=10)
    assert (ids == -1).all() and torch.isinf(scores).all()
    gate.set()
    deadline = time.monotonic() + 30
    while (ids == -1).any() and time.monotonic() < deadline:
        time.sleep(0.05)
        scores, ids = client.query_nearest(features, 3, metric="cosine", max_index_age=10)
    expected_scores, expected_ids = _truth(features, client.get_rows(0, 40), "cosine", 3)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
    client.close()
