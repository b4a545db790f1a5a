"""The pipeline: a declared list of passes per stage (plan, spec, rules, materialize, check) run in order on
one ``Context`` by the pass manager; ``GROW`` is the whole growth (see docs/design.md)."""

from .context import FIELD_STAGES, Context, Options
from .manager import Pass, Restart, check_declared, check_order, checking, declare, run_passes
from .record import GrowthRecord, GrowthRules
from .rules import RULES
from .stages import CHECK, GROW, GROW_PLANNED, MATERIALIZE, PLAN, PROXY_PLAN, SPEC, STAGES, STAND_IN, plan_of

__all__ = ["FIELD_STAGES", "Context", "Options", "Pass", "Restart", "check_declared", "check_order", "checking",
           "declare", "run_passes", "GrowthRecord", "GrowthRules", "RULES", "CHECK", "GROW", "GROW_PLANNED",
           "MATERIALIZE", "PLAN", "PROXY_PLAN", "SPEC", "STAGES", "STAND_IN", "plan_of"]
