"""Analysis: dimension equalities propagated op by op; leaves of the axis graph are the width groups."""

from .derived_rules import derived
from .groups import Group, find_groups
from .ops import TRAITS
from .walker import Facts, Walker


def analyze(gm) -> Facts:
    """Apply every op's axis rule (from the op table; derived from its meta kernel for an op the table lacks) to
    ``gm`` and return the collected facts."""
    return Walker(gm, TRAITS, derive=derived).run()


__all__ = ["analyze", "Facts", "Group", "find_groups"]
