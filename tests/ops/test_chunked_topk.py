"""Chunked top-k against ``torch.topk`` of the full score matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaclass.ops.chunked_topk import chunked_topk, merge_topk_scores_, scoring_chunk


@pytest.mark.parametrize(("batch", "classes", "dim"), [(1, 1, 1), (3, 17, 5), (4, 64, 7), (2, 65, 3)])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_full_topk(batch, classes, dim, chunk_size, k, with_bias):
    k = min(k, classes)
    x, weight = torch.randn(batch, dim, dtype=torch.float64), torch.randn(classes, dim, dtype=torch.float64)
    bias = torch.randn(classes, dtype=torch.float64) if with_bias else None
    scores, ids = chunked_topk(x, weight, k, bias=bias, chunk_size=chunk_size)
    full = x @ weight.T + (0 if bias is None else bias)
    expected = full.topk(k, dim=1)
    assert torch.equal(ids, expected.indices), (
        f"first mismatch in row {(ids != expected.indices).nonzero()[0]}"
    )
    torch.testing.assert_close(scores, expected.values.float())


def test_cosine_scores_and_non_contiguous():
    x = torch.randn(8, 5).T  # (5, 8), non-contiguous
    weight = torch.randn(40, 8)
    scores, ids = chunked_topk(x, weight, 3, cosine=True, scale=10.0, chunk_size=6)
    full = 10.0 * F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).T
    expected = full.topk(3, dim=1)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(scores, expected.values)


def test_bf16_inputs_give_float32_scores():
    x, weight = torch.randn(2, 16).bfloat16(), torch.randn(30, 16)
    scores, ids = chunked_topk(x, weight, 4, chunk_size=8)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    full = (x.float() @ weight.bfloat16().float().T).topk(4, dim=1)
    torch.testing.assert_close(scores, full.values, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("k", "chunk_size", "message"), [(0, 4, "k must be"), (31, 4, "k must be"), (3, 0, "chunk")]
)
def test_bad_arguments(k, chunk_size, message):
    with pytest.raises(ValueError, match=message):
        chunked_topk(torch.randn(2, 3), torch.randn(30, 3), k, chunk_size=chunk_size)


@pytest.mark.parametrize("classes", [65536, 65536 + 37, 200_003])
@pytest.mark.parametrize("k", [1, 7, 1024])
def test_wide_chunks_through_column_group_maxima(classes, k):
    """Chunks of 2^16 columns and more take their top-k through the maxima of column groups (a ragged tail
    included); the scores equal the full top-k's, and every id scores what it is reported with."""
    generator = torch.Generator().manual_seed(classes + k)
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    weight = torch.randn(classes, 4, dtype=torch.float64, generator=generator)
    weight[1000:1300] = weight[5]  # ties across groups
    scores, ids = chunked_topk(x, weight, k, chunk_size=1 << 17)
    full = x @ weight.T
    torch.testing.assert_close(scores, full.topk(k, dim=1).values.float())
    torch.testing.assert_close(full.gather(1, ids).float(), scores)
    assert all(row.unique().numel() == k for row in ids)  # k distinct classes a row


def test_a_gpu_scores_wider_chunks_within_bounded_memory():
    assert scoring_chunk(8192, 512, 32, "cpu") == 8192  # the configured chunk
    assert scoring_chunk(8192, 512, 32, "cuda") == 131072  # 2^26 scores at once
    assert scoring_chunk(8192, 1, 768, "cuda") == (1 << 26) // 768  # 2^26 float32 row values at once
    assert scoring_chunk(1 << 18, 4096, 32, "cuda") == 1 << 18  # never fewer than configured


