"""Constants derived from sizes, grown with each model's own class (issue #11).

Gemma 1/2/3, mBART and Marian scale embeddings by sqrt(hidden) (Gemma2 also softcaps scores and logits with
tanh, and its norms are x̂·(1 + w)); Bloom, MPT and Falcon (alibi=True) add ALiBi slopes computed from the head count. A config
rebuilt at the new size recomputes those constants; growir must keep the function anyway.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import transformers as T

import growir
from growir.api import TOLERANCE
from zoo import randomize_norms

SMALL = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=4, bos_token_id=97, eos_token_id=98,
             pad_token_id=99)
GEMMA = dict(SMALL, hidden_size=32, intermediate_size=64, num_key_value_heads=4, head_dim=8)
SEQ2SEQ = dict(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, scale_embedding=True,
               max_position_embeddings=64, bos_token_id=97, eos_token_id=98, pad_token_id=99,
               decoder_start_token_id=99)

MODELS = {
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**dict(GEMMA, num_key_value_heads=2))),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**GEMMA, query_pre_attn_scalar=8, sliding_window=64)),
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**GEMMA, query_pre_attn_scalar=8, sliding_window=64)),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(**dict(SMALL, hidden_size=32, n_layer=2, n_head=4))),
    "mpt": lambda: T.MptForCausalLM(T.MptConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                                                expansion_ratio=2, pad_token_id=99)),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(**dict(SMALL, hidden_size=32), alibi=True,
                                                         multi_query=False)),
    "mbart": lambda: T.MBartForConditionalGeneration(T.MBartConfig(**SEQ2SEQ)),
    "marian": lambda: T.MarianMTModel(T.MarianConfig(**SEQ2SEQ)),
}


def make(name):
    torch.manual_seed(0)
    return randomize_norms(MODELS[name]().eval())


def inputs(model, seed):
    """Fresh ids with left padding in one row (ALiBi positions come from the mask)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        out["decoder_input_ids"] = torch.randint(3, 96, (2, 5), generator=gen)
    return out


def max_error(source, grown) -> float:
    """max|Δ| / max(1, max|y|) of the logits over two fresh batches, measured here, not by growir."""
    worst = 0.0
    with torch.no_grad():
        for seed in (1, 2):
            x = inputs(source, seed)
            y, z = source(**x).logits, grown(**x).logits
            worst = max(worst, ((z - y).abs().max() / max(1.0, y.abs().max())).item())
    return worst


def quiet_grow(source, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = growir.grow(source, **kw)
    assert not [w for w in caught if "growir" in str(w.message)], "an exact growth warns about nothing"
    return grown


@functools.lru_cache(maxsize=None)  # one growth per (model, spec) for all the checks on it
def grow_exact(name, **kw):
    source = make(name)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    grown = quiet_grow(source, **kw)
    assert type(grown) is type(source), "grown with the model's own class, not a GraphModule"
    assert grown.growir_record.exact
    assert max_error(source, grown) <= TOLERANCE
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in before.items()), "source untouched"
    return source, grown


@pytest.mark.parametrize("name", list(MODELS))
def test_width_two_with_own_class(name):
    source, grown = grow_exact(name, width=2.0)
    hidden = getattr(grown.config, "hidden_size", None) or grown.config.d_model
    assert hidden == 64


@pytest.mark.parametrize("name", ["gemma", "bloom"])
def test_width_and_depth_two_pre_norm(name):
    _, grown = grow_exact(name, width=2.0, depth=2)
    assert grown.config.num_hidden_layers == 4


@pytest.mark.parametrize("name", ["gemma", "mpt"])
def test_width_one_and_a_half(name):
    """Gemma: repeat-and-fill (pre-norm, RMS); MPT: six heads, whose slopes include the four old ones."""
    grow_exact(name, width=1.5)


