"""The one object the pipeline's passes read and write (``pipeline.manager``), and the growth options.

Each field belongs to the stage that writes it (``FIELD_STAGES``); a pass declares the fields it reads, writes
and mutates, so the order of ``stages.GROW`` can be checked without running it (``manager.check_order``) and
what a pass touches checked while it runs (``manager.checking``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Options:
    """How the rules are made: the width and depth methods, the seed, noise, and what the caller knows of the
    weights (stored below float32, eps a config cannot hold, per-unit constants a rebuilt model computes)."""
    width_method: str = "auto"  # "auto" decides per group (passes/fresh.py: copy_where_exact)
    depth_method: str = "auto"
    seed: int = 0
    noise: float = 0.0
    keep_eps: bool = False  # the rebuilt config cannot express a changed eps: keep it and measure
    rescale: bool = True  # repeat-and-fill keeps eps by rescaling the residual stream where it can (rescale.py)
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


# Each field, grouped by the stage whose passes write it (a test checks every pass against it); the caller sets
# the inputs, and may give a stage's results instead of running it (``growir.rules`` on a plan: plan, counts).
FIELD_STAGES = {
    "inputs": ("opts", "model", "example_inputs", "width", "depth", "layers", "asked_method", "materialize",
               "strict", "verify"),
    "PLAN": ("proxy", "how", "counts", "captured", "plan"),
    "SPEC": ("sizes", "depth_plan"),
    "RULES": ("fill", "new_units", "maps", "units", "frozen", "unit_reasons", "width_result", "size_literals",
              "scales", "compensated", "head_dim_reasons", "tied_reasons", "rescaled", "stream_scales", "eps",
              "eps_values", "reasons", "graph_edits", "filled", "rules", "schedules", "layer_info"),
    "MATERIALIZE": ("state", "rounded", "graph", "built"),
    "bookkeeping": ("ran", "timings", "reruns"),  # the manager's
}


@dataclass
class Context:
    """The growth in progress. Inputs first (the caller sets them), then what each stage's passes write
    (``FIELD_STAGES``)."""
    # --- inputs --------------------------------------------------------------------------------------------
    opts: Options = field(default_factory=Options)
    model: torch.nn.Module | None = None
    example_inputs: object = None
    width: object = 1.0  # the spec as given: a multiplier or a role dict
    depth: object = 1.0
    layers: int | None = None
    asked_method: str = "auto"  # the width_method the caller asked for ("auto": per group)
    materialize: str = "auto"
    strict: bool = False
    verify: bool = False
    # --- plan: capture, analyse ----------------------------------------------------------------------------
    proxy: object = None  # capture.Proxy: grow planned on a two-block meta proxy (None: the full model)
    how: str = ""  # what was captured: the proxy, or the full model and why
    counts: dict = field(default_factory=dict)  # block list -> full block count (rules of a two-block proxy)
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
    tied_reasons: list | None = None  # why a tied head's norm could not absorb its copies
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
    reruns: list = field(default_factory=list)  # "pass: why" for each stage that ran again (a restart, a rebuild)

    def nested(self, **inputs) -> "Context":
        """A fresh context for a nested run (a config rebuild), sharing the bookkeeping (``ran``, ``timings``,
        ``reruns``): a grow's ``ran`` lists every pass that ran in it."""
        return Context(plan=self.plan, counts=self.counts, proxy=self.proxy, ran=self.ran, timings=self.timings,
                       reruns=self.reruns, **inputs)

    def restart(self, how: str) -> None:
        """Back to the inputs alone, for a growth started again on the full capture (``how`` says why); the
        bookkeeping is kept (``manager.Restart``)."""
        fresh = Context(self.opts, self.model, self.example_inputs, self.width, self.depth, self.layers,
                        asked_method=self.asked_method, materialize=self.materialize, strict=self.strict,
                        verify=self.verify, how=how, ran=self.ran, timings=self.timings, reruns=self.reruns)
        self.__dict__.update(fresh.__dict__)
