"""Why repeat-and-fill is not exact (passes/fill.py ``_why_not``): every reason that holds, the post-norm theorem
first where it applies, and never where it does not (an embedding LayerNorm before pre-norm blocks); a norm module
applied at several places has its one weight scaled once."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import growir
from test_archs import assert_same, grow_quietly
from zoo import VOCAB, nudge, randomize_norms

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)
THEOREM = "feeds the residual stream (post-norm): no exact construction exists"
HEAD = "reads the output of `aten.gelu`"


def fill_reasons(model) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = growir.grow(model.eval(), width=1.5).growir_record
    return " ".join(r for r in record.reasons if r.startswith("repeat-and-fill"))


def test_a_post_norm_encoder_with_a_masked_lm_head_states_the_theorem_and_the_head():
    """BERT's blocks are post-norm (the theorem: no exact x1.5), and its masked-LM head's LayerNorm reads a GELU:
    both hold, and the theorem comes first, not the first other check met."""
    text = fill_reasons(T.BertForMaskedLM(T.BertConfig(**SIZES)))
    assert THEOREM in text and HEAD in text, text
    assert text.index(THEOREM) < text.index(HEAD)
    assert "channel by channel" not in text, text  # the head's dense adds its bias: no per-channel product
    with pytest.raises(growir.NotExactError, match="no exact construction exists"):
        growir.grow(T.BertForMaskedLM(T.BertConfig(**SIZES)).eval(), width=1.5, strict=True)


def test_an_embedding_norm_before_pre_norm_blocks_claims_no_theorem():
    """A pre-norm model whose embedding LayerNorm writes the stream (RoBERTa-PreLayerNorm): its input is a sum
    of embeddings, not a block's residual sum, so the post-norm theorem is not claimed; every fill obstacle is
    named instead (the first block's norm reads that LayerNorm, the head's LayerNorm reads a GELU)."""
    text = fill_reasons(T.RobertaPreLayerNormForMaskedLM(T.RobertaPreLayerNormConfig(**SIZES)))
    assert "no exact construction" not in text, text
    assert "reads the output of `aten.layer_norm`" in text and HEAD in text, text


class SharedNorm(nn.Module):
    """A pre-norm model whose one norm module (one weight) is applied at three places: before each branch and
    before the head."""

    def __init__(self, rms: bool = False, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, 5)
        self.up, self.down, self.up2, self.down2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 2 * d), \
            nn.Linear(2 * d, d)
        self.norm = nn.RMSNorm(d) if rms else nn.LayerNorm(d)
        nudge(self.norm)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        x = x + self.down2(F.gelu(self.up2(self.norm(x))))
        return self.head(self.norm(x))


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("width", [2.0, 1.5])
def test_a_norm_applied_at_three_places_has_its_weight_scaled_once(rms, width):
    """Repeat-and-fill scales a norm's weight by sqrt(n·d/d'): per tensor, not per call (three calls once scaled
    it three times, 0.45 off at x2)."""
    source = SharedNorm(rms).eval()
    grown = grow_quietly(source, width=width, example_inputs=(torch.randint(0, VOCAB, (2, 5)),))
    rule = grown.growir_record.rules["norm.weight"]
    assert len([n for n in rule.notes if n.startswith("repeat-and-fill")]) == 1, rule.notes
    assert math.isclose(rule.scale, math.sqrt(1 / width)), rule.scale  # one copy and a fill: sqrt(d/d')
    assert_same(source, grown, [(torch.randint(0, VOCAB, (2, 5)),), (torch.randint(0, VOCAB, (1, 9)),)])


class PostNormBlock(nn.Module):
    """A post-norm block whose one LayerNorm module follows both of its residual sums."""

    def __init__(self, d: int):
        super().__init__()
        self.up, self.down, self.up2, self.down2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 2 * d), \
            nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = self.norm(x + self.down(F.gelu(self.up(x))))
        return self.norm(x + self.down2(F.gelu(self.up2(x))))


class PostNormShared(nn.Module):
    """A post-norm encoder: summed embeddings, a LayerNorm after each residual sum."""

    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = nn.Embedding(VOCAB, d), nn.Parameter(0.1 * torch.randn(16, d))
        self.emb_norm, self.head = nn.LayerNorm(d), nn.Linear(d, 5)
        self.blocks = nn.ModuleList(PostNormBlock(d) for _ in range(2))

    def forward(self, idx):
        x = self.emb_norm(self.emb(idx) + self.pos[:idx.shape[1]])
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_auto_raises_a_shared_post_norm_weight_once():
    """``auto`` fills a post-norm stream with the norms' weights x sqrt(d'/d): once per tensor, so a norm applied
    after two sums gets sqrt(1.5), not 1.5."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = growir.grow(PostNormShared().eval(), width=1.5,
                             example_inputs=(torch.randint(0, VOCAB, (2, 5)),)).growir_record
    assert any("it is filled anyway" in r for r in record.reasons), record.reasons
    for name in ("blocks.0.norm.weight", "blocks.1.norm.weight", "emb_norm.weight"):
        assert math.isclose(record.rules[name].scale, math.sqrt(1.5)), (name, record.rules[name].scale)


