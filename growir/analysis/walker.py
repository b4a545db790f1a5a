"""Walk an exported aten graph once, applying one rule per op, and collect the facts growth needs.

The facts are deliberately plain records: which parameter axes a group is *produced* on (copied) and
*consumed* on (contracted, so split by copy count), which ops *read* a group in a way that can break
exactness (a mean, a sum, a softmax, a contraction between two activations), which graph constants
carry a group's size, and which axes are *pinned* (model inputs, vocabularies, kernels) and never grow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import sympy
import torch
import torch.fx as fx

from ..errors import AnalysisError, GrowthError, UnsupportedOpError, first_line
from ..frontend.folder import named_tensors
from ..ir.axes import AxisGraph
from .nodes import back, chain, op_name, permutation


def module_of(node: fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module the node came from, or ('<top>', '')."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path or "<top>", cls_name.rsplit(".", 1)[-1]


def where(node: fx.Node) -> str:
    """A node for messages: its name, its op and the module it came from."""
    path, cls = module_of(node)
    return f"`{node.name}` ({op_name(node)}) in module `{path}`" + (f" ({cls})" if cls else "")


@dataclass(frozen=True)
class ParamAxis:
    """Axis ``axis`` of the parameter (or buffer) ``param``, by its state_dict name."""
    param: str  # state_dict name
    axis: int


@dataclass
class Read:
    """An op that reads a group beyond copying it elementwise."""
    axis: object
    kind: str  # norm | max | sum | softmax | index | contract | select | scale
    node: str
    where: str
    detail: object = None


@dataclass
class SizeConst:
    """A literal in the graph that equals (a factor of) an axis's size: view sizes, split sizes, slice bounds."""
    node: str
    path: tuple  # ("args", i) | ("args", i, j) | ("sym", node_name, i)
    axis: object
    kind: str  # size | split | start | end


@dataclass
class Facts:
    """What one walk of a graph found: the axis graph, each value's axes, the parameters and where each is
    copied (produced) or contracted (consumed), the reads that can break exactness, the size literals, the
    pinned axes, the attention sites and the norms. The passes read these instead of walking the graph."""
    ag: AxisGraph = field(default_factory=AxisGraph)
    axes: dict = field(default_factory=dict)  # node name -> [axis ids] (tensor outputs)
    tuple_axes: dict = field(default_factory=dict)  # node name -> [[axis ids]] (tuple outputs)
    params: dict = field(default_factory=dict)  # get_attr node name -> state_dict name (parameters)
    buffers: dict = field(default_factory=dict)  # get_attr node name -> state_dict name (buffers)
    inputs: list = field(default_factory=list)  # placeholder node names
    outputs: list = field(default_factory=list)  # [[axis ids] or None] per flat output
    consumed: list = field(default_factory=list)  # (param state name, param axis index, op node name)
    produced: set = field(default_factory=set)  # param state names used by a non-contracting op (copied)
    aliases: dict = field(default_factory=dict)  # state name -> the state name the graph uses for that tensor
    reads: list = field(default_factory=list)
    consts: list = field(default_factory=list)
    pins: dict = field(default_factory=dict)  # axis id -> reason
    expanded: set = field(default_factory=set)  # axis ids created by expand/repeat (kv-group replicas)
    attention: list = field(default_factory=list)  # dicts: node, q, k, v, out axes, scale given?
    norms: list = field(default_factory=list)  # (node name, [normalized axis ids])
    variances: set = field(default_factory=set)  # state names an op divides by the root of (must stay positive)


