"""More experts for a mixture-of-experts model: ``growir.grow(model, experts=2.0)`` as a declared list of passes.

The layers are read from the graph (``analysis/moe.py``: router, choice, experts, how the weights combine), the
copies made by per-tensor rules (``passes/experts.py``), and the class rebuilt by the config search growir uses
for width (``materialize/config.py``): the expert count is the size the grown tensors require; top-k (and a
group-limited choice's group counts) are sizes no tensor shows, offered x m. A candidate is kept where its model
runs the theorem's top-k (the k of every top-k op that runs, read from the ops themselves) and computes the
source's function; failing that, any candidate whose measure is exact, said in the notes (with
``keep_top_k=True`` nothing but the expert count changes, and the deviation is measured and reported). No field
name is read.

>>> import growir, torch
>>> from transformers import MixtralConfig, MixtralForCausalLM
>>> torch.manual_seed(0) and None
>>> small = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=50))
>>> big = growir.grow(small, experts=2.0)
>>> big.config.num_local_experts, big.config.num_experts_per_tok, big.growir_record.exact
(8, 4, True)
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..analysis.moe import TOPK, moe_layers
from ..analysis.plan import make_plan
from ..errors import (AnalysisError, GrowthError, MaterializeError, NotExactError, PreservationError, SpecError,
                      TraceError, first_line, warn)
from ..frontend.export import capture
from ..materialize.config import candidate_configs
from ..materialize.load import config_shapes, load_hf
from ..materialize.faithful import config_diff
from ..materialize.hf import raised_in_model, with_source_ties
from ..passes.experts import drop_neurons, expert_rules, multiplier, neuron_positions, theorem
from ..verify.compare import TOLERANCE
from ..verify.measure import measurable, measure
from .manager import declare, run_passes
from .moe_search import upcycle_by_search
from .record import GrowthRecord

_READ = "reading the mixture-of-experts layers"


@dataclass
class ExpertsContext:
    """The experts growth in progress: the caller's inputs, then what each pass writes."""
    model: torch.nn.Module | None = None
    example_inputs: object = None
    experts: object = None  # a multiplier (2.0) or a target expert count (8)
    keep_top_k: bool = False
    drop: float = 0.0
    noise: float = 0.0
    seed: int = 0
    strict: bool = False
    captured: object = None
    plan: object = None
    layers: list | None = None  # analysis.moe.MoeLayer per layer
    m: int | None = None
    rules: dict | None = None  # state name -> TensorRule
    reasons: list | None = None  # why the growth is not exact (empty: exact)
    notes: list | None = None
    state: dict | None = None  # state name -> grown tensor
    grown: torch.nn.Module | None = None
    chosen: dict | None = None  # layer choice -> the k the rebuilt model's top-k op chooses
    record: GrowthRecord | None = None
    ran: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    reruns: list = field(default_factory=list)


@declare(reads=("model", "example_inputs?"), writes=("captured", "plan"), what="exporting and analysing the model",
         error=TraceError)
def _capture(c) -> None:
    c.captured = capture(c.model, c.example_inputs)
    c.plan = make_plan(c.captured)


@declare(reads=("model", "plan", "experts", "keep_top_k", "drop", "noise", "strict"),
         writes=("layers", "m", "reasons", "notes"),
         what=_READ, error=AnalysisError)
def _read(c) -> None:
    c.layers = moe_layers(c.plan.facts, c.plan.captured.gm)
    if not c.layers:
        raise SpecError("experts= asks for more experts, but growir found no mixture-of-experts layer in the graph "
                        "(a top-k choice over the output rows of a router, whose indices select expert weights); "
                        "on a dense model give top_k= too (experts=8, top_k=2: the MoE class found by search) "
                        "or into= an MoE config")
    if not c.plan.captured.is_hf:
        raise SpecError("experts= rebuilds the model's class from a config with more experts; "
                        f"{type(c.model).__name__} is not a Hugging Face model")
    if not measurable(c.model):
        raise SpecError("experts= chooses the config whose model runs top-k x m by running the candidates, which a "
                        "model on the meta device cannot: grow the model with its weights (or a random one of its "
                        "config, then load the weights by the record's rules)")
    if not isinstance(c.drop, (int, float)) or not 0 <= c.drop <= 1:
        raise SpecError(f"drop must be a fraction of each expert's neurons in [0, 1], got {c.drop!r}")
    c.m = multiplier(c.experts, [layer.experts for layer in c.layers])
    others = f" (and {len(c.layers) - 1} other layers)" if len(c.layers) > 1 else ""
    c.reasons = [theorem(c.layers[0], c.m, True) + others] if c.keep_top_k else []
    if c.drop:
        c.reasons.append(f"drop={c.drop} draws {c.drop:.0%} of each new expert copy's FFN neurons again "
                         f"(Drop-Upcycling): not function-preserving by design")
    if c.strict and c.reasons:
        raise NotExactError("strict=True and this growth cannot be exact: " + "; ".join(c.reasons))
    c.notes = [theorem(layer, c.m, False) for layer in c.layers] if not c.keep_top_k else []
    if c.noise and not c.keep_top_k:
        c.notes.append(f"noise={c.noise} on each expert's copies cancels over them (exact)")


