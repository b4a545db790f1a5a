"""Tensors the forward computes from sizes alone, one value per unit of a group (ALiBi's slope per head).

Such a tensor depends on no input and no parameter, so it is evaluated once here. Two ways to keep the function:

- **In the rewritten graph** it becomes a buffer grown like a producer: new unit j holds old unit g(j)'s value,
  so every copy of head h keeps h's slope and the usual copy rules are exact (at any ratio).
- **In a rebuilt model** the forward recomputes the values for the new size, with its own formula (for ALiBi
  m_h = 2^(-8h/H) when H is a power of two, two interleaved sequences otherwise). growir reads them from the
  rebuilt model (never assuming the formula) and moves each old unit h to a new position j whose value equals
  h's old one; the other positions are fresh units whose consumer weights are zero, so their values do not
  matter:  sum_j O'[:, j] f_j(x) = sum_h O[:, h] f_h(x)  when O'[:, p(h)] = O[:, h] and O' is 0 elsewhere.
  Producers of a fresh unit copy a neighbour (so that it trains). A value with no match makes the growth
  inexact, which the caller measures and reports.

Constants uniform along the group (ones, zeros) carry no per-unit information and are left to ``constants.py``.

>>> import torch
>>> slope_index(torch.tensor([.25, .0625]), torch.tensor([.5, .25, .125, .0625]))
tensor([-1,  0, -1,  1])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir.axes import is_structured
from ..analysis.ops import RANDOM
from ..analysis.plan import Plan



@dataclass
class UnitConstant:
    """A constant computed from sizes alone with an axis along a grown group (a per-unit table): its value is
    recomputed at the new size."""
    node: str  # the input-independent node whose value is computed from sizes
    axis: int  # its axis along the group
    root: object  # the group's root
    value: torch.Tensor  # its value at the old size


def evaluate_constants(gm: fx.GraphModule) -> dict:
    """node -> value for every tensor node computed from literals alone (no input, parameter or buffer)."""
    env = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        if not all(a in env for a in n.all_input_nodes) or RANDOM(n):
            continue
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if str(kwargs.get("device")) == "meta":  # made on the proxy's meta device, which holds no values
            kwargs = {**kwargs, "device": torch.device("cpu")}
        try:
            env[n] = n.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that cannot run eagerly here is simply not folded
            continue
    return env


def _frontier(env: dict) -> list:
    """Constant nodes read by something that is not constant (metadata asserts aside), in graph order."""
    def reader(u):
        return u not in env and (u.op == "output" or isinstance(u.meta.get("val"), torch.Tensor))
    return [n for n in env if isinstance(env[n], torch.Tensor) and any(reader(u) for u in n.users)]


def find_unit_constants(plan: Plan, maps: dict) -> list[UnitConstant]:
    """Constants along a grown group that differ between units."""
    f, ag, found = plan.facts, plan.facts.ag, []
    env = evaluate_constants(plan.captured.gm)
    for n in _frontier(env):
        for i, axis in enumerate(f.axes.get(n.name, [])):
            root = ag.expand(axis)
            if is_structured(root) or root not in maps or env[n].shape[i] < 2:  # plain grown axes only
                continue
            rows = env[n].movedim(i, 0).reshape(env[n].shape[i], -1)
            if not bool((rows == rows[:1]).all()):
                found.append(UnitConstant(n.name, i, root, env[n]))
    return found


def grown_value(c: UnitConstant, maps: dict) -> torch.Tensor:
    """The constant at the new size for the rewritten graph: each new unit holds the value of the unit it
    copies (a fresh unit, its neighbour's)."""
    m = maps[c.root]
    index = m.index if m.copies is None else torch.where(m.index >= 0, m.index, m.copies)
    return c.value.index_select(c.axis, index.clamp(min=0))


def slope_index(old: torch.Tensor, new: torch.Tensor, rel: float = 1e-6) -> torch.Tensor | None:
    """new position -> old unit whose value it holds (-1: a fresh unit); rows are compared whole. None when
    some old value appears nowhere in ``new``."""
    old2, new2 = old.reshape(len(old), -1).double(), new.reshape(len(new), -1).double()
    tol = rel * max(1.0, float(old2.abs().max()))
    index = torch.full((len(new2),), -1, dtype=torch.long)
    for h, row in enumerate(old2):
        close = ((new2 - row).abs().amax(1) <= tol) & (index < 0)
        if not bool(close.any()):
            return None
        index[int(close.nonzero()[0])] = h
    return index


def freeze_constants(gm: fx.GraphModule, values: dict) -> None:
    """Replace each node in ``values`` ({node name: tensor}) by a buffer holding the tensor."""
    for n in list(gm.graph.nodes):
        if n.name in values:
            name = f"_growir_{n.name}"
            gm.register_buffer(name, values[n.name].clone())
            with gm.graph.inserting_before(n):
                attr = gm.graph.get_attr(name)
            attr.meta = dict(n.meta)
            n.replace_all_uses_with(attr)


def fresh_map(index: torch.Tensor, old: int):
    """A ``GroupMap`` for ``index`` (-1: a fresh unit): one copy of each old unit, fresh units zero in
    consumers and, in producers, a copy of the nearest old unit before them."""
    from ..ir.index_maps import GroupMap
    known = torch.where(index >= 0, torch.arange(len(index)), -1).cummax(0).values
    first = int((index >= 0).nonzero()[0])
    copies = torch.where(known >= 0, index[known.clamp(min=0)], index[first])
    return GroupMap(old, len(index), index, torch.ones(old, dtype=torch.long), "fresh", copies)


def unit_maps(units: list[UnitConstant], values: dict) -> tuple[dict, list[str]]:
    """Group maps that put each old unit where the rebuilt model's value (``values``: node -> tensor) equals its
    old one, and the reasons where no such place exists."""
    out, reasons = {}, []
    for c in units:
        if c.node not in values:
            continue
        old, new = c.value.movedim(c.axis, 0), values[c.node].movedim(c.axis, 0)
        if c.root in out:  # a second constant on the same group must agree with the first's placement
            index = out[c.root].index
            placed = new.reshape(len(new), -1)[index >= 0]
            if not torch.allclose(placed.double(), old.reshape(len(old), -1)[index[index >= 0]].double()):
                reasons.append(f"the per-unit constants at `{c.node}` and another of its group disagree on where "
                               f"the old units belong at the new size")
            continue
        index = slope_index(old, new)
        if index is None:
            reasons.append(f"the rebuilt model computes the constant at `{c.node}` (one value per unit) with "
                           f"values that the old units do not have, so no placement of the old units keeps them")
            continue
        out[c.root] = fresh_map(index, len(old))
    return out, reasons


def rebuilt_values(units: list[UnitConstant], maps: dict, rebuilt: torch.nn.Module) -> dict:
    """What the rebuilt model computes for each constant: its graph's constants of the grown shape, matched in
    graph order (the formula is the model's own and is never assumed)."""
    from ..frontend.export import capture
    env = evaluate_constants(capture(rebuilt).gm)
    frontier, out, used = _frontier(env), {}, set()
    for c in units:
        shape = list(c.value.shape)
        shape[c.axis] = maps[c.root].new
        match = next((n for n in frontier if n not in used and list(env[n].shape) == shape), None)
        if match is not None:
            used.add(match)
            out[c.node] = env[match].to(c.value.dtype)
    return out
