"""What a growth did, kept on the grown model as ``growir_record``; ``print(record)`` shows it as a table."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..analysis.plan import Plan


@dataclass
class GrowthRecord:
    """What a growth did: kept on the grown model as ``growir_record``."""
    plan: Plan
    sizes: dict  # group id -> new size
    layers: dict = field(default_factory=dict)  # block prefix -> (old count, new count, method)
    reasons: list = field(default_factory=list)  # why the growth is not exact (empty: exact)
    deviation: float | None = None  # measured max|Δ| / max(1, max|y|); None: not measured (meta device)
    output_maps: list = field(default_factory=list)  # per flat output, per axis: index map or None
    config_changes: dict = field(default_factory=dict)  # every config field whose value changed
    notes: list = field(default_factory=list)  # what the caller should know beyond exactness (kept groups, ...)
    filled: dict = field(default_factory=dict)  # group label -> fill kind, where repeat-and-fill was used
    width_method: str = ""  # the one asked for ("auto": per group, see ``group_methods``; "fpi" with noise)
    rules: dict = field(default_factory=dict)  # state_dict name -> TensorRule that made it
    params_before: int = 0
    params_after: int = 0
    rounding: str | None = None  # grown values the source's dtype could not hold exactly (a reason if measurable)
    seconds: float = 0.0  # wall time of the grow call: trace, rules, rebuild, measurement (and --verify)
    timings: dict = field(default_factory=dict)  # pass name -> seconds (growir.manager), for the benchmarks
    capture: str = ""  # what was exported: a two-block proxy, or the full model and why
    reruns: list = field(default_factory=list)  # "pass: why" for each stage that ran again in this growth
    measured: str = ""  # what the self-measure ran
    experts: dict = field(default_factory=dict)  # a layer's expert choice -> (old E, new E, old k, new k)
    reload: object = None  # materialize.reload.Reload of a rebuilt class saved and loaded again (None: not checked)

    @property
    def exact(self) -> bool:
        """No reason the growth is not function-preserving was found."""
        return not self.reasons

    @property
    def group_methods(self) -> dict:
        """group label -> how it grew: "zero"/"mean" (a fill), "random" (fresh units), "copies (why)", or
        "copies" (the other grown groups: head_dim, or every group under fpi)."""
        grown = {} if self.plan is None else {g.label: "copies" for g in self.plan.groups
                                               if g.size is not None and self.sizes.get(g.id, g.size) != g.size}
        return {**grown, **self.filled}

    def __deepcopy__(self, memo):  # the record describes a growth; copies of the model share it
        return self

    def __getstate__(self):  # the plan holds the traced graph (fake tensors): not picklable, not needed
        return {**self.__dict__, "plan": None, "rules": {}}

    def __str__(self) -> str:
        from ..report import record_table
        return record_table(self)


@dataclass
class GrowthRules:
    """What ``growir.rules`` found: the per-tensor rules of a growth and what they change, before any weight is
    read. ``rules`` maps each grown state_dict name to the ``TensorRule`` that makes it from its source
    tensor; ``apply(state)`` runs them on a source state dict (one tensor at a time, as streaming does)."""
    context: object = field(repr=False)  # the pipeline's Context: ``api.materialize`` continues from it

    plan = property(lambda self: self.context.plan)
    sizes = property(lambda self: self.context.sizes)  # group id -> new size
    rules = property(lambda self: self.context.rules)  # state_dict name -> TensorRule
    reasons = property(lambda self: self.context.reasons)  # why the growth cannot be exact (empty: exact)
    layers = property(lambda self: self.context.layer_info)  # block prefix -> (old count, new count, method)
    eps_values = property(lambda self: self.context.eps_values)  # a config change: a norm's old eps -> new
    width_method = property(lambda self: self.context.opts.width_method)

    @property
    def exact(self) -> bool:
        """No reason the growth is not function-preserving was found."""
        return not self.reasons

    @property
    def output_maps(self) -> list:
        """Per flat output, per axis: where each grown position reads the source's output (None: unchanged)."""
        from ..verify.compare import output_maps
        return output_maps(self.plan, self.context.maps)

    def apply(self, state: dict) -> dict:
        """The grown tensors from ``state`` (source name -> tensor), each rule on its source (and AKI donor)."""
        return {name: rule.apply(state[rule.source], state.get(rule.donor)) for name, rule in self.rules.items()}

    def __repr__(self) -> str:
        return (f"GrowthRules({len(self.rules)} tensors, {len(self.sizes)} groups grown, "
                f"{'exact' if self.exact else 'not exact'}, width_method={self.width_method!r})")
