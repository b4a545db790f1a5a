"""Check that a grown model computes the function of its source, measured in ONNX Runtime.

Both models are exported with ``torch.onnx.export(..., dynamo=True)`` and run in onnxruntime (CPU) on the
same seeded inputs: several batch sizes and sequence lengths, with padding in the attention mask. Each
output (named by its pytree path: ``last_hidden_state``, ``logits``, ``output[0]``) is compared after
mapping the source output into the grown coordinates, by the alignment and relative scale that every growir
check shares (:mod:`growir.verify.compare`).

Precision. Both models run in float32: bfloat16/float16 weights and inputs are upcast (exactly) into a float32
twin of each model (:func:`growir.verify.precision.float32_twin`), so a low-precision growth is judged by the float32
standard; the models themselves are not modified.

Tolerance. An output is preserved when, on every sample and element,

    |grown_i - source_i| <= atol * max(1, max_j |source_j|) + rtol * |source_i|

so ``atol`` is absolute for outputs of magnitude up to 1 and relative to the output's largest magnitude
beyond that (:func:`growir.verify.compare.bound`; ``grow``'s self-measure is this bound with
``atol = TOLERANCE = 1e-5`` and ``rtol = 0``). Defaults by output dtype: float64 atol 1e-8, float32 1e-4,
float16 1e-2, bfloat16 5e-2, and rtol 0; integer outputs must be equal. A function-preserving growth in
float32 typically measures ~1e-6: only the order of summation changes.

>>> import copy, growir, torch
>>> from transformers import BertConfig, BertModel
>>> small = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
...                              intermediate_size=64, vocab_size=100))
>>> report = growir.check(small, copy.deepcopy(small), samples=2)
>>> report.preserved, report.max_abs_error < 1e-5
(True, True)
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from ..errors import TraceError
from ..frontend.inputs import Inputs, hf_example_inputs, is_hf_model, normalize_inputs
from .compare import abs_diff, bound, map_source_output
from .precision import float32_twin, upcast_inputs
from .onnx_export import SAMPLE_SHAPES, eval_mode, export_onnx, ort_session, run_session, to_onnx_program

__all__ = ["check", "CheckReport", "OutputCheck", "compare_output", "default_tolerance", "export_onnx"]

# dtype -> (atol, rtol); see the module docstring for how they combine.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-8, 0.0),
    torch.float32: (1e-4, 0.0),
    torch.float16: (1e-2, 0.0),
    torch.bfloat16: (5e-2, 0.0),
}


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` used for outputs of ``dtype`` when check() is not given them; exact for integers."""
    return DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))


@dataclass
class OutputCheck:
    """How one output of the grown model compares with the source's, over every sample."""

    name: str
    source_shape: tuple[int, ...]  # at the first sample
    grown_shape: tuple[int, ...]
    compared: str                  # "same shape", "index map" or "leading slice"
    max_abs_error: float
    max_rel_error: float           # |Δ_i| / max(|s_i|, 1e-3·max|s|)
    error_to_bound: float          # worst |Δ_i| / its allowed bound: preserved iff <= 1
    preserved: bool
    kl_divergence: float | None = None   # LM logits only: mean KL(source || grown) per position
    top1_agreement: float | None = None  # LM logits only: fraction of positions with the same argmax


