"""Analysis: dimension equalities propagated op by op; leaves of the axis graph are the width groups."""

from .groups import Group, find_groups
from .walker import Facts, Walker


def analyze(gm) -> Facts:
    """Apply every op rule to ``gm`` and return the collected facts."""
    from .rules import RULES
    return Walker(gm, RULES).run()


__all__ = ["analyze", "Facts", "Group", "find_groups"]
