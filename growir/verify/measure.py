"""The in-process preservation measurement ``grow`` runs on every result (PyTorch; ``growir.check`` does the
same comparison in ONNX Runtime): outputs on the example inputs and on a second shape, source outputs
mapped into the grown coordinates by the groups' index maps (:mod:`growir.verify.compare`). Both models
run in float32 (:mod:`growir.verify.precision`, module by module), one after the other, so a bfloat16
growth is judged by the float32 standard without a float32 copy of either model. Only axes the export
proved dynamic change size, and only within the range the export allows.
"""

from __future__ import annotations

import sympy
import torch
import torch.utils._pytree as pytree

from ..frontend.export import Captured
from .compare import deviation
from .precision import float32_modules, float32_twin, needs_upcast, upcast_inputs

__all__ = ["measure", "other_sizes", "long_sizes", "inputs_at", "eval_outputs", "measurable", "failing_node",
           "export_gap"]


def _hints(captured: Captured) -> dict:
    """symbol -> its value in the example inputs, and whether it is ever a leading (batch) axis."""
    leaves = pytree.tree_leaves((captured.args, captured.kwargs))
    hints, leading = {}, set()
    for leaf, dims in zip(leaves, captured.dims):
        for i, d in enumerate(dims or ()):
            if isinstance(d, sympy.Symbol):
                hints[d] = int(leaf.shape[i])
                if i == 0:
                    leading.add(d)
    return {s: (h, s in leading) for s, h in hints.items()}


def _clamp(captured: Captured, sym, value: int) -> int:
    lo, hi = captured.ranges.get(sym, (0, None))
    return max(lo, value if hi is None else min(hi, value))


def other_sizes(captured: Captured) -> dict:
    """A second value for every dynamic axis (batch 2 -> 3, sequence 8 -> 5 within the allowed range, or the
    nearest value the export's shape guards admit: a sequence reshaped into fours stays a multiple of four);
    empty when no axis is dynamic. Symbols with one example value move together (the export may name the
    batch of two inputs apart)."""
    hints, guards = _hints(captured), _guards(captured)
    out = {}
    for sym, (hint, leading) in hints.items():
        want = hint + 1 if leading else max(2, hint - 3) if hint > 4 else hint + 3
        value = _admitted(captured, guards, sym, hint, want, out)
        if value == hint:
            value = _admitted(captured, guards, sym, hint, hint - 1 if hint > 2 else hint + 1, out)
        out[sym] = value
    return {s: v for s, v in out.items() if v != hints[s][0]}


def long_sizes(captured: Captured, length: int, batch: int | None = None) -> dict:
    """Every dynamic non-batch axis at ``length``, and the batch axes at ``batch`` where given (clamped to the
    range the export allows, and moved to the nearest value its shape guards admit)."""
    guards, out = _guards(captured), {}
    for sym, (hint, leading) in _hints(captured).items():
        if (not leading and length > hint) or (leading and batch not in (None, hint)):
            out[sym] = _admitted(captured, guards, sym, hint, batch if leading else length, out)
    return out


def _admitted(captured: Captured, guards, sym, hint: int, want: int, chosen: dict) -> int:
    """``want`` clamped to the range the export allows, if the export's shape ``guards`` (:func:`_guards`) admit
    it for ``sym`` (with the values ``chosen`` so far and the example's elsewhere), else the nearest admitted value
    in that range (the example's own ``hint`` at worst). The guards are the exported module's ``_guards_fn`` (a
    model that reshapes its sequence into fours guards ``s % 4 == 0``); they run on the resized inputs, which are
    small."""
    want = _clamp(captured, sym, want)
    if want == hint or guards is None:
        return want
    for value in sorted({_clamp(captured, sym, want + k) for k in range(-want, 2 * want + 1)},
                        key=lambda v: (abs(v - want), v)):
        if value != hint and _admits(captured, guards, {**chosen, sym: value}):
            return value
    return hint


def _guards(captured: Captured):
    """The exported module's shape-guard submodule and the flat-input positions it reads; None without one."""
    gm = captured.gm
    fn = getattr(gm, "_guards_fn", None)
    if fn is None:
        return None
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    call = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), None)
    if call is None or not all(a in places for a in call.args):
        return None
    return fn, [places.index(a) for a in call.args]


def _admits(captured: Captured, guards, values: dict) -> bool:
    """Whether the export's shape ``guards`` hold for the inputs at ``values`` (symbol -> size)."""
    fn, at = guards
    leaves = pytree.tree_leaves(inputs_at(captured, values))
    try:
        fn(*[leaves[i] for i in at])
    except Exception:  # noqa: BLE001 - a guard that does not hold raises (AssertionError, or a symbolic error)
        return False
    return True


def inputs_at(captured: Captured, values: dict):
    """The example inputs with their dynamic axes at ``values`` (symbol -> size). New token ids stay in
    the example's range; an input holding one value (a mask of ones, token types of zero) keeps it."""
    leaves, spec = pytree.tree_flatten((captured.args, captured.kwargs))
    values = {**{s: h for s, (h, _) in _hints(captured).items()}, **values}
    out = []
    for k, (leaf, dims) in enumerate(zip(leaves, captured.dims)):
        if dims is None:
            out.append(leaf)
            continue
        shape = [int(sympy.sympify(d).subs(values)) for d in dims]
        out.append(leaf if shape == list(leaf.shape) else _resized(leaf, shape, k))
    return pytree.tree_unflatten(out, spec)


