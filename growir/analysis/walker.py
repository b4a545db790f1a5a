"""Walk an exported aten graph once, applying one rule per op, and collect the facts growth needs.

The facts are deliberately plain records: which parameter axes a group is *produced* on (copied) and
*consumed* on (contracted, so split by copy count), which ops *read* a group in a way that can break
exactness (a mean, a sum, a softmax, a contraction between two activations), which graph constants
carry a group's size, and which axes are *pinned* (model inputs, vocabularies, kernels) and never grow.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from ..errors import AnalysisError, GrowthError, UnsupportedOpError, first_line
from ..ir.axes import AxisGraph
from .ops import INDEXES, LAYOUT, back, chain, op_name, permutation, traits



def module_of(node: fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module the node came from, or ('<top>', '')."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path or "<top>", cls_name.rsplit(".", 1)[-1]


def gathers_rows(node: fx.Node) -> bool:
    """``x[idx]`` with one 1-d index: whole rows of x, every other axis kept in place."""
    if op_name(node) != "aten.index" or len(node.args[1]) != 1 or not isinstance(node.args[1][0], fx.Node):
        return False
    idx = node.args[1][0].meta.get("val")
    return idx is not None and idx.dim() == 1 and not idx.dtype == torch.bool


def indexes_leading(node: fx.Node) -> bool:
    """An index on leading axes only (tokens routed to experts): the last axis passes intact."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or op_name(node) not in INDEXES:
        return False
    ndim = len(node.args[0].meta["val"].shape)
    if op_name(node) == "aten.index":
        return len(node.args[1]) < ndim
    return node.args[1] % ndim != ndim - 1


def where(node: fx.Node) -> str:
    path, cls = module_of(node)
    return f"`{node.name}` ({op_name(node)}) in module `{path}`" + (f" ({cls})" if cls else "")


@dataclass(frozen=True)
class ParamAxis:
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
    param_uses: dict = field(default_factory=lambda: defaultdict(set))  # state name -> {op node names}


class Walker:
    """Applies the op rules (``growir.analysis.rules.RULES``) to every node of a graph."""

    def __init__(self, gm: fx.GraphModule, rules: dict):
        self.gm = gm
        self.rules = rules
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
        for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
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
        return self.ax(node)

    def tuple_out(self, node: fx.Node) -> list:
        if node.name not in self.f.tuple_axes:
            vals = node.meta.get("val") or []
            self.f.tuple_axes[node.name] = [
                [self.f.ag.add((node.name, k, i), s) for i, s in enumerate(v.shape)]
                if isinstance(v, torch.Tensor) else [] for k, v in enumerate(vals)]
        return self.f.tuple_axes[node.name]

    def eq(self, a, b, node: fx.Node) -> None:
        self.f.ag.unify(a, b, where(node))

    def eq_except(self, xs: list, outs: list, dim: int, node: fx.Node) -> None:
        """Axes equal position by position, except ``dim`` (the one an index, slice or narrow acts on)."""
        for i, (a, o) in enumerate(zip(xs, outs)):
            if i != dim:
                self.eq(a, o, node)

    def size(self, axis):
        return self.f.ag.size_of(axis)

    def read(self, axis, kind: str, node: fx.Node, detail=None) -> None:
        self.f.reads.append(Read(axis, kind, node.name, where(node), detail))

    def pin(self, axis, reason: str) -> None:
        self.f.pins.setdefault(axis, reason)

    def const(self, node: fx.Node, path: tuple, axis, kind: str = "size") -> None:
        self.f.consts.append(SizeConst(node.name, path, axis, kind))

    def param_of(self, arg) -> str | None:
        """The state_dict name of the parameter an operand is, through layout-only ops and gathers of whole
        rows (``weight[expert_ids]``: per-token expert weights); else None."""
        src = back(arg, lambda n: LAYOUT(n) or (n.op == "call_function" and gathers_rows(n)))
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
            if traits(op).kind == "permute":
                i = permutation(op, len(self.ax(src)))[i]
            elif traits(op).kind == "view":
                target = self.f.ag.find(self.ax(op)[i])
                return next(k for k, a in enumerate(self.ax(src)) if self.f.ag.find(a) == target)
        return i

    def produce(self, operand) -> None:
        """Record a parameter used without contraction (copied along its groups by a growth)."""
        p = self.param_of(operand)
        if p is not None:
            self.f.produced.add(p)

    # --- the walk ------------------------------------------------------------------------------------
    def run(self) -> Facts:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.f.inputs.append(node.name)
                self._name_sizes(node)
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
        for pname in list(self.f.params) + list(self.f.buffers):
            node = self.nodes[pname]
            for user in node.users:
                self.f.param_uses[self.f.params.get(pname) or self.f.buffers[pname]].add(user.name)
        return self.f

    def _name_sizes(self, node: fx.Node) -> None:
        """Remember, for error messages, which input axis each dynamic size symbol is."""
        val = node.meta.get("val")
        for i, d in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            expr = getattr(getattr(d, "node", None), "expr", None)
            if isinstance(expr, sympy.Symbol):
                self.f.ag.names.setdefault(expr, f"axis {i} of the input `{node.name}`")

    def _apply(self, node: fx.Node) -> None:
        name = op_name(node)
        rule = self.rules.get(name)
        if rule is None:
            if not _has_tensor(node.meta.get("val")):
                return  # symbolic-size arithmetic and assertions carry no tensor axes
            raise UnsupportedOpError(
                f"growir has no rule for the op `{node.target}` at {where(node)}. It stops rather than guess "
                f"how the op treats tensor axes; add a rule for it in growir/analysis/rules.py")
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