@declare(reads=("model", "layers", "m", "noise", "seed", "plan"), writes=("rules", "state"))
def _copy_experts(c) -> None:
    source = c.model.state_dict()
    aliases = c.plan.facts.aliases
    c.rules = expert_rules(c.layers, {k: tuple(v.shape) for k, v in source.items()}, c.m, c.noise, c.seed)
    c.state = {name: c.rules[aliases.get(name, name)].apply(t) if aliases.get(name, name) in c.rules else t
               for name, t in source.items()}


@declare(reads=("model", "captured", "plan", "layers", "m", "state", "keep_top_k"), writes=("grown", "chosen"),
         mutates=("notes",), what="rebuilding the model's class with more experts", error=MaterializeError)
def _rebuild(c) -> None:
    """The config search runs on the copies alone (the theorem's function), before any inexact change; the k
    each layer then chooses is read from the rebuilt model's own top-k ops."""
    gm, outputs = c.plan.captured.gm, [None] * len(c.plan.facts.outputs)
    theorem = theorem_k(gm, c.layers, c.m, c.keep_top_k)
    c.grown, by_theorem = fit_config(c.model, c.captured, c.state, c.layers, c.m, c.keep_top_k, outputs, theorem)
    if getattr(c.model, "generation_config", None) is not None and hasattr(c.grown, "generation_config"):
        c.grown.generation_config = copy.deepcopy(c.model.generation_config)
    order = [n.name for n in gm.graph.nodes if TOPK(n)]
    ks = chosen_k(c.grown, c.captured)
    c.chosen = {layer.choice: ks[order.index(layer.choice)] if len(ks) == len(order) else None for layer in c.layers}
    if not by_theorem:  # exact by measure only: say what the config does instead of k x m
        c.notes[:] = [f"the rebuilt config computes the source's function (measured, not the theorem's top-k "
                      f"x{c.m}) with {config_diff(c.model.config, c.grown.config)}; top-k per layer: {c.chosen}"]


@declare(reads=("grown", "layers", "m", "drop", "seed", "plan"), mutates=("notes", "grown"))
def _drop(c) -> None:
    """Drop-Upcycling on the new copies, in the rebuilt model's tensors (after the config search, which needs
    the exact copies)."""
    if not c.drop or c.m == 1:
        return
    state = c.grown.state_dict()
    with torch.no_grad():
        drawn = sum(drop_neurons(state, layer, c.m, c.drop, neuron_positions(c.plan, layer), c.seed + i)
                    for i, layer in enumerate(c.layers))
    c.notes.append(f"drop={c.drop}: {drawn} FFN neurons of the new expert copies drawn again")


@declare(reads=("model", "plan", "grown", "rules", "reasons", "notes", "layers", "m", "chosen"),
         writes=("record",), mutates=("grown",), what="measuring the grown model")
def _measure(c) -> None:
    outputs = [None] * len(c.plan.facts.outputs)
    record = GrowthRecord(c.plan, {}, reasons=c.reasons, output_maps=outputs, notes=c.notes, rules=c.rules,
                          config_changes=config_diff(c.model.config, c.grown.config),
                          experts={layer.choice: (layer.experts, c.m * layer.experts, layer.k, c.chosen[layer.choice])
                                   for layer in c.layers})
    record.params_before = sum(t.numel() for t in c.model.parameters())
    record.params_after = sum(t.numel() for t in c.grown.parameters())
    record.deviation = measure(c.model, c.grown, c.plan.captured, outputs)
    record.measured = "the real source and grown models in float32 at the example inputs and a second shape"
    c.record = c.grown.growir_record = record
    if record.exact and record.deviation is not None and record.deviation > TOLERANCE:
        raise PreservationError(f"copying the experts should be exact but the outputs moved by "
                                f"{record.deviation:.3g}; this is a growir bug: please report it with the config")
    if not record.exact:
        warn(f"growir: the grown model is not function-preserving (measured deviation {record.deviation:.3g}): "
             + "; ".join(record.reasons))


