"""Recipes resolved from the data: the shipped presets fill what the user did not set, explicit keys always
win, ``auto`` values are written out, and the command line records all of it in the run's ``config.yaml``."""

import dataclasses

import pytest
import yaml

from megaclass.cli import main
from megaclass.dst import DSTConfig
from megaclass.heads import head_config
from megaclass.heads.sparse import SparseHeadConfig
from megaclass.schema import ConfigError
from megaclass.train import recipes
from megaclass.train.config import RunConfig, config_to_dict, from_preset, load_config, load_config_and_keys
from megaclass.train.loop import keep_recorded_values, settings_given_again
from megaclass.train.recipes import DataFacts, resolve_auto, resolve_recipe

# 80 positives a label: the presets' epochs are enough (epochs_for)
BOW = DataFacts("bow", True, 15_000, num_classes=7_500, num_features=20_000, num_positives=600_000)
TEXT_ONE_LABEL = dataclasses.replace(BOW, inputs="text", multilabel=False)
BOW_ONE_LABEL = dataclasses.replace(BOW, multilabel=False)
TOKENS = dataclasses.replace(BOW, inputs="tokens", num_features=30_522)
IMAGES = DataFacts("images", False, 5_000, num_classes=100, num_features=0, num_positives=5_000)


def _resolve(overrides=(), *, head=None, facts=BOW):
    config, keys = load_config_and_keys(None, list(overrides), head=head)
    return resolve_recipe(config, keys, facts)


