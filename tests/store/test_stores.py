"""Device and host row stores against a dense reference of the same updates."""

import pytest
import torch

from megaclass.ops.row_optimizers import init_rows_
from megaclass.state_io import read_state, write_state
from megaclass.store import RowOptimizerConfig, build_store
from megaclass.store.host import HostStore
from megaclass.store.local import LocalRows


@pytest.mark.parametrize("spec", ["gpu", "host"])
@pytest.mark.parametrize("num_rows,dim", [(1, 1), (17, 5), (70000, 2)])
def test_initial_rows_do_not_depend_on_the_store(spec, num_rows, dim):
    store = build_store(
        spec, num_rows=num_rows, dim=dim, device="cpu", optimizer=RowOptimizerConfig(), seed=4
    )
    reference = torch.empty(num_rows, dim)
    init_rows_(reference, seed=4)
    assert torch.equal(store.rows(), reference)
    assert float(reference.abs().max()) <= dim**-0.5
    assert torch.equal(store.read(3, 9), reference[3:9])


@pytest.mark.parametrize("spec", ["gpu", "host"])
@pytest.mark.parametrize("dtype", ["float32", "bf16_sr"])
@pytest.mark.parametrize("block_rows", [1, 4, 10, 64])
def test_blocks_are_the_rows_read_in_order(spec, dtype, block_rows):
    store = build_store(
        spec, num_rows=10, dim=3, device="cpu", optimizer=RowOptimizerConfig(), seed=1, dtype=dtype
    )
    store.push(torch.tensor([2, 7]), torch.ones(2, 3), step=1, lr=0.5)  # read after the update
    blocks = list(store.blocks(block_rows))
    assert [start for start, _ in blocks] == list(range(0, 10, block_rows))
    assert all(block.dtype == torch.float32 for _, block in blocks)
    assert torch.equal(torch.cat([block for _, block in blocks]), store.read(0, 10))


