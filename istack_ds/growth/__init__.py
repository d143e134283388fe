"""Depth growth: pure lineage operators, the stage schedule, and the manager that regrows a live engine.

``operators`` and ``schedule`` import no torch; ``GrowthManager`` (torch + DeepSpeed)
is imported lazily from :mod:`istack_ds.growth.manager`.
"""

from istack_ds.growth.operators import OPERATORS, carry_supervised, compose, identity, lineage, lineage_through
from istack_ds.growth.schedule import Schedule

__all__ = [
    "OPERATORS",
    "Schedule",
    "carry_supervised",
    "compose",
    "identity",
    "lineage",
    "lineage_through",
    "GrowthManager",
    "GrowthResult",
]


def __getattr__(name):
    if name in ("GrowthManager", "GrowthResult"):
        from istack_ds.growth import manager

        return getattr(manager, name)
    raise AttributeError(name)