@dataclass
class CheckReport:
    """The result of :func:`check`; ``str(report)`` is a table."""

    outputs: list[OutputCheck]
    samples: list[str]                     # input shapes of each sample, e.g. "input_ids 2×8"
    export_error: dict[str, float]         # torch vs onnxruntime max abs error, per model
    export_faithful: bool                  # both exports within the same tolerance as the comparison
    atol: float | None
    rtol: float | None
    problems: list[str] = field(default_factory=list)  # outputs that could not be compared at all

    @property
    def preserved(self) -> bool:
        """Whether every output was compared and is within its bound on every sample."""
        return not self.problems and all(out.preserved for out in self.outputs)

    @property
    def max_abs_error(self) -> float:
        """The largest |grown - source| over every output and sample (inf when nothing was compared)."""
        return max((out.max_abs_error for out in self.outputs), default=math.inf)

    @property
    def failed(self) -> list[str]:
        """Names of the outputs that moved beyond tolerance."""
        return [out.name for out in self.outputs if not out.preserved]

    def __getitem__(self, name: str) -> OutputCheck:
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(f"no output named {name!r}; outputs are {[out.name for out in self.outputs]}")

    def __str__(self) -> str:
        verdict = "PRESERVED" if self.preserved else f"NOT PRESERVED ({', '.join(self.failed) or 'see problems'})"
        tol = "dtype defaults" if self.atol is None and self.rtol is None else f"atol={self.atol} rtol={self.rtol}"
        lines = [f"growir check: {verdict}", f"{len(self.samples)} samples: {'; '.join(self.samples)}; tolerance {tol}"]
        lm = any(out.kl_divergence is not None for out in self.outputs)
        header = ["output", "source shape", "grown shape", "compared", "max abs err", "max rel err", "err/bound", "ok"]
        rows = [header + (["KL", "top-1"] if lm else [])]
        for out in self.outputs:
            row = [out.name, _shape(out.source_shape), _shape(out.grown_shape), out.compared,
                   f"{out.max_abs_error:.2e}", f"{out.max_rel_error:.2e}", f"{out.error_to_bound:.3f}",
                   "yes" if out.preserved else "NO"]
            if lm:
                row += ["-", "-"] if out.kl_divergence is None else [f"{out.kl_divergence:.2e}",
                                                                     f"{out.top1_agreement:.3f}"]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        fidelity = ", ".join(f"{model} {err:.2e}" for model, err in self.export_error.items())
        lines.append(f"export fidelity (torch vs onnxruntime, max abs): {fidelity}"
                     + ("" if self.export_faithful else "  -- BEYOND TOLERANCE: the ONNX comparison is suspect"))
        lines += [f"problem: {problem}" for problem in self.problems]
        return "\n".join(lines)


def _shape(shape) -> str:
    return "×".join(str(size) for size in shape) or "scalar"


def check(source: torch.nn.Module, grown: torch.nn.Module, example_inputs=None, *, atol: float | None = None,
          rtol: float | None = None, samples: int = 4) -> CheckReport:
    """Export ``source`` and ``grown`` to ONNX, run both in onnxruntime, and report how far their outputs differ.

    Hugging Face models get seeded inputs built from the source's config at ``samples`` (batch, sequence)
    shapes, with padding in the attention mask; other models need ``example_inputs`` (a tuple of positional
    or a dict of keyword arguments): the samples are then those inputs and copies whose floating-point
    tensors are redrawn with the same shape, mean and spread. Grown outputs may be wider: they are compared
    through ``grown.growir_record.output_maps`` when present, else on the leading slice. ``atol``/``rtol``
    default by dtype (see the module docstring). Raises TraceError when a model cannot be exported.

    >>> import growir, torch
    >>> net = torch.nn.Linear(4, 3)
    >>> wider = torch.nn.Linear(4, 5)
    >>> with torch.no_grad():
    ...     _ = wider.weight[:3].copy_(net.weight), wider.bias[:3].copy_(net.bias)
    >>> growir.check(net, wider, (torch.randn(2, 4),), samples=2).preserved
    True
    """
    if samples < 1:
        raise ValueError(f"check(samples={samples}): need at least one sample")
    sample_inputs, dynamic = _sample_inputs(source, example_inputs, samples)
    with tempfile.TemporaryDirectory(prefix="growir-check-") as workdir:
        upcast = upcast_inputs(sample_inputs)  # judged in float32: see growir.precision
        src = _run_both(float32_twin(source), upcast, dynamic, Path(workdir) / "source.onnx")
        big = _run_both(float32_twin(grown), upcast, dynamic, Path(workdir) / "grown.onnx")
    maps = _output_maps(grown)
    vocab = getattr(getattr(source, "config", None), "vocab_size", None)
    outputs, problems = [], []
    if src.names != big.names:
        problems.append(f"the models return different outputs: source {src.names}, grown {big.names}")
    else:
        for k, name in enumerate(src.names):
            leaf_maps = maps[src.leaf_positions[k]] if maps is not None else None
            try:
                outputs.append(compare_output(name, [o[k] for o in src.ort], [o[k] for o in big.ort], leaf_maps,
                                        atol, rtol, vocab))
            except ValueError as error:
                problems.append(f"output {name}: {error}")
    fidelity = {label: _fidelity(run, atol, rtol) for label, run in (("source", src), ("grown", big))}
    return CheckReport(outputs=outputs, samples=[_describe(inputs) for inputs in sample_inputs],
                       export_error={label: err for label, (err, _) in fidelity.items()},
                       export_faithful=all(ok for _, ok in fidelity.values()), atol=atol, rtol=rtol,
                       problems=problems)


