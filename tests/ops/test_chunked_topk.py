"""Chunked top-k against ``torch.topk`` of the full score matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaclass.ops.chunked_topk import chunked_topk, scoring_chunk


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
