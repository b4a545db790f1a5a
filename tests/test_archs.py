"""Architectures beyond the zoo: mixture of experts with their own HF classes, grouped and depthwise convolution,
shifted windows (roll/flip), baddbmm attention with a symbolic repeat, einsum residual writers and blocks stored as
parallel lists. Each grows exactly (measured on fresh inputs) or stops with a clear GrowthError."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import growir
from zoo import VOCAB, randomize_norms

TOL = 1e-5
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)


def moe_models() -> dict:
    """Tiny mixture-of-experts decoders: 4 experts, top-2 routing."""
    return {
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(
            intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **SMALL)),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
            num_experts_per_tok=2, **SMALL)),
        "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, head_dim=8, num_experts=4, num_experts_per_tok=2,
            **SMALL)),
        "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(
            intermediate_size=64, num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=1, **SMALL)),
    }


def make_moe(name: str, experts_implementation: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = moe_models()[name]()
    if experts_implementation is not None:
        model.config._experts_implementation = experts_implementation
    return randomize_norms(model.eval())


def grow_quietly(model, **kw):
    """Grow and assert that growir warned about nothing (an exact growth has nothing to report)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = growir.grow(model, **kw)
    assert not [w for w in caught if "growir" in str(w.message)], [str(w.message) for w in caught]
    assert grown.growir_record.exact, grown.growir_record.reasons
    return grown


def assert_same(source, grown, inputs: list) -> None:
    for x in inputs:
        with torch.no_grad():
            a = source(*x) if isinstance(x, tuple) else source(**x)
            b = grown(*x) if isinstance(x, tuple) else grown(**x)
        a, b = (getattr(y, "logits", y) for y in (a, b))
        err = (a - b).abs().max().item()
        assert err <= TOL * max(1.0, a.abs().max().item()), err


def ids(batch: int, seq: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, VOCAB, (batch, seq), generator=gen)}


@pytest.mark.parametrize("name", list(moe_models()))
def test_moe_width_two_is_exact_with_experts_pinned(name):
    source = make_moe(name)
    grown = grow_quietly(source, width=2.0)
    assert type(grown) is type(source)
    assert_same(source, grown, [ids(2, 9, 1), ids(3, 5, 2)])
    src, new = source.state_dict(), grown.state_dict()
    experts = next(k for k in src if src[k].dim() == 3)  # the experts' fused weights: (E, out, in)
    assert new[experts].shape[0] == src[experts].shape[0]  # the number of experts never grows
    assert new[experts].shape[1:] == tuple(2 * n for n in src[experts].shape[1:])
    router = next(k for k in src if src[k].dim() == 2 and src[k].shape[0] == src[experts].shape[0])
    assert new[router].shape == (src[router].shape[0], 2 * src[router].shape[1])  # reads the residual, E rows
    # Qwen3-MoE's per-head q/k norms read the same config field as the residual norms: a halved
    # rms_norm_eps would move them by ~eps/var (under the numeric check's tolerance), so the config keeps it
    if name == "qwen3_moe":
        assert "rms_norm_eps" not in grown.growir_record.config_changes, grown.growir_record.config_changes


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_width_and_depth_identity_exact(name):
    source = make_moe(name)
    grown = grow_quietly(source, width=2.0, depth=2)
    (old, new, method), = grown.growir_record.layers.values()
    assert (old, new, method) == (2, 4, "identity")
    assert_same(source, grown, [ids(2, 9, 3)])


def test_moe_experts_as_gathered_weights_and_as_a_loop():
    """transformers' batched_mm experts gather per-token weights (``w[expert_ids]``): exact too; the eager loop
    over the experts hit is data-dependent, which torch.export cannot trace: a TraceError says so."""
    source = make_moe("mixtral", "batched_mm")
    assert_same(source, grow_quietly(source, width=2.0, depth=2), [ids(2, 9, 5)])
    with pytest.raises(growir.TraceError, match="data-dependent"):
        growir.grow(make_moe("mixtral", "eager"), width=2.0)


def test_moe_any_ratio_by_repeat_and_fill():
    source = make_moe("mixtral")
    grown = grow_quietly(source, width=1.5)
    assert_same(source, grown, [ids(2, 9, 4)])


# --- hand-written modules for the missing op rules -----------------------------------------------------------
class ConvNet(nn.Module):
    """A residual conv block: pointwise in, depthwise (or grouped) 3x3, pointwise out, pooled head."""

    def __init__(self, d=16, groups=None, mult=1):
        super().__init__()
        self.inp = nn.Conv2d(3, d, 1)
        self.mix = nn.Conv2d(d, d * mult, 3, padding=1, groups=groups or d)
        self.out = nn.Conv2d(d * mult, d, 1)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.out(F.gelu(self.mix(h)))
        return self.head(h.mean((2, 3)))


