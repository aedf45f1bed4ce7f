"""Run configs: YAML + overrides + presets, typed errors, and the learning-rate schedule."""

import math

import pytest

from megaclass.schema import ConfigError
from megaclass.train.config import (
    OptimConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    from_preset,
    load_config,
    lr_at,
)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_round_trip():
    config = RunConfig()
    assert config.model.type == "mlp" and config.head.type == "dense"
    assert config_from_dict(config_to_dict(config)) == config


def test_yaml_then_overrides(tmp_path):
    path = _write(
        tmp_path,
        "model: {type: mlp, hidden: [32, 16]}\nhead: {type: dense, loss: softmax}\n"
        "optim: {head: {lr: 0.1, name: sgd}}\ntrain: {epochs: 3}\n",
    )
    config = load_config(path, ["train.epochs=5", "eval.ks=[1,10]", "optim.encoder.betas=[0.8,0.9]"])
    assert config.model.hidden == (32, 16)
    assert config.head.loss == "softmax"
    assert config.optim.head.name == "sgd" and config.optim.head.lr == 0.1
    assert config.optim.encoder.betas == (0.8, 0.9)
    assert config.train.epochs == 5 and config.eval.ks == (1, 10)


def test_preset_then_file_then_head(tmp_path):
    base = from_preset("xmc-mlp")
    config = load_config(_write(tmp_path, "train: {epochs: 2}\n"), preset="xmc-mlp")
    assert config.train.epochs == 2 and config.model == base.model
    assert load_config(None, [], preset="xmc-mlp", head="dense").head == base.head


@pytest.mark.parametrize(
    ("preset", "overrides", "section", "kind"),
    [
        ("hfsoftmax", ["model.type=mobilefacenet"], "model", "mobilefacenet"),
        ("xmc-mlp", ["model.max_length=64", "model.type=transformer"], "model", "transformer"),
        ("spartex", ["head.type=dense"], "head", "dense"),
    ],
)
def test_a_type_set_over_a_preset_replaces_the_section_of_the_old_type(preset, overrides, section, kind):
    """The preset's options of the old type go (as with a YAML file's or --head's change of type); the
    options set beside the new type stay, whatever their order."""
    config = load_config(None, overrides, preset=preset)
    assert getattr(config, section).type == kind
    if kind == "transformer":
        assert config.model.max_length == 64
    kept = load_config(None, ["model.hidden=[64]", "model.type=mlp"], preset="xmc-mlp").model
    assert kept.hidden == (64,) and kept.dropout == from_preset("xmc-mlp").model.dropout  # the same type


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("trian: {epochs: 1}\n", [], "unknown key.*'trian'"),
        ("train: {epoch: 1}\n", [], r"train: unknown key.*'epoch'"),
        ("train: {epochs: two}\n", [], "train.epochs: expected an integer, got 'two'"),
        ("train: {epochs: 0}\n", [], "train.epochs: expected > 0"),
        ("", ["train.batch_size=1.5"], "train.batch_size: expected an integer"),
        ("", ["optim.decay=step"], "optim.decay: 'step' is not one of"),
        ("", ["optim.head.name=lamb"], "optim.head.name"),
        ("", ["optim.encoder.lr=-1"], "lr: expected a finite value >= 0"),
        ("", ["eval.ks=[0]"], "eval.ks"),
        ("", ["model.type=transformerXL"], "model.type: unknown model"),
        ("", ["head.type=nope"], "head.type: unknown head"),
        ("", ["model.hidden=abc"], "model.hidden"),
        ("", ["train.device=tpu"], "train.device"),
        ("", ["train"], "expected key=value"),
        ("model: 3\n", [], "model: expected a mapping"),
        ("- a\n- b\n", [], "expected a mapping of sections"),
        ("", ["data.featurizer={min_df: x}"], "data.featurizer.min_df"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text), overrides)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="xmc-mlp"):
        from_preset("nope")


def _reference_lr(step, peak, total, warmup, decay, floor):
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant":
        return peak
    t = min(max((step - warmup) / max(total - 1 - warmup, 1), 0.0), 1.0)
    shape = (1 + math.cos(math.pi * t)) / 2 if decay == "cosine" else 1 - t
    return peak * (floor + (1 - floor) * shape)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(
    ("total", "warmup_steps", "warmup_fraction"), [(1, 0, 0.0), (7, 2, 0.0), (100, 3, 0.1), (50, 0, 0.0)]
)
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_lr_schedule(decay, total, warmup_steps, warmup_fraction, floor):
    optim = OptimConfig(
        warmup_steps=warmup_steps, warmup_fraction=warmup_fraction, decay=decay, min_lr_ratio=floor
    )
    warmup = max(warmup_steps, int(warmup_fraction * total))
    lrs = [lr_at(step, peak=0.5, total_steps=total, optim=optim) for step in range(total)]
    want = [_reference_lr(step, 0.5, total, warmup, decay, floor) for step in range(total)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert all(0 <= lr <= 0.5 + 1e-12 for lr in lrs)
    after = lrs[warmup:]
    assert all(a >= b - 1e-12 for a, b in zip(after[:-1], after[1:], strict=True)), "lr rose after warm-up"
    if decay != "constant" and total - 1 > warmup:
        assert lrs[-1] == pytest.approx(0.5 * floor)
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(0.5)


def test_the_warm_up_fraction_is_taken_of_warmup_total_steps():
    """A run lengthened on a resume keeps its warm-up's length in steps: a fraction of the first total."""
    optim = OptimConfig(warmup_fraction=0.5)
    kept = [lr_at(step, peak=1.0, total_steps=12, optim=optim, warmup_total_steps=4) for step in range(12)]
    assert kept[:2] == [0.5, 1.0]  # 2 warm-up steps (0.5 of 4), not 6 (0.5 of 12)
    want = [_reference_lr(step, 1.0, 12, 2, "cosine", 0.0) for step in range(2, 12)]
    assert kept[2:] == pytest.approx(want)
    assert lr_at(3, peak=1.0, total_steps=12, optim=optim) == pytest.approx(4 / 6)  # the fraction of 12


def test_an_unknown_key_from_a_config_file_names_the_file(tmp_path):
    path = _write(tmp_path, "train: {batchsize: 3}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train: unknown key\(s\) 'batchsize' \(did you mean"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^train: unknown key\(s\) 'epoch'"):  # from --set: no file named
        load_config(_write(tmp_path, "train: {epochs: 2}\n"), ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"^config: unknown key\(s\) 'trian' \(did you mean 'train'\?\)"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match=r"none.yaml: cannot read the config file: No such file"):
        load_config(str(tmp_path / "none.yaml"))