def _resized(t: torch.Tensor, shape: list, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape) * 100 + k)
    if t.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=t.dtype).to(t.device)
    flat = t.flatten()
    if t.numel() and bool((flat == flat[0]).all()):
        return torch.full(shape, flat[0].item(), dtype=t.dtype, device=t.device)
    if t.dtype == torch.bool or bool(((flat == 0) | (flat == 1)).all()):
        return torch.ones(shape, dtype=t.dtype, device=t.device)  # a mask: keep every position
    hi = int(t.max()) + 1
    return torch.randint(0, max(hi, 2), shape, generator=gen, dtype=t.dtype).to(t.device)


def measure(source, grown, captured: Captured, maps: list, quick: bool = False,
            sizes: dict | None = None) -> float | None:
    """The largest :func:`~growir.verify.compare.deviation` (max|Δ| / max(1, max|y|)) over all outputs, at
    the example shape and (unless quick) one other shape of the axes the export proved dynamic; ``sizes``
    (symbol -> size) measures at that shape only. ``maps``: per flat output, its index maps
    (:func:`~growir.verify.compare.output_maps`). Both models run in float32. None when either model is on
    the meta device (no values to measure)."""
    if not measurable(source) or not measurable(grown):
        return None
    if sizes is not None:
        inputs = [inputs_at(captured, sizes)]
    else:
        other = {} if quick or not captured.dims else other_sizes(captured)
        inputs = [(captured.args, captured.kwargs)] + ([inputs_at(captured, other)] if other else [])
    worst = 0.0
    for ys, yg in zip(_outputs(source, inputs), _outputs(grown, inputs)):
        for i, (a, b) in enumerate(zip(ys, yg)):
            d = deviation(a, b, maps[i] if i < len(maps) else None)
            worst = worst if d is None else max(worst, d)
    return worst


def _outputs(model, inputs: list) -> list:
    """The flat outputs of ``model`` computing in float32 on each (args, kwargs), in eval mode: module by
    module where its forward allows, else through a whole float32 twin."""
    try:
        with float32_modules(model) as wide:
            return eval_outputs(wide, inputs)
    except RuntimeError:  # a forward that multiplies another module's low-precision tensor: copy it all
        if not needs_upcast(model):
            raise
        return eval_outputs(float32_twin(model), inputs)


def eval_outputs(model, inputs: list) -> list:
    """The flat output leaves of ``model`` on each (args, kwargs) of ``inputs``, in eval mode without grad,
    floating-point inputs upcast to float32 (the model's own precision is the caller's: see ``_outputs``).

    >>> net = torch.nn.Linear(2, 1)
    >>> [[y.shape for y in ys] for ys in eval_outputs(net, [((torch.ones(3, 2),), {})])]
    [[torch.Size([3, 1])]]
    """
    from .onnx_export import eval_mode  # ONNX tooling loads on first use (see growir.verify)
    with eval_mode(model), torch.no_grad():
        return [_seeded(model, args, kwargs) for args, kwargs in upcast_inputs(inputs)]


def _seeded(model, args: tuple, kwargs: dict) -> list:
    """One forward from a fixed random state (the caller's is restored): a forward that draws (a random
    masking of patches) draws the same values for the source and the grown model."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
        torch.manual_seed(0)
        return pytree.tree_leaves(model(*args, **kwargs))


def export_gap(source, grown, captured: Captured, maps: list) -> tuple[float, float] | None:
    """(how far the source's own export is from the source, how far ``grown`` is from that export), each at the
    inputs :func:`measure` uses; None where the export is not the whole source with its weights (a proxy's).

    A forward that branches on its inputs' values (a mask of all ones dropped, another attention taken) is
    exported along the example's branch: a graph grown from that export computes that branch at every input,
    so the source can differ from it at the second shape while the growth itself is exact. The first number
    says so; the second is then the growth's own deviation.

    >>> net = torch.nn.Linear(2, 1)
    >>> from growir.frontend.export import capture
    >>> captured = capture(net, (torch.ones(3, 2),))
    >>> export_gap(net, captured.gm, captured, [None])
    (0.0, 0.0)
    """
    gm = captured.gm
    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    if not measurable(gm) or count(gm) != count(source):
        return None
    try:
        return measure(source, gm, captured, [None] * len(maps)), measure(gm, grown, captured, maps)
    except Exception:  # noqa: BLE001 - the export does not run there: no gap to report, the caller's verdict stands
        return None


def measurable(model) -> bool:
    """Whether ``model`` holds values: a meta-device model has shapes only."""
    return not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def failing_node(grown, captured: Captured) -> str:
    """' at `node` (op) in module `path` (args ...)': the node of a rewritten GraphModule that raises on the
    example inputs or the second shape; empty when ``grown`` is not a GraphModule or nothing raises."""
    import torch.fx as fx
    from ..analysis.walker import where
    if not isinstance(grown, fx.GraphModule):
        return ""
    other = other_sizes(captured) if captured.dims else {}
    for args, kwargs in [(captured.args, captured.kwargs)] + ([inputs_at(captured, other)] if other else []):
        interp = _Tracking(grown)
        try:
            with torch.no_grad():
                interp.run(*pytree.tree_leaves((args, kwargs)))
        except Exception:  # noqa: BLE001 - we only want to know where
            node = interp.current
            if node is None:
                return ""
            literals = [a for a in node.args if not isinstance(a, fx.Node)]
            return f" at {where(node)} (its literal arguments: {literals})"
    return ""


class _Tracking(torch.fx.Interpreter):
    """An interpreter that remembers the node it is running."""
    current = None

    def run_node(self, n):
        self.current = n
        return super().run_node(n)
