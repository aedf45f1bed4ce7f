"""The trainer drives the sparse head's rewiring: the optimizer is bound, regrown weights start from a clean
AdamW state and weight average, the rewired fraction anneals with the run's length, and a resumed run stays
bound; an eager step beside a captured one leaves no gradient held."""

import pytest
import torch

from megaclass.dst import DSTConfig, rewire_fraction
from megaclass.train import Trainer, load_config


@pytest.fixture(scope="module")
def tiny(deb_tags_slice):
    return deb_tags_slice(256, 64)


def _trainer(tiny, out, *extra: str) -> Trainer:
    overrides = [
        "model.hidden=[32]",
        "head.fan_in=4",
        "head.aux_clusters=0",
        "head.dst.interval=3",
        "head.dst.fraction=0.5",
        "train.batch_size=32",
        "train.epochs=2",
        "train.progress=false",
        "train.cpu_threads=1",
        *extra,
    ]
    config = load_config(head="sparse", overrides=overrides)
    return Trainer(config, train_path=tiny[0], test_path=tiny[1], out_dir=str(out))


class _GraphOfAnotherBatchSize:
    """A captured step that no batch fits: every step runs eagerly beside it, as an epoch's smaller last
    batch does on a GPU."""

    def fits(self, targets, inputs) -> bool:
        return False


def test_an_eager_step_beside_a_captured_one_drops_its_gradients(tiny, tmp_path):
    """Its gradients are its own, beside the graph's: an evaluation or a save after it holds none; without a
    graph a step's stay until the next (their blocks serve its gradients again)."""
    trainer = _trainer(tiny, tmp_path)
    trainer.setup()
    try:
        batches = iter(trainer.loader.epoch(0))
        parameters = [*trainer.encoder.parameters(), *trainer.head.parameters()]
        trainer.train_step(next(batches))
        assert all(parameter.grad is not None for parameter in parameters)
        trainer.step_graph = _GraphOfAnotherBatchSize()
        weights = trainer.head.weight.detach().clone()
        trainer.train_step(next(batches))
        assert all(parameter.grad is None for parameter in parameters)
        assert not torch.equal(trainer.head.weight, weights)  # applied, then dropped
    finally:
        trainer.close()


@pytest.mark.parametrize("group", [1, 3])
def test_regrown_weights_start_with_zero_adamw_state(tiny, tmp_path, group):
    trainer = _trainer(tiny, tmp_path, f"head.group={group}", "train.ema_decay=0.9")
    trainer.setup()
    try:
        head, optimizer = trainer.head, trainer.optimizers["head"]
        assert head._optimizer is optimizer and head._total_steps == trainer.total_steps == 16
        batches = iter(trainer.loader.epoch(0))
        checked = 0
        for _ in range(7):
            index = head.index.clone()
            trainer.train_step(next(batches))
            changed = (head.index != index).repeat_interleave(group, 0)[: head.weight.shape[0]]  # (C, K)
            state = optimizer.state[head.weight]
            if changed.any():
                checked += 1
                assert (head.weight[changed] == 0).all()
                assert (state["exp_avg"][changed] == 0).all() and (state["exp_avg_sq"][changed] == 0).all()
                assert (state["exp_avg_sq"][~changed] != 0).any(), "untouched connections keep their state"
                average = trainer.average.average["head.weight"]
                assert (average[changed] == 0).all() and (average[~changed] != 0).any(), "EMA restarts"
        assert checked == 2  # steps 3 and 6
        expected = rewire_fraction(DSTConfig(interval=3, fraction=0.5), 6, 16)
        assert expected < 0.5 and head.metrics()["rewired_fraction"] == pytest.approx(round(4 * expected) / 4)
    finally:
        trainer.close()


def test_resumed_run_rebinds_the_optimizer(tiny, tmp_path):
    stopped = _trainer(tiny, tmp_path, "train.stop_after_steps=5")
    stopped.setup()
    stopped.train()
    stopped.close()
    resumed = Trainer(
        stopped.config, train_path=tiny[0], test_path=tiny[1], out_dir=str(tmp_path), resume=True
    )
    resumed.setup()
    try:
        assert resumed.state.global_step == 5
        assert resumed.head._optimizer is resumed.optimizers["head"] and resumed.head._total_steps == 16
        assert resumed.head.weight in resumed.optimizers["head"].state  # the restored AdamW state
    finally:
        resumed.close()


def test_auxiliary_loss_gets_label_features_by_default(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, "head.aux_clusters=auto", "head.aux_leaf=50")
    trainer.setup()
    try:
        assert trainer.head.aux is not None and trainer.head.metrics()["aux_alpha"] == 0.5
        clusters = trainer.head.label_cluster
        assert clusters.shape == (595,) and int(clusters.max()) + 1 == trainer.head.aux.out_features > 1
    finally:
        trainer.close()
    dense = load_config(overrides=["model.hidden=[32]"])
    assert dense.data.label_feature_width(wanted=False) == 0
    assert dense.data.label_feature_width(wanted=True) == 256
