"""The one object the pipeline's passes read and write (``growir.manager``), and the growth options.

Each field says which pass writes it; a pass declares the fields it reads and writes, so the order of
``pipeline.GROW`` can be checked without running it (``manager.check_order``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Options:
    width_method: str = "auto"  # "auto" decides per group (passes/fresh.py: copy_where_exact)
    depth_method: str = "auto"
    seed: int = 0
    noise: float = 0.0
    keep_eps: bool = False  # the rebuilt config cannot express a changed eps: keep it and measure
    low_precision: bool | None = None  # weights stored below float32 (bf16, fp16); None: the traced weights' dtype
    unit_values: dict = field(default_factory=dict)  # per-unit constants as the rebuilt model computes them


@dataclass
class Built:
    """What the materialize passes made: the grown model and what a config rebuild needs to redo it."""
    record: object  # GrowthRecord
    state: dict
    grown: torch.nn.Module
    maps: dict
    eps_values: dict = field(default_factory=dict)  # old eps -> new eps (repeat-and-fill), for the config
    units: list = field(default_factory=list)  # per-unit constants (ALiBi slopes): read back from a rebuilt model
    eps_nodes: dict = field(default_factory=dict)  # the eps literals changed: node -> (position, new eps)


@dataclass
class Context:
    """The growth in progress. Inputs first (the caller sets them), then what each stage's passes write."""
    # --- inputs --------------------------------------------------------------------------------------------
    opts: Options = field(default_factory=Options)
    model: torch.nn.Module | None = None
    example_inputs: object = None
    width: object = 1.0  # the spec as given: a multiplier or a role dict
    depth: object = 1.0
    layers: int | None = None
    counts: dict = field(default_factory=dict)  # block list -> full block count (rules of a two-block proxy)
    asked_method: str = "auto"  # the width_method the caller asked for ("auto": per group)
    materialize: str = "auto"
    strict: bool = False
    verify: bool = False
    # --- plan: capture, analyse ----------------------------------------------------------------------------
    proxy: object = None  # capture.Proxy: grow planned on a two-block meta proxy (None: the full model)
    how: str = ""  # what was captured: the proxy, or the full model and why
    captured: object = None  # frontend.Captured
    plan: object = None  # plan.Plan
    # --- spec: sizes, depth_plan ---------------------------------------------------------------------------
    sizes: dict | None = None  # group id -> new size
    depth_plan: list | None = None  # [(Blocks, new count)]
    # --- rules: the width passes, then blocks and depth ----------------------------------------------------
    fill: object = None  # passes.fill.FillPlan
    new_units: dict | None = None  # group root -> fill kind of the fresh width method's new units
    maps: dict | None = None  # group root -> GroupMap
    units: list | None = None  # per-unit constants (ALiBi slopes)
    frozen: dict | None = None  # per-unit constant node -> its grown value, frozen into the graph
    unit_reasons: list | None = None
    width_result: object = None  # passes.width.WidthResult: per-tensor width rules
    size_literals: dict | None = None  # size values in the graph (eps-like literals) -> new value
    scales: dict | None = None  # attention score scales to rewrite (head_dim growth)
    compensated: set | None = None  # (group root, read kind) the head_dim pass made exact
    head_dim_reasons: list | None = None
    rescaled: set | None = None  # residual groups rescaled so that their norms keep eps
    stream_scales: dict | None = None  # group root -> c: that residual stream is c x its copies
    eps: dict | None = None  # norm eps literal -> new value (repeat-and-fill)
    eps_values: dict | None = None  # old eps -> new eps, for a rebuilt config
    reasons: list | None = None  # why the growth is not exact (empty: exact)
    graph_edits: list | None = None  # functions that rewrite the copied graph (sizes, scales, eps)
    filled: dict | None = None  # group label -> fill kind
    rules: dict | None = None  # state_dict name -> TensorRule
    schedules: list | None = None  # depth schedules
    layer_info: dict | None = None  # block prefix -> (old count, new count, method)
    # --- materialize ---------------------------------------------------------------------------------------
    state: dict | None = None  # state_dict name -> grown tensor
    rounded: list | None = None  # names whose cast to the source dtype changed a value
    graph: torch.fx.GraphModule | None = None  # the rewritten GraphModule
    built: Built | None = None
    # --- bookkeeping (the manager) -------------------------------------------------------------------------
    ran: list = field(default_factory=list)  # pass names, in the order they ran
    timings: dict = field(default_factory=dict)  # pass name -> seconds (summed over nested runs)

    def nested(self, **inputs) -> "Context":
        """A fresh context for a nested run (a config rebuild, the copies a growth prefers), sharing
        ``timings``."""
        return Context(plan=self.plan, counts=self.counts, proxy=self.proxy, timings=self.timings, **inputs)

    def restarted(self, how: str) -> "Context":
        """The inputs alone, for a growth started again on the full capture (``how`` says why), sharing
        ``timings`` and ``ran``."""
        return Context(self.opts, self.model, self.example_inputs, self.width, self.depth, self.layers,
                       asked_method=self.asked_method, materialize=self.materialize, strict=self.strict,
                       verify=self.verify, how=how, ran=self.ran, timings=self.timings)
