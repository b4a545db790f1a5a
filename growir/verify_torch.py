"""The in-process preservation measurement ``grow`` runs on every result (PyTorch; ``growir.check`` does the
same comparison in ONNX Runtime): outputs on the example inputs and on a second shape, source outputs
mapped into the grown coordinates by the groups' index maps. Both models run in float32
(:mod:`growir.precision`, module by module), one after the other, so a bfloat16 growth is judged by the
float32 standard without a float32 copy of either model.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .frontend import Captured
from .precision import float32_modules, float32_twin, needs_upcast, upcast_inputs


def output_maps(plan, maps: dict) -> list:
    """Per flat graph output, per axis: the index map (new position -> source position) or None."""
    from .passes.width import tree_map
    ag, out = plan.facts.ag, []
    for axes in plan.facts.outputs:
        per_axis = []
        for axis in axes or []:
            index, _, _, _ = tree_map(ag.expand(axis), ag, maps)
            per_axis.append(index)
        out.append(per_axis if axes else None)
    return out


def _inputs_at(captured: Captured, batch: int, seq: int):
    """The example inputs resized on their batch/sequence axes (token ids stay in range)."""
    def resize(t, name=None):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        gen = torch.Generator().manual_seed(batch * 100 + seq)
        shape = list(t.shape)
        shape[0] = batch
        if t.dim() >= 2 and not t.is_floating_point():
            shape[1] = seq
        if t.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=t.dtype).to(t.device)
        if t.dtype == torch.bool or name == "attention_mask":
            return torch.ones(shape, dtype=t.dtype, device=t.device)
        hi = int(t.max()) + 1
        return torch.randint(0, max(hi, 2), shape, generator=gen, dtype=t.dtype).to(t.device)
    return tuple(resize(a) for a in captured.args), {k: resize(v, k) for k, v in captured.kwargs.items()}


def measure(source, grown, captured: Captured, maps: list, quick: bool = False) -> float | None:
    """max|Δ| / max(1, max|y|) over all outputs, at the example shape and (unless quick) one other shape,
    both models run in float32. None when either model is on the meta device (no values to measure)."""
    from .verify import map_source_output
    if not measurable(source) or not measurable(grown):
        return None
    inputs = [(captured.args, captured.kwargs)]
    if not quick and any(isinstance(v, torch.Tensor) and v.dim() >= 2 and not v.is_floating_point()
                         for v in list(captured.kwargs.values()) + list(captured.args)):
        inputs.append(_inputs_at(captured, 3, 5))
    worst = 0.0
    for ys, yg in zip(_outputs(source, inputs), _outputs(grown, inputs)):
        for i, (a, b) in enumerate(zip(ys, yg)):
            if not isinstance(a, torch.Tensor) or not a.is_floating_point():
                continue
            m = maps[i] if i < len(maps) else None
            expected, index = map_source_output(a, b.shape, m)
            scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
            worst = max(worst, float((b[index] - expected).abs().max()) / scale if expected.numel() else 0.0)
    return worst


def _outputs(model, inputs: list) -> list:
    """The flat outputs of ``model`` computing in float32 on each (args, kwargs), in eval mode: module by
    module where its forward allows, else through a whole float32 twin."""
    try:
        with float32_modules(model) as wide:
            return _run(wide, inputs)
    except RuntimeError:  # a forward that multiplies another module's low-precision tensor: copy it all
        if not needs_upcast(model):
            raise
        return _run(float32_twin(model), inputs)


def _run(model, inputs: list) -> list:
    from .onnx_export import eval_mode
    with eval_mode(model), torch.no_grad():
        return [pytree.tree_leaves(model(*args, **kwargs)) for args, kwargs in upcast_inputs(inputs)]


def measurable(model) -> bool:
    """Whether ``model`` holds values: a meta-device model has shapes only."""
    return not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
