"""Norms with no weight (``layer_norm(x, shape, None, None, eps)``): where repeat-and-fill's factor goes instead.

Repeat-and-fill (``fill.py``) leaves a norm over ``x' = [x × n, fill]`` computing ``x̂ / sqrt(ρ)`` on the copies,
ρ = n·d/d' (eps rewritten to ρ·eps, or the stream rescaled by 1/sqrt(ρ): ``rescale.py``), and takes the factor back
out in the norm's weight (``× sqrt(ρ)``). A norm with no weight has nowhere to take it. Its output is pre-norm
(``NormSite.pre_norm``): it reaches only contractions with a parameter, linear in that parameter, so each of those
parameters takes the factor instead, and a bias of the norm is divided by it:

    W·sqrt(ρ) · (x̂ / sqrt(ρ) + b / sqrt(ρ)) = W·(x̂ + b)

A parameter that reads anything else as well (a tied embedding, the stream itself, the output of a norm that has a
weight) cannot take it: the group is then copied where its ratio is whole (a uniform copy keeps a norm's
statistics, weight or no weight), else the fill's reason says why it is not exact.
"""

from __future__ import annotations

from ..analysis.norms import NormSite
from ..analysis.ops import PART, SCALES, forward, indexes_leading
from ..analysis.plan import Plan


def bare_norm_readers(plan: Plan, g, mine: list[NormSite]) -> tuple[set, str]:
    """(the parameters that take the fill's sqrt(ρ) for the norms over ``g`` that have no weight, why they
    cannot: "" where they can). Both empty where every norm over ``g`` has a weight."""
    f = plan.facts
    bare = [s for s in mine if s.weight is None]
    if not bare:
        return set(), ""
    through = lambda u: PART(u) or indexes_leading(u) or SCALES(u)  # noqa: E731 - NormSite.pre_norm's path
    reached = [u for s in bare for u in forward(s.output, through)]
    if any(u.op == "output" for u in reached):
        return set(), (f"the norm at `{bare[0].node}` has no weight and its output is returned: nothing can take "
                       f"the fill's factor back out")
    names = {u.name for u in reached}
    targets = {p for p, _, node in f.consumed if node in names}
    read = {node for p, _, node in f.consumed if p in targets}
    if read - names or names - read:
        return set(), (f"the norm at `{bare[0].node}` has no weight, and a parameter reading its output also reads "
                       f"another value (or none does): nothing can take the fill's factor back out")
    for graph_name, state in f.params.items():
        if state in targets and _other_uses(plan, graph_name, names):
            return set(), (f"the norm at `{bare[0].node}` has no weight and `{state}`, which reads its output, is "
                           f"also used elsewhere (a tied weight): nothing can take the fill's factor back out")
    return targets, ""


def _other_uses(plan: Plan, graph_name: str, contractions: set) -> bool:
    """Whether the parameter node ``graph_name`` is used, past layout views, by anything but ``contractions``."""
    node = next(n for n in plan.captured.gm.graph.nodes if n.name == graph_name)
    return any(u.name not in contractions for u in forward(node, PART))


def fold_scale(rules: dict, params: set, factor: float) -> None:
    """Multiply the contractions ``params`` that read a weightless norm by ``factor`` = sqrt(ρ)."""
    for p in sorted(params):
        rules[p].scale *= factor
        rules[p].notes.append(f"x{factor:.4g}: the norm it reads has no weight to take repeat-and-fill's factor")
