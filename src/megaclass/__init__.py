"""megaclass: training classifiers whose output space is huge.

Every model is ``encoder -> features -> head``; the head is where 10^5 to 10^8 classes hurt, so the heads
are the library's core. This module only re-exports the public API; importing it loads no CUDA, Triton or
other optional backend.
"""

from megaclass.errors import DataFormatError
from megaclass.heads.base import Head, RaggedLabels, Targets

__version__ = "0.1.0"

__all__ = ["DataFormatError", "Head", "RaggedLabels", "Targets", "__version__"]
