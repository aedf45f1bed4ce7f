"""A world of gloo ranks on the CPU for the ops' collective forms.

As a script, one rank: ``python _ranks.py OUT_DIR RANK WORLD_SIZE`` runs every case and writes
``OUT_DIR/rank{RANK}.json`` (case -> error against the single-process result, or 1 for a mismatch).
:func:`launch` starts a world of them (a file store rendezvous: no port to race for) and reads the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import torch

B, D, C = 7, 6, 23  # global batch, features, classes (odd on purpose: the ranks hold 12 and 11 classes)


def launch(out_dir: str, *, world_size: int = 2, timeout_s: float = 180.0) -> list[dict]:
    """Run the cases on ``world_size`` ranks; each rank's results, in rank order.

    Raises:
        AssertionError: a rank failed or ran past ``timeout_s`` (its stderr in the message).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, out_dir, str(rank), str(world_size)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    errors = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            _, err = process.communicate()
        errors.append(err)
    codes = [process.returncode for process in processes]
    assert codes == [0] * world_size, f"ranks exited {codes}:\n" + "\n".join(errors)
    results = []
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"rank{rank}.json"), encoding="utf-8") as file:
            results.append(json.load(file))
    return results


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference of ``a`` from the expected ``b``, over ``b``'s largest magnitude where it is > 1."""
    if not a.numel():
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0))


def _generator(name: str) -> torch.Generator:
    """The same random stream on every rank for one case."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _collective_cases(rank: int, world: int) -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from megaclass.ops.collectives import (
        all_reduce_logsumexp,
        all_reduce_max,
        all_reduce_replicated,
        gather_rows,
        gather_targets,
        merge_topk,
        world_of,
    )
    from megaclass.targets import RaggedLabels

    generator = _generator("collectives")
    every_x = torch.randn(world, 3, 4, generator=generator)  # (N, B_r, D): rank r holds every_x[r]
    upstream = torch.randn(world * 3, 4, generator=generator)  # the gradient each rank sends back
    out: dict[str, dict[str, float]] = {"world_of": {"rank": float(world_of() != (rank, world))}}

    x = every_x[rank].clone().requires_grad_(True)
    gathered = gather_rows(x, grad_scale=0.5)
    (gathered * upstream).sum().backward()  # every rank the same upstream: the sum over ranks is N times it
    rows = slice(rank * 3, (rank + 1) * 3)
    out["gather_rows"] = {
        "value": _err(gathered.detach(), every_x.reshape(-1, 4)),
        "grad": _err(x.grad, 0.5 * world * upstream[rows]),
    }

    lists = [[[1, 2], [], [5]], [[0], [3, 4, 6], [7, 8]]]  # rank 1 holds more labels than rank 0
    ragged = gather_targets(RaggedLabels.from_lists(lists[rank % 2]))
    dense = gather_targets(torch.tensor([rank, 10 + rank]))
    want = [row for r in range(world) for row in lists[r % 2]]
    out["gather_targets"] = {
        "ragged": float(ragged.to_lists() != want),
        "dense": float(dense.tolist() != [v for r in range(world) for v in (r, 10 + r)]),
    }

    values = torch.randn(world, 5, generator=generator)  # rank r's per-row statistic values[r]
    mine = values[rank].clone().requires_grad_(True)
    total = all_reduce_replicated(mine)
    total.sum().backward()
    out["all_reduce_replicated"] = {
        "value": _err(total.detach(), values.sum(0)),
        "grad": _err(mine.grad, torch.ones(5)),  # each rank back-propagates its own term
    }
    mine = values[rank].clone().requires_grad_(True)
    lse = all_reduce_logsumexp(mine)
    (lse * upstream[0, 0]).sum().backward()
    exact = torch.logsumexp(values, 0)
    out["all_reduce_logsumexp"] = {
        "value": _err(lse.detach(), exact),
        "grad": _err(mine.grad, upstream[0, 0] * torch.exp(values[rank] - exact)),
        "max": _err(all_reduce_max(values[rank]), values.amax(0)),
    }
    empty = all_reduce_logsumexp(torch.full((2,), -torch.inf))  # a row with no class on any rank
    out["all_reduce_logsumexp"]["empty_rows"] = float(not torch.equal(empty, torch.full((2,), -torch.inf)))

    scores = torch.randn(world, 4, 6, generator=generator)  # (N, B, k_r): every rank's candidates
    ids = torch.randperm(world * 6, generator=generator).reshape(world, 1, 6).expand(world, 4, 6)
    k_rank = 6 if rank == 0 else 2  # ranks may bring fewer candidates than k
    merged_scores, merged_ids = merge_topk(scores[rank, :, :k_rank], ids[rank, :, :k_rank], 5)
    pool_scores = torch.cat([scores[r, :, : (6 if r == 0 else 2)] for r in range(world)], 1)
    pool_ids = torch.cat([ids[r, :, : (6 if r == 0 else 2)] for r in range(world)], 1)
    best = pool_scores.topk(5, dim=1)
    out["merge_topk"] = {
        "scores": _err(merged_scores, best.values),
        "ids": float(not torch.equal(merged_ids, pool_ids.gather(1, best.indices))),
    }
    dist.barrier()
    return out


SHARDED_CASES = {  # name -> (loss, multilabel, bias, margin kind, reduction)
    "softmax-multiclass": ("softmax", False, True, "none", "mean"),
    "softmax-multilabel": ("softmax", True, False, "none", "mean"),
    "softmax-sum": ("softmax", True, True, "none", "sum"),
    "bce-multilabel": ("bce", True, True, "none", "mean"),
    "squared_hinge-multiclass": ("squared_hinge", False, True, "none", "sum"),
    "arcface": ("softmax", False, False, "arcface", "mean"),
    "cosface": ("softmax", False, False, "cosface", "mean"),
}


def _targets(multilabel: bool, generator: torch.Generator) -> object:
    from megaclass.targets import RaggedLabels

    if not multilabel:
        return torch.randint(0, C, (B,), generator=generator)
    lists = []
    for row in range(B):
        count = 0 if row == 1 else int(torch.randint(1, 5, (1,), generator=generator))  # one empty row
        lists.append(torch.randperm(C, generator=generator)[:count].tolist())
    return RaggedLabels.from_lists(lists)


def _sharded_loss_case(name: str, impl: str, rank: int, world: int) -> dict[str, float]:
    """One rank's shard of :func:`linear_loss` against the single-process op on the whole problem."""
    import torch.distributed as dist

    from megaclass.ops.collectives import ClassShard
    from megaclass.ops.linear_cross_entropy import LinearLossOptions, linear_loss
    from megaclass.ops.margins import MarginConfig

    loss, multilabel, with_bias, margin, reduction = SHARDED_CASES[name]
    generator = _generator(name)
    x_all = torch.randn(B, D, generator=generator)
    weight_all = torch.randn(C, D, generator=generator)
    bias_all = torch.randn(C, generator=generator) if with_bias else None
    targets = _targets(multilabel, generator)
    margin_config = MarginConfig(kind=margin, scale=8.0, margin=0.3)
    options = LinearLossOptions(loss=loss, reduction=reduction, margin=margin_config, chunk_size=5)
    shard = ClassShard.for_rank(C, rank, world)
    rows = slice(shard.start, shard.stop)

    x = x_all.clone().requires_grad_(True)
    weight = weight_all[rows].clone().requires_grad_(True)
    bias = None if bias_all is None else bias_all[rows].clone().requires_grad_(True)
    value = linear_loss(x, weight, targets, bias=bias, options=options, impl=impl, shard=shard)
    value.backward()
    grad_x = x.grad.clone()
    dist.all_reduce(grad_x)  # the ranks' shares of dx sum to the whole dx (gather_rows' backward does this)

    x_ref = x_all.clone().requires_grad_(True)
    weight_ref = weight_all.clone().requires_grad_(True)
    bias_ref = None if bias_all is None else bias_all.clone().requires_grad_(True)
    expected = linear_loss(x_ref, weight_ref, targets, bias=bias_ref, options=options, impl=impl)
    expected.backward()
    out = {
        "loss": _err(value.detach(), expected.detach()),
        "grad_x": _err(grad_x, x_ref.grad),
        "grad_weight": _err(weight.grad, weight_ref.grad[rows]),
    }
    if bias is not None:
        out["grad_bias"] = _err(bias.grad, bias_ref.grad[rows])
    return out


