"""End to end on CPU: a tiny random BERT + dense head in the trainer, resume, bf16 head state, predict."""

import io
import os

import numpy as np
import pytest
import torch

from megaclass.state_io import read_state
from megaclass.train.config import load_config
from megaclass.train.loop import train
from megaclass.train.progress import read_log

VARIANTS = {
    "fp32": [],
    # Renee's recipe: SGD on the classifier, AdamW on the encoder; bf16 head state; a head-only warm-up
    "bf16_sr": [
        "optim.head_state=bf16_sr",
        "optim.head.name=sgd",
        "optim.head.lr=0.1",
        "optim.encoder_frozen_steps=3",
        "model.gradient_checkpointing=true",
    ],
}


def _config(model_options: dict, overrides: list[str]):
    base = [
        "train.epochs=2",
        "train.batch_size=8",
        "train.device=cpu",
        "train.progress=false",
        "train.log_every=1",
        "train.valid_fraction=0",  # every row trains: the recorded loss curve is over all 48
        "optim.encoder.lr=0.003",
        "optim.head.lr=0.03",
        "optim.decay=constant",
    ]
    model = [
        f"model.{key}={value!r}" if isinstance(value, str) else f"model.{key}={value}"
        for key, value in model_options.items()
    ]
    return load_config(None, [*base, *model, *overrides])


def _run(config, data, out, **kwargs):
    return train(
        config,
        train_path=str(data / "train.txt"),
        test_path=str(data / "test.txt"),
        out_dir=str(out),
        **kwargs,
    )


def _losses(out) -> list[float]:
    return [
        record["loss"] for record in read_log(os.path.join(out, "log.jsonl")) if record["kind"] == "train"
    ]


def _weights(out) -> dict[str, torch.Tensor]:
    state = read_state(os.path.join(out, "model"))
    return {f"{part}.{name}": value for part in ("encoder", "head") for name, value in state[part].items()}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loss_falls_and_resume_is_exact(write_text_data, tmp_path, tiny_model_options, variant):
    data = tmp_path / "data"
    write_text_data(data, n_train=48, n_test=16)
    config = _config(tiny_model_options, VARIANTS[variant])
    metrics = _run(config, data, tmp_path / "full")
    losses = _losses(tmp_path / "full")
    assert len(losses) == 12 and metrics["steps"] == 12
    assert np.mean(losses[6:]) < 0.9 * np.mean(losses[:6]), losses  # the second epoch's mean, the first's
    weights = _weights(tmp_path / "full")
    if variant == "bf16_sr":
        assert weights["head.weight"].dtype == torch.bfloat16
        assert next(v for k, v in weights.items() if k.startswith("encoder.")).dtype == torch.float32

    stopped = _config(tiny_model_options, [*VARIANTS[variant], "train.stop_after_steps=5"])
    assert _run(stopped, data, tmp_path / "resumed") == {}
    resumed = _run(config, data, tmp_path / "resumed", resume=True)
    assert _losses(tmp_path / "resumed") == losses
    assert resumed["P@1"] == metrics["P@1"]
    for name, tensor in _weights(tmp_path / "resumed").items():
        assert torch.equal(tensor, weights[name]), name


def test_frozen_encoder_warmup_leaves_encoder_unchanged(write_text_data, tmp_path, tiny_model_options):
    data = tmp_path / "data"
    write_text_data(data, n_train=16, n_test=8)
    # every test label is filtered out (XMC repository filter file): nothing is left to hit
    pairs = [
        f"{doc} {label}"
        for doc, line in enumerate((data / "test.txt").read_text().splitlines())
        for label in line.split("\t")[0].split(",")
    ]
    (data / "filter.txt").write_text("\n".join(pairs) + "\n")
    overrides = [
        "optim.encoder_frozen_steps=100",
        "train.epochs=1",
        f"eval.filter_labels={data / 'filter.txt'}",
    ]
    config = _config(tiny_model_options, overrides)
    from megaclass.train.loop import Trainer

    trainer = Trainer(
        config,
        train_path=str(data / "train.txt"),
        test_path=str(data / "test.txt"),
        out_dir=str(tmp_path / "run"),
    )
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    head_before = trainer.head.weight.detach().clone()
    metrics = trainer.train()
    trainer.close()
    assert metrics["P@1"] == 0.0 and metrics["P@5"] == 0.0
    for name, value in trainer.encoder.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not torch.equal(trainer.head.weight, head_before)


def test_label_names_initialise_head_and_predict_reads_stdin(
    write_text_data, tmp_path, tiny_model_options, monkeypatch, capsys
):
    from megaclass.cli import main
    from megaclass.models.text import TransformerEncoder

    data = tmp_path / "data"
    write_text_data(data, n_train=16, n_test=8)
    config = _config(
        tiny_model_options,
        [
            "model.init_head=label_names",
            "model.label_features=names",
            "train.epochs=1",
            "optim.head.lr=0",
            "optim.encoder.lr=0",
        ],
    )
    _run(config, data, tmp_path / "run")
    weights = _weights(tmp_path / "run")
    encoder = TransformerEncoder(config.model, None)
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")})
    names = (data / "labels.txt").read_text().split("\n")[:6]
    want = torch.nn.functional.normalize(torch.from_numpy(encoder.encode_texts(names)), dim=1)
    got = torch.nn.functional.normalize(weights["head.weight"], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("kde games\nruby http client\n"))
    assert main(["predict", "--run", str(tmp_path / "run"), "--input", "-", "--out", "-", "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2 and all(len(line.split()) == 3 for line in lines)
    ids = [int(pair.split(":")[0]) for pair in lines[0].split()]
    assert all(0 <= i < 6 for i in ids)
