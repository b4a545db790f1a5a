"""Depth growth of block lists whose blocks differ by design (growir/analysis/blocks.py, growir/passes/depth.py).

Blocks with the same class, parameter shapes, ops and shared inputs are one kind; a list whose kinds repeat with a
period grows by whole periods, so the pattern is kept (``[a, b]`` x2 is ``[a, b, a', b']``), and each added
block is an identity by its own kind's writers. Found from the graph: the tests build the kinds from module
classes with nothing in common but the stream they read and write.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growir
from growir.errors import SpecError
from growir.frontend.export import capture
from growir.analysis.plan import make_plan
from growir.passes.depth import schedule
from growir.train.blocks import find_blocks, identity_blocks

D, V = 16, 50


class Mlp(nn.Module):
    """A pre-norm feed-forward block: x + W2 gelu(W1 ln(x))."""

    def __init__(self):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.ln(x))))


class Mix(nn.Module):
    """A pre-norm token-mixing block of another kind: x + W_o cumsum(W_v rms(x)) (a causal running sum)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(D))
        self.v, self.o = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)

    def forward(self, x):
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm
        return x + self.o(torch.cumsum(self.v(rms), dim=1))


class PostNorm(nn.Module):
    """A post-norm block: ln(x + W x), never an identity."""

    def __init__(self):
        super().__init__()
        self.w, self.ln = nn.Linear(D, D), nn.LayerNorm(D)

    def forward(self, x):
        return self.ln(x + self.w(x))


class Stack(nn.Module):
    def __init__(self, kinds):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.layers = nn.ModuleList(kind() for kind in kinds)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _model(kinds):
    torch.manual_seed(0)
    model = Stack(kinds).eval()
    with torch.no_grad():  # norms away from their init, so that a wrong copy would show
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
            if isinstance(m, Mix):
                m.norm.uniform_(0.5, 1.5)
    return model


IDS = (torch.randint(0, V, (2, 7)),)


def test_kinds_and_period_are_found_from_the_graph():
    plan = make_plan(capture(_model([Mix, Mlp, Mix, Mlp]), IDS))
    (b,) = plan.blocks
    assert b.homogeneous and b.mixed and not b.alike and b.period == 2 and b.pre_norm, b.why_not
    assert b.period_writers == [["o.weight"], ["down.bias", "down.weight"]]
    assert b.suffixes_of(4) == ["norm", "o.weight", "v.weight"] and "up.weight" in b.suffixes_of(5)


