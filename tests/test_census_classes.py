"""Regressions from the census (``benchmarks/census.py``): each test is the smallest model that showed one class
of refusal or crash that was a growir bug, fixed by mechanism. Each grows exactly or stops with a named reason."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import growir
from zoo import randomize_norms

TOL = 1e-5


class Scaled(nn.Module):
    """A residual MLP whose hidden units are divided by a tensor made in ``forward`` (a lifted constant), and
    whose output is masked by a mask written in ``forward`` (``mask[:, 0] = 0`` lifts the 0 as a constant)."""

    def __init__(self, d: int = 8, ffn: int = 16):
        super().__init__()
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        mask = torch.ones(x.shape[:2])
        mask[:, 0] = 0
        h = torch.relu(self.up(x) / torch.tensor(2.0))
        return x + self.down(h) * mask[..., None]


def test_lifted_constants_are_graph_constants_not_missing_buffers():
    """torch.export lifts tensors made in forward as ``lifted_tensor_N`` attributes, not buffers: the scalar
    scale was looked up as a buffer (AttributeError, deberta, t5gemma) and the written mask's 0 had a rule but no
    source tensor (KeyError, imagegpt, kimi_k25, vit_mae)."""
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(), Scaled()).eval()
    x = torch.randn(2, 5, 8)
    grown = growir.grow(model, width=2.0, example_inputs=(x,))
    assert grown.growir_record.exact and grown.growir_record.deviation <= TOL
    assert any("lifted_tensor" in n for n, _ in grown.named_buffers())
    with torch.no_grad():
        assert torch.allclose(model(x), grown(x), atol=TOL)


class Stack(nn.Module):
    """Blocks that each make their own constants: torch numbers them across the model, growir per module."""

    def __init__(self, n: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Scaled() for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_lifted_constants_have_the_same_names_in_every_block():
    """Depth growth copies a block's tensors by their names inside the block: ``lifted_tensor_2`` in block 1 was
    not block 0's ``lifted_tensor_0`` (deberta refused depth, imagegpt crashed with a KeyError)."""
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(2, 5, 8)
    grown = growir.grow(model, width=2.0, depth=2, example_inputs=(x,))
    assert grown.growir_record.exact and grown.growir_record.deviation <= TOL
    assert grown.get_parameter("blocks.3.up.weight").shape == (32, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), grown(x), atol=TOL)


def test_random_masking_and_a_repeat_by_the_width_grow_exactly():
    """ViTMAE draws a random patch mask in forward and gathers the kept patches with an index repeated to the
    hidden width (``ids.unsqueeze(-1).repeat(1, 1, hidden)``): the repeat's literal follows the width, and both
    models are measured on the same random draws."""
    torch.manual_seed(0)
    cfg = T.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                         decoder_num_attention_heads=4, decoder_intermediate_size=64)
    model = randomize_norms(T.ViTMAEModel(cfg).eval())
    grown = growir.grow(model, width=2.0)
    assert grown.growir_record.exact and grown.growir_record.deviation <= TOL
    assert type(grown) is T.ViTMAEModel and grown.config.hidden_size == 64


def test_unread_tensors_take_the_rebuilt_class_init():
    """A causal LM's cross-attention is never read (no encoder states): no group reaches it, so it kept its old
    shapes and no config fitted (bart, marian, trocr, layoutlm's pooler, visual_bert's visual embeddings). The
    rebuilt class initialises it at its own shape, and the record says so."""
    torch.manual_seed(0)
    cfg = T.MBartConfig(d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
                       encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64, vocab_size=100,
                       max_position_embeddings=64)
    model = randomize_norms(T.MBartForCausalLM(cfg).eval())
    grown = growir.grow(model, width=2.0)
    assert type(grown) is T.MBartForCausalLM  # exact or not is the width method's (post-norm residual)
    cross = grown.model.decoder.layers[0].encoder_attn.k_proj.weight
    assert cross.shape == (64, 64) and 0.01 < float(cross.detach().std()) < 0.03  # the class's normal(0, 0.02)
    assert any("never reads" in n and "own initialisation" in n for n in grown.growir_record.notes)


def test_unread_tensors_are_kept_in_a_graph_module_and_said():
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(), Scaled()).eval()
    model[1].spare = nn.Linear(8, 16)  # registered, never called
    grown = growir.grow(model, width=2.0, example_inputs=(torch.randn(2, 5, 8),))
    assert grown.get_parameter("1.spare.weight").shape == (16, 8)
    assert any("never reads" in n and "`1.spare.bias`" in n for n in grown.growir_record.notes)


class Sinusoidal(nn.Module):
    """A scaled embedding plus a sinusoidal position table held as a buffer (nllb-moe, m2m100, marian), pre-norm
    blocks, a final norm and a head."""

    def __init__(self, vocab=50, d=16, ffn=32, layers=2, max_len=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        pos = torch.arange(max_len)[:, None] * torch.exp(-math.log(1e4) * torch.arange(0, d, 2) / d)
        self.register_buffer("table", torch.cat([pos.sin(), pos.cos()], -1), persistent=False)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ups = nn.ModuleList(nn.Linear(d, ffn) for _ in range(layers))
        self.downs = nn.ModuleList(nn.Linear(ffn, d) for _ in range(layers))
        self.out_norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx) * math.sqrt(self.emb.embedding_dim) + self.table[: idx.shape[1]]
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            x = x + down(torch.relu(up(norm(x))))
        return self.head(self.out_norm(x))