def test_explicit_keys_are_what_the_user_gave(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("head: {type: dense, loss: bce}\ntrain: {epochs: 2}\n")
    _, keys = load_config_and_keys(str(path), ["optim.encoder.lr=0.001", "head.index=exact"], head="selected")
    assert keys == {"head.type", "head.index", "train.epochs", "optim.encoder.lr"}  # --head replaced head.*
    _, keys = load_config_and_keys(None, ["train.epochs=2"], preset="xmc-mlp")
    assert "optim.head.lr" in keys and "model.hidden" in keys and "train.valid_fraction" in keys


def test_no_settings_on_multilabel_bow_is_the_xmc_mlp_hinge_preset():
    config, description = _resolve()
    assert config == resolve_auto(from_preset("xmc-mlp-hinge"), BOW)
    assert (config.head.loss, config.train.batch_size, config.train.ema_decay) == ("squared_hinge", 64, 0.0)
    assert (config.optim.encoder.lr, config.model.dropout, config.train.epochs) == (0.002, 0.65, 5)
    assert description == (
        "recipe: xmc-mlp-hinge (BoW, multi-label, 15,000 documents, 7,500 labels, 80 positives a label; "
        "5 epochs); explicit settings win"
    )


def test_no_settings_on_one_label_data_is_the_xmc_mlp_preset():
    config, description = _resolve(facts=BOW_ONE_LABEL)
    assert config == resolve_auto(from_preset("xmc-mlp"), BOW_ONE_LABEL)
    assert (config.head.loss, config.optim.encoder.lr, config.train.epochs) == ("softmax", 0.005, 3)
    assert description.startswith("recipe: xmc-mlp (BoW, multi-class")


@pytest.mark.parametrize(
    ("facts", "head", "preset"),
    [
        (TEXT_ONE_LABEL, None, "xmc-mlp"),
        (dataclasses.replace(TEXT_ONE_LABEL, multilabel=True), None, "xmc-mlp-hinge"),
        (TEXT_ONE_LABEL, "selected", None),
        (dataclasses.replace(TEXT_ONE_LABEL, multilabel=True), "sparse", "spartex"),
    ],
)
def test_an_mlp_over_featurised_text_drops_some_of_each_rows_ngrams(facts, head, preset):
    """Text rows (word and character n-grams) drop 30% of their non-zeros in training; BoW rows none; an
    explicit value wins."""
    config, description = _resolve(head=head, facts=facts)
    assert config.model.input_dropout == 0.3
    assert "epochs; input dropout 0.3" in description
    assert description.endswith(
        "; natural-language text: --set model.type=transformer fine-tunes MiniLM (higher P@1, slower)"
    )
    if preset is not None:
        wanted = from_preset(preset)
        wanted = dataclasses.replace(wanted, model=dataclasses.replace(wanted.model, input_dropout=0.3))
        assert config == resolve_auto(wanted, facts)
    assert _resolve(head=head, facts=dataclasses.replace(facts, inputs="bow"))[0].model.input_dropout == 0.0
    config, description = _resolve(["model.input_dropout=0"], head=head, facts=facts)
    assert config.model.input_dropout == 0.0 and "input dropout" not in description
    config, description = _resolve(["model.type=transformer"], head=head, facts=facts)
    assert not hasattr(config.model, "input_dropout") and "input dropout" not in description
    assert "--set model.type=transformer" not in description
    assert "transformer" not in _resolve(head=head, facts=dataclasses.replace(facts, inputs="bow"))[1]


def test_explicit_settings_win_even_when_they_equal_the_defaults():
    config, _ = _resolve(["optim.encoder.lr=0.001", "train.epochs=10", "model.hidden=[64]"])
    assert config.optim.encoder.lr == 0.001 and config.train.epochs == 10 and config.model.hidden == (64,)
    assert config.optim.head.lr == 0.002 and config.model.dropout == 0.65  # the rest from xmc-mlp-hinge
    config, _ = _resolve(["head.loss=softmax"])
    assert config.head.loss == "softmax" and config.head.init_scale == 0.2


def test_a_sparse_head_gets_the_spartex_recipe():
    config, description = _resolve(head="sparse")
    assert config == resolve_auto(from_preset("spartex"), BOW)
    assert config.head.intermediate == 1024 and config.head.group == 1 and config.head.aux_enabled
    assert config.data.label_feature_dim == 256 and config.head.loss == "bce"
    assert description.startswith("recipe: spartex (BoW, multi-label")
    config, _ = _resolve(["head.fan_in=8", "head.intermediate=0"], head="sparse")
    assert (config.head.fan_in, config.head.intermediate) == (8, 0)
    assert config.model.dropout == from_preset("spartex").model.dropout
    assert config.optim == from_preset("spartex").optim


def test_a_transformer_gets_its_own_optimizer_recipe():
    config, description = _resolve(["model.type=transformer"], facts=TOKENS)
    assert (config.optim.encoder.lr, config.optim.head.lr) == (5e-5, 2e-3)
    assert config.optim.warmup_fraction == 0.1 and config.train.grad_clip == 1.0
    assert config.head.type == "dense" and config.head.loss == "squared_hinge"
    assert description.startswith("recipe: xmc-transformer with the squared hinge (tokens, multi-label")
    one_label = dataclasses.replace(TOKENS, multilabel=False)
    config, description = _resolve(["model.type=transformer"], facts=one_label)
    assert config.head.loss == "softmax" and description.startswith("recipe: xmc-transformer (tokens,")
    config, _ = _resolve(["model.type=transformer", "head.loss=bce"], facts=TOKENS)
    assert config.head.loss == "bce"
    config, description = _resolve(
        ["model.type=transformer", "optim.encoder.lr=1e-3"], head="sparse", facts=TOKENS
    )
    assert config.optim.encoder.lr == 1e-3 and config.optim.head.lr == 2e-3
    assert config.head == resolve_auto(from_preset("spartex"), TOKENS).head
    assert description.startswith("recipe: xmc-transformer with the spartex head")


def test_images_get_the_hfsoftmax_recipe_unless_the_types_are_chosen():
    config, _ = _resolve(facts=IMAGES)
    assert config == resolve_auto(from_preset("hfsoftmax"), IMAGES)
    config, _ = _resolve(["model.type=mobilefacenet"], head="dense", facts=IMAGES)
    assert config.model.type == "mobilefacenet" and config.head == head_config({"loss": "softmax"})
    assert config.optim.encoder.name == "sgd" and config.data.label_feature_dim == 0


def test_a_sampled_head_keeps_its_section_under_the_xmc_mlp_recipe_with_sgd_rows():
    config, description = _resolve(["head.sample_num=0.2"], head="partial_fc")
    row_optimizer = {"kind": "sgd", "momentum": 0.9, "weight_decay": 5e-4}  # optim.head's (below)
    assert config.head == head_config({"type": "partial_fc", "sample_num": 0.2, "optimizer": row_optimizer})
    assert (config.optim.head.name, config.optim.head.lr, config.optim.head.weight_decay) == (
        "sgd",
        0.1,
        5e-4,
    )
    assert config.optim.encoder == from_preset("xmc-mlp").optim.encoder
    assert description.startswith("recipe: xmc-mlp with SGD rows (BoW, multi-label")


@pytest.mark.parametrize("head", [None, "selected"])
def test_another_head_optimizer_takes_its_own_learning_rate_and_decay(head):
    """An optimizer named for the head group with no lr or decay gets the MLP recipes' settings of that
    optimizer, never the settings of the one it replaced; the encoder's stay."""
    config, description = _resolve(["optim.head.name=adamw"], head=head, facts=TEXT_ONE_LABEL)
    assert config.optim.head == from_preset("xmc-mlp").optim.head
    assert description.startswith("recipe: xmc-mlp (text")
    config, _ = _resolve(["optim.head.name=sgd"], head=head, facts=TEXT_ONE_LABEL)
    assert (config.optim.head.name, config.optim.head.lr, config.optim.head.weight_decay) == (
        "sgd",
        0.1,
        5e-4,
    )
    config, _ = _resolve(["optim.head.name=adam", "optim.head.lr=0.01"], head=head, facts=TEXT_ONE_LABEL)
    assert (config.optim.head.name, config.optim.head.lr, config.optim.head.weight_decay) == (
        "adam",
        0.01,
        0.0,
    )
    assert config.optim.encoder == from_preset("xmc-mlp").optim.encoder


@pytest.mark.parametrize("head", ["selected", "partial_fc"])
def test_a_sampled_head_trains_its_rows_with_the_head_optimizer(head):
    """The rows get optim.head's scheduled lr, so optim.head's optimizer, unless head.optimizer is set."""
    config, _ = _resolve(head=head, facts=TEXT_ONE_LABEL)
    optimizer = config.head.optimizer
    assert (optimizer.kind.value, optimizer.momentum, optimizer.weight_decay) == ("sgd", 0.9, 5e-4)
    assert not optimizer.lazy
    overrides = ["optim.head.name=sgd", "optim.head.momentum=0.8", "optim.head.weight_decay=1e-4"]
    optimizer = _resolve(overrides, head=head, facts=TEXT_ONE_LABEL)[0].head.optimizer
    assert (optimizer.kind.value, optimizer.momentum, optimizer.weight_decay) == ("sgd", 0.8, 1e-4)
    optimizer = _resolve(["head.optimizer.momentum=0.5"], head=head)[0].head.optimizer
    assert (optimizer.kind.value, optimizer.momentum, optimizer.weight_decay) == ("sgd", 0.5, 0.0)
    optimizer = _resolve(["head.optimizer={kind: adam}"], head=head)[0].head.optimizer
    assert (optimizer.kind.value, optimizer.weight_decay) == ("adam", 0.0)
    optimizer = _resolve(["head.store=ps://127.0.0.1:1"], head=head)[0].head.optimizer  # rows on servers too
    assert (optimizer.kind.value, optimizer.weight_decay) == ("sgd", 5e-4)


def test_auto_values_are_written_out_from_the_data():
    assert resolve_auto(RunConfig(), BOW).head.loss == "bce"
    assert resolve_auto(RunConfig(), TEXT_ONE_LABEL).head.loss == "softmax"
    assert resolve_auto(RunConfig(), BOW).data.label_feature_dim == 0  # the dense head uses none
    sparse = dataclasses.replace(RunConfig(), head=head_config({"type": "sparse"}))
    assert resolve_auto(sparse, BOW).data.label_feature_dim == 256
    assert resolve_auto(sparse, IMAGES).data.label_feature_dim == 0
    assert resolve_auto(RunConfig(), BOW).train.device == "auto"  # device choices are not the data's


@pytest.mark.parametrize("facts", [BOW, TEXT_ONE_LABEL, TOKENS, IMAGES])
@pytest.mark.parametrize("head", [None, "sparse", "partial_fc"])
def test_resolving_a_resolved_config_changes_nothing(facts, head):
    overrides = ["model.type=transformer"] if facts.inputs == "tokens" else []
    config, keys = load_config_and_keys(None, overrides, head=head)
    once, _ = resolve_recipe(config, keys, facts)
    assert resolve_recipe(once, keys, facts)[0] == once  # a resumed run compares equal configs
    assert resolve_auto(once, facts) == once


def test_a_sparse_head_config_takes_a_dst_config_not_a_mapping():
    assert head_config({"type": "sparse", "dst": {"interval": 50}}).dst == DSTConfig(interval=50)
    with pytest.raises(ConfigError, match="head.dst"):
        SparseHeadConfig(dst={"interval": 50})


def test_the_cli_prints_the_recipe_and_writes_the_resolved_config(deb_tags_slice, tmp_path, capsys):
    train, test = deb_tags_slice(120, 30)
    out = tmp_path / "run"
    argv = ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "1", "--head", "sparse"]
    settings = ["model.hidden=[16]", "head.intermediate=32", "optim.encoder.lr=0.001", "train.progress=false"]
    assert main([*argv, "--set", *settings, "train.stop_after_steps=1"]) == 0
    assert main([*argv, "--resume", "--set", *settings]) == 0  # resolves to the checkpoint's config
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line.startswith("recipe:")] == [
        "recipe: spartex (BoW, multi-label, 120 documents, 595 labels, 0.77 positives a label); "
        "explicit settings win"
    ] * 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["encoder"]["lr"] == 0.001 and saved["optim"]["head"]["lr"] == 0.002
    assert saved["head"]["loss"] == "bce" and saved["data"]["label_feature_dim"] == 256
    assert saved["head"]["group"] == 1 and saved["train"]["epochs"] == 1


