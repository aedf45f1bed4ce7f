"""MLP encoder over sparse rows against a dense plain-PyTorch reference (outputs and every gradient)."""

import copy

import pytest
import torch

from megaclass.data.batch import InputSpec, SparseInputs
from megaclass.models import build_model, model_config, model_types
from megaclass.models import mlp as mlp_module
from megaclass.models.mlp import SPARSE_GRAD_FEATURES, MLPConfig, MLPEncoder
from megaclass.ops import row_optimizers
from megaclass.schema import ConfigError

_ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
}


def _random_rows(batch: int, features: int, *, empty_row: bool, dtype: torch.dtype) -> SparseInputs:
    generator = torch.Generator().manual_seed(batch * 31 + features)
    lengths = torch.randint(0, 6, (batch,), generator=generator)
    if empty_row:
        lengths[batch // 2] = 0
    indptr = torch.zeros(batch + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(lengths, 0)
    indices = torch.randint(0, features, (int(indptr[-1]),), generator=generator)  # repeats allowed: they add
    weights = torch.rand(int(indptr[-1]), generator=generator, dtype=torch.float64).to(dtype)
    return SparseInputs(indices, indptr, weights)


def _dense(rows: SparseInputs, features: int, dtype: torch.dtype) -> torch.Tensor:
    dense = torch.zeros(rows.batch_size, features, dtype=dtype)
    sample = torch.repeat_interleave(torch.arange(rows.batch_size), rows.indptr.diff())
    dense.index_put_((sample, rows.indices), rows.weights.to(dtype), accumulate=True)
    return dense  # (B, F)


def _reference(encoder: MLPEncoder, dense: torch.Tensor, config: MLPConfig) -> torch.Tensor:
    act = _ACTIVATIONS[config.activation]
    hidden = dense @ encoder.embedding + encoder.bias
    hidden = act(encoder.norms[0](hidden))
    for linear, norm in zip(encoder.linears, encoder.norms[1:], strict=False):
        hidden = act(norm(hidden @ linear.weight.T + linear.bias))
    return hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("activation", "layer_norm"), [("relu", False), ("gelu", True), ("silu", False), ("tanh", True)]
)
@pytest.mark.parametrize(
    ("batch", "features", "hidden"), [(1, 1, (1,)), (7, 13, (5,)), (9, 31, (17, 3)), (4, 5, (8, 6, 2))]
)
def test_matches_dense_reference(batch, features, hidden, activation, layer_norm, dtype):
    config = MLPConfig(hidden=hidden, activation=activation, layer_norm=layer_norm, dropout=0.0)
    encoder = MLPEncoder(config, InputSpec(kind="sparse", num_features=features)).to(dtype)
    rows = _random_rows(batch, features, empty_row=batch > 2, dtype=torch.float32)
    out = encoder(rows)
    ref = _reference(encoder, _dense(rows, features, dtype), config)
    assert out.shape == (batch, hidden[-1]) and encoder.out_features == hidden[-1]
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(out, ref, **tolerance)
    upstream = torch.randn_like(out)
    params = list(encoder.parameters())
    got = torch.autograd.grad(out, params, upstream, allow_unused=True)
    want = torch.autograd.grad(ref, params, upstream, allow_unused=True)
    if dtype == torch.float64:
        for (name, _), g, w in zip(encoder.named_parameters(), got, want, strict=False):
            torch.testing.assert_close(g, w, **tolerance, msg=lambda m, name=name: f"grad of {name}: {m}")
        return
    # float32: a layer norm over two features amplifies rounding (its output is +-1 whatever the input), so
    # both are measured against the fp64 truth: the encoder's error at most twice the float32 reference's, or
    # within the conditioning floor of 2e-4 of the gradient's scale (summation orders differ)
    truth_encoder = copy.deepcopy(encoder).double()
    truth_out = _reference(truth_encoder, _dense(rows, features, torch.float64), config)
    truth = torch.autograd.grad(truth_out, list(truth_encoder.parameters()), upstream.double())
    for (name, _), g, w, t in zip(encoder.named_parameters(), got, want, truth, strict=True):
        error, reference_error = (g.double() - t).abs().max(), (w.double() - t).abs().max()
        assert error <= max(2 * reference_error, 2e-4 * t.abs().max()), (name, error, reference_error)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "features", "hidden"), [(1, 1, (1,)), (7, 13, (5,)), (9, 31, (17, 3))])
def test_a_sparse_first_layer_gradient_is_the_dense_one(batch, features, hidden, dtype, device):
    """model.sparse_grad: the same forward, and a sparse gradient whose rows sum to the dense gradient
    (repeated columns, an empty row, non-contiguous inputs); the other parameters' gradients unchanged. On
    an accelerator one entry a non-zero, unsorted; on the CPU a row per column whose gradient is not zero."""
    dense = MLPEncoder(
        MLPConfig(hidden=hidden, sparse_grad=False), InputSpec(kind="sparse", num_features=features)
    )
    sparse = MLPEncoder(
        MLPConfig(hidden=hidden, sparse_grad=True), InputSpec(kind="sparse", num_features=features)
    )
    dense, sparse = dense.to(device, dtype), sparse.to(device, dtype)
    sparse.load_state_dict(dense.state_dict())
    rows = _random_rows(batch, features, empty_row=batch > 2, dtype=torch.float32).to(device)
    rows = SparseInputs(rows.indices, rows.indptr, torch.stack([rows.weights, rows.weights], 1)[:, 0])
    assert not rows.weights.is_contiguous() or rows.weights.numel() <= 1
    upstream = torch.randn(batch, hidden[-1], dtype=dtype, device=device)
    outputs = [encoder(rows) for encoder in (dense, sparse)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)
    for out in outputs:
        out.backward(upstream)
    grad = sparse.embedding.grad
    assert grad.is_sparse and not dense.embedding.grad.is_sparse
    if device == "cpu":
        moved = dense.embedding.grad.ne(0).any(1).nonzero().flatten()  # not those a ReLU or dropout cut off
        assert torch.equal(grad._indices()[0], moved)  # in order: coalesced, though autograd drops the flag
    else:
        assert grad._nnz() == rows.indices.numel()  # one entry a non-zero, no sort
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(sparse.embedding.grad.to_dense(), dense.embedding.grad, **tolerance)
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        if name != "embedding":
            torch.testing.assert_close(b.grad, a.grad, atol=0, rtol=0)
    sparse.eval()
    with torch.no_grad():  # evaluation runs the plain embedding bag
        torch.testing.assert_close(sparse(rows), dense.eval()(rows), atol=0, rtol=0)


