"""Dynamic sparse training of fixed fan-in layers: topology initialisation, prune/regrow and schedules."""

from megaclass.dst.schedule import DSTConfig, RewireMode, rewire_fraction, stop_step
from megaclass.dst.topology import (
    connection_magnitude,
    expand_to_labels,
    prune_regrow,
    random_fanin_index,
    rewiring_scratch_bytes,
    sample_new_columns,
)

__all__ = [
    "DSTConfig",
    "RewireMode",
    "connection_magnitude",
    "expand_to_labels",
    "prune_regrow",
    "random_fanin_index",
    "rewire_fraction",
    "rewiring_scratch_bytes",
    "sample_new_columns",
    "stop_step",
]
