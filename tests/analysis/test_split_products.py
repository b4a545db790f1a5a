"""An axis that is both a product and a concatenation (issue 21: "one axis is both split by a slice and reshaped
into a product"): the distributive law cat(g1 x m, g2 x m) == cat(g1, g2) x m, where every part is whole rows of
the minor factors. Differential attention (DiffLlama) chunks its heads in two where they are also kv heads x
repeats."""

from __future__ import annotations

import pytest
import sympy
import torch
import transformers as T

import growir
from growir.errors import AnalysisError
from growir.ir.axes import AxisGraph


def test_a_split_at_whole_rows_splits_the_major_factor():
    ag = AxisGraph()
    flat, heads, head_dim = ag.add("flat", 32), ag.add("heads", 4), ag.add("head_dim", 8)
    ag.set_structure(flat, "prod", [heads, head_dim], "a view")
    first, second = ag.add("first", 8), ag.add("second", 24)
    ag.set_structure(flat, "cat", [first, second], "a split")
    assert ag.expand(heads)[0] == "cat" and [ag.size_of(r) for r in ag.leaf_roots(heads)] == [1, 3]
    assert ag.expand(second) == ("prod", [ag.find(ag.leaf_roots(heads)[1]), "head_dim"])


def test_a_split_into_one_row_each_fixes_the_major_factor():
    """Two halves of (pair, heads): the pair index is the split's part index, never grown."""
    ag = AxisGraph()
    flat, pair, heads = ag.add("flat", 8), ag.add("pair", 2), ag.add("heads", 4)
    ag.set_structure(flat, "prod", [pair, heads], "a repeat")
    halves = [ag.add("a", 4), ag.add("b", 4)]
    ag.set_structure(flat, "cat", halves, "a chunk")
    assert "pair" in ag.fixed and all(ag.find(h) == ag.find(heads) for h in halves)


def test_a_split_inside_a_minor_factors_rows_is_refused():
    ag = AxisGraph()
    flat = ag.add("flat", 8)
    ag.set_structure(flat, "prod", [ag.add("rows", 2), ag.add("cols", 4)], "a view")
    with pytest.raises(AnalysisError, match="both split by a slice"):
        ag.set_structure(flat, "cat", [ag.add("a", 2), ag.add("b", sympy.Integer(6))], "a split")


def diffllama(kv_heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.DiffLlamaForCausalLM(T.DiffLlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=kv_heads, head_dim=8)).eval()


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_differential_attention_grows_exactly_in_its_own_class(width):
    grown = growir.grow(diffllama(4), width=width)
    assert type(grown).__name__ == "DiffLlamaForCausalLM"
    assert grown.growir_record.exact and grown.growir_record.deviation < 1e-5
    assert grown.config.num_key_value_heads == 4 * width


def test_one_kv_head_per_half_is_refused_naming_the_repeat():
    """kv_heads = 2: each half of the split is one head, which growir's products take for a broadcast."""
    with pytest.raises(growir.GrowthError, match=r"aten.repeat.*one entry that a parameter produces"):
        growir.grow(diffllama(2), width=2.0)


def test_grouped_convolution_over_query_and_key_heads_grows_exactly():
    """Zaya convolves q and k concatenated with groups = heads + kv heads (each group one head's channels), and
    its value is two projections concatenated and viewed as kv heads: the group count is the concatenation of
    the head counts, and the kv heads index the value's two parts (pinned: the query heads per kv head grow)."""
    torch.manual_seed(0)
    model = T.ZayaForCausalLM(T.ZayaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
        moe_intermediate_size=64, num_experts=4, layer_types=["hybrid", "hybrid"], eos_token_id=2, head_dim=8,
        router_hidden_size=32)).eval()
    grown = growir.grow(model, width=2.0)
    assert type(grown).__name__ == "ZayaForCausalLM" and grown.config.num_attention_heads == 8
    assert grown.growir_record.exact and grown.growir_record.deviation < 1e-5


def test_a_learned_probe_repeated_over_the_batch_is_a_broadcast():
    """A parameter's own axis of size one (SigLIP's pooling probe, (1, 1, d), repeated over the batch) is a
    broadcast, not one entry of a width; the repeat rule refuses only a one-entry part of a parameter's axis."""
    class Probe(torch.nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.emb, self.probe = torch.nn.Embedding(50, d), torch.nn.Parameter(torch.randn(1, 1, d))
            self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, 5)

        def forward(self, ids):
            x = torch.cat([self.probe.repeat(ids.shape[0], 1, 1), self.emb(ids)], dim=1)
            return self.down(torch.relu(self.up(x)))

    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    grown = growir.grow(Probe().eval(), width=2.0, example_inputs=(ids,))
    assert grown.growir_record.exact
