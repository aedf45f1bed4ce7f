"""One rank of a test world: ``python _worker.py SCENARIO OUT_DIR [ARGS...]`` under RANK / WORLD_SIZE."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import zlib

import torch

from megaclass.distributed.info import DistInfo, init_distributed, shutdown_distributed
from megaclass.heads.base import ClassShard, HeadContext
from megaclass.heads.dense import DenseHead, DenseHeadConfig
from megaclass.heads.selected import SelectedHead, SelectedHeadConfig
from megaclass.index.config import NoIndexConfig
from megaclass.ops.margins import MarginConfig
from megaclass.targets import RaggedLabels

B, D, C = 5, 7, 23  # per-rank batch, features, classes (odd on purpose)


def _targets(multilabel: bool, generator: torch.Generator, rows: int) -> object:
    if not multilabel:
        return torch.randint(0, C, (rows,), generator=generator)
    lists = []
    for row in range(rows):
        count = 0 if row == 1 else int(torch.randint(1, 4, (1,), generator=generator))  # one empty row
        lists.append(torch.randperm(C, generator=generator)[:count].tolist())
    return RaggedLabels.from_lists(lists)


def _slice_targets(targets: object, start: int, stop: int) -> object:
    if isinstance(targets, torch.Tensor):
        return targets[start:stop]
    return RaggedLabels.from_lists(targets.to_lists()[start:stop])


def _shard(rank: int, world: int) -> ClassShard:
    return ClassShard.for_rank(C, rank, world)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _dense_case(
    name: str, config: DenseHeadConfig, multilabel: bool, rank: int, world: int
) -> dict[str, float]:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x_all = torch.randn(world * B, D, generator=generator)
    targets = _targets(multilabel, generator, world * B)
    context = HeadContext(in_features=D, num_classes=C, multilabel=multilabel)
    sharded = DenseHead(dataclasses.replace(config, seed=3), context, _shard(rank, world))
    plain = DenseHead(config, context)
    start, stop, _ = sharded.row_range()
    with torch.no_grad():
        plain.weight.zero_()
        plain.weight[start:stop] = sharded.weight
        if plain.bias is not None:
            plain.bias.copy_(torch.randn(C, generator=generator))
            sharded.bias.copy_(plain.bias[start:stop])
    # the whole head's weight, the same on every rank: gather every rank's rows
    rows = [torch.empty(0)] * world
    torch.distributed.all_gather_object(rows, sharded.weight.detach())
    with torch.no_grad():
        plain.weight.copy_(torch.cat(rows, 0))
    x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    loss = sharded(x, _slice_targets(targets, rank * B, (rank + 1) * B))
    loss.backward()
    x_ref = x_all.clone().requires_grad_(True)
    ref = plain(x_ref, targets)
    ref.backward()
    s = slice(start, stop)
    out = {
        "loss": _err(loss.detach(), ref.detach()),
        "grad_x": _err(x.grad / world, x_ref.grad[rank * B : (rank + 1) * B]),
        "grad_weight": _err(sharded.weight.grad, plain.weight.grad[s]),
    }
    if plain.bias is not None:
        out["grad_bias"] = _err(sharded.bias.grad, plain.bias.grad[s])
    for head in (sharded, plain):  # one optimizer step each
        torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9).step()
    out["step"] = _err(sharded.weight.detach(), plain.weight.detach()[s])
    scores, ids = sharded.topk(x_all, 4)
    ref_scores, ref_ids = plain.topk(x_all, 4)
    out["topk_scores"] = _err(scores, ref_scores)
    out["topk_ids"] = float((ids != ref_ids).sum())
    return out


def _selected_case(name: str, multilabel: bool, margin: bool, rank: int, world: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x_all = torch.randn(world * B, D, generator=generator)
    targets = _targets(multilabel, generator, world * B)
    context = HeadContext(in_features=D, num_classes=C, multilabel=multilabel)
    margin_config = MarginConfig(kind="arcface", scale=8.0, margin=0.3) if margin else MarginConfig()
    config = SelectedHeadConfig(sample_num=C, index=NoIndexConfig(), margin=margin_config, coverage_every=0)
    sharded = SelectedHead(config, context, _shard(rank, world))
    plain = SelectedHead(config, context)
    local_rows = sharded.materialize().rows().clone()
    every = [torch.empty(0)] * world
    torch.distributed.all_gather_object(every, local_rows)
    full = torch.cat(every, 0)
    plain.materialize().load_state_dict({**plain.store.state_dict(), "weight": full})
    x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    loss = sharded(x, _slice_targets(targets, rank * B, (rank + 1) * B))
    loss.backward()
    x_ref = x_all.clone().requires_grad_(True)
    ref = plain(x_ref, targets)
    ref.backward()
    sharded.after_step(1, 0.0, lr=0.5)
    plain.after_step(1, 0.0, lr=0.5)
    start, stop, _ = sharded.row_range()
    scores, ids = sharded.topk(x_all, 3)
    ref_scores, ref_ids = plain.topk(x_all, 3)
    return {
        "loss": _err(loss.detach(), ref.detach()),
        "grad_x": _err(x.grad / world, x_ref.grad[rank * B : (rank + 1) * B]),
        "step": _err(sharded.store.rows(), plain.store.rows()[start:stop]),
        "topk_scores": _err(scores, ref_scores),
        "topk_ids": float((ids != ref_ids).sum()),
    }


def _sparse_case(name: str, loss: str, multilabel: bool, rank: int, world: int) -> dict[str, float]:
    import numpy as np

    from megaclass.heads.sparse import SparseHead, SparseHeadConfig

    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x_all = torch.randn(world * B, D, generator=generator)
    targets = _targets(multilabel, generator, world * B)
    label_features = np.random.default_rng(0).standard_normal((C, 5)).astype(np.float32)
    counts = np.arange(C)[::-1].copy()
    context = HeadContext(D, C, multilabel, label_counts=counts, label_features=label_features)
    config = SparseHeadConfig(
        fan_in=3, group=2, intermediate=6, dense_frequent=4, aux_clusters=3, loss=loss, impl="reference"
    )
    sharded = SparseHead(config, context, _shard(rank, world))
    plain = SparseHead(config, context)
    for part in ("intermediate", "dense", "aux"):  # replicated parts: rank 0's, as the sharded head keeps
        getattr(plain, part).load_state_dict(getattr(sharded, part).state_dict())
    x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    value = sharded(x, _slice_targets(targets, rank * B, (rank + 1) * B))
    value.backward()
    x_ref = x_all.clone().requires_grad_(True)
    ref = plain(x_ref, targets)
    ref.backward()
    start, stop, _ = sharded.row_range()
    s = slice(start, stop)
    out = {
        "loss": _err(value.detach(), ref.detach()),
        "grad_x": _err(x.grad / world, x_ref.grad[rank * B : (rank + 1) * B]),
        "grad_weight": _err(sharded.weight.grad, plain.weight.grad[s]),
        "grad_bias": _err(sharded.bias.grad, plain.bias.grad[s]),
    }
    for part in ("intermediate", "dense", "aux"):  # replicated: summed over ranks
        mine = [p.grad for p in getattr(sharded, part).parameters()]
        theirs = [p.grad for p in getattr(plain, part).parameters()]
        out[f"grad_{part}"] = max(_err(a, b) for a, b in zip(mine, theirs, strict=True))
    for head in (sharded, plain):
        torch.optim.SGD(head.parameters(), lr=0.5).step()
    out["step"] = _err(sharded.weight.detach(), plain.weight.detach()[s])
    scores, ids = sharded.topk(x_all, 4)
    ref_scores, ref_ids = plain.topk(x_all, 4)
    out["topk_scores"] = _err(scores, ref_scores)
    out["topk_ids"] = float((ids != ref_ids).sum())
    return out


def _checkpoint_head(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer | None, object, torch.Tensor]:
    """A sharded head of ``kind`` on this world, its optimizer, and a fixed global batch ``(targets, x)``."""
    import numpy as np

    from megaclass.heads.sparse import SparseHead, SparseHeadConfig

    generator = torch.Generator().manual_seed(11)
    x_all = torch.randn(2 * B, D, generator=generator)
    multilabel = kind == "sparse"
    targets = _targets(multilabel, generator, 2 * B)
    features = np.random.default_rng(0).standard_normal((C, 5)).astype(np.float32)
    context = HeadContext(D, C, multilabel, label_counts=np.arange(C)[::-1].copy(), label_features=features)
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size()) if world_open() else (0, 1)
    )
    shard = _shard(rank, world)
    if kind == "dense":
        head = DenseHead(DenseHeadConfig(chunk_size=4, seed=5), context, shard)
    elif kind == "selected":
        config = SelectedHeadConfig(sample_num=C, index=NoIndexConfig(), coverage_every=0)
        head = SelectedHead(config, context, shard)
    else:
        config = SparseHeadConfig(fan_in=3, group=2, intermediate=6, dense_frequent=4, aux_clusters=3)
        head = SparseHead(config, context, shard)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05) if params else None
    return head, optimizer, targets, x_all


def _step(head: torch.nn.Module, optimizer: object, targets: object, x_all: torch.Tensor) -> float:
    """One training step on this rank's part of the global batch; the loss before it."""
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size()) if world_open() else (0, 1)
    )
    rows = x_all.shape[0] // world
    loss = head(
        x_all[rank * rows : (rank + 1) * rows], _slice_targets(targets, rank * rows, (rank + 1) * rows)
    )
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
    head.after_step(1, 0.0, lr=0.05)
    return loss.item()