EXPERTS = (_capture, _read, _copy_experts, _rebuild, _drop, _measure)


def grow_experts(model, experts, *, keep_top_k=False, drop=0.0, noise=0.0, seed=0, strict=False,
                 example_inputs=None):
    """``model`` with each mixture-of-experts layer's experts copied (see the module docstring); the grown
    model's ``growir_record.experts`` maps each layer's choice to (old E, new E, old k, new k),
    new k as the rebuilt model's top-k op runs it."""
    ctx = ExpertsContext(model, example_inputs, experts, keep_top_k, drop, noise, seed, strict)
    return run_passes(EXPERTS, ctx).grown


def fit_config(model, captured, state: dict, layers: list, m: int, keep_top_k: bool, outputs: list,
               theorem: list) -> tuple:
    """(the class rebuilt from a config whose tensors have the grown shapes and, unless ``keep_top_k``, whose model
    computes the source's function; whether it runs the theorem's top-k). Top-k and group counts that no shape
    shows are offered x m. A config whose model runs its top-k ops at ``theorem`` (k x m, groups x m: exact by
    construction) is preferred, then any other whose measure is exact; fewest changes first in each.
    ``outputs``: index maps per flat output."""
    state = with_source_ties(model, state)
    expected = {k: tuple(v.shape) for k, v in state.items()}
    shown = {layer.experts: {m * layer.experts} for layer in layers}
    hidden = {} if keep_top_k else {n: {m * n} for layer in layers for n in [layer.k, *layer.groups]}
    pairs = {n: shown.get(n, set()) | hidden.get(n, set()) for n in {**shown, **hidden}}
    required = set(dict(model.named_parameters(remove_duplicate=False)))
    base = model.config.to_dict()
    tried, seen, others, built = [], set(), [], {}
    for cfg, _, _ in candidate_configs(model, expected, pairs, hidden, required, {}):
        for trial in fewest_changes(model, cfg, expected, built):
            changes = {k: v for k, v in trial.items() if base.get(k) != v}
            if repr(changes) in seen:
                continue
            seen.add(repr(changes))
            grown, why = _try(model, captured, trial, state, outputs, keep_top_k, theorem)
            if why is None:
                return grown, True
            (others if why == _NOT_THEOREM else tried).append((changes, trial, why))
    for changes, trial, _ in others:  # exact by measure only: a construction the theorem does not name
        grown, why = _try(model, captured, trial, state, outputs, keep_top_k, None)
        if why is None:
            return grown, False
        tried.append((changes, trial, why))
    raise MaterializeError(f"no {type(model.config).__name__} that holds {m}x the experts computes the source's "
                           f"function (top-k x{m} is what makes copies exact): "
                           f"{'; '.join(f'{c} ({why})' for c, _, why in tried[:4]) or 'none fits'}. "
                           f"keep_top_k=True keeps k and reports the deviation")


_NOT_THEOREM = "its top-k ops run other k than the theorem's"


def chosen_k(model, captured) -> list[int]:
    """The k of every top-k the model runs at the example inputs, in the order it runs them (the graph's order
    of its top-k nodes): read from the ops themselves, not from the config."""
    calls = _TopkCalls()
    with torch.no_grad(), calls:
        model(*captured.args, **captured.kwargs)
    return calls.ks


class _TopkCalls(TorchDispatchMode):
    """Records the k of each top-k op that runs."""

    def __init__(self):
        super().__init__()
        self.ks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if f"{func.namespace}.{func._overloadpacket.__name__}" in TOPK:
            self.ks.append(int(args[1]))
        return func(*args, **(kwargs or {}))


def _try(model, captured, cfg: dict, state: dict, outputs: list, keep_top_k: bool, theorem) -> tuple:
    """(the rebuilt model, why it is not the one -- None where it is): ``theorem`` (None: any) are the k its
    top-k ops must run; it must compute the source's function unless ``keep_top_k``."""
    try:
        grown = load_hf(model, cfg, state)
        if theorem is not None and chosen_k(grown, captured) != theorem:
            return grown, _NOT_THEOREM
        deviation = None if keep_top_k else measure(model, grown, captured, outputs)
    except GrowthError as err:
        return None, f"growir refuses it: {first_line(err)}"
    except Exception as err:  # noqa: BLE001 - the model's own code failing is the candidate's failure
        if not raised_in_model(err, model):
            raise
        return None, f"the rebuilt model fails: {type(err).__name__}: {first_line(err)}"
    if deviation is not None and deviation > TOLERANCE:
        return grown, f"differs from the source by {deviation:.2g}"
    return grown, None


