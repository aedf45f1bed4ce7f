"""Updates applied by real shards on loopback, checked against torch.optim run on the same rows."""

import threading

import pytest
import torch

from megaclass.ops.row_optimizers import RowOptimizerConfig
from megaclass.paramserver import HyperParams, ParamServerClient
from megaclass.store import build_store

OPTIMIZERS = {
    # name: (server optimizer, HyperParams options, torch optimizer class, its options)
    "sgd": ("sgd", {"momentum": 0.0}, torch.optim.SGD, {}),
    "sgd-momentum-wd": (
        "sgd",
        {"momentum": 0.9, "weight_decay": 0.01},
        torch.optim.SGD,
        {"momentum": 0.9, "weight_decay": 0.01},
    ),
    "sgd-nesterov": (
        "sgd",
        {"momentum": 0.5, "nesterov": True},
        torch.optim.SGD,
        {"momentum": 0.5, "nesterov": True},
    ),
    "adam": ("adam", {"weight_decay": 0.02}, torch.optim.Adam, {"weight_decay": 0.02}),
    "adamw": (
        "adamw",
        {"weight_decay": 0.1, "beta1": 0.8},
        torch.optim.AdamW,
        {"weight_decay": 0.1, "betas": (0.8, 0.999)},
    ),
    "adagrad": ("adagrad", {"eps": 1e-10}, torch.optim.Adagrad, {"eps": 1e-10}),
}


def _addresses(servers):
    return [f"127.0.0.1:{server.port}" for server in servers]


class PerRowReference:
    """One torch optimizer per row: exactly the lazy semantics (untouched rows keep their state)."""

    def __init__(self, rows, optimizer, options, dtype=torch.float64):
        self.params = [torch.nn.Parameter(row.clone().to(dtype)) for row in rows]
        self.optimizers = [optimizer([p], lr=0.1, **options) for p in self.params]

    def step(self, ids, grads, lr):
        for row, grad in zip(ids.tolist(), grads.to(self.params[0].dtype), strict=True):
            self.params[row].grad = grad.clone()
            self.optimizers[row].param_groups[0]["lr"] = lr
            self.optimizers[row].step()

    def rows(self):
        return torch.stack([p.detach() for p in self.params]).double()


def assert_within_float32_error(actual, truth, float32_reference, *, slack=1e-7):
    """``actual``'s error against the float64 ``truth`` is at most twice torch's own float32 error."""
    own = (float32_reference - truth).abs().max().item()
    error = (actual.double() - truth).abs().max().item()
    assert error <= 2 * own + slack, f"error {error:.3g} vs torch float32's {own:.3g}"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("touched", ["subset", "all"])
def test_updates_match_torch(shards, name, num_shards, touched):
    optimizer, hyper, reference_class, reference_options = OPTIMIZERS[name]
    servers = shards(num_shards, num_rows=23, dim=7, optimizer=optimizer, hyper=HyperParams(lr=0.5, **hyper))
    client = ParamServerClient(_addresses(servers), timeout_s=20)
    initial = client.get_rows(0, 23)
    truth = PerRowReference(initial, reference_class, reference_options)
    float32 = PerRowReference(initial, reference_class, reference_options, dtype=torch.float32)
    for step in range(1, 6):
        ids = torch.randperm(23)[: [0, 1, 9, 23, 17][step - 1]] if touched == "subset" else torch.arange(23)
        grads = torch.randn(len(ids), 7)
        lr = 0.05 * step  # a schedule: each push carries its step's lr
        client.push(ids, grads, step=step, lr=lr)
        truth.step(ids, grads, lr)
        float32.step(ids, grads, lr)
        # store.optim's float32 Adam (bias corrections 1 - beta^k in float32; torch: float64) is ~1e-5 off
        slack = 1e-5 if optimizer.startswith("adam") else 1e-7
        assert_within_float32_error(client.pull(torch.arange(23)), truth.rows(), float32.rows(), slack=slack)