def test_a_table_added_to_a_rescaled_stream_is_rescaled_with_it():
    """Repeat-and-fill keeps the norms' eps by multiplying every term of the residual stream by c: the position
    table, a buffer, is a term too. It was left out, and nllb-moe's "exact" growth moved by 0.113."""
    torch.manual_seed(0)
    model, idx = randomize_norms(Sinusoidal()).eval(), torch.randint(0, 50, (2, 7))
    grown = growir.grow(model, width=2.0, example_inputs=(idx,))
    record = grown.growir_record
    assert record.exact and record.deviation <= TOL, record
    assert any("residual stream is rescaled" in n for n in record.rules["table"].notes)


class Masked(nn.Module):
    """Token embeddings picked by a boolean mask over (batch, sequence) (higgs_audio_v2's audio tokens): the mask
    indexes two axes into one of data-dependent size."""

    def __init__(self, vocab=20, d=8, ffn=16):
        super().__init__()
        self.emb, self.up, self.down, self.head = (nn.Embedding(vocab, d), nn.Linear(d, ffn), nn.Linear(ffn, d),
                                                   nn.Linear(d, vocab))

    def forward(self, ids):
        x = self.emb(ids)
        picked = x[(ids == 1) | (ids == 6)]
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x), picked.sum(0)


def test_a_boolean_mask_index_covers_as_many_axes_as_it_has():
    torch.manual_seed(0)
    model, ids = Masked().eval(), torch.randint(0, 20, (2, 9))
    ids[0, 0] = 1
    grown = growir.grow(model, width=2.0, example_inputs=(ids,))
    assert grown.growir_record.exact and grown.get_parameter("up.weight").shape == (32, 16)


def test_a_projected_tied_embedding_grows_exactly_as_fresh_units():
    """OPT with ``word_embed_proj_dim`` != ``hidden_size``: the embedding (tied to the head) lives on the projection
    width, which no norm reads, so ``auto`` gives it fresh units: random where it is written, zero where it is
    read. The tied tensor is both, so it takes zero (the head reads 0 there); it had taken random draws, and the
    logits moved by 0.24 while growir claimed exact (and at x1.5 refused the uneven copies of the tie)."""
    cfg = T.OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                      word_embed_proj_dim=48, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    source = T.OPTForCausalLM(cfg).eval()
    x = torch.randint(2, 99, (2, 9))
    for width in (2.0, 1.5):
        grown = growir.grow(source, width=width, strict=True)
        assert type(grown) is T.OPTForCausalLM and grown.config.word_embed_proj_dim == int(48 * width)
        assert grown.growir_record.exact and grown.growir_record.deviation <= TOL
        with torch.no_grad():
            assert (source(x).logits - grown(x).logits).abs().max() <= TOL * max(1.0, source(x).logits.abs().max())
        new = grown.lm_head.weight[:, 48:]
        assert new.abs().max() == 0  # the head reads zeros at the fresh units


class ScaledHead(nn.Module):
    """A pre-norm stack whose final norm's output is scaled by a constant before a tied head (MiniCPM's
    ``hidden / (hidden_size / dim_model_base)``)."""

    def __init__(self, d: int = 8, vocab: int = 20):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.up, self.down, self.norm = nn.Embedding(vocab, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d), \
            nn.LayerNorm(d)
        self.ln = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.down(torch.relu(self.up(self.ln(x))))
        return F.linear(self.norm(x) / 4.0, self.emb.weight)


def test_the_norm_before_a_tied_head_is_found_past_a_constant_scale():
    """x2 copies the tied width: the logits double unless the final norm is halved. A constant scale between the
    norm and the head is linear: the norm is still the one to divide (it had said "no norm feeds the head")."""
    source = ScaledHead().eval()
    x = torch.randint(0, 20, (2, 5))
    grown = growir.grow(source, width=2.0, width_method="fpi", strict=True, example_inputs=(x,))
    assert grown.growir_record.exact and any("tied head" in n for n in grown.growir_record.rules["norm.weight"].notes)
    with torch.no_grad():
        assert torch.allclose(source(x), grown(x), atol=TOL)


class LoopedExperts(nn.Module):
    """Experts stored as one stacked weight and run in a Python loop, each ``F.linear(x, weight[i])`` (JetMoE's
    ParallelExperts), inside a pre-norm residual block."""

    def __init__(self, d: int = 8, ffn: int = 16, experts: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Parameter(torch.randn(experts, ffn, d) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, d, ffn) / ffn ** 0.5)

    def forward(self, x):
        h = self.norm(x)
        return x + sum(F.linear(torch.relu(F.linear(h, self.up[i])), self.down[i]) for i in range(self.up.shape[0]))


def test_one_selected_expert_weight_is_a_parameter_operand():
    """``weight[i]`` (a select with a literal index) of a parameter is that parameter: the contraction is a
    consumer's, not a product of two activations, so the experts' width is no head_dim and x2 grows it (JetMoE's
    hidden width had been taken for a head_dim: it grew nothing and was counted exact)."""
    source = nn.Sequential(LoopedExperts(), LoopedExperts()).eval()
    x = torch.randn(2, 5, 8)
    grown = growir.grow(source, width=2.0, example_inputs=(x,))
    assert grown.growir_record.exact and grown.growir_record.deviation <= TOL
    # the input's width is pinned (a model input), the experts' width grows
    assert grown.state_dict()["0.up"].shape == (2, 32, 8) and grown.state_dict()["0.down"].shape == (2, 8, 32)
    with torch.no_grad():
        assert torch.allclose(source(x), grown(x), atol=TOL)
