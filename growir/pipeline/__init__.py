"""The pipeline: a declared list of passes per stage (plan, spec, rules, materialize, check) run in order on
one ``Context`` by the pass manager; ``GROW`` is the whole growth (see docs/design.md)."""

from .context import Context, Options
from .manager import Pass, run_passes
from .record import GrowthRecord, GrowthRules
from .rules import RULES
from .stages import CHECK, GROW, MATERIALIZE, PLAN, PROXY_PLAN, SPEC, plan_of

__all__ = ["Context", "Options", "Pass", "run_passes", "GrowthRecord", "GrowthRules", "RULES", "CHECK", "GROW", "MATERIALIZE", "PLAN", "PROXY_PLAN", "SPEC", "plan_of"]