class Walker:
    """Applies each op's axis rule to every node of a graph and collects the ``Facts``.

    ``table`` is the op table (``growir.analysis.ops.TRAITS``: op name -> row with ``rule``, ``kind``, ``layout``);
    it is passed in because the table names the rules, which use the walker. ``derive`` is the rule for aten ops
    the table lacks (``growir.analysis.derived_rules.derived``, read from its meta kernel); without it they are refused.
    """

    def __init__(self, gm: fx.GraphModule, table: dict, derive: Callable | None = None):
        self.gm = gm
        self.table = table
        self.derive = derive
        self.f = Facts()
        self.nodes = {n.name: n for n in gm.graph.nodes}
        param_ids = {id(p) for p in gm.parameters()}
        used = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                obj = _fetch(gm, n.target)
                if isinstance(obj, torch.Tensor) and n.users:
                    (self.f.params if id(obj) in param_ids else self.f.buffers)[n.name] = n.target
                    used[id(obj)] = n.target
        for name, t in named_tensors(gm, buffer_aliases=True):
            if id(t) in used and used[id(t)] != name:
                self.f.aliases[name] = used[id(t)]

    # --- axis helpers used by the rules ----------------------------------------------------------------
    def ax(self, arg) -> list:
        """The axis ids of a tensor-valued argument (an fx Node)."""
        if not isinstance(arg, fx.Node):
            return []
        if arg.name in self.f.axes:
            return self.f.axes[arg.name]
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return []
        ids = [self.f.ag.add((arg.name, i), s) for i, s in enumerate(val.shape)]
        self.f.axes[arg.name] = ids
        return ids

    def out(self, node: fx.Node) -> list:
        """The axis ids of a node's (tensor) output."""
        return self.ax(node)

    def tuple_out(self, node: fx.Node) -> list:
        """The axis ids of each part of a node's tuple output."""
        if node.name not in self.f.tuple_axes:
            vals = node.meta.get("val") or []
            self.f.tuple_axes[node.name] = [
                [self.f.ag.add((node.name, k, i), s) for i, s in enumerate(v.shape)]
                if isinstance(v, torch.Tensor) else [] for k, v in enumerate(vals)]
        return self.f.tuple_axes[node.name]

    def eq(self, a, b, node: fx.Node) -> None:
        """Make two axes one (they index the same thing), because of ``node``."""
        self.f.ag.unify(a, b, where(node))

    def eq_except(self, xs: list, outs: list, dim: int, node: fx.Node) -> None:
        """Axes equal position by position, except ``dim`` (the one an index, slice or narrow acts on)."""
        for i, (a, o) in enumerate(zip(xs, outs)):
            if i != dim:
                self.eq(a, o, node)

    def size(self, axis):
        """The (sympy) size of an axis."""
        return self.f.ag.size_of(axis)

    def read(self, axis, kind: str, node: fx.Node, detail=None) -> None:
        """Record that ``node`` reads ``axis`` beyond copying it (a ``Read`` of this kind)."""
        self.f.reads.append(Read(axis, kind, node.name, where(node), detail))

    def pin(self, axis, reason: str) -> None:
        """Keep ``axis`` from growing, for ``reason`` (the first reason given stays)."""
        self.f.pins.setdefault(axis, reason)

    def const(self, node: fx.Node, path: tuple, axis, kind: str = "size") -> None:
        """Record a literal of ``node`` (at ``path`` in its arguments) that carries ``axis``'s size."""
        self.f.consts.append(SizeConst(node.name, path, axis, kind))

    def param_of(self, arg) -> str | None:
        """The state_dict name of the parameter an operand is, through layout-only ops, gathers of whole
        rows (``weight[expert_ids]``: per-token expert weights) and selects of one entry (``weight[i]``: one
        expert's weight of a stacked tensor, JetMoE's loop over experts); else None."""
        src = back(arg, lambda n: self._row(n).layout or self._gathers_rows(n) or self._selects_one(n))
        return self.f.params.get(src.name) if isinstance(src, fx.Node) and src.op == "get_attr" else None

    def contract(self, a, a_axis, b, b_axis, node: fx.Node) -> None:
        """Record a contraction of ``a`` and ``b`` over equal axes: a parameter operand is a *consumer* of
        the group (its copies are split by count); two activations make an activation read."""
        pa, pb = self.param_of(a), self.param_of(b)
        for p, operand, axis in ((pa, a, a_axis), (pb, b, b_axis)):
            if p is not None:
                self.f.consumed.append((p, self._param_axis(operand, axis), node.name))
        if pa is None and pb is None:
            self.read(a_axis, "contract", node)

    def _param_axis(self, operand: fx.Node, axis) -> int:
        """Which axis of the parameter behind ``operand`` (through layout ops) an operand axis is."""
        i = self.ax(operand).index(axis)
        for op in chain(operand, lambda n: n.op != "get_attr")[:-1]:  # param_of has checked the ops on the way
            src = op.args[0]
            if self._row(op).kind == "permute":
                i = permutation(op, len(self.ax(src)))[i]
            elif self._selects_one(op):  # the selected axis is gone: the ones after it sit one place later
                i += int(i >= op.args[1] % len(self.ax(src)))
            elif self._row(op).kind == "view":
                target = self.f.ag.find(self.ax(op)[i])
                return next(k for k, a in enumerate(self.ax(src)) if self.f.ag.find(a) == target)
        return i

    def produce(self, operand) -> None:
        """Record a parameter used without contraction (copied along its groups by a growth)."""
        p = self.param_of(operand)
        if p is not None:
            self.f.produced.add(p)

    def _row(self, node):
        """The op table's row for a call (a row of no kind and no rule for anything else)."""
        row = self.table.get(op_name(node)) if isinstance(node, fx.Node) and node.op == "call_function" else None
        return row if row is not None else _NO_ROW

    def _selects_one(self, node) -> bool:
        """``select(x, dim, i)`` with a literal ``i`` (``entry_at``): one entry of ``x`` along ``dim``, its other
        axes kept."""
        at = self._row(node).entry_at
        return at is not None and len(node.args) > at and isinstance(node.args[at], int)

    def _gathers_rows(self, node) -> bool:
        """``x[idx]`` with one 1-d index: whole rows of x, every other axis kept in place (of the gather kind,
        only ``index`` takes a list of index tensors)."""
        if self._row(node).kind != "gather" or not isinstance(node.args[1], (list, tuple)):
            return False
        if len(node.args[1]) != 1 or not isinstance(node.args[1][0], fx.Node):
            return False
        idx = node.args[1][0].meta.get("val")
        return idx is not None and idx.dim() == 1 and not idx.dtype == torch.bool

    def after_softmax(self, x) -> bool:
        """Whether ``x`` is a softmax's output (attention probabilities), through casts, copies, views and dropout."""
        while self._row(x).kind in ("cast", "copy", "view", "dropout"):
            x = x.args[0]
        return self._row(x).kind == "softmax"

    # --- the walk ------------------------------------------------------------------------------------
    def run(self) -> Facts:
        """Walk every node once, in graph order, and return the facts."""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.f.inputs.append(node.name)
                self._name_sizes(node)
                self.f.ag.data.extend(self.ax(node))
                for a in self.ax(node):
                    self.pin(a, f"an axis of the model input `{node.name}`")
            elif node.op == "get_attr":
                self.ax(node)
            elif node.op == "call_function":
                self._apply(node)
            elif node.op == "output":
                flat = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
                self.f.outputs = [self.ax(a) if isinstance(a, fx.Node) else None for a in flat]
            elif node.op in ("call_module", "call_method") and _has_tensor(node.meta.get("val")):
                raise UnsupportedOpError(f"{node.op} `{node.target}` at `{node.name}`: growir reads aten-level "
                                         f"graphs from torch.export; this graph was not fully lowered")
        self._pin_opaque()
        return self.f

    def _pin_opaque(self) -> None:
        """Pin the axes a regrouping of the data's axes left opaque (``AxisGraph.opaque``), or refuse where one of
        them is a feature: an axis some parameter contracts (a weight never contracts the data's axes), or one the
        model returns regrouped with the data. Pin too the axes the graph keeps from growing once the walk is done:
        a split's part index (``AxisGraph.fixed``) and a group count that is no other size (``AxisGraph.counts``)."""
        ag, node_of = self.f.ag, {state: node for node, state in self.f.params.items()}
        contracted = {leaf for state, i, _ in self.f.consumed if state in node_of
                      for leaf in ag.leaf_roots(self.f.axes[node_of[state]][i])}
        data = {r for a in ag.data for r in (ag.find(a), *ag.leaf_roots(a))}  # a sequence and its parts
        contracted |= {leaf for out in self.f.outputs for a in out or [] for leaf in ag.leaf_roots(a)
                       if leaf not in data and not ag.size_of(leaf).free_symbols}
        for axis, (why, refusal) in ag.opaque.items():
            if contracted & set(ag.leaf_roots(axis)):
                raise AnalysisError(refusal)
            self.pin(axis, why)
        for axis, why in ag.fixed.items():
            self.pin(axis, why)
        for axis in ag.alone(list(ag.counts)):  # a grouped convolution's group count that is no other size
            self.pin(axis, ag.counts[axis])

    def _name_sizes(self, node: fx.Node) -> None:
        """Remember which input axis each dynamic size symbol is (for error messages) and its traced value."""
        val = node.meta.get("val")
        for i, d in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            expr = getattr(getattr(d, "node", None), "expr", None)
            if isinstance(expr, sympy.Symbol):
                self.f.ag.names.setdefault(expr, f"axis {i} of the input `{node.name}`")
                if isinstance(hint := getattr(d.node, "hint", None), int):
                    self.f.ag.traced.setdefault(expr, hint)

    def _apply(self, node: fx.Node) -> None:
        name = op_name(node)
        row = self._row(node)
        if not _has_tensor(node.meta.get("val")) and (row is _NO_ROW or row.rule is None):
            return  # symbolic-size arithmetic and assertions carry no tensor axes
        rule = self.derive if row is _NO_ROW and isinstance(node.target, torch._ops.OpOverload) else row.rule
        if rule is None:
            probe = ("" if isinstance(node.target, torch._ops.OpOverload) else
                     " and cannot derive one: it is no aten op but a Python function the export kept (vmap's "
                     "batching calls are), so it has no meta kernel to probe")
            raise UnsupportedOpError(
                f"growir has no rule for the op `{node.target}` at {where(node)}{probe}. It stops rather than guess "
                f"how the op treats tensor axes; give it a row with an axis rule in growir/analysis/ops.py")
        try:
            rule(self, node)
        except GrowthError:
            raise
        except Exception as exc:  # noqa: BLE001 - a rule that fails is an AnalysisError naming the node
            literals = [a for a in node.args if not isinstance(a, fx.Node)]
            raise AnalysisError(
                f"growir's rule for `{name}` cannot read {where(node)} (its literal arguments: {literals}): "
                f"{type(exc).__name__}: {first_line(exc)}. It stops rather than guess how the op treats tensor "
                f"axes; write that step with ops growir reads (see docs/design.md, 'Adding an op'), or report "
                f"it") from exc
        self._variance(node, row)

    def _variance(self, node: fx.Node, row) -> None:
        """Record the parameter or buffer (behind layout ops) that ``node`` takes as a variance (``variance_at``)."""
        at = row.variance_at
        if at is None or len(node.args) <= at or not isinstance(node.args[at], fx.Node):
            return
        src = back(node.args[at], lambda n: self._row(n).layout)
        state = self.f.params.get(src.name) or self.f.buffers.get(src.name) if src.op == "get_attr" else None
        if state is not None:
            self.f.variances.add(state)


class _NoRow:
    """The row of a node outside the table: no kind, no rule, not a layout op, no variance or entry operand."""
    kind, rule, layout, variance_at, entry_at = "", None, False, None, None


_NO_ROW = _NoRow()


def _has_tensor(val) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (list, tuple)):
        return any(_has_tensor(v) for v in val)
    return False


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