def world_open() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def checkpoint_cases(rank: int, world: int, out_dir: str, *, load: bool) -> dict[str, dict[str, float]]:
    """Save each sharded head after a step (``load`` false), or load it (any world) and take the next two."""
    from megaclass.distributed.checkpoint import load_sharded, save_sharded

    results = {}
    for kind in ("dense", "selected", "sparse"):
        head, optimizer, targets, x_all = _checkpoint_head(kind)
        folder = os.path.join(os.path.dirname(out_dir), f"checkpoint-{kind}")
        if load:
            path = os.path.join(folder, sorted(e for e in os.listdir(folder) if e.startswith("step_"))[-1])
            load_sharded(path, head=head, head_optimizer=optimizer, rank=rank, world_size=world)
        else:
            _step(head, optimizer, targets, x_all)
            save_sharded(folder, 1, head=head, head_optimizer=optimizer, common={}, private={}, rank=rank,
                         world_size=world)  # fmt: skip
        results[f"checkpoint-{kind}"] = {
            "next": _step(head, optimizer, targets, x_all),
            "after": _step(head, optimizer, targets, x_all),
        }
    return results


def head_cases(rank: int, world: int) -> dict[str, dict[str, float]]:
    """Every sharded head against the plain head on the global batch."""
    results = {}
    for loss in ("softmax", "bce", "squared_hinge"):
        for multilabel in (False, True):
            name = f"dense-{loss}-{'multilabel' if multilabel else 'multiclass'}"
            results[name] = _dense_case(
                name, DenseHeadConfig(loss=loss, chunk_size=4), multilabel, rank, world
            )
    arcface = DenseHeadConfig(
        bias=False, chunk_size=5, margin=MarginConfig(kind="arcface", scale=8.0, margin=0.3)
    )
    results["dense-arcface"] = _dense_case("dense-arcface", arcface, False, rank, world)
    for multilabel, margin in ((False, False), (True, False), (False, True)):
        name = f"selected-{'multilabel' if multilabel else 'multiclass'}{'-arcface' if margin else ''}"
        results[name] = _selected_case(name, multilabel, margin, rank, world)
    for loss, multilabel in (("bce", True), ("softmax", False), ("hinge", True)):
        name = f"sparse-{loss}"
        results[name] = _sparse_case(name, loss, multilabel, rank, world)
    return results