def _sharded_topk_case(cosine: bool, rank: int, world: int) -> dict[str, float]:
    from megaclass.ops.chunked_topk import chunked_topk
    from megaclass.ops.collectives import ClassShard

    generator = _generator(f"topk-{cosine}")
    x, weight = torch.randn(B, D, generator=generator), torch.randn(C, D, generator=generator)
    bias = None if cosine else torch.randn(C, generator=generator)
    shard = ClassShard.for_rank(C, rank, world)
    rows = slice(shard.start, shard.stop)
    k = 13  # more than either rank holds
    options = {"cosine": cosine, "scale": 4.0, "chunk_size": 5}
    scores, ids = chunked_topk(
        x, weight[rows], k, bias=None if bias is None else bias[rows], shard=shard, **options
    )
    want_scores, want_ids = chunked_topk(x, weight, k, bias=bias, **options)
    return {"scores": _err(scores, want_scores), "ids": float(not torch.equal(ids, want_ids))}


def main() -> None:
    import torch.distributed as dist

    out_dir, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    store = f"file://{os.path.join(out_dir, 'store')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        results = _collective_cases(rank, world)
        for name in SHARDED_CASES:
            for impl in ("reference", "torch"):
                results[f"linear_loss-{name}-{impl}"] = _sharded_loss_case(name, impl, rank, world)
        for cosine in (False, True):
            results[f"chunked_topk-{'cosine' if cosine else 'dot'}"] = _sharded_topk_case(cosine, rank, world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as file:
            json.dump(results, file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