class RMSStream(nn.Module):
    """An RMSNorm model in one of three shapes: ``post`` (x = norm(x + f(x)), the norm's output is the stream),
    ``sandwich`` (x = x + norm2(f(norm1(x))): a branch's output norm, Gemma 2/3, OLMo 2) and ``head`` (pre-norm
    blocks, then a head transform whose norm reads a GELU, as a masked-LM head's does)."""

    def __init__(self, shape: str, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.shape = shape
        self.emb, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, 5)
        self.up, self.down, self.dense = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, d)
        self.norm1, self.norm2, self.norm3 = nn.RMSNorm(d), nn.RMSNorm(d), nn.RMSNorm(d)
        for norm in (self.norm1, self.norm2, self.norm3):
            nudge(norm)

    def forward(self, idx):
        x = self.emb(idx)
        for _ in range(2):
            if self.shape == "post":
                x = self.norm1(x + self.down(F.gelu(self.up(x))))
            else:
                y = self.down(F.gelu(self.up(self.norm1(x))))
                x = x + (self.norm2(y) if self.shape == "sandwich" else y)
        if self.shape == "head":
            x = self.norm2(F.gelu(self.dense(self.norm3(x))))
        return self.head(self.norm3(x) if self.shape == "sandwich" else x)


@pytest.mark.parametrize("shape", ["post", "sandwich", "head"])
def test_an_rms_norm_anywhere_is_exact_at_any_ratio(shape):
    """An RMSNorm's fill is zero: zero in, zero out, whatever the norm's place (its output the stream, a branch's
    output added to it) and whatever elementwise op that keeps zero at zero feeds it (a GELU). The post-norm
    theorem is the mean fill's (LayerNorm); x1.5 is exact, eps kept by the stream's rescale where it can be."""
    source, inputs = RMSStream(shape).eval(), [(torch.randint(0, VOCAB, (2, 5)),), (torch.randint(0, VOCAB, (1, 9)),)]
    grown = grow_quietly(source, width=1.5, strict=True, example_inputs=inputs[0])
    assert_same(source, grown, inputs)


def test_keeps_zero_asks_the_op_itself():
    """An activation between a norm and its writers passes a zero fill only if f(0) = 0: the op is run on zeros."""
    from growir.analysis.norms import keeps_zero

    def node(fn, *args):
        g = torch.fx.symbolic_trace(lambda x: fn(x, *args)).graph
        return next(n for n in g.nodes if n.op == "call_function")

    assert keeps_zero(node(torch.ops.aten.gelu.default)) and keeps_zero(node(torch.ops.aten.tanh.default))
    assert not keeps_zero(node(torch.ops.aten.exp.default)) and not keeps_zero(node(torch.ops.aten.sigmoid.default))
    assert keeps_zero(node(torch.ops.aten.clamp.default, -1.0, 1.0))
    assert not keeps_zero(node(torch.ops.aten.clamp.default, 0.5))