def train_run(out_dir: str, run_dir: str, train_path: str, test_path: str, overrides: list[str]) -> dict:
    from megaclass.train.config import load_config_and_keys
    from megaclass.train.loop import train

    config, keys = load_config_and_keys(None, overrides)  # the recipe fills the rest, as `megaclass train`
    resume = "--resume" in sys.argv
    train(
        config, train_path=train_path, test_path=test_path, out_dir=run_dir, resume=resume, explicit_keys=keys
    )
    return {}


def record_views(out_dir: str) -> None:
    """Make the trainer write this rank's view of the model (its head state, its encoder, its head's row range
    and state layout) into ``out_dir/<when>-rank<r>/`` after ``setup`` and at the end of the run."""
    from megaclass.state_io import write_state
    from megaclass.train.loop import Trainer

    def write_view(trainer: Trainer, when: str) -> None:
        head = trainer.head
        view = {
            "head": head.state_dict(),
            "encoder": {  # an FSDP2 encoder's: this rank's shards
                key: value.to_local() if hasattr(value, "to_local") else value
                for key, value in trainer.encoder.state_dict().items()
            },
            "range": list(head.row_range()),
            "layout": dict(head.state_layout()),
        }
        write_state(os.path.join(out_dir, f"{when}-rank{trainer.dist.rank}"), view)

    setup, finish = Trainer.setup, Trainer._finish_run

    def setup_and_record(self: Trainer) -> None:
        setup(self)
        write_view(self, "setup")

    def finish_and_record(self: Trainer) -> dict:
        write_view(self, "final")
        metrics = finish(self)
        write_view(self, "kept")  # the weights the run ends with
        return metrics

    Trainer.setup, Trainer._finish_run = setup_and_record, finish_and_record


