"""More experts (E -> mE): every expert copied m times with its router row, as per-tensor rules.

Copy j of expert e sits at ``j·E + e`` (blocked), on every tensor with an axis on the experts (router rows,
router biases, expert weights; ``analysis/moe.py`` reads them from the graph). Copies have their expert's
logit, so with top-k -> mk the m copies of each chosen expert are chosen together, and

    Σ_{copies} w_copy · FFN_e(x) = w_e · FFN_e(x)

when the copies' weights sum to their expert's: a softmax before the choice gives each ``p_e / m``, a
renormalisation gives each ``w_e / (m Σ w)``. Elsewhere (a sigmoid router without renormalisation) each copy
keeps ``w_e``, and the tensors that make the experts' outputs are divided by m (the rule's ``divide``). A group-
limited choice is exact with m times the groups and m times the groups chosen (the blocked layout repeats
every group whole); the config search of ``pipeline/experts.py`` finds the fields.

Symmetry breaking (copies otherwise receive identical gradients), each marked exact or not:

- ``noise=σ``: noise on the copies' output tensors that sums to zero over the m copies of an expert. The
  copies' hidden activations and weights are equal, so ``Σ_j (w/m)(W + N_j) h = w W h``: exact.
- ``drop=r`` (Drop-Upcycling): a fraction r of the FFN neurons of every new copy (j >= 1; the original keeps its
  weights) drawn again from a normal at each tensor's mean and std, each copy its own neurons: not exact.

>>> import torch
>>> rule = copy_rule("w", 2, 0, experts=2, m=2, divide=2)
>>> rule.apply(torch.tensor([[1.0], [3.0]]).expand(2, 3).contiguous())[:, 0].tolist()
[0.5, 1.5, 0.5, 1.5]
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from ..ir.axes import is_structured
from ..ir.tensor_rule import AxisMap, TensorRule


def multiplier(experts, counts: list[int]) -> int:
    """The whole m of ``experts=``: a multiplier (a float, 2.0) or a target expert count (an int, 8).

    >>> multiplier(2.0, [4, 4]), multiplier(8, [4])
    (2, 2)
    """
    if isinstance(experts, bool) or not isinstance(experts, (int, float)) or experts < 1:
        raise SpecError(f"experts must be a multiplier >= 1 (2.0) or a target expert count (8), got {experts!r}")
    if isinstance(experts, float):
        if experts != int(experts):
            raise SpecError(f"experts={experts} is not whole: copies preserve the function only when each expert "
                            f"is copied the same number of times (E -> mE); ask for a whole multiplier")
        return int(experts)
    if len(set(counts)) > 1:
        raise SpecError(f"experts={experts} is a target count, but the layers hold {sorted(set(counts))} experts: "
                        f"give a multiplier instead (experts=2.0)")
    if experts % counts[0]:
        raise SpecError(f"experts={experts} is not a multiple of the {counts[0]} experts each layer holds: copies "
                        f"preserve the function only when each expert is copied the same number of times")
    return experts // counts[0]


def copy_rule(name: str, ndim: int, axis: int, experts: int, m: int, divide: int | None = None) -> TensorRule:
    """The rule of a tensor whose ``axis`` is the experts: copies blocked, and divided by ``divide`` where the
    tensor makes the experts' outputs (1 there without a division: the copies' noise needs the consumer mark)."""
    axes = [AxisMap() for _ in range(ndim)]
    axes[axis] = AxisMap(index=torch.arange(m * experts) % experts,
                         divide=None if divide is None else torch.full((experts,), divide))
    return TensorRule(name, axes, notes=[f"experts copied x{m}" + (f", divided by {divide}" if divide else "")])


def expert_rules(layers: list, shapes: dict, m: int, noise: float = 0.0, seed: int = 0) -> dict:
    """state name -> TensorRule for every tensor on the experts of ``layers`` (``analysis.moe.MoeLayer``).
    ``shapes``: state name -> shape of the source tensors."""
    rules = {}
    for layer in layers:
        outputs = set(layer.outputs)
        for pa in layer.tensors:
            divide = (1 if layer.copies_sum else m) if pa.param in outputs else None
            rule = copy_rule(pa.param, len(shapes[pa.param]), pa.axis, layer.experts, m, divide)
            if noise and divide is not None:
                rule.noise = (float(noise), seed * 100003 + len(rules))
                rule.notes.append(f"noise {noise} that cancels over each expert's copies")
            rules[pa.param] = rule
    return rules


def theorem(layer, m: int, keep_top_k: bool) -> str:
    """Why copying the experts of ``layer`` preserves its function (or why not), in words."""
    if keep_top_k:
        return (f"keep_top_k=True keeps k={layer.k} of {m * layer.experts} experts at {layer.where}: a token's "
                f"top-{layer.k} now holds copies of fewer experts, so the combine drops experts it used")
    how = ("a softmax before the choice gives each copy p/m" if layer.split else
           "the chosen weights are renormalised, each copy gets w/(m Σw)" if layer.renormalised else
           f"the {layer.score} weights do not split over copies, so the experts' outputs are divided by {m}")
    extra = f"; the factor {layer.scale} on the weights is the same for copies" if layer.scale is not None else ""
    groups = f"; the {sorted(layer.groups)} group sizes of the group-limited choice x{m}" if layer.groups else ""
    return f"{layer.where}: top-{layer.k} -> top-{m * layer.k} of {m * layer.experts}: {how}{extra}{groups}"


def neuron_positions(plan, layer) -> dict:
    """state name -> (axis, [positions per neuron part]) of the FFN neurons on each expert tensor of ``layer``:
    the axes of the plan's "ffn" group, parts of a fused gate/up axis each located by its offset."""
    f = plan.facts
    ag, node_of = f.ag, {s: n for n, s in {**f.params, **f.buffers}.items()}
    out = {}
    for pa in layer.tensors:
        if pa.param == layer.router or pa.param not in node_of:
            continue
        for axis, a in enumerate(f.axes[node_of[pa.param]]):
            tree = ag.expand(a)
            leaves = tree[1] if is_structured(tree) and tree[0] == "cat" else [tree]
            starts, offset = [], 0
            for leaf in leaves:
                g = None if is_structured(leaf) else plan.group_of(ag.find(leaf))
                size = int(ag.size_of(leaf)) if not is_structured(leaf) else None
                if size is None:
                    break
                if g is not None and g.role == "ffn":
                    starts.append((offset, size))
                offset += size
            if starts and axis != pa.axis:
                out[pa.param] = (axis, starts)
    return out