class Pooled(nn.Module):
    """Max and adaptive average pooling over spatial axes (the channels pass through)."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, d, 3, padding=1), nn.Conv2d(d, d, 1), nn.Linear(d, 5)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.a(x)), 2)
        return self.head(F.adaptive_avg_pool2d(self.b(h), 1).flatten(1))


class ShiftedWindows(nn.Module):
    """Swin-style cyclic shift and a flip, along spatial axes; ``.T`` on a weight."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.w, self.b = nn.Linear(d, d), nn.Parameter(torch.randn(d, d) / 4), nn.Linear(d, 4)

    def forward(self, x):
        h = torch.roll(self.a(x), shifts=(-1, -1), dims=(1, 2))
        return self.b(torch.flip(h, dims=[1]) @ self.w.T)


class BiasedAttention(nn.Module):
    """Positions repeated for a symbolic batch, scores by baddbmm over a bias, detach_ on the way out."""

    def __init__(self, d=16):
        super().__init__()
        self.emb, self.pos = nn.Embedding(50, d), nn.Embedding(32, d)
        self.q, self.k, self.v, self.o, self.head = (nn.Linear(d, 8), nn.Linear(d, 8), nn.Linear(d, d),
                                                     nn.Linear(d, d), nn.Linear(d, 4))

    def forward(self, ids):
        b, s = ids.shape
        h = self.emb(ids) + self.pos(torch.arange(s).unsqueeze(0).repeat(b, 1))
        scores = torch.baddbmm(torch.zeros(b, s, s), self.q(h), self.k(h).transpose(1, 2), alpha=8 ** -0.5)
        h = h + self.o(scores.softmax(-1) @ self.v(h))
        return self.head(h.detach_())


@pytest.mark.parametrize("model, shape", [
    (ConvNet(), (2, 3, 8, 8)), (ConvNet(mult=2), (2, 3, 8, 8)), (ConvNet(groups=4), (2, 3, 8, 8)),
    (Pooled(), (2, 3, 8, 8)), (ShiftedWindows(), (2, 4, 4, 16)), (BiasedAttention(), (2, 7))],
    ids=["depthwise", "depthwise_multiplier", "grouped", "pooling", "roll_flip_T", "baddbmm_repeat"])
@pytest.mark.parametrize("width", [2.0, 1.5])
def test_missing_op_rules_grow_exactly(model, shape, width):
    torch.manual_seed(1)
    make = (lambda s: torch.randint(0, 50, s)) if isinstance(model, BiasedAttention) else torch.randn
    grown = grow_quietly(model, example_inputs=(make(shape),), width=width)
    rec = grown.growir_record
    assert rec.params_after > rec.params_before
    other = (shape[0] + 1, *shape[1:2], *shape[2:]) if len(shape) > 2 else (3, 5)
    assert_same(model, grown, [(make(shape),), (make(other),)])