def favour_epoch(best: int) -> None:
    """Make the trainer's validation P@1 peak at epoch ``best`` (lower before, lower still after), whatever
    the model scores; every other number is the model's."""
    from megaclass.train.loop import Trainer

    evaluate = Trainer.evaluate

    def forced(self: Trainer, dataset: object, **options: object) -> dict:
        metrics = evaluate(self, dataset, **options)
        if dataset is self.valid_data:
            epoch = self.state.epoch + 1
            metrics["P@1"] = 0.5 + 0.1 * epoch if epoch <= best else 0.1 / epoch
        return metrics

    Trainer.evaluate = forced


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    info = DistInfo.from_env()
    if scenario == "heads":
        init_distributed(info, device=torch.device("cpu"), timeout_s=60)
        result = head_cases(info.rank, info.world_size)
        result.update(checkpoint_cases(info.rank, info.world_size, out_dir, load=False))
        shutdown_distributed()
    elif scenario == "reload":  # after "heads" in a sibling folder, on any world size
        init_distributed(info, device=torch.device("cpu"), timeout_s=60)
        result = checkpoint_cases(info.rank, info.world_size, out_dir, load=True)
        shutdown_distributed()
    elif scenario in ("exit", "hang"):  # rank 1 exits, or stops answering, after one training step
        from megaclass.train.loop import Trainer

        step = Trainer.train_step

        def failing_step(self: Trainer, batch: object) -> torch.Tensor:
            if self.dist.rank == 1 and self.state.global_step == 1:
                if scenario == "exit":
                    os._exit(3)
                time.sleep(600)
            return step(self, batch)

        Trainer.train_step = failing_step
        args = sys.argv[3:]
        result = train_run(out_dir, args[0], args[1], args[2], args[3:])
    else:  # train, views or best-<epoch> (views, that epoch the best): RUN_DIR TRAIN TEST overrides...
        if scenario == "views" or scenario.startswith("best-"):
            record_views(out_dir)
        if scenario.startswith("best-"):
            favour_epoch(int(scenario[len("best-") :]))
        args = [a for a in sys.argv[3:] if a != "--resume"]
        result = train_run(out_dir, args[0], args[1], args[2], args[3:])
    with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w", encoding="utf-8") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
    # Results are written and the process group is closed: skip interpreter teardown, where a background
    # thread of a C++ library (gloo) can still be joinable and abort an otherwise finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