def theorem_k(gm, layers: list, m: int, keep_top_k: bool) -> list[int]:
    """The k of every top-k node of ``gm``, in graph order, as the theorem's construction runs them: each layer's
    choice k x m and a group-limited choice's groups chosen x m (unless ``keep_top_k``), any other as it is."""
    scaled = set() if keep_top_k else {name for layer in layers for name in (layer.choice, layer.group_choice) if name}
    return [int(n.args[1]) * (m if n.name in scaled else 1) for n in gm.graph.nodes if TOPK(n)]


def fewest_changes(model, cfg: dict, expected: dict, built: dict):
    """``cfg`` with as many of its changed top-level fields reverted to the source's as the grown shapes allow,
    fewest changes first: two fields that only change shapes together (heads and kv heads that happen to equal
    the expert count) are both reverted. ``built`` caches the rebuilt shapes per config."""
    base = model.config.to_dict()
    changed = [k for k in cfg if k in base and cfg[k] != base[k]]
    for size in range(len(changed) + 1):
        for keep in itertools.combinations(changed, size):
            trial = {**cfg, **{k: base[k] for k in changed if k not in keep}}
            key = repr(sorted((k, trial[k]) for k in keep))
            if key not in built:
                built[key] = config_shapes(model, trial)
            if built[key] is not None and all(expected.get(k) == s for k, s in built[key].items()):
                yield trial


def grow_with_experts(grow, model, experts, *, keep_top_k=False, drop=0.0, top_k=None, then: dict):
    """``growir.grow`` with ``experts=``: the experts grown first (``grow_experts``), then, where ``then`` asks for
    width, depth or ``into``, the result grown by ``grow`` (the public function, passed in) with ``then``; one
    record for both, its deviation measured from the source to the end. With ``top_k`` the model is dense and
    is upcycled into the MoE class found by search (``pipeline/moe_search.py``)."""
    if experts is None:
        raise SpecError("keep_top_k and drop apply to a growth of the experts, as top_k does: pass experts= (2.0, or a count)")
    if top_k is not None:
        return _upcycle_dense(model, experts, top_k, keep_top_k, drop, then)
    if then.get("materialize") == "graph":
        raise SpecError("experts= rebuilds the model's class from a config (no rewritten graph holds more experts): "
                        "use materialize='auto' or 'hf'")
    if isinstance(experts, float):  # a multiplier that is not whole is refused before any export
        multiplier(experts, [1])
    started = time.perf_counter()
    first = grow_experts(model, experts, keep_top_k=keep_top_k, drop=drop, noise=then["noise"], seed=then["seed"],
                         strict=then["strict"], example_inputs=then["example_inputs"])
    ours = first.growir_record
    if (then["into"] is None and then["layers"] is None and then["width"] in (1, 1.0)
            and then["depth"] in (1, 1.0)):
        ours.seconds = time.perf_counter() - started
        return first
    grown = grow(first, **then)
    record = grown.growir_record
    record.reasons[:0], record.notes[:0], record.experts = ours.reasons, ours.notes, ours.experts
    record.params_before = ours.params_before
    record.config_changes = config_diff(model.config, grown.config)
    deviation = measure(model, grown, ours.plan.captured, record.output_maps)
    record.deviation = None if deviation is None else max(deviation, record.deviation or 0.0)
    record.seconds = time.perf_counter() - started
    return grown


def _upcycle_dense(model, experts, top_k, keep_top_k, drop, then: dict):
    """``experts=E, top_k=k`` on a dense model: the upcycling alone (grow the result further in a second call)."""
    asked = {"keep_top_k": keep_top_k, "drop": drop, "noise": then["noise"], "width": then["width"] not in (1, 1.0),
             "depth": then["depth"] not in (1, 1.0), **{k: then[k] is not None for k in ("layers", "into",
                                                                                       "example_inputs")}}
    others = [k for k, v in asked.items() if v]
    if others:
        raise SpecError(f"experts= with top_k= makes experts of a dense model's FFNs alone: leave "
                        f"{', '.join(others)} out (grow the upcycled model in a second call)")
    return upcycle_by_search(model, experts, top_k, seed=then["seed"], strict=then["strict"])