def test_embedding_scale_is_the_rebuilt_one_and_absorbed():
    """The sqrt(hidden) constant becomes sqrt(64). With copies (fpi): the embedding carries 1/sqrt(2), and
    1 + w' = (1 + w)/sqrt(2) in the final norm before the tied head (two copies, times sqrt(2)). With the default
    (the old dimensions once and a zero fill): the residual stream is rescaled by sqrt(2) instead of changing eps,
    and the new sqrt(64) constant is that rescale, so the embedding's old columns are kept as they were; the
    norm sees the same mean of squares (eps kept) and 1 + w' = (1 + w)/sqrt(2) undoes the stream's sqrt(2)."""
    for method, embedding in (("fpi", 2 ** -0.5), ("auto", 1.0)):
        source, grown = grow_exact("gemma", width=2.0, width_method=method)
        assert float(grown.model.embed_tokens.embed_scale) == pytest.approx(64 ** 0.5)
        assert grown.config.rms_norm_eps == source.config.rms_norm_eps
        old, new = source.model.embed_tokens.weight, grown.model.embed_tokens.weight
        torch.testing.assert_close(new[:, :32], old * embedding)
        torch.testing.assert_close(1 + grown.model.norm.weight[:32], (1 + source.model.norm.weight) * 2 ** -0.5)
        assert method == "fpi" or new[:, 32:].abs().max() == 0


def test_alibi_heads_sit_at_their_slopes_and_new_heads_are_fresh():
    """Bloom 4 -> 8 heads: slopes 2^-2h become 2^-j, so old head h sits at position 2h+1 (0-based); the heads
    between have slopes no old head had, and the output projection reads zero from them."""
    source, grown = grow_exact("bloom", width=2.0)
    dense = grown.transformer.h[0].self_attention.dense.weight.reshape(64, 8, 8)
    fresh = [0, 2, 4, 6]
    assert torch.count_nonzero(dense[:, fresh]) == 0
    old = source.transformer.h[0].self_attention.dense.weight.reshape(32, 4, 8)
    torch.testing.assert_close(dense[:32, 1::2], old)


def test_alibi_as_a_graph_module_copies_slopes():
    """Without a config to rebuild, the slopes become a buffer grown like any producer: copies keep them."""
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make("bloom")

        def forward(self, ids, mask):
            return self.inner(input_ids=ids, attention_mask=mask, use_cache=False).logits

    source = Wrapped().eval()
    x = inputs(source.inner, 1)
    grown = quiet_grow(source, width=2.0, example_inputs=(x["input_ids"], x["attention_mask"]))
    assert isinstance(grown, torch.fx.GraphModule)
    x = inputs(source.inner, 2)
    with torch.no_grad():
        y, z = source(x["input_ids"], x["attention_mask"]), grown(x["input_ids"], x["attention_mask"])
    assert ((z - y).abs().max() / max(1.0, y.abs().max())).item() <= TOLERANCE


@pytest.mark.slow
def test_alibi_one_and_a_half_is_honest():
    """Bloom normalizes its embeddings (a post-norm step): x1.5 cannot be exact; it warns with the deviation."""
    with pytest.warns(UserWarning, match="measured deviation"):
        grown = growir.grow(make("bloom"), width=1.5)
    assert not grown.growir_record.exact and grown.config.n_head == 6


def test_buffers_made_from_parameters_are_the_classes_own():
    """I-BERT registers `weight_integer = zeros_like(weight)` at construction: built with its parameters on the
    meta device, that buffer is on meta too, and its value comes from the class built for real."""
    from transformers import IBertConfig, IBertForMaskedLM
    torch.manual_seed(0)
    source = IBertForMaskedLM(IBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=100, max_position_embeddings=40)).eval()
    grown = growir.grow(source, width=2.0, width_method="fpi")
    assert type(grown) is IBertForMaskedLM and grown.growir_record.exact
    assert not any(b.is_meta for b in grown.buffers())
    assert grown.ibert.encoder.layer[0].attention.self.query.weight_integer.shape == (64, 64)
