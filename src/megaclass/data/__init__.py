"""Data sets: extreme classification formats (BoW and text), synthetic data, loaders."""

from megaclass.data.xmc import (
    CSR,
    XMCData,
    label_features,
    load_xmc,
    read_bow,
    read_label_file,
    read_label_names,
    read_text,
    write_bow,
    write_text,
)

__all__ = [
    "CSR",
    "XMCData",
    "label_features",
    "load_xmc",
    "read_bow",
    "read_label_file",
    "read_label_names",
    "read_text",
    "write_bow",
    "write_text",
]