@pytest.mark.parametrize("spec", ["gpu", "host"])
def test_sgd_momentum_every_row_equals_torch_sgd(spec):
    config = RowOptimizerConfig(kind="sgd", momentum=0.9, weight_decay=5e-4)
    store = build_store(spec, num_rows=11, dim=3, device="cpu", optimizer=config)
    reference = store.rows().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([reference], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step, lr in enumerate([0.1, 0.3, 0.05]):
        grads = torch.randn(11, 3)
        ids = torch.randperm(11)
        optimizer.param_groups[0]["lr"] = lr
        reference.grad = grads
        optimizer.step()
        store.push(ids, grads[ids], step=step, lr=lr)
        torch.testing.assert_close(store.pull(torch.arange(11)), reference.detach())


@pytest.mark.parametrize("spec", ["gpu", "host"])
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_lazy_updates_and_state_round_trip(spec, kind):
    config = RowOptimizerConfig(kind=kind, weight_decay=0.01, lazy=True)
    store = build_store(spec, num_rows=9, dim=4, device="cpu", optimizer=config, seed=1)
    dense = {r: store.rows()[r].clone().requires_grad_(True) for r in range(9)}
    optimizers = {
        r: (
            torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
            if kind == "sgd"
            else (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)([p], lr=0.1, weight_decay=0.01)
        )
        for r, p in dense.items()
    }
    steps = [torch.tensor([0, 5]), torch.tensor([5, 8, 2]), torch.tensor([8])]
    for step, ids in enumerate(steps):
        grads = torch.randn(ids.numel(), 4)
        for row, grad in zip(ids.tolist(), grads, strict=True):
            dense[row].grad = grad.clone()
            optimizers[row].step()
        store.push(ids, grads, step=step, lr=0.1)
        if step == 1:  # checkpoint in the middle; a fresh store continues identically
            saved = store.state_dict()
            fresh = build_store(spec, num_rows=9, dim=4, device="cpu", optimizer=config, seed=99)
            fresh.load_state_dict(saved)
            store = fresh
    expected = torch.stack([dense[r].detach() for r in range(9)])
    torch.testing.assert_close(store.pull(torch.arange(9)), expected)
    untouched = [1, 3, 4, 6, 7]
    init = torch.empty(9, 4)
    init_rows_(init, seed=1)
    assert torch.equal(store.rows()[untouched], init[untouched])


def test_host_and_device_store_agree():
    config = RowOptimizerConfig(kind="adam")
    host = build_store("host", num_rows=30, dim=6, device="cpu", optimizer=config)
    device = build_store("gpu", num_rows=30, dim=6, device="cpu", optimizer=config)
    for step in range(4):
        ids = torch.randperm(30)[:7]
        grads = torch.randn(7, 6)
        host.push(ids, grads, step=step, lr=0.01)
        device.push(ids, grads, step=step, lr=0.01)
    assert torch.equal(host.rows(), device.rows())
    for name, tensor in host.state_dict().items():
        assert torch.equal(tensor, device.state_dict()[name]), name


def test_errors():
    store = build_store("host", num_rows=4, dim=2, device="cpu", optimizer=RowOptimizerConfig())
    with pytest.raises(ValueError, match="grads: expected shape"):
        store.push(torch.tensor([0]), torch.zeros(2, 2), step=0, lr=0.1)
    with pytest.raises(ValueError, match="ids: expected"):
        store.pull(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="missing"):
        store.load_state_dict({})
    with pytest.raises(ValueError, match="unknown store 'disk'"):
        build_store("disk", num_rows=4, dim=2, device="cpu", optimizer=RowOptimizerConfig())


on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _host_store(num_rows, dim, config, *, mapped, dtype="float32"):
    rows = LocalRows(num_rows, dim, optimizer=config, draw_device="cuda", dtype=dtype)
    return HostStore(rows, device="cuda", mapped=mapped)


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("mapped", [True, False])  # read and updated by the GPU in place, or on the host
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", ["float32", "bf16_sr"])
def test_host_store_on_cuda_matches_device_store(mapped, kind, dtype):
    config = RowOptimizerConfig(kind=kind, momentum=0.9, weight_decay=0.01)
    host = _host_store(1000, 16, config, mapped=mapped, dtype=dtype)
    device = build_store("gpu", num_rows=1000, dim=16, device="cuda", optimizer=config, dtype=dtype)
    assert host.mapped == mapped and host.capturable == mapped and device.capturable
    # mapped: the same kernels on the same values; on the host the optimizer's float32 maths may round apart
    # from the GPU's in the last bit, and bf16 rows then by one rounding step
    tolerance = {"rtol": 0, "atol": 0} if mapped else {}
    if not mapped and dtype == "bf16_sr":
        tolerance = {"rtol": 2**-7, "atol": 1e-5}
    for step in range(1, 11):
        ids = torch.randperm(1000, device="cuda")[:100]
        grads = torch.randn(100, 16, device="cuda")
        torch.testing.assert_close(host.pull(ids), device.pull(ids), **tolerance)
        host.push(ids, grads, step=step, lr=0.1)
        device.push(ids, grads, step=step, lr=0.1)
    host.flush()
    torch.testing.assert_close(host.rows(), device.rows().cpu(), **tolerance)
    for name, tensor in host.state_dict().items():  # the host's own tensors, the GPU's updates in them
        assert tensor.device.type == "cpu"
        torch.testing.assert_close(tensor, device.state_dict()[name].cpu(), **tolerance)
    blocks = [block for _, block in host.blocks(64)]
    assert all(block.is_cuda for block in blocks)
    torch.testing.assert_close(torch.cat(blocks), device.rows().float(), **tolerance)
    host.close()


@pytest.mark.gpu
@on_cuda
def test_mapped_host_rows_are_pulled_and_updated_inside_a_cuda_graph():
    config = RowOptimizerConfig(kind="sgd", momentum=0.9)
    host = _host_store(500, 8, config, mapped=True)
    device = build_store("gpu", num_rows=500, dim=8, device="cuda", optimizer=config)
    ids = torch.randperm(500, device="cuda")[:64]
    grads = torch.zeros(64, 8, device="cuda")
    pulled = {}

    def step(store, name):  # step 0: no global step (a replay repeats the captured one's)
        pulled[name] = store.pull(ids)
        store.push(ids, grads * pulled[name], step=0, lr=0.1)  # a gradient that depends on the pull

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as before a capture
        step(host, "warm")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(host, "host")
    step(device, "warm")  # the device store takes the warm-up's update too
    for _ in range(5):
        ids.copy_(torch.randperm(500, device="cuda")[:64])
        grads.copy_(torch.randn(64, 8, device="cuda"))
        graph.replay()
        step(device, "device")
        torch.testing.assert_close(pulled["host"], pulled["device"], rtol=0, atol=0)
    host.flush()
    torch.testing.assert_close(host.rows(), device.rows().cpu(), rtol=0, atol=0)


@pytest.mark.gpu
@on_cuda
def test_a_weight_average_keeps_host_rows_on_the_host():
    host = _host_store(50, 4, RowOptimizerConfig(), mapped=True)
    assert host.capturable
    host.start_average(0.9)  # swaps the rows' tensor at evaluations: no mapping may hold the old one
    assert not host.mapped and not host.capturable
    host.push(torch.tensor([3], device="cuda"), torch.ones(1, 4, device="cuda"), step=1, lr=0.1)
    host.flush()
    assert host.rows()[3].tolist() != LocalRows(50, 4, draw_device="cuda").weight[3].tolist()


@pytest.mark.parametrize("spec", ["gpu", "host"])
def test_bf16_sr_stores_deliver_float32_rows_and_agree(spec):
    config = RowOptimizerConfig(kind="adamw")
    store = build_store(spec, num_rows=40, dim=8, device="cpu", optimizer=config, dtype="bf16_sr")
    other = build_store(
        "host" if spec == "gpu" else "gpu",
        num_rows=40,
        dim=8,
        device="cpu",
        optimizer=config,
        dtype="bf16_sr",
    )
    assert store.rows().dtype == torch.bfloat16
    assert store.held_bytes() == (40 * 8 * 2, 2 * 40 * 8 * 2 + 2 * 40 * 4)  # moments; step, last_step
    for step in range(1, 4):
        ids = torch.randperm(40)[:9]
        pulled = store.pull(ids)
        assert pulled.dtype == torch.float32 and torch.equal(pulled, store.rows()[ids].float())
        grads = torch.randn(9, 8)
        store.push(ids, grads, step=step, lr=0.01)
        other.push(ids, grads, step=step, lr=0.01)
    assert store.read(5, 12).dtype == torch.float32
    assert torch.equal(store.read(5, 12), store.rows()[5:12].float())
    for name, tensor in store.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name


@pytest.mark.parametrize("spec", ["gpu", "host"])
@pytest.mark.parametrize("dtype", ["float32", "bf16_sr"])
def test_load_rows_replaces_the_rows_and_keeps_the_optimizer_state(spec, dtype, tmp_path):
    config = RowOptimizerConfig(kind="adamw")
    store = build_store(spec, num_rows=6, dim=3, device="cpu", optimizer=config, seed=2, dtype=dtype)
    store.push(torch.tensor([1, 4]), torch.randn(2, 3), step=0, lr=0.1)
    state = {name: value.clone() for name, value in store.state_dict().items() if name != "weight"}
    rows = torch.randn(6, 3).to(store.rows().dtype)
    write_state(str(tmp_path / "rows"), {"weight": rows})
    store.load_rows(read_state(str(tmp_path / "rows"), stream=lambda key: True)["weight"])  # streamed
    assert torch.equal(store.rows(), rows)
    for name, value in store.state_dict().items():
        assert name == "weight" or torch.equal(value, state[name]), name
    with pytest.raises(ValueError, match=r"store rows: expected shape \(6, 3\), got \(5, 3\)"):
        store.load_rows(torch.zeros(5, 3))
