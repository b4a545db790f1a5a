"""bert2BERT's advanced knowledge initialization (AKI): new units of block l come from block l+1.

For a group that lives inside block l (its FFN neurons, its heads), the new positions j >= n of every
parameter axis on that group take the values that block l+1's corresponding parameter has after the same
expansion (in-dimension expanded, split by the same copy counts). Old positions keep block l's values.
The top block falls back to FPI. The hidden (residual) group spans all blocks and grows by FPI. Not
function-preserving by design: bert2BERT reports that it converges faster than FPI.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ir.axes import CAT, is_structured
from ..analysis.plan import Plan


def new_unit_mask(tree, ag, maps: dict, root) -> torch.Tensor:
    """Over the new positions of an axis tree: True where ``root``'s index is a new unit (>= old size)."""
    if is_structured(tree):
        parts = [new_unit_mask(t, ag, maps, root) for t in tree[1]]
        if tree[0] == CAT:
            return torch.cat(parts)
        out = torch.zeros(1, dtype=torch.bool)
        for p in parts:
            out = (out[:, None] | p[None, :]).reshape(-1)
        return out
    m = maps.get(tree)
    n = m.new if m is not None else int(ag.size[tree])
    if tree != root or m is None:
        return torch.zeros(n, dtype=torch.bool)
    return torch.arange(n) >= m.old


def aki_rules(plan: Plan, maps: dict, rules: dict) -> int:
    """Point the new units of each block's own groups at the next block; returns how many tensors changed."""
    ag, changed = plan.facts.ag, 0
    nodes = {state: node for node, state in plan.facts.params.items()}
    for b in plan.blocks:
        if not b.homogeneous or not b.alike:  # kinds with other parameters: no next-block units
            continue
        for level in range(b.count - 1):
            for g in plan.groups:
                axes = g.producers + g.consumers
                if g.root not in maps or not axes or any(b.suffix_of(level, pa.param) is None for pa in axes):
                    continue
                for pa in axes:
                    tree = ag.expand(plan.facts.axes[nodes[pa.param]][pa.axis])
                    mask = new_unit_mask(tree, ag, maps, g.root)
                    rule = rules[pa.param]
                    if rule.donor_axis is not None:  # two of the block's groups on one tensor: join masks
                        mask = mask | rule.donor_axis[1] if rule.donor_axis[0] == pa.axis else mask
                    rules[pa.param] = dataclasses.replace(rule, donor=b.name(level + 1, b.suffix_of(level, pa.param)),
                                                          donor_axis=(pa.axis, mask))
                    changed += 1
    return changed