def _rms_everywhere(kind: str):
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    if kind == "gemma3":  # sandwich norms (a branch's output norm added to the stream), weights as 1 + w
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**sizes, head_dim=8, sliding_window=4))
    return T.Olmo2ForCausalLM(T.Olmo2Config(**sizes))  # q/k norms over the whole projection, post-branch norms


@pytest.mark.parametrize("kind", ["gemma3", "olmo2"])
def test_rms_norms_off_the_pre_norm_place_grow_x1_5_exactly_in_their_own_class(kind):
    """The census's Gemma 3 and OLMo 2 (warned at x1.5): branch-output RMSNorms and q/k norms over every head
    are zero-filled; one `rms_norm_eps` holds every norm's eps, so where the stream's rescale would keep some
    and change others, every filled norm's eps is rewritten by the same ρ = 2/3 and the field holds it."""
    source = randomize_norms(_rms_everywhere(kind)).eval()
    grown = grow_quietly(source, width=1.5, strict=True)
    assert type(grown) is type(source)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a, b = source(x).logits, grown(x).logits
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    if kind == "olmo2":
        assert math.isclose(grown.config.rms_norm_eps, source.config.rms_norm_eps * 2 / 3, rel_tol=1e-6)


class PooledStream(nn.Module):
    """Pre-norm LayerNorm blocks whose stream is max-pooled over tokens after each (Hiera's query pooling)."""

    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Linear(3, d), nn.Linear(d, 5)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.ups, self.downs = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(2)), \
            nn.ModuleList(nn.Linear(2 * d, d) for _ in range(2))
        for norm in self.norms:
            nudge(norm)

    def forward(self, x):
        x = self.emb(x)
        for i in range(2):
            x = x + self.downs[i](F.gelu(self.ups[i](self.norms[i](x))))
            x = F.max_pool1d(x.transpose(1, 2), 3, 1, 1).transpose(1, 2)  # the largest of 3 tokens per channel
        return self.head(self.norms[2](x))


def test_a_max_pooled_stream_is_not_mean_filled():
    """The mean fill needs the stream's fill to be the mean of its channels where each LayerNorm reads it; a max
    over tokens of the mean is not the mean of the maxes. ``auto`` at x2 copies that stream (exact; the fill had
    moved Hiera's outputs by 1.0 while claiming exact), and x1.5 says why it is not exact."""
    source, x = PooledStream().eval(), torch.randn(2, 8, 3)
    grown = grow_quietly(source, width=2.0, example_inputs=(x,))
    assert_same(source, grown, [(x,), (torch.randn(3, 8, 3),)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = growir.grow(source, width=1.5, example_inputs=(x,)).growir_record
    assert not record.exact and any("not linearly" in r and "max_pool" in r for r in record.reasons), record.reasons


def test_eps_kept_after_every_eps_was_rewritten_rescales_the_stream_again():
    """Zamba2 (Mamba2 layers): one ``rms_norm_eps`` field, and the gated norms over the heads must change theirs,
    so every filled norm's eps is rewritten (no stream rescaled); when no config holds that either, eps is kept,
    and then the stream must be rescaled again, or the hidden fill is left uncompensated (x2: 0.008, said)."""
    cfg = T.Zamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8, intermediate_size=64,
                         layers_block_type=["mamba", "mamba"], chunk_size=16, max_position_embeddings=64,
                         attention_head_dim=8)
    torch.manual_seed(0)
    source = T.Zamba2ForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a note: Mamba2's one-head attention inside the scan stays one head
        grown = growir.grow(source, width=2.0, strict=True)
    assert grown.growir_record.exact and grown.growir_record.deviation <= 1e-5, grown.growir_record.reasons
    assert type(grown) is T.Zamba2ForCausalLM and grown.config.rms_norm_eps == cfg.rms_norm_eps
