"""Text data as token ids: tokenised once, cached beside the data, padded per batch, batched by length.

The fast tokenizer runs once over the whole file (with a progress bar); the ids are saved as
``<file>.tok-<hash>.cache.npz`` beside the data (or under ``$MEGACLASS_CACHE``, default
``~/.cache/megaclass``, when that folder is read-only). The file name hashes the tokenizer (its full
serialised form: vocabulary, normaliser, special tokens) and the maximum length, so changing either reads or
writes another cache; the source file's size and modification time are stored inside and checked on load, so
an edited source is tokenised again.

Batches are padded to their own longest row (dynamic padding). :meth:`TokenDataset.arrange` groups rows of
similar length into the same batches (length bucketing) as a pure function of the seed and the epoch, so a
resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megaclass.data.batch import Batch, InputSpec, batch_targets, count_labels
from megaclass.data.cache import cache_dir, read_cache, write_cache
from megaclass.data.xmc import CSR, XMCData, label_features, load_xmc
from megaclass.errors import DataFormatError

__all__ = [
    "TokenDataset",
    "TokenIds",
    "TokenInputs",
    "bucket_order",
    "load_token_ids",
    "open_token_dataset",
    "token_cache_path",
    "tokenize_texts",
    "tokenizer_fingerprint",
]

_CACHE_VERSION = 1
_BUCKET_BATCHES = 64  # rows are sorted by length within pools of this many batches


@dataclass(frozen=True)
class TokenInputs:
    """A padded batch of token ids.

    Args:
        input_ids: ``(B, T)`` int64, ``T`` the longest row of the batch, padded with the pad id.
        attention_mask: ``(B, T)`` int64, 1 on real tokens, 0 on padding.
    """

    input_ids: Tensor
    attention_mask: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenInputs:
        return TokenInputs(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
        )


@dataclass(frozen=True)
class TokenIds:
    """Token ids of ``N`` documents in CSR form: document ``i`` is ``ids[indptr[i]:indptr[i + 1]]``.

    Args:
        ids: ``(total,)`` uint16 (vocabularies up to 65,536) or int32 token ids, special tokens included.
        indptr: ``(N + 1,)`` int64 offsets.
        pad_id: the tokenizer's padding id.
    """

    ids: np.ndarray
    indptr: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return int(self.indptr.shape[0]) - 1

    def lengths(self) -> np.ndarray:
        """``(N,)`` int64 tokens of each document."""
        return np.diff(self.indptr)

    def pad(self, rows: np.ndarray) -> TokenInputs:
        """Rows ``rows (B,)`` padded to their longest: ``(B, T)`` ids and mask."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts  # (B,)
        width = max(int(lengths.max(initial=0)), 1)
        input_ids = np.full((rows.shape[0], width), self.pad_id, dtype=np.int64)  # (B, T)
        positions = np.arange(width)[None, :]  # (1, T)
        mask = positions < lengths[:, None]  # (B, T)
        source = (starts[:, None] + positions)[mask]  # (tokens,) row-major, matches mask order
        input_ids[mask] = self.ids[source]
        return TokenInputs(torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64)))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hex digest of what decides a fast tokenizer's output (its serialised form, class, specials)."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)  # set by each call's truncation/padding arguments: not part of the identity
    state.pop("padding", None)
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(json.dumps(state, sort_keys=True).encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return digest.hexdigest()


def tokenize_texts(
    texts: Sequence[str], tokenizer: Any, *, max_length: int, chunk: int = 4096, progress: bool = True
) -> TokenIds:
    """Token ids of ``texts`` with special tokens, truncated to ``max_length``, in chunks, with a tqdm bar."""
    from tqdm.auto import tqdm

    dtype = np.uint16 if len(tokenizer) <= 65536 else np.int32
    lengths = np.zeros(len(texts), dtype=np.int64)
    pieces: list[np.ndarray] = []
    # on a terminal only (disable=None): redirected output keeps the logged lines alone
    with tqdm(
        total=len(texts), desc="tokenising", unit="doc", disable=not progress or None, leave=False
    ) as bar:
        for start in range(0, len(texts), chunk):
            encoded = tokenizer(
                list(texts[start : start + chunk]),
                truncation=True,
                max_length=max_length,
                add_special_tokens=True,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            lengths[start : start + len(encoded)] = [len(row) for row in encoded]
            pieces.extend(np.asarray(row, dtype=dtype) for row in encoded)
            bar.update(len(encoded))
    indptr = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return TokenIds(ids, indptr, int(tokenizer.pad_token_id or 0))


def token_cache_path(path: str | os.PathLike, tokenizer: Any, *, max_length: int) -> list[Path]:
    """Where the token cache of ``path`` may live: beside it first, then in the cache directory."""
    source = Path(os.fspath(path)).resolve()
    key = hashlib.sha256(
        f"{tokenizer_fingerprint(tokenizer)}:{max_length}:{_CACHE_VERSION}".encode()
    ).hexdigest()
    name = f"{source.name}.tok-{key[:16]}.cache.npz"
    folder_key = hashlib.sha1(str(source.parent).encode()).hexdigest()[:12]
    return [source.with_name(name), cache_dir() / f"{folder_key}-{name}"]


def _source_stamp(path: str) -> np.ndarray:
    stat = os.stat(path)
    return np.array([_CACHE_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)


def load_token_ids(
    path: str | os.PathLike,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int,
    cache: bool = True,
    progress: bool = True,
) -> TokenIds:
    """Token ids of ``texts`` (the documents of file ``path``), from the cache when it is current.

    Args:
        path: the data file the texts came from (names the cache and stamps it with its size and mtime).
        texts: its documents, in file order.
        tokenizer: a Hugging Face fast tokenizer.
        max_length: tokens per document, special tokens included.
        cache: read and write the cache; False always tokenises.
        progress: show a tqdm bar while tokenising.
    """
    path = os.fspath(path)
    candidates = token_cache_path(path, tokenizer, max_length=max_length) if cache else []
    stamp = _source_stamp(path) if cache else np.zeros(0, dtype=np.int64)
    if cache:
        arrays = read_cache(candidates, "stamp", stamp)
        if arrays is not None:
            cached = TokenIds(arrays["ids"], arrays["indptr"], int(arrays["pad_id"]))
            if len(cached) == len(texts):
                return cached
    tokens = tokenize_texts(texts, tokenizer, max_length=max_length, progress=progress)
    if cache:
        arrays = {
            "stamp": stamp,
            "ids": tokens.ids,
            "indptr": tokens.indptr,
            "pad_id": np.array(tokens.pad_id),
        }
        write_cache(candidates, arrays)
    return tokens


def bucket_order(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    *,
    seed: Sequence[int] | int,
    pool_batches: int = 64,
) -> np.ndarray:
    """Reorder ``order`` so consecutive ``batch_size`` slices hold rows of similar length.

    Pools of ``pool_batches * batch_size`` consecutive rows of ``order`` are sorted by length and cut into
    batches; the full batches are then shuffled (seeded by ``seed``), the one partial batch stays last, so the
    number of batches and ``drop_last`` behave as without bucketing.

    Args:
        order: ``(N,)`` row ids (already shuffled for the epoch).
        lengths: token count of every row of the data set.
        batch_size: rows per batch.
        seed: seeds the batch shuffle (e.g. ``(seed, epoch)``).
        pool_batches: batches per sorting pool; larger pools pad less but mix less.

    Returns:
        ``(N,)`` the same row ids, reordered.
    """
    order = np.asarray(order, dtype=np.int64)
    pool = max(pool_batches, 1) * batch_size
    pieces = []
    for start in range(0, order.shape[0], pool):
        rows = order[start : start + pool]
        pieces.append(rows[np.argsort(-lengths[rows], kind="stable")])
    arranged = np.concatenate(pieces) if pieces else order
    full = arranged.shape[0] // batch_size
    batches = arranged[: full * batch_size].reshape(full, batch_size)  # (batches, B)
    rng = np.random.default_rng(list(seed) if not isinstance(seed, int) else seed)
    shuffled = batches[rng.permutation(full)].reshape(-1)
    return np.concatenate([shuffled, arranged[full * batch_size :]])


@dataclass(eq=False, repr=False)
class TokenDataset:
    """Documents as token ids with their labels; the data-source face of text for transformer encoders.

    Args:
        tokens: the documents' :class:`TokenIds`.
        labels: :class:`~megaclass.data.xmc.CSR` of label ids per document.
        num_classes: ``C``.
        multilabel: whether targets are ragged label sets rather than one class per row.
        vocab_size: the tokenizer's vocabulary size.
        path: the file it came from, for messages.
        texts: the raw documents (kept for prediction output and label-feature fallbacks), or None.
        bucket: group rows of similar length into batches (see :meth:`arrange`).
        label_names: the name of each class, where the text file named its labels (else None).
    """

    tokens: TokenIds
    labels: Any
    _: KW_ONLY
    num_classes: int
    multilabel: bool
    vocab_size: InitVar[int]
    path: str = ""
    texts: Sequence[str] | None = None
    bucket: bool = True
    label_names: list[str] | None = None
    featurizer: None = field(default=None, init=False)  # text featurisers make sparse data, not tokens
    input_spec: InputSpec = field(init=False)
    lengths: np.ndarray = field(init=False)  # (N,) tokens per document
    _label_counts: np.ndarray | None = field(default=None, init=False)

    def __post_init__(self, vocab_size: int) -> None:
        if len(self.tokens) != len(self.labels):
            raise ValueError(
                f"{self.path}: {len(self.tokens)} tokenised documents but {len(self.labels)} label rows"
            )
        self.input_spec = InputSpec(kind="tokens", num_features=vocab_size)
        self.lengths = self.tokens.lengths()

    def __len__(self) -> int:
        return len(self.tokens)

    def label_counts(self) -> np.ndarray:
        """``(C,)`` int64 documents carrying each label; counted once and shared (do not change it)."""
        if self._label_counts is None:
            self._label_counts = count_labels(self.labels, self.num_classes)
        return self._label_counts

    def label_features(self, *, dim: int = 256, seed: int = 0) -> np.ndarray:
        """``(C, E)`` float32 PIFA vectors over bag-of-token-id documents (no encoder needed)."""
        ids = self.tokens.ids.astype(np.int32)
        bags = CSR(
            self.tokens.indptr, ids, np.ones(ids.shape[0], dtype=np.float32), self.input_spec.num_features
        )
        return label_features(bags, self.labels, dim=dim, seed=seed)

    def arrange(self, order: np.ndarray, batch_size: int, *, seed: Sequence[int] | int) -> np.ndarray:
        """The epoch's row order with length-bucketed batches (unchanged when ``bucket`` is off)."""
        if not self.bucket:
            return order
        return bucket_order(order, self.lengths, batch_size, seed=seed, pool_batches=_BUCKET_BATCHES)

    def batch(self, rows: np.ndarray) -> Batch:
        """The :class:`~megaclass.data.batch.Batch` of rows ``rows (B,)``: padded ids and targets (CPU)."""
        rows = np.asarray(rows, dtype=np.int64)
        return Batch(self.tokens.pad(rows), batch_targets(self.labels, rows, multilabel=self.multilabel))


def open_token_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    max_length: int,
    num_classes: int | None = None,
    cache: bool = True,
    progress: bool = True,
    bucket: bool = True,
    read: Callable[..., XMCData] = load_xmc,
    label_names: list[str] | None = None,
) -> TokenDataset:
    """Read an XMC text file (``labels<TAB>text``; another text format through its reader ``read``, e.g.
    :func:`megaclass.data.lf_json.read_lf_json`) and tokenise it once (cached).

    >>> train = open_token_dataset("data/deb-tags/train.txt.gz", tokenizer, max_length=64)  # doctest: +SKIP
    >>> train.num_classes, train.input_spec.kind
    (595, 'tokens')
    """
    path = os.fspath(path)
    data = read(path, num_labels=num_classes, label_names=label_names)
    if data.texts is None:
        raise DataFormatError(path, "a transformer encoder needs 'labels<TAB>text' lines; this is a BoW file")
    tokens = load_token_ids(
        path, data.texts, tokenizer, max_length=max_length, cache=cache, progress=progress
    )
    return TokenDataset(
        tokens,
        data.labels,
        num_classes=int(data.num_labels),
        multilabel=bool(data.multilabel),
        vocab_size=len(tokenizer),
        path=path,
        texts=data.texts,
        bucket=bucket,
        label_names=data.label_names,
    )