def test_dense_sgd_equals_torch_sgd_on_the_matrix(shards):
    """Every row touched every step: the shards follow torch.optim.SGD on the whole (C, D) matrix."""
    servers = shards(2, num_rows=11, dim=3, hyper=HyperParams(lr=0.3, momentum=0.9, weight_decay=0.05))
    client = ParamServerClient(_addresses(servers), timeout_s=20)
    weight = torch.nn.Parameter(client.get_rows(0, 11))
    sgd = torch.optim.SGD([weight], lr=0.3, momentum=0.9, weight_decay=0.05)
    for step in range(1, 5):
        grads = torch.randn(11, 3)
        weight.grad = grads.clone()
        sgd.step()
        client.push(torch.arange(11).flip(0), grads.flip(0), step=step)  # unsorted ids on purpose
    torch.testing.assert_close(client.get_rows(0, 11), weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        client.get_rows(0, 11, field="momentum_buffer"),
        sgd.state[weight]["momentum_buffer"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_bfloat16_wire_rounds_only_the_gradients(shards):
    servers = shards(2, num_rows=13, dim=4)
    client = ParamServerClient(_addresses(servers), timeout_s=20, wire_dtype="bfloat16")
    exact = ParamServerClient(_addresses(servers), timeout_s=20)
    before = exact.get_rows(0, 13)
    grads = torch.randn(5, 4)
    ids = torch.tensor([12, 0, 6, 7, 3])
    client.push(ids, grads, step=1, lr=0.1)
    expected = before.clone()
    expected[ids] -= 0.1 * grads.bfloat16().float()
    torch.testing.assert_close(exact.get_rows(0, 13), expected, rtol=0, atol=1e-7)
    pulled = client.pull(ids)  # rows travel as bfloat16 too
    torch.testing.assert_close(pulled, expected[ids].bfloat16().float(), rtol=0, atol=0)


def test_two_trainers_sync_average_their_gradients(shards):
    """Sync mode: step t is applied once both trainers pushed it, with the mean of their gradients."""
    servers = shards(2, num_rows=17, dim=3, trainers=2, hyper=HyperParams(lr=0.2, momentum=0.9))
    clients = [ParamServerClient(_addresses(servers), trainer=rank, timeout_s=30) for rank in (0, 1)]
    reference = PerRowReference(clients[0].get_rows(0, 17), torch.optim.SGD, {"momentum": 0.9})
    plans = {
        (rank, step): (torch.randperm(17)[: 4 + 3 * rank + step], torch.randn(4 + 3 * rank + step, 3))
        for rank in (0, 1)
        for step in range(1, 5)
    }
    seen = {}

    def trainer(rank):
        for step in range(1, 5):
            seen[rank, step] = clients[rank].pull(torch.arange(17))  # waits for step - 1 on every shard
            clients[rank].push(*plans[rank, step], step=step, lr=0.2)
        clients[rank].flush()

    threads = [threading.Thread(target=trainer, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for step in range(1, 5):
        torch.testing.assert_close(seen[0, step], seen[1, step], rtol=0, atol=0)  # both saw the same rows
        total = torch.zeros(17, 3)
        for rank in (0, 1):
            ids, grads = plans[rank, step]
            total.index_add_(0, ids, grads)
        touched = torch.nonzero(total.abs().sum(1)).flatten()
        reference.step(touched, total[touched] / 2, 0.2)  # mean over trainers, like DDP
    torch.testing.assert_close(clients[0].get_rows(0, 17), reference.rows().float(), rtol=1e-5, atol=1e-6)


def test_barrier_drops_a_dead_trainer_and_lets_it_rejoin(shards, caplog):
    servers = shards(
        1, num_rows=5, dim=2, trainers=2, hyper=HyperParams(lr=1.0, momentum=0.0, barrier_timeout_s=0.3)
    )
    alive = ParamServerClient(_addresses(servers), trainer=0, timeout_s=20)
    before = alive.get_rows(0, 5)
    alive.push(torch.tensor([1]), torch.ones(1, 2), step=1)
    with caplog.at_level("WARNING", logger="megaclass.paramserver"):
        rows = alive.pull(torch.tensor([1]))  # waits for the barrier timeout, not forever
    assert "dropping them from the barrier" in caplog.text and "[1]" in caplog.text
    torch.testing.assert_close(rows, before[1:2] - 1.0)  # the mean over the one trainer that pushed
    assert list(alive.health()[0].dropped_trainers) == [1]
    late = ParamServerClient(_addresses(servers), trainer=1, timeout_s=20)
    late.push(torch.tensor([2]), torch.ones(1, 2), step=2)
    assert list(alive.health()[0].dropped_trainers) == []  # rejoined: step 2 waits for both again
    alive.push(torch.tensor([2]), torch.ones(1, 2), step=2)
    torch.testing.assert_close(alive.pull(torch.tensor([2])), before[2:3] - 1.0)


def test_async_mode_applies_each_push_once(shards):
    servers = shards(2, num_rows=9, dim=2, trainers=2, mode="async", hyper=HyperParams(lr=1.0, momentum=0.0))
    clients = [ParamServerClient(_addresses(servers), trainer=rank, timeout_s=20) for rank in (0, 1)]
    before = clients[0].get_rows(0, 9)
    clients[0].push(torch.tensor([0, 8]), torch.ones(2, 2), step=1)
    clients[1].push(torch.tensor([8]), torch.ones(1, 2), step=7)
    clients[0].push(torch.tensor([0, 8]), torch.ones(2, 2), step=1)  # a retried push: applied once
    after = clients[1].get_rows(0, 9)
    torch.testing.assert_close(after[0], before[0] - 1)
    torch.testing.assert_close(after[8], before[8] - 2)
    assert list(clients[0].health()[1].trainer_steps) == [1, 7]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "copied-in-pieces-on-threads"])
def test_prefetch_never_returns_stale_rows(shards, split, monkeypatch):
    from megaclass.paramserver import client as client_module
    from megaclass.store.paramserver import ParamServerStore

    if split:  # every block copy cut into pieces of a row or two, on 4 threads
        monkeypatch.setattr(client_module, "_COPY_PIECE_BYTES", 20)
        monkeypatch.setattr(client_module.os, "cpu_count", lambda: 4)

    servers = shards(3, num_rows=31, dim=4, hyper=HyperParams(lr=0.5, momentum=0.9))
    store = ParamServerStore(",".join(_addresses(servers)).join(["ps://", ""]), timeout_s=20)
    check = ParamServerClient(_addresses(servers), timeout_s=20)
    ids = torch.arange(0, 31, 2)
    for step in range(1, 6):
        rows = store.pull(ids)
        torch.testing.assert_close(rows, check.pull(ids), rtol=0, atol=0)
        next_ids = torch.unique(torch.cat([ids[:5], torch.randperm(31)[:6]]))  # overlaps this step's rows
        store.prefetch(next_ids)  # starts before this step's push
        store.push(ids, torch.randn(len(ids), 4), step=step, lr=0.5)
        ids = next_ids
    torch.testing.assert_close(store.pull(ids), check.pull(ids), rtol=0, atol=0)
    assert store.read(3, 30).shape == (27, 4)


def test_query_nearest_merges_shards(shards):
    servers = shards(3, num_rows=40, dim=6)
    client = ParamServerClient(_addresses(servers), timeout_s=20)
    rows = client.get_rows(0, 40)
    features = torch.randn(5, 6)
    for metric, n in [("dot", 4), ("cosine", 20)]:
        scores, ids = client.query_nearest(features, n, metric=metric)
        if metric == "cosine":
            truth = (
                torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(rows, dim=1).T
            )
        else:
            truth = features @ rows.T
        expected_scores, expected_ids = truth.topk(n, dim=1)
        torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(ids, expected_ids)


def test_store_state_dict_round_trip(shards):
    from megaclass.store.paramserver import ParamServerStore

    first = shards(2, num_rows=10, dim=3, optimizer="adam")
    second = shards(3, num_rows=10, dim=3, optimizer="adam", seed=5, init_bound=0.0)
    source = ParamServerStore(_addresses(first), timeout_s=20)
    source.push(torch.tensor([1, 4, 9]), torch.randn(3, 3), step=1, lr=0.1)
    state = source.state_dict()  # sources read from the servers when asked
    assert sorted(state) == ["optim.exp_avg", "optim.exp_avg_sq", "optim.step", "weight"]
    assert {key: tuple(value.shape) for key, value in state.items()} == {
        "weight": (10, 3),
        "optim.exp_avg": (10, 3),
        "optim.exp_avg_sq": (10, 3),
        "optim.step": (10,),
    }
    assert state["optim.step"].read().tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 1]
    assert state["optim.step"][2:2].shape == (0,)
    target = ParamServerStore(_addresses(second), timeout_s=20)
    target.load_state_dict(state)  # read from the first servers block by block
    for key, value in target.state_dict().items():
        assert torch.equal(value.read(), state[key].read()), key
    with pytest.raises(ValueError, match="keep"):
        target.load_state_dict({"weight": state["weight"]})
    wrong = {key: value.read() for key, value in state.items()}
    wrong["optim.step"] = torch.zeros(10, 1)
    with pytest.raises(ValueError, match=r"'optim.step': shape \(10, 1\), the servers keep \(10,\)"):
        target.load_state_dict(wrong)


def test_hyper_params_change_and_persist(shards, tmp_path):
    servers = shards(1, num_rows=4, dim=2, hyper=HyperParams(lr=0.1, momentum=0.0))
    client = ParamServerClient(_addresses(servers), timeout_s=20)
    assert client.set_hyper_params(lr=2.0)["lr"] == 2.0
    before = client.get_rows(0, 4)
    client.push(torch.tensor([3]), torch.ones(1, 2), step=1)  # no lr sent: the server's
    torch.testing.assert_close(client.get_rows(3, 4), before[3:] - 2.0)
    with pytest.raises(ValueError, match="momentum_buffer"):
        client.set_hyper_params(momentum=0.9)  # no momentum state on this shard
    with pytest.raises(ValueError, match="lr"):
        client.set_hyper_params(lr=-1)
    with pytest.raises(ValueError, match="not one of"):
        client.set_hyper_params(learning_rate=1)


@pytest.mark.parametrize(("num_rows", "num_shards"), [(5, 1), (70_001, 3)])
def test_shards_start_from_the_matrix_in_process_stores_draw(shards, num_rows, num_shards):
    from megaclass.ops.row_optimizers import init_rows_

    servers = shards(num_shards, num_rows=num_rows, dim=2, seed=7)
    expected = torch.empty(num_rows, 2)
    init_rows_(expected, seed=7)
    torch.testing.assert_close(
        ParamServerClient(_addresses(servers), timeout_s=20).get_rows(0, num_rows), expected
    )


def test_build_store_ps_url_configures_the_servers(shards):
    from megaclass.store import RowOptimizerConfig, build_store

    servers = shards(2, num_rows=12, dim=3, optimizer="sgd", hyper=HyperParams(momentum=0.5))
    url = "ps://" + ",".join(_addresses(servers))
    store = build_store(
        url, num_rows=12, dim=3, device="cpu", optimizer=RowOptimizerConfig(momentum=0.8, weight_decay=0.1)
    )
    assert store.pull(torch.tensor([11, 0])).shape == (2, 3)
    assert ParamServerClient(_addresses(servers)).set_hyper_params()["momentum"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="servers hold 12 x 3"):
        build_store(url, num_rows=13, dim=3, device="cpu", optimizer=RowOptimizerConfig())
    with pytest.raises(ValueError, match="run 'sgd'"):
        build_store(url, num_rows=12, dim=3, device="cpu", optimizer=RowOptimizerConfig(kind="adam"))
    with pytest.raises(ValueError, match="not host:port"):
        build_store("ps://localhost", num_rows=12, dim=3, device="cpu", optimizer=RowOptimizerConfig())


def test_late_push_for_a_step_applied_without_the_trainer_is_refused(shards):
    from megaclass.paramserver import ParamServerError

    hyper = HyperParams(lr=1.0, momentum=0.0, barrier_timeout_s=0.2)
    servers = shards(1, num_rows=4, dim=2, trainers=2, hyper=hyper)
    alive, late = (ParamServerClient(_addresses(servers), trainer=rank, timeout_s=10) for rank in (0, 1))
    alive.push(torch.tensor([1]), torch.ones(1, 2), step=1)
    alive.push(torch.tensor([1]), torch.ones(1, 2), step=1)  # a retry: acknowledged, applied once
    alive.flush()  # trainer 1 is dropped after 0.2 s
    assert alive.health()[0].version == 1
    with pytest.raises(ParamServerError, match="applied step 1 without it"):
        late.push(torch.tensor([2]), torch.ones(1, 2), step=1)


def test_a_push_retried_while_its_step_is_applied_is_applied_once(shards, monkeypatch):
    """A retry that arrives after its step left the barrier and before the step is committed finds it being
    applied (not pending again, which applied it twice)."""
    servers = shards(1, num_rows=4, dim=2, hyper=HyperParams(lr=1.0, momentum=0.0))
    service = servers[0].service
    client = ParamServerClient(_addresses(servers))
    ids, grads = torch.tensor([1]), torch.ones(1, 2)
    before = client.pull(ids)
    apply = service.state.apply

    def retried_meanwhile(*args, **kwargs):
        service._add_to_barrier(0, 1, ids, grads, 1.0)  # the trainer's retry, while step 1 is applied
        return apply(*args, **kwargs)

    monkeypatch.setattr(service.state, "apply", retried_meanwhile)
    client.push(ids, grads, step=1)
    client.flush()
    service.apply_ready_steps()
    assert client.health()[0].version == 1 and client.health()[0].applied_step == 1
    torch.testing.assert_close(client.pull(ids), before - 1)
    client.close()


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shared_memory_mib", [0, 1])
def test_bf16_shards_serve_the_rows_they_hold(shards, wire_dtype, shared_memory_mib):
    servers = shards(2, num_rows=23, dim=7, optimizer="adam", dtype="bf16_sr", hyper=HyperParams(lr=0.1))
    client = ParamServerClient(
        _addresses(servers), timeout_s=20, wire_dtype=wire_dtype, shared_memory_mib=shared_memory_mib
    )
    assert client.row_dtype == "bf16_sr"
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        client.push(
            torch.randperm(23, generator=generator)[:9], torch.randn(9, 7, generator=generator), step=step
        )
    held = {  # the shards' bfloat16 values, exactly
        field: torch.cat([server.service.state.field(field) for server in servers]).float()
        for field in ("rows", "exp_avg", "step")
    }
    torch.testing.assert_close(client.pull(torch.arange(23), min_step=3), held["rows"], rtol=0, atol=0)
    for field, values in held.items():
        torch.testing.assert_close(client.get_rows(0, 23, field=field), values, rtol=0, atol=0)
    features = torch.randn(4, 7, generator=generator)
    exact_scores, exact_ids = (features @ held["rows"].T).topk(5, dim=1)
    scores, ids = client.query_nearest(features, 5)
    assert torch.equal(ids, exact_ids)
    torch.testing.assert_close(scores, exact_scores)
    scores, ids = client.query_nearest(features, 5, max_index_age=1)  # through each shard's index
    found = ids >= 0
    assert bool(found[:, 0].all())
    rescored = (features.unsqueeze(1) * held["rows"][ids.clamp_min(0)]).sum(-1)  # (4, 5) from the held rows
    torch.testing.assert_close(scores[found], rescored[found])
    client.close()


def test_a_store_asks_the_row_dtype_and_optimizer_its_shards_hold(shards):
    servers = shards(1, num_rows=23, dim=7, optimizer="adam", dtype="bf16_sr")
    spec = "ps://" + ",".join(_addresses(servers))
    options = dict(num_rows=23, dim=7, device="cpu", optimizer=RowOptimizerConfig(kind="adam"))
    with pytest.raises(
        ValueError, match="the servers hold bf16_sr rows but float32 rows were asked for; start them"
    ):
        build_store(spec, **options)
    with pytest.raises(ValueError, match="the parameter servers run 'adam'; start them with --optimizer sgd"):
        build_store(spec, **{**options, "optimizer": RowOptimizerConfig(kind="sgd")}, dtype="bf16_sr")
    store = build_store(spec, **options, dtype="bf16_sr")
    assert store.held_bytes() == (2 * 23 * 7, 2 * (2 * 23 * 7) + 4 * 23)  # exp_avg, exp_avg_sq; step
    store.close()
