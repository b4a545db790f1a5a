"""The residual stream rescaled instead of eps (passes/rescale.py, analysis/residual.terms_and_readers): exact
x1.5 where one eps field is shared by the residual's norms and the per-head q/k norms."""

from __future__ import annotations

import pytest

import growir
from growir.analysis.norms import norm_sites
from growir.analysis.residual import terms_and_readers
from test_archs import assert_same, grow_quietly, ids, make_moe


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_experts_outputs_weighted_by_their_router_are_terms_of_a_rescaled_stream(name):
    """An expert's output is ``w(x)·(W_down h)``: the routing weight w(x) comes from the norm's output, which the
    rescale keeps, so the term is still linear in ``W_down`` (stacked and read transposed) and the whole stream
    can carry c = sqrt(d'/d) with every eps unchanged (Qwen3-MoE's q/k norms share its ``rms_norm_eps``)."""
    source = make_moe(name)
    grown = grow_quietly(source, width=1.5)
    notes = {p: r.notes for p, r in grown.growir_record.rules.items()}
    rescaled = {p for p, ns in notes.items() if any("residual stream is rescaled" in n for n in ns)}
    assert any("experts" in p for p in rescaled), sorted(rescaled)
    assert grown.config.rms_norm_eps == source.config.rms_norm_eps
    assert_same(source, grown, [ids(2, 9), ids(1, 13, seed=1)])


def test_a_product_of_two_terms_is_not_rescaled():
    """Two projections that both write the stream, multiplied (a gated branch): each carries the factor c, and
    c·c is not c, so no rescale is claimed (the routing weight above is fixed only because its router writes
    nothing into the stream)."""
    import torch
    import torch.nn as nn

    class Gated(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.emb, self.norm, self.head = nn.Embedding(10, d), nn.LayerNorm(d), nn.Linear(d, 3)
            self.up, self.gate = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, idx):
            x = self.emb(idx)
            h = self.norm(x)
            x = x + self.up(h) * self.gate(h)
            return self.head(self.norm(x))

    plan = growir.plan(Gated(), example_inputs=(torch.randint(0, 10, (2, 5)),))
    group = plan.by_role("hidden")[0]
    sites = [s for s in norm_sites(plan.captured.gm, plan.facts) if group.root in plan.facts.ag.leaf_roots(s.axis)]
    assert len(sites) == 2
    assert terms_and_readers(plan.captured.gm, plan.facts, group, sites) is None