@pytest.mark.parametrize(
    "head, bare",
    [([], False), (["--head", "dense"], False), (["--head", "sparse"], True)],
    ids=["no-head", "the-same-head-named", "settings-not-given-again"],
)
def test_a_resume_keeps_the_values_the_run_recorded_where_the_recipe_changed(
    deb_tags_slice, tmp_path, capsys, monkeypatch, head, bare
):
    train, test = deb_tags_slice(120, 30)
    out = tmp_path / "run"
    argv = ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "1", *head]
    settings = ["model.hidden=[16]", "train.progress=false"]
    assert main([*argv, "--set", *settings, "train.stop_after_steps=1"]) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    resolve = recipes.recipe_settings

    def another_version(config, facts):  # a later version's recipe: another loss, dropout and head lr
        preset, change, settings = resolve(config, facts)
        settings["model"]["dropout"], settings["optim"]["head"]["lr"] = 0.25, 0.125
        settings["head"]["loss"] = "bce"
        return preset, change, settings

    monkeypatch.setattr(recipes, "recipe_settings", another_version)
    capsys.readouterr()
    # without the settings: those the run was given are given again (the head's type, its hidden width)
    again = ["train", "--resume", "--out", str(out)] if bare else [*argv, "--resume", "--set", *settings]
    assert main(again) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("recipe:"))
    loss = recorded["head"]["loss"]  # the sparse head's recipe has BCE already: not a change
    assert line.endswith(
        "; resumed with the run's own "
        + (f"head.loss={loss} (now bce), " if loss != "bce" else "")
        + f"model.dropout={recorded['model']['dropout']:g} (now 0.25), "
        f"optim.head.lr={recorded['optim']['head']['lr']:g} (now 0.125)"
    )
    assert line.startswith("recipe: spartex" if bare else "recipe: xmc-mlp")
    resumed = yaml.safe_load((out / "config.yaml").read_text())
    assert resumed["train"].pop("stop_after_steps") == 0 and recorded["train"].pop("stop_after_steps") == 1
    # train.progress: this command's own
    assert resumed["train"].pop("progress") == bare and not recorded["train"].pop("progress")
    assert resumed == recorded
    assert (out / "metrics.json").exists()
    # a value the user sets now is theirs: a change the saved state cannot take is refused, as before
    assert main([*argv, "--resume", "--set", *settings, "model.dropout=0.25"]) == 2
    assert "differs from the checkpoint's in model.dropout" in capsys.readouterr().err