def test_mixed_stack_depth_x2_keeps_the_pattern_and_is_exact():
    model = _model([Mix, Mlp])
    grown = growir.grow(model, width=2.0, depth=2, example_inputs=IDS)
    record = grown.growir_record
    assert record.exact, record.reasons
    state = grown.state_dict()
    assert "layers.2.v.weight" in state and "layers.3.up.weight" in state and "layers.3.v.weight" not in state
    assert not state["layers.2.o.weight"].any() and not state["layers.3.down.weight"].any()  # added: identities
    ids = torch.randint(0, V, (3, 11))
    torch.testing.assert_close(grown(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_schedule_moves_whole_periods():
    b = make_plan(capture(_model([Mix, Mlp, Mix, Mlp]), IDS)).blocks[0]
    identity = schedule(b, 6, "identity")
    assert identity.sources == [0, 1, 0, 1, 2, 3] and identity.fresh == [False, False, True, True, False, False]
    assert schedule(b, 8, "stack").sources == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(SpecError, match="multiple of 2"):
        schedule(b, 5, "identity")


def test_kinds_that_never_repeat_grow_by_runs():
    """First-k-dense ``[d, m, m]`` has no period: each run of one kind grows, ``[d, d', m, m', m, m']``."""
    model = _model([Mlp, Mix, Mix])
    (b,) = make_plan(capture(model, IDS)).blocks
    assert b.period == 3 and b.kinds == [0, 1, 1] and b.runs == [(0, 1), (1, 2)]
    assert b.layouts == ("runs", "first", "period") and b.layout == "runs"
    grown = growir.grow(model, depth=2, example_inputs=IDS)
    record = grown.growir_record
    assert record.exact and record.layers["layers"] == (3, 6, "identity; each run of one kind grown: "
                                                              "blocks 0 (1 -> 2), 1-2 (2 -> 4)")
    state = grown.state_dict()
    assert "layers.1.up.weight" in state and "layers.1.v.weight" not in state and "layers.2.v.weight" in state
    assert not state["layers.1.down.weight"].any() and not state["layers.3.o.weight"].any()
    ids = torch.randint(0, V, (3, 11))
    torch.testing.assert_close(grown(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_run_layouts_schedule():
    import dataclasses
    b = make_plan(capture(_model([Mlp, Mix, Mix]), IDS)).blocks[0]
    first = schedule(dataclasses.replace(b, layout="first"), 6, "identity")
    assert first.sources == [0, 1, 1, 1, 2, 2] and first.fresh == [False, False, True, True, False, True]
    assert schedule(b, 5, "identity").sources == [0, 0, 1, 1, 2]  # added blocks spread over the growing ones
    assert schedule(b, 6, "stack").sources == [0, 0, 1, 2, 1, 2]  # each run stacked on its own
    periods = schedule(dataclasses.replace(b, layout="period"), 6, "identity")
    assert periods.sources == [0, 1, 2, 0, 1, 2]


def test_a_post_norm_kind_is_not_copyable_and_says_which():
    plan = make_plan(capture(_model([Mlp, PostNorm, Mlp, PostNorm]), IDS))
    (b,) = plan.blocks
    assert not b.homogeneous and "layers.1" in b.why_not and "post-norm" in b.why_not
    with pytest.raises(growir.GrowthError, match="post-norm"):
        growir.grow(_model([Mlp, PostNorm, Mlp, PostNorm]), depth=2, example_inputs=IDS)


def test_a_sequential_of_other_layers_is_no_block_list():
    """Children of different classes that do not make a copyable stack are not reported as blocks at all."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.layers = nn.Embedding(V, D), nn.ModuleList([Mlp(), Mlp()])
            self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

        def forward(self, ids):
            x = self.emb(ids)
            for layer in self.layers:
                x = layer(x)
            return self.mlp(x)

    plan = make_plan(capture(Model().eval(), IDS))
    assert [b.prefix for b in plan.blocks] == ["layers"] and not plan.blocks[0].mixed


def test_gemma2_sliding_and_full_layers_keep_their_pattern():
    """Gemma-2's layers are alike but read different masks (sliding, full): two kinds, period 2, so the grown
    config's per-layer list, reordered by the schedule, repeats the pattern."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=100,
                                       sliding_window=3)
    model = transformers.Gemma2ForCausalLM(config).eval()
    (b,) = make_plan(capture(model)).blocks
    assert b.mixed and b.alike and b.period == 2  # alike parameters, other masks
    grown = growir.grow(model, depth=2)
    assert grown.growir_record.exact
    assert grown.config.layer_types == ["sliding_attention", "full_attention"] * 2
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(grown(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def _deepseek(first_dense: int, layers: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=first_dense, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, vocab_size=100, n_group=1, topk_group=1)
    return transformers.DeepseekV3ForCausalLM(config).eval()


def test_first_k_dense_moe_grows_each_run_in_its_own_class():
    """DeepSeek-V3 ``[dense, moe, moe]`` x2: the config states runs by ``first_k_dense_replace``, found by the
    config search (the run's count 1 -> 2), never by name."""
    model = _deepseek(1, 3)
    grown = growir.grow(model, depth=2, materialize="hf")
    record = grown.growir_record
    assert type(grown).__name__ == "DeepseekV3ForCausalLM" and record.exact, record.reasons
    assert record.config_changes == {"num_hidden_layers": 6, "first_k_dense_replace": 2}
    assert "each run of one kind grown" in record.layers["model.layers"][2]
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(grown(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # training after growth finds the mixed stack, and the added blocks as identities
    assert find_blocks(grown).path == "model.layers" and identity_blocks(grown) == [1, 3, 5]


def test_nested_stages_of_one_block_each_grow_their_lists():
    """ConvNextV2: stages of other widths (a downsampling layer in each), each holding a block list, even of
    one block; depth x2 grows every stage's list and the config's per-stage ``depths`` follow."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextV2Config(num_stages=2, hidden_sizes=[16, 32], depths=[1, 2], image_size=32)
    model = transformers.ConvNextV2Model(config).eval()
    grown = growir.grow(model, depth=2, materialize="hf")
    record = grown.growir_record
    assert type(grown).__name__ == "ConvNextV2Model" and record.exact, record.reasons
    assert record.layers == {"encoder.stages.0.layers": (1, 2, "identity"),
                             "encoder.stages.1.layers": (2, 4, "identity")}
    assert grown.config.depths == [2, 4]
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(grown(pixels).last_hidden_state, model(pixels).last_hidden_state,
                               rtol=1e-5, atol=1e-5)


class Biased(nn.Module):
    """A pre-norm feed-forward block that reads a position bias; the first block makes it from its own table and
    hands it to every later block (T5's relative attention bias), so block 0 is a kind of its own."""

    def __init__(self, makes: bool):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.table = nn.Parameter(torch.randn(32)) if makes else None

    def forward(self, x, bias):
        if self.table is not None:
            bias = self.table[: x.shape[1]].unsqueeze(-1)
        return x + self.down(F.gelu(self.up(self.ln(x)) + bias)), bias


class BiasedStack(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.layers = nn.ModuleList(Biased(i == 0) for i in range(n))

    def forward(self, ids):
        x, bias = self.emb(ids), None
        for layer in self.layers:
            x, bias = layer(x, bias)
        return self.head(x)


def test_a_value_the_first_block_hands_to_all_is_no_second_stream():
    """Block 0 hands two values on: the stream, and a bias every later block reads. The stream is the one shaped
    like the last block's output; block 0 is its own kind, and each run grows by identities."""
    torch.manual_seed(0)
    model = BiasedStack(3).eval()
    (b,) = make_plan(capture(model, IDS)).blocks
    assert b.homogeneous and b.kinds == [0, 1, 1] and b.pre_norm, b.why_not
    assert [n.meta["val"].shape for n in b.chain_out] == [torch.Size([2, 7, D])] * 3
    assert b.writers_of(0) == b.writers_of(1) == ["down.bias", "down.weight"]
    grown = growir.grow(model, depth=2, example_inputs=IDS)
    assert grown.growir_record.exact, grown.growir_record.reasons
    ids = torch.randint(0, V, (3, 11))
    torch.testing.assert_close(grown(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_a_value_handed_out_of_the_list_stops_the_chain():
    """A second value read after the list (not only by later blocks) is a second stream: no copyable list."""
    class Leaky(BiasedStack):
        def forward(self, ids):
            x, bias = self.emb(ids), None
            for layer in self.layers:
                x, bias = layer(x, bias)
            return self.head(x) + bias.sum()

    (b,) = make_plan(capture(Leaky(2).eval(), IDS)).blocks
    assert not b.homogeneous and "layers.1" in b.why_not


def test_t5_block_0_holds_the_relative_bias_and_depth_keeps_it_first():
    """T5: only block 0 holds the relative attention bias and hands the bias to every block. Its run is kept
    (the config cannot state two blocks with the bias), the other run grows: the config search finds the layout
    and the layer counts, and the grown T5 computes the same function."""
    from zoo import example_inputs, make
    model = make("t5")
    grown = growir.grow(model, depth=2)
    record = grown.growir_record
    assert record.exact, record.reasons
    assert record.config_changes == {"num_layers": 4, "num_decoder_layers": 4}
    for prefix in ("encoder.block", "decoder.block"):
        assert record.layers[prefix] == (2, 4, "identity; the first run kept, the others grown: "
                                               "blocks 0 (1 -> 1), 1 (1 -> 3)")
    inputs = example_inputs("t5", seq=9, seed=1)
    torch.testing.assert_close(grown(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                               rtol=1e-4, atol=1e-5)
