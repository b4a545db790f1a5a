"""The fresh width method: exact growth that brings new random directions and copies nothing.

Copies of a unit receive identical gradients and train as one (growth-math §7); noise that cancels over copies
breaks that but is ill-conditioned when large (§8). This method copies nothing:

* a normalized group (the residual stream) keeps its old units once and fills the rest (repeat-and-fill with
  n = 1, ``fill.py``): RMSNorm fills 0, LayerNorm fills the mean, which the norm maps to 0. The residual is
  rescaled by ``sqrt(d'/d)`` so every norm keeps its statistics and its eps (``rescale.py``); the consumers'
  columns at the fill positions are random at each tensor's own std (they multiply zeros), so the fill
  dimensions receive gradients in new directions from the first step.
* any other grown group (FFN neurons, heads, kv heads) gets fresh units: producer rows random at the tensor's
  std, consumer columns zero. A fresh unit adds nothing at first; its consumer weights get a gradient
  (activation × upstream gradient) at the first step.

Nothing cancels, so nothing is amplified (rounding stays rounding). A normalized group whose norm is post-norm
cannot be filled exactly (``fill.py``); ``fresh`` copies it at a whole ratio (exact), else balanced copies
(reported); ``auto`` fills it with the norms' eps kept and weights raised (``fill.py``), and
``width_method="fill"`` fills it compensated, both inexactly and reported, where the model does
not return it (copies train as one: docs/savings.md measures the difference), and copies it under ``strict=True``.

A copied group's symmetry is broken by its consumers instead (``split_copies``): each consumer column is split
over its copies by random factors drawn in ``SPLIT`` = (0.25, 0.75) and normalized to sum to 1 over each
position's copies, per element (at ×2: a and 1 - a with a in (0.25, 0.75)), instead of 1/n each. Exact because the
copies' inputs are equal (``sum_k a_k·W·x = W·x``), bounded so nothing is amplified, and the copies receive
different gradients from the first step (docs/methods.md: "Copies that must stay copies").

>>> import growir
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=100))
>>> big = growir.grow(small, width=2.0, width_method="fresh")
>>> big.growir_record.exact, float(big.model.layers[0].mlp.down_proj.weight[:, 64:].abs().max().detach())
(True, 0.0)
"""

from __future__ import annotations

import zlib

from ..analysis.plan import Plan
from .fill import FillPlan, group_reads


def fresh_units(plan: Plan, sizes: dict, fp: FillPlan) -> dict:
    """root -> "random" (fresh units) for every grown group no norm reads (FFN neurons, heads); head_dim keeps its own rules
    (rotary interleaving, score scales) and normalized groups are filled or copied."""
    out = {}
    for g in plan.groups:
        new = sizes.get(g.id, g.size)
        if g.size is None or new == g.size or g.role == "head_dim" or g.root in fp.fills:
            continue
        if not any(r.kind == "norm" for r in g.reads):
            out[g.root] = "random"
    return out


def copy_where_exact(plan: Plan, sizes: dict, fp: FillPlan, low_precision: bool, keep_eps: bool) -> None:
    """``width_method="auto"``: move each filled group whose fill is not exact, while copies are, to
    ``fp.copied`` (a per-group choice; the other groups keep their fresh construction). At a whole ratio k:

    * the grown weights are stored in a dtype narrower than float32 and k is a power of two: the fill's
      factors sqrt(d'/d) (and a LayerNorm's mean rows) round there, a division by 2^j does not;
    * the norms' eps cannot change (``keep_eps``: the rebuilt config cannot hold it) and the residual cannot be
      rescaled instead (it is an output): the fill shrinks the statistics the norm sees, copies do not."""
    from .rescale import can_rescale
    for g in plan.groups:
        if g.root not in fp.fills or g.root in fp.reasons:  # an inexact (post-norm) fill: exactness is not its aim
            continue
        ratio, rest = divmod(sizes.get(g.id, g.size), g.size)
        if rest:
            continue
        why = ""
        if low_precision and ratio & (ratio - 1) == 0:
            why = ("the weights are stored below float32 precision, where a fill's sqrt(d'/d) rounds and a "
                   "copy's 1/2^j does not")
        elif keep_eps and not can_rescale(plan, g.root, fp.sites[g.root]):
            why = "the norms' eps cannot change and the residual cannot be rescaled: a fill is not exact here"
        if why:
            del fp.fills[g.root], fp.sites[g.root]
            fp.copied[g.root] = why


SPLIT = (0.25, 0.75)  # bounds of the consumers' split factors over a copied group (before normalizing)


def split_copies(plan: Plan, roots, rules: dict) -> list[str]:
    """Consumers of the copied groups ``roots`` split each column over its copies by bounded random factors
    (``AxisMap.split``) instead of dividing by the count; returns the parameters changed. A tied parameter
    (an embedding that is also the head) copies, not splits: it is left as is."""
    changed = []
    for root in roots:
        for p, i, _ in group_reads(plan, root):
            axis = rules[p].axes[i]
            if axis.divide is not None and axis.index is not None and axis.split is None:
                axis.split = SPLIT
                rules[p].notes.append(f"copies of `{plan.group_of(root).label}` split by random factors in "
                                      f"{SPLIT} summing to 1 (exact: the copies' inputs are equal)")
                changed.append(p)
    return changed


def seed_random_fills(rules: dict, aliases: dict, seed: int) -> None:
    """One seed per tensor for its "random" fills and splits, from its (canonical) name: tied names draw the
    same values, and a new block's tensors draw other values than the block they copy."""
    for name, rule in rules.items():
        if any(m.fill == "random" or m.split is not None for m in rule.axes):
            rule.fill_seed = zlib.crc32(f"{seed}:{aliases.get(name, name)}".encode())
