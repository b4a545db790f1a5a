"""The intermediate representation every stage shares: the axis graph (each tensor axis a node, equal axes
joined), index maps (new position -> old position, copy counts) and per-tensor rules (gathers, divisions,
scales, fills) that turn a source tensor into its grown tensor."""

from .axes import AxisGraph, is_structured, tree_leaves
from .index_maps import GroupMap, tree_map
from .tensor_rule import AxisMap, TensorRule

__all__ = ["AxisGraph", "is_structured", "tree_leaves", "GroupMap", "tree_map", "AxisMap", "TensorRule"]