def test_a_sparse_first_layer_moves_no_column_of_zero_weights_or_of_samples_without_gradient():
    """On the CPU the first layer's gradient lists no column whose entries all weigh 0 (input dropout, a
    captured step's padding) or belong to samples whose gradient is zero: those rows stay as they are."""
    config = MLPConfig(hidden=(4,), sparse_grad=True, activation="tanh", dropout=0.0)
    encoder = MLPEncoder(config, InputSpec(kind="sparse", num_features=6))
    rows = SparseInputs.from_lists([[0, 1], [1, 2], [3, 4]], [[1.0, 0.0], [0.5, 0.5], [1.0, 1.0]])
    upstream = torch.ones(3, 4)
    upstream[2] = 0.0  # the third sample's gradient is zero
    encoder(rows).backward(upstream)
    grad = encoder.embedding.grad
    assert grad._indices()[0].tolist() == [0, 1, 2] and bool(grad._values().ne(0).any(1).all())


def test_sparse_grad_auto_follows_the_number_of_features():
    config = MLPConfig(hidden=(4,))
    assert config.sparse_grad == "auto"
    small = MLPEncoder(config, InputSpec(kind="sparse", num_features=SPARSE_GRAD_FEATURES - 1))
    assert not small.sparse_gradient and config.resolved_sparse_grad(SPARSE_GRAD_FEATURES)
    assert not MLPConfig(sparse_grad=False).resolved_sparse_grad(10**9)
    assert MLPConfig(sparse_grad=True).resolved_sparse_grad(1)
    with pytest.raises(ConfigError, match="model.sparse_grad"):
        model_config({"sparse_grad": 3})


def _first_layer(features: int, threads: int, seed: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        return MLPEncoder(MLPConfig(hidden=(8,)), InputSpec(kind="sparse", num_features=features)).embedding
    finally:
        torch.set_num_threads(before)


def test_a_large_first_layer_is_drawn_in_seeded_blocks_the_same_on_any_thread_count(monkeypatch):
    monkeypatch.setattr(mlp_module, "_BLOCK_INIT_WEIGHTS", 64)
    monkeypatch.setattr(row_optimizers, "INIT_CHUNK", 3)  # chunks of 3 rows of 8, on several threads
    one, three = _first_layer(50, threads=1, seed=4), _first_layer(50, threads=3, seed=4)
    assert torch.equal(one, three)
    assert not torch.equal(one, _first_layer(50, threads=3, seed=5))
    bound = 1 / 8**0.5
    assert one.abs().max() <= bound and one.std() > bound / 3  # U(-b, b): std b / sqrt(3)
    assert not torch.equal(one[:3], one[3:6])  # each block its own stream
    torch.manual_seed(4)  # a table within the limit: one draw from the global generator, as before
    expected = torch.empty(8, 8).uniform_(-bound, bound)
    assert torch.equal(_first_layer(8, threads=3, seed=4), expected)


def test_dropout_only_in_training():
    encoder = MLPEncoder(MLPConfig(hidden=(64,), dropout=0.5), InputSpec(kind="sparse", num_features=10))
    rows = SparseInputs.from_lists([[1, 2], [3]], [[1.0, 0.5], [2.0]])
    encoder.eval()
    torch.testing.assert_close(encoder(rows), encoder(rows))
    encoder.train()
    assert not torch.equal(encoder(rows), encoder(rows))


def test_all_rows_empty_give_the_bias_path():
    encoder = MLPEncoder(MLPConfig(hidden=(4,)), InputSpec(kind="sparse", num_features=3))
    rows = SparseInputs(torch.zeros(0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), torch.zeros(0))
    torch.testing.assert_close(encoder(rows), torch.relu(encoder.bias).expand(2, 4))


def test_registry_and_config_errors():
    assert "mlp" in model_types()
    config = model_config({"type": "mlp", "hidden": [16, 8], "activation": "gelu"})
    assert config == MLPConfig(hidden=(16, 8), activation="gelu")
    encoder = build_model(config, InputSpec(kind="sparse", num_features=5))
    assert isinstance(encoder, MLPEncoder) and encoder.out_features == 8
    with pytest.raises(ConfigError, match="model.type"):
        model_config({"type": "nope"})
    with pytest.raises(ConfigError, match="hidden"):
        model_config({"hidden": []})
    with pytest.raises(ConfigError, match="dropout"):
        model_config({"dropout": 1.5})
    with pytest.raises(ConfigError, match="activation"):
        model_config({"activation": "swish"})
    with pytest.raises(ConfigError, match="unknown key"):
        model_config({"width": 3})
    with pytest.raises(ConfigError, match="sparse"):
        MLPEncoder(MLPConfig(), InputSpec(kind="image"))
