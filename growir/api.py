"""growir's pipeline as public stages: ``plan`` (weight-free) -> ``rules`` (per-tensor rules, no weights) ->
``materialize`` (in memory; ``growir.grow_checkpoint`` streams disk to disk instead) -> check. ``grow``
composes them.

Each stage is a declared list of passes that ``manager.run_passes`` runs in order on one ``Context``
(``context.py``); a pass names what it reads and writes, an unexpected failure is a GrowthError naming the
stage and the pass, and ``record.timings`` gives each pass's time. The passes live in ``pipeline/stages.py``
(plan, spec, materialize, check) and ``pipeline/rules.py`` (the rules).
"""

from __future__ import annotations

import time

import torch

from .pipeline.context import Context, Options
from .errors import SpecError
from .pipeline.manager import run_passes
from .pipeline.rules import RULES
from .analysis.plan import Plan
from .pipeline.record import GrowthRecord, GrowthRules
from .pipeline.stages import CHECK, GROW, MATERIALIZE, PLAN, SPEC, plan_of
from .verify.compare import TOLERANCE
from .pipeline.spec import options, check_mode
from .pipeline.experts import grow_with_experts
from .pipeline.target import derive
from .pipeline.upcycle import upcycle

__all__ = ["plan", "rules", "materialize", "grow", "growth_rules", "GrowthRecord", "GrowthRules", "Options",
           "TOLERANCE"]




def plan(model: torch.nn.Module, example_inputs=None) -> Plan:
    """The width groups and blocks growir finds in ``model``; ``print(plan)`` shows them as a table.
    Weight-free: a model on the meta device plans the same.

    >>> import growir
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> p = growir.plan(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)))
    >>> len(p.by_role("heads")) > 0
    True
    """
    return plan_of(model, example_inputs)


def rules(model_or_plan, width=1.0, depth=1.0, *, layers=None, width_method="auto", depth_method="auto",
          method=None, noise=0.0, seed=0, example_inputs=None) -> GrowthRules:
    """The per-tensor rules of a growth, without reading a weight (a meta-device model will do).

    Arguments as ``grow``. ``width_method="auto"`` gives the fresh rules per group where they are exact, and
    copies where only copies are (the theorems of ``passes/fresh.py``; ``grow`` measures too).

    >>> import growir, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> with torch.device("meta"):
    ...     small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> r = growir.rules(small, width=2.0)
    >>> r.exact, r.rules["model.layers.0.mlp.up_proj.weight"].new_shape((64, 32))
    (True, (128, 64))
    """
    asked, opts = options(method, width_method, depth_method, noise, seed)
    if isinstance(model_or_plan, Plan):
        ctx = Context(opts, plan=model_or_plan)
    else:
        ctx = run_passes(PLAN, Context(opts, model_or_plan, example_inputs))
    ctx.width, ctx.depth, ctx.layers, ctx.asked_method = width, depth, layers, asked
    run_passes(SPEC + RULES, ctx)
    return GrowthRules(ctx)


def materialize(model: torch.nn.Module, growth_rules: GrowthRules, *, mode="auto", strict=False, verify=False):
    """The grown model in memory from rules made on ``model`` (``growir.rules(model, ...)``: its traced graph
    holds the weights the rules read), measured and judged as ``grow`` does; ``mode`` is grow's
    ``materialize``. Rules materialize once.

    >>> import growir
    >>> from growir.api import materialize
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> small = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    >>> materialize(small, growir.rules(small, width=2.0)).config.n_embd
    64
    """
    ctx = growth_rules.context
    if ctx.built is not None:
        raise SpecError("these rules were already materialized (their graph no longer holds the source's "
                        "weights): make them again with growir.rules(model, ...)")
    check_mode(mode)
    ctx.model, ctx.materialize, ctx.strict, ctx.verify = model, mode, strict, verify
    return run_passes(MATERIALIZE + CHECK, ctx).built.grown