def _check_table(values, ids, truth, finite):
    """``values (N, k)`` are the top-``k`` of ``truth (N, ids)`` (float64, ``-inf`` where a row has no such
    id), descending, each id scoring its value, ids distinct; past a row's ``finite`` scores ``-inf``, id -1.
    """
    expected = truth.topk(finite, dim=1).values.float()
    torch.testing.assert_close(values[:, :finite], expected, rtol=1e-5, atol=1e-5)
    assert torch.all(values[:, finite:] == -torch.inf) and torch.all(ids[:, finite:] == -1)
    found = ids[:, :finite]
    assert torch.all(found >= 0), f"first row without an id: {(found < 0).any(1).nonzero()[0]}"
    torch.testing.assert_close(truth.gather(1, found).float(), values[:, :finite], rtol=1e-5, atol=1e-5)
    assert all(row.unique().numel() == finite for row in found), "an id is kept twice"
    assert torch.all(values[:, 1:] <= values[:, :-1]), "not descending"


def _id_scores(scores, parts):
    """``(Bt M, ids)`` float64: the scores ``(Bt, M, P)`` at the ids the merges of the column ``parts``
    give them (part ``i`` from ``start``, offset by the earlier parts' ids: ``offset + b width + p``), -inf at
    another batch entry's ids."""
    batch, rows, _ = scores.shape
    truth = torch.full((batch, rows, batch * scores.shape[2]), -torch.inf, dtype=torch.float64)
    offset = 0
    for start, stop in parts:
        width = stop - start
        for b in range(batch):
            truth[b, :, offset + b * width : offset + (b + 1) * width] = scores[b, :, start:stop]
        offset += batch * width
    return truth.view(batch * rows, -1)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize(
    ("batch", "rows", "columns", "dim", "k"),
    [(1, 1, 1, 1, 1), (2, 65, 130, 20, 8), (3, 17, 5, 33, 8), (1, 64, 64, 16, 3), (2, 9, 70, 80, 1)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("addressed", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_merge_topk_scores_keeps_the_top_k_of_every_merge(
    impl, batch, rows, columns, dim, k, dtype, addressed, id_dtype, device_for
):
    """Two merges (the columns in two parts) leave each row's top-k of all its scores, in a table addressed
    by ``b M + m`` or by ``rows`` (a permutation into a larger table); non-contiguous features."""
    device = device_for(impl)
    x = torch.randn(batch, dim, rows).to(dtype).transpose(1, 2).to(device)  # (Bt, M, D), non-contiguous
    y = torch.randn(batch, columns, dim).to(dtype).to(device)
    size = batch * rows + (5 if addressed else 0)
    where = torch.randperm(size)[: batch * rows].view(batch, rows).to(device) if addressed else None
    values = torch.full((size, k), -torch.inf, device=device)
    ids = torch.full((size, k), -1, dtype=id_dtype, device=device)
    parts = [(0, columns // 2), (columns // 2, columns)]
    offset = 0
    for start, stop in parts:
        merge_topk_scores_(x, y[:, start:stop], values, ids, rows=where, id_offset=offset, impl=impl)
        offset += batch * (stop - start)
    table = torch.arange(batch * rows) if where is None else where.flatten().cpu()
    scores = torch.bmm(x.double(), y.double().transpose(1, 2)).cpu()
    assert ids.dtype == id_dtype
    found = ids.cpu()[table].long()
    _check_table(values.cpu()[table], found, _id_scores(scores, parts), min(k, columns))


def test_merge_topk_scores_checks_its_table():
    x, y = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match="share a dtype"):
        merge_topk_scores_(x, y.double(), torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="Bt M = 3 rows"):
        merge_topk_scores_(x, y, torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="float32"):
        merge_topk_scores_(x, y, torch.zeros(3, 2).double(), torch.zeros(3, 2, dtype=torch.int64))


@pytest.mark.parametrize(("batch", "classes", "dim"), [(1, 1, 3), (5, 300, 20), (70, 129, 16)])
@pytest.mark.parametrize("k", [1, 6, 70])  # 70: past the fused kernel's 64, the chunk loop's
@pytest.mark.parametrize("mode", ["dot", "bias", "cosine", "column_scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_scan_against_the_chunk_loop(batch, classes, dim, k, mode, dtype, device_for):
    """``impl="triton"`` (the fused kernel) errs against a float64 truth at most twice what the chunk loop
    errs in the same dtype, and every id it returns scores its value."""
    k = min(k, classes)
    device = device_for("triton")
    x, weight = torch.randn(batch, dim).to(dtype), torch.randn(classes, dim)
    bias = torch.randn(classes) if mode == "bias" else None
    factors = torch.rand(classes) + 0.5 if mode == "column_scale" else None
    options = {"bias": bias, "cosine": mode == "cosine", "scale": 3.0, "column_scale": factors}
    looped = chunked_topk(x, weight, k, chunk_size=64, impl="reference", **options)[0]
    on = {name: value.to(device) if torch.is_tensor(value) else value for name, value in options.items()}
    scores, ids = (t.cpu() for t in chunked_topk(x.to(device), weight.to(device), k, impl="triton", **on))
    rows = weight.to(dtype).double()
    if mode == "cosine":
        truth = 3.0 * F.normalize(x.double(), dim=1) @ F.normalize(weight.double(), dim=1).T
    else:
        truth = x.double() @ rows.T + (0 if bias is None else bias.double())
        truth = truth if factors is None else truth * factors.double()
    best = truth.topk(k, dim=1).values
    allowed = 2 * (looped.double() - best).abs().max() + 1e-4
    assert (scores.double() - best).abs().max() <= allowed
    assert (truth.gather(1, ids) - scores.double()).abs().max() <= allowed
    assert all(row.unique().numel() == k for row in ids)


def test_fused_scan_merges_column_splits():
    """Columns split across programs (each a table entry of its own) merge to the loop's top-k."""
    from megaclass.ops.chunked_topk.kernels import merge_topk_scores_triton_

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = torch.randn(1, 3, 16, device=device), torch.randn(1, 200, 16, device=device)
    values = torch.full((3 * 4, 2), -torch.inf, device=device)
    ids = torch.full((3 * 4, 2), -1, dtype=torch.int64, device=device)
    merge_topk_scores_triton_(x, y, values, ids, None, 0, splits=4)
    top = values.view(3, 8).topk(2, dim=1)
    scores = (x[0].double() @ y[0].double().T).cpu()
    _check_table(top.values.cpu(), ids.view(3, 8).gather(1, top.indices).cpu(), scores, 2)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_merge_topk_scores_ids_past_two_to_the_31(impl, device_for):
    """Ids are int64 end to end: an offset past 2^32 comes back whole."""
    device = device_for(impl)
    x, y = torch.randn(1, 3, 16, device=device), torch.randn(1, 40, 16, device=device)
    values = torch.full((3, 4), -torch.inf, device=device)
    ids = torch.full((3, 4), -1, dtype=torch.int64, device=device)
    merge_topk_scores_(x, y, values, ids, id_offset=5 << 32, impl=impl)
    expected = (x[0].double() @ y[0].double().T).topk(4, dim=1)
    assert torch.equal(ids.cpu(), expected.indices.cpu() + (5 << 32))


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("mode", ["dot", "cosine"])
def test_rows_in_another_memory_are_scanned_a_chunk_at_a_time(impl, mode, device_for):
    """Features on the device (a GPU's where there is one), rows and biases in host memory: the same top-k
    as with everything on the features' device."""
    device = device_for(impl)
    x, weight, bias = torch.randn(5, 24), torch.randn(300, 24), torch.randn(300)
    options = {"cosine": mode == "cosine", "bias": None if mode == "cosine" else bias, "chunk_size": 64}
    here = chunked_topk(x.to(device), weight, 4, impl=impl, **options)
    moved = {**options, "bias": None if options["bias"] is None else bias.to(device)}
    there = chunked_topk(x.to(device), weight.to(device), 4, impl=impl, **moved)
    torch.testing.assert_close(here[0], there[0])
    assert torch.equal(here[1], there[1])
