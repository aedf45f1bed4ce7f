"""megaclass: training classifiers whose output space is huge.

Every model is ``encoder -> features -> head``; the head is where 10^5 to 10^8 classes hurt, so the heads
are the library's core. This module only re-exports the public API; importing it loads no CUDA, Triton or
other optional backend.

>>> import torch, megaclass
>>> head = megaclass.DenseHead(megaclass.DenseHeadConfig(), megaclass.HeadContext(16, 1000, multilabel=False))
>>> loss = head(torch.randn(8, 16), torch.randint(0, 1000, (8,)))
>>> scores, ids = head.topk(torch.randn(8, 16), k=5)
"""

from megaclass.errors import DataFormatError
from megaclass.heads import build_head, head_config
from megaclass.heads.base import Head, HeadContext
from megaclass.heads.dense import DenseHead, DenseHeadConfig
from megaclass.heads.partial_fc import PartialFCConfig, PartialFCHead
from megaclass.heads.selected import SelectedHead, SelectedHeadConfig
from megaclass.heads.sparse import SparseHead, SparseHeadConfig
from megaclass.ops.margins import MarginConfig
from megaclass.schema import ConfigError
from megaclass.targets import RaggedLabels, Targets

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataFormatError",
    "DenseHead",
    "DenseHeadConfig",
    "Head",
    "HeadContext",
    "MarginConfig",
    "PartialFCConfig",
    "PartialFCHead",
    "RaggedLabels",
    "SelectedHead",
    "SelectedHeadConfig",
    "SparseHead",
    "SparseHeadConfig",
    "Targets",
    "__version__",
    "build_head",
    "head_config",
]