def test_a_resume_is_given_again_the_settings_its_run_was_given_but_for_those_it_sets_now():
    start = ["head.sample_num=0.2", "model.hidden=[16]", "train.stop_after_steps=5"]
    recorded = config_to_dict(load_config(head="selected", overrides=start))
    started_with = ["head.type", "head.sample_num", "model.hidden", "train.stop_after_steps", "data.gone"]
    config, keys = settings_given_again(recorded, started_with, load_config(), explicit_keys=())
    assert config.head == load_config(head="selected", overrides=start).head  # the type's section whole
    assert config.model.hidden == (16,) and config.train.stop_after_steps == 0  # this command's own: not
    assert keys == {"head.type", "head.sample_num", "model.hidden"}  # not a key the record lacks
    now = load_config(head="sparse", overrides=["model.hidden=[32]"])  # set now: theirs
    config, keys = settings_given_again(
        recorded, started_with, now, explicit_keys=("head.type", "model.hidden")
    )
    assert config == now and "head.sample_num" not in keys  # a key of a head whose type is set now
    assert settings_given_again(recorded, (), now, explicit_keys=()) == (now, frozenset())


def test_a_section_of_the_records_type_is_taken_whole_unless_the_user_set_a_key_in_it():
    transformer = config_to_dict(load_config(overrides=["model.type=transformer", "model.max_length=64"]))
    config = load_config()  # this version's defaults: an MLP
    kept_config, kept = keep_recorded_values(transformer, config, explicit_keys=())
    assert kept_config.model == load_config(overrides=["model.type=transformer", "model.max_length=64"]).model
    assert kept == {"model.type": ("transformer", "mlp")}
    dropout = load_config(overrides=["model.dropout=0.25"])  # a key set in the section: compared as given
    assert keep_recorded_values(transformer, dropout, explicit_keys=("model.dropout",)) == (dropout, {})
    sparse = load_config(head="sparse")  # a head type the user names: compared as given
    assert keep_recorded_values(config_to_dict(config), sparse, explicit_keys=("head.type",)) == (sparse, {})