def _sample_inputs(source: torch.nn.Module, example_inputs, count: int) -> tuple[list[Inputs], bool]:
    """The inputs to compare on, and whether the export should keep batch/sequence dynamic."""
    if example_inputs is not None:
        base = normalize_inputs(example_inputs)
        return [base] + [_redraw(base, seed) for seed in range(1, count)], False
    if not is_hf_model(source):
        raise TraceError(f"check(): {type(source).__name__} is not a Hugging Face model (it has no .config), so "
                         "growir cannot build inputs for it: pass example_inputs=(tensor, ...) or {'name': tensor}")
    samples = []
    for k in range(count):
        batch, seq = SAMPLE_SHAPES[k % len(SAMPLE_SHAPES)]
        samples.append(((), hf_example_inputs(source, batch, seq + 8 * (k // len(SAMPLE_SHAPES)), seed=k)))
    return samples, True


def _redraw(inputs: Inputs, seed: int) -> Inputs:
    """Floating-point tensors redrawn with the same shape, mean and spread; everything else kept."""
    gen = torch.Generator().manual_seed(seed)

    def redraw(value):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return value
        spread = value.float().std() if value.numel() > 1 else value.new_tensor(1.0)
        noise = torch.randn(value.shape, generator=gen)
        return (noise * spread.cpu() + value.float().mean().cpu()).to(value.dtype).to(value.device)

    return pytree.tree_map(redraw, inputs)


def _describe(inputs: Inputs) -> str:
    args, kwargs = inputs
    named = [(f"arg{i}", v) for i, v in enumerate(args)] + list(kwargs.items())
    tensors = [(name, v) for name, v in named if isinstance(v, torch.Tensor)]
    return f"{tensors[0][0]} {_shape(tensors[0][1].shape)}" if tensors else "no tensors"


@dataclass
class _Run:
    """One model's outputs on every sample, from torch and from onnxruntime (tensor leaves only)."""

    names: list[str]
    leaf_positions: list[int]  # index of each tensor leaf among all pytree leaves (output_maps order)
    torch: list[list[torch.Tensor]]
    ort: list[list[torch.Tensor]]


# Exports of small models, by fingerprint (class, config, graph code, every weight's bytes, input signature):
# checking several grown models against one source exports the source once. Big models are never cached.
_CACHE_MAX_BYTES = 64 * 2**20
_CACHE_ENTRIES = 4
_export_cache: OrderedDict[str, object] = OrderedDict()


def _fingerprint(model: torch.nn.Module, inputs: Inputs, dynamic: bool) -> str | None:
    state = list(model.state_dict(keep_vars=False).items()) + list(model.named_buffers())
    if sum(t.numel() * t.element_size() for _, t in state) > _CACHE_MAX_BYTES:
        return None
    digest = hashlib.blake2b(digest_size=20)
    config = getattr(model, "config", None)
    describe = [type(model).__module__, type(model).__qualname__, str(dynamic), getattr(model, "code", ""),
                config.to_json_string() if hasattr(config, "to_json_string") else repr(config),
                str(getattr(config, "_attn_implementation", None)),
                repr(pytree.tree_map(lambda v: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v,
                                     inputs))]
    digest.update("\0".join(describe).encode())
    for name, tensor in state:
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _onnx_program(model: torch.nn.Module, inputs: Inputs, dynamic: bool):
    key = _fingerprint(model, inputs, dynamic)
    if key is not None and key in _export_cache:
        _export_cache.move_to_end(key)
        return _export_cache[key]
    program = to_onnx_program(model, inputs, dynamic=dynamic, optimize=False)
    if key is not None:
        _export_cache[key] = program
        while len(_export_cache) > _CACHE_ENTRIES:
            _export_cache.popitem(last=False)
    return program


def _run_both(model: torch.nn.Module, samples: list[Inputs], dynamic: bool, onnx_path: Path) -> _Run:
    _onnx_program(model, samples[0], dynamic).save(onnx_path)
    session = ort_session(onnx_path)
    names, positions, torch_outs = [], [], []
    with eval_mode(model), torch.no_grad():
        for args, kwargs in samples:
            leaves = pytree.tree_flatten_with_path(model(*args, **kwargs))[0]
            tensors = [(i, path, leaf) for i, (path, leaf) in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
            names = [_leaf_name(path) for _, path, _ in tensors]
            positions = [i for i, _, _ in tensors]
            torch_outs.append([leaf.detach().cpu() for _, _, leaf in tensors])
    ort_outs = [run_session(session, inputs) for inputs in samples]
    if len(ort_outs[0]) != len(names):
        raise TraceError(f"the ONNX export of {type(model).__name__} returns {len(ort_outs[0])} outputs but the "
                         f"model returns {len(names)} tensors ({', '.join(names)}); outputs cannot be matched")
    return _Run(names, positions, torch_outs, ort_outs)


def _leaf_name(path) -> str:
    """``last_hidden_state`` for a ModelOutput field, ``output[0]`` for a tuple element, ``output`` alone."""
    parts = []
    for key in path:
        if isinstance(key, pytree.MappingKey):
            parts.append(f".{key.key}")
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(f".{key.name}")
        else:
            parts.append(f"[{getattr(key, 'idx', key)}]")
    name = "".join(parts)
    return name[1:] if name.startswith(".") else f"output{name}"


def _output_maps(grown: torch.nn.Module):
    record = getattr(grown, "growir_record", None)
    if isinstance(record, dict):
        return record.get("output_maps")
    return getattr(record, "output_maps", None)


def compare_output(name: str, source_outs: list, grown_outs: list, maps=None, atol: float | None = None,
                   rtol: float | None = None, vocab: int | None = None) -> OutputCheck:
    """Compare one output over every sample: ``source_outs[k]`` mapped by ``maps`` (per axis, see
    :func:`~growir.verify.compare.map_source_output`) against ``grown_outs[k]``, within
    :func:`~growir.verify.compare.bound` (``atol``/``rtol`` default by dtype). An output named ``logits`` whose
    last axis is ``vocab`` long also gets its KL divergence and top-1 agreement.

    >>> s = [torch.tensor([1000.0, -2.0])]
    >>> compare_output("y", s, [s[0] + torch.tensor([0.09, 0.0])]).preserved  # bound 1e-4 * max(1, 1000)
    True
    """
    default_atol, default_rtol = default_tolerance(source_outs[0].dtype)
    atol, rtol = default_atol if atol is None else atol, default_rtol if rtol is None else rtol
    abs_err = rel_err = ratio = 0.0
    kl_sum, agree, positions = 0.0, 0, 0
    is_logits = name.split(".")[-1] == "logits" and (vocab is None or source_outs[0].shape[-1] == vocab)
    compared = "same shape"
    for s, g in zip(source_outs, grown_outs):
        expected, index = map_source_output(s, g.shape, maps)
        got = g[index].double()
        expected = expected.double()
        if maps is not None and any(m is not None for m in maps):
            compared = "index map"
        elif tuple(s.shape) != tuple(g.shape):
            compared = "leading slice"
        diff = abs_diff(got, expected)
        allowed = bound(expected, atol, rtol)
        abs_err = max(abs_err, float(diff.max()) if diff.numel() else 0.0)
        floor = 1e-3 * float(expected.abs().max()) if expected.numel() else 0.0
        rel = diff / expected.abs().clamp_min(max(floor, 1e-30))
        rel_err = max(rel_err, float(rel.max()) if rel.numel() else 0.0)
        over = diff / allowed.clamp_min(1e-300) if diff.numel() else diff
        ratio = max(ratio, float(over.max()) if over.numel() else 0.0)
        if is_logits and expected.numel():
            log_p, log_q = expected.log_softmax(-1), got.log_softmax(-1)
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
            agree += int((expected.argmax(-1) == got.argmax(-1)).sum())
            positions += expected[..., 0].numel()
    s0, g0 = source_outs[0], grown_outs[0]
    return OutputCheck(name, tuple(s0.shape), tuple(g0.shape), compared, abs_err, rel_err, ratio,
                       preserved=ratio <= 1.0,
                       kl_divergence=kl_sum / positions if positions else None,
                       top1_agreement=agree / positions if positions else None)


def _fidelity(run: _Run, atol, rtol) -> tuple[float, bool]:
    """Max |torch - onnxruntime| over every output and sample, and whether it is within tolerance."""
    worst, ok = 0.0, True
    for torch_outs, ort_outs in zip(run.torch, run.ort):
        for t, o in zip(torch_outs, ort_outs):
            if t.shape != o.shape:
                return math.inf, False
            a, r = default_tolerance(t.dtype)
            a, r = a if atol is None else atol, r if rtol is None else rtol
            t, o = t.double(), o.double()
            diff = abs_diff(o, t)
            if diff.numel():
                worst = max(worst, float(diff.max()))
                ok = ok and bool((diff <= bound(t, a, r)).all())
    return worst, ok