def drop_neurons(state: dict, layer, m: int, rate: float, positions: dict, seed: int = 0) -> int:
    """Drop-Upcycling on the new copies (j >= 1) of ``layer``'s experts in the grown ``state``, in place: a
    fraction ``rate`` of each copy's FFN neurons drawn again from a normal at the tensor's mean and std.
    Returns how many neurons were drawn again."""
    if not positions:
        raise SpecError(f"drop={rate} re-initialises FFN neurons of the experts, but growir found no FFN axis on "
                        f"the experts at {layer.where}")
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    sizes = {size for _, starts in positions.values() for _, size in starts}
    if len(sizes) != 1:
        raise SpecError(f"drop={rate}: the experts at {layer.where} hold FFN axes of sizes {sorted(sizes)}")
    neurons = sizes.pop()
    count = round(rate * neurons)
    axis_of = {pa.param: pa.axis for pa in layer.tensors}
    drawn = 0
    for slot in range(layer.experts, m * layer.experts):
        chosen = torch.randperm(neurons, generator=gen)[:count]
        for name, (axis, starts) in positions.items():
            t = state[name]
            expert = t.select(axis_of[name], slot)
            ax = axis - (axis > axis_of[name])
            mean, std = float(t.float().mean()), float(t.float().std())
            for offset, _ in starts:
                rows = chosen + offset
                shape = list(expert.shape)
                shape[ax] = len(rows)
                draw = torch.randn(shape, generator=gen) * std + mean
                expert.index_copy_(ax, rows, draw.to(t.dtype))
        drawn += count
    return drawn