def test_mlp_recipes_train_until_each_label_saw_about_200_positives_300_under_the_sparse_head():
    rare = dataclasses.replace(BOW, num_positives=75_000)  # 10 positives a label an epoch
    config, description = _resolve(facts=rare)
    assert config.train.epochs == 20 and "10 positives a label; 20 epochs)" in description
    assert _resolve(head="sparse", facts=rare)[0].train.epochs == 30
    twenty = dataclasses.replace(BOW, num_positives=150_000)  # 20 positives a label an epoch
    assert _resolve(head="sparse", facts=twenty)[0].train.epochs == 15
    assert _resolve(head="selected", facts=rare)[0].train.epochs == 20  # xmc-mlp: 200
    assert _resolve(head="sparse")[0].train.epochs == 5  # never fewer than the preset's
    assert _resolve(facts=dataclasses.replace(BOW, num_positives=7_500))[0].train.epochs == 30  # at most 30
    assert _resolve(["train.epochs=2"], facts=rare)[0].train.epochs == 2  # explicit settings win
    transformer = _resolve(["model.type=transformer"], facts=rare)[0]
    assert transformer.train.epochs == from_preset("xmc-transformer").train.epochs  # its own recipe


@pytest.mark.parametrize("head", ["selected", "partial_fc"])
def test_a_sampled_heads_batch_leaves_half_its_active_classes_to_sampled_ones(head):
    """5% of 5,000 one-label classes active (250): a batch of 256 would fill them with its own positives."""
    planted = DataFacts("bow", False, 50_000, num_classes=5_000, num_features=20_000, num_positives=50_000)
    config, description = _resolve(["head.sample_num=0.05"], head=head, facts=planted)
    assert config.train.batch_size == 128
    assert "; batch 128, about half the 250 active classes" in description
    roomy = dataclasses.replace(planted, num_classes=16_760)  # 838 active: 256 rows leave room
    assert _resolve(["head.sample_num=0.05"], head=head, facts=roomy)[0].train.batch_size == 256
    explicit = _resolve(["head.sample_num=0.05", "train.batch_size=256"], head=head, facts=planted)[0]
    assert explicit.train.batch_size == 256  # explicit settings win
    assert _resolve(facts=planted)[0].train.batch_size == 256  # the dense head samples nothing
    everything = _resolve(["head.sample_num=5000"], head=head, facts=planted)[0]
    assert everything.train.batch_size == 256  # every class active: nothing is sampled