def grow(model: torch.nn.Module, width=1.0, depth=1.0, *, layers=None, width_method="auto", depth_method="auto",
         method=None, noise=0.0, example_inputs=None, strict=False, seed=0, verify=False, materialize="auto",
         into=None, experts=None, keep_top_k=False, drop=0.0, top_k=None):
    """Grow ``model`` wider and deeper, starting from the same function where mathematics allows.

    Returns an instance of the same class for Hugging Face models (config updated), else a rewritten
    ``torch.fx.GraphModule``. The source is never modified. ``grown.growir_record`` says what was done.

    ``width_method``: ``"auto"`` (the default) decides per group from the analysis: the ``"fresh"``
    construction wherever it is exact — a normalized group (the residual stream) once plus a zero/mean fill
    whose readers' columns are random, fresh FFN neurons and heads (random producer rows, zero consumer
    columns) — and copies for a group where only copies are exact: a post-norm residual (its consumers then
    split each column over the copies by bounded random factors summing to 1), a LayerNorm group written
    channel by channel (a depthwise convolution), a filled group whose eps the config cannot change and
    whose residual cannot be rescaled, or, for weights stored below float32 precision, a group grown by a
    power of two (a fill's sqrt(d'/d) rounds there, copies do not); see ``passes/fresh.py`` and
    docs/methods.md. A post-norm residual only a head reads (a masked-LM encoder) is filled instead, its norms'
    eps kept and weights raised by sqrt(d'/d) (the stream's old units grow by d'/d; not exact: warned, with the
    measured deviation; copies there train as one; ``strict=True`` keeps the exact copies). It trained best in
    benchmarks/savings.py (docs/savings.md). ``"fill"`` is
    ``"auto"`` with that fill compensated in the norms (a smaller deviation, but it trained worse).
    ``"fresh"`` fills every normalized group it can; ``"fpi"`` (function-preserving
    copies, and repeat-and-fill for a normalized group whose ratio is not whole, exact for pre-norm models),
    ``"fpi_balanced"`` (copies only, counts differing by at most one), ``"fpi_random"`` (bert2BERT's uniformly
    random copies) or ``"aki"`` (bert2BERT: new units of block l from block l+1; not exact). With ``noise``,
    ``"auto"`` grows ``"fpi"`` copies (the noise is their symmetry breaking).
    ``method="bert2bert"`` is the paper's recipe (AKI width, stacked depth).
    ``noise=σ`` perturbs split consumer copies by noise that cancels over the copies (relative std σ):
    the function stays exact while copies stop receiving identical gradients.
    ``materialize``: ``"auto"`` rebuilds a Hugging Face model's class from a changed config, or returns the
    rewritten GraphModule with a warning where no config computes the grown function; ``"hf"`` raises
    MaterializeError there instead; ``"graph"`` always returns the GraphModule.
    ``into``: a target of the model's class (a transformers config, a model folder or a config.json path)
    instead of ``width``/``depth``/``layers``: every size is derived from the two graphs (``pipeline/target.py``)
    and the grown config equals the target's in every field the growth decides; the record's notes name the
    target's fields kept at the source's value (token ids, ...). A size no growth reaches is a SpecError.
    ``into`` a config of another class whose graph is the model's with each FFN made a mixture of experts
    (a dense decoder into its family's MoE class) upcycles: the experts made from the FFN by the construction the
    router makes exact (``pipeline/upcycle.py``); the other parameters copied, the router seeded by ``seed``.
    ``experts``: on a mixture-of-experts model, a multiplier (2.0) or a target expert count (8): each expert
    copied with its router row and top-k multiplied with them, which is exact (``pipeline/experts.py`` reads the
    router's convention from the graph); ``keep_top_k=True`` keeps k (the inference cost) and warns with the
    measured deviation; ``drop=r`` draws a fraction r of each new copy's FFN neurons again (Drop-Upcycling: not
    exact, reported); ``noise`` there is noise that cancels over each expert's copies (exact). Width, depth or
    ``into`` then grow the result. ``experts=E, top_k=k`` on a dense model upcycles it into the transformers
    mixture-of-experts class whose graph is the model's with FFNs made experts, found by search
    (``pipeline/moe_search.py``), else a SpecError that asks for ``into=``.

    >>> import growir
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> big = growir.grow(small, width=2.0, depth=2)
    >>> (big.config.hidden_size, big.config.num_attention_heads, big.config.num_key_value_heads,
    ...  big.config.num_hidden_layers)
    (64, 8, 4, 4)
    """
    asked, opts = options(method, width_method, depth_method, noise, seed)
    check_mode(materialize)
    if experts is not None or keep_top_k or drop or top_k is not None:
        then = dict(width=width, depth=depth, layers=layers, width_method=width_method, depth_method=depth_method,
                    method=method, noise=noise, example_inputs=example_inputs, strict=strict, seed=seed,
                    verify=verify, materialize=materialize, into=into)
        return grow_with_experts(grow, model, experts, keep_top_k=keep_top_k, drop=drop, top_k=top_k, then=then)
    started = time.perf_counter()
    target = derive(model, into, width, depth, layers) if into is not None else None
    if target is not None and target.upcycle:
        return upcycle(model, target.config, target.cls, seed=seed, strict=strict)
    if target is not None:
        width, layers = target.width, target.layers
    ctx = Context(opts, model, example_inputs, width, depth, layers, asked_method=asked, materialize=materialize,
                  strict=strict, verify=verify)
    record = run_passes(GROW, ctx).built.record
    if target is not None:
        record.notes += target.settle(ctx.built.grown)
    record.seconds, record.timings = time.perf_counter() - started, ctx.timings
    return ctx.built.grown


def growth_rules(p: Plan, sizes: dict, depth_plan: list, opts: Options, counts: dict | None = None):
    """The RULES passes for resolved ``sizes`` and ``depth_plan`` (streaming, the proxy's config choice).

    ``counts`` (block list prefix -> full block count) expands the rules of a two-block proxy's plan to the
    full model (``growir.checkpoint``). Returns (context, rules, schedules, layer info, reasons).
    """
    ctx = run_passes(RULES, Context(opts, plan=p, sizes=sizes, depth_plan=depth_plan, counts=counts or {}))
    return ctx, ctx.rules, ctx.schedules, ctx.layer_info, ctx.reasons