def test_depthwise_groups_literal_follows_the_channels():
    model = ConvNet()
    grown = grow_quietly(model, example_inputs=(torch.randn(2, 3, 8, 8),), width=2.0)
    convs = [n for n in grown.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    assert [n.args[6] for n in convs if len(n.args) > 6] == [32]


# --- depth: einsum/matmul residual writers, blocks as parallel lists ------------------------------------------
class EinsumBlock(nn.Module):
    """Pre-norm block whose projections are raw parameters used by einsum and matmul; with ``sandwich``, the
    FFN's output passes a LayerNorm before it joins the stream (zeroing that norm's weight and bias zeroes it)."""

    def __init__(self, d=32, heads=4, sandwich=False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.post = nn.LayerNorm(d) if sandwich else nn.Identity()
        self.wqkv = nn.Parameter(torch.randn(3, heads, d, d // heads) * 0.2)
        self.wo = nn.Parameter(torch.randn(heads, d // heads, d) * 0.2)
        self.w1, self.w2 = nn.Parameter(torch.randn(d, 2 * d) * 0.2), nn.Parameter(torch.randn(2 * d, d) * 0.2)

    def forward(self, x):
        q, k, v = torch.einsum("bsd,thde->tbhse", self.ln1(x), self.wqkv).unbind(0)
        x = x + torch.einsum("bhse,hed->bsd", F.scaled_dot_product_attention(q, k, v, is_causal=True), self.wo)
        return x + self.post(torch.matmul(F.gelu(self.ln2(x) @ self.w1), self.w2))


class Attention(nn.Module):
    def __init__(self, d, heads=4):
        super().__init__()
        self.qkv, self.o, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, d))


class Decoder(nn.Module):
    """Blocks either as one ModuleList of EinsumBlocks, or as parallel lists ln1[i], attn[i], ln2[i], mlp[i]."""

    def __init__(self, parallel: bool, d=32, layers=2, sandwich=False):
        super().__init__()
        self.emb, self.lnf, self.head = nn.Embedding(VOCAB, d), nn.LayerNorm(d), nn.Linear(d, VOCAB)
        self.parallel = parallel
        if parallel:
            self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
            self.attn = nn.ModuleList(Attention(d) for _ in range(layers))
            self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
            self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                     for _ in range(layers))
        else:
            self.blocks = nn.ModuleList(EinsumBlock(d, sandwich=sandwich) for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for i in range(len(self.attn if self.parallel else self.blocks)):
            if self.parallel:
                x = x + self.attn[i](self.ln1[i](x))
                x = x + self.mlp[i](self.ln2[i](x))
            else:
                x = self.blocks[i](x)
        return self.head(self.lnf(x))


@pytest.mark.parametrize("parallel, sandwich, width", [
    (False, False, 1.0), (False, False, 1.5), (True, False, 1.0), (True, False, 1.5), (False, True, 2.0)],
    ids=["einsum_writers", "einsum_writers_x1.5", "parallel_lists", "parallel_lists_x1.5", "sandwich_norm_x2"])
def test_identity_depth_found_from_the_graph(parallel, sandwich, width):
    torch.manual_seed(0)
    model = randomize_norms(Decoder(parallel, sandwich=sandwich).eval())
    x = torch.randint(0, VOCAB, (2, 7))
    grown = grow_quietly(model, example_inputs=(x,), width=width, depth=2)
    (old, new, method), = grown.growir_record.layers.values()
    assert (old, new, method) == (2, 4, "identity")
    per_block = {k for k in grown.state_dict() if ".3." in k}
    assert per_block and len(per_block) == len({k for k in model.state_dict() if ".1." in k})
    assert_same(model, grown, [(x,), (torch.randint(0, VOCAB, (3, 5)),)])


class MLPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Stage(nn.Module):
    def __init__(self, d, project: bool):
        super().__init__()
        self.project = nn.Linear(d, d) if project else None  # only some stages: the stages are no blocks
        self.blocks = nn.ModuleList(MLPBlock(d) for _ in range(2))

    def forward(self, x):
        x = self.project(x) if self.project is not None else x
        for b in self.blocks:
            x = b(x)
        return x


class Staged(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, 4)
        self.stages = nn.ModuleList([Stage(d, False), Stage(d, True)])

    def forward(self, ids):
        x = self.emb(ids)
        for s in self.stages:
            x = s(x)
        return self.head(x)


def test_block_lists_inside_stages_that_differ():
    torch.manual_seed(0)
    model = randomize_norms(Staged().eval())
    x = torch.randint(0, VOCAB, (2, 7))
    grown = grow_quietly(model, example_inputs=(x,), depth=2)
    assert grown.growir_record.layers == {"stages.0.blocks": (2, 4, "identity"), "stages.1.blocks": (2, 4, "identity")}
    assert_same(model, grown, [(x,)])


# --- one attention head; Swin (list-valued config fields) ----------------------------------------------------
def test_single_head_is_kept_with_a_warning_not_silently():
    """One head is a size-1 axis (no group): width=2 keeps it, exact, and says so."""
    torch.manual_seed(0)
    source = randomize_norms(T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
        vocab_size=VOCAB)).eval())
    with pytest.warns(UserWarning, match="single-head attention in `model.layers.0.self_attn`"):
        grown = growir.grow(source, width=2.0)
    assert type(grown) is type(source) and grown.growir_record.exact
    assert_same(source, grown, [ids(2, 9, 1)])


def test_swin_x2_is_exact_with_its_own_class():
    """Swin's per-stage head counts are a list in its config: each element is a field the rebuild may change
    (the relative position tables grow with the heads), and only the elements the grown shapes need change."""
    torch.manual_seed(0)
    source = randomize_norms(T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=5)).eval())
    grown = grow_quietly(source, width=2.0, example_inputs={"pixel_values": torch.randn(2, 3, 32, 32)})
    assert type(grown) is type(source)
    assert grown.growir_record.config_changes == {"embed_dim": 32, "num_heads": [4, 4]}
    assert_same(source, grown, [{"pixel_values": torch.randn(3, 3, 32, 32)}])
