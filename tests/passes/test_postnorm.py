"""``width_method="fill"`` on a post-norm residual that only a head reads (BERT with its masked-LM head).

No exact growth of a post-norm residual brings new directions (docs/methods.md, "Copies that must stay
copies"), and copies train as one. ``fill`` (asked for; ``auto`` keeps the exact copies) therefore fills such
a residual like a pre-norm one (the old units
once, the LayerNorm's mean at the fill, random reader columns there) and reports the measured deviation: the
post-norm output's mean at the fill, ``mean((γ - mean γ) ⊙ x̂) + mean(β)``, small where γ is near uniform.
``strict=True`` keeps the exact copies, and so does a model that returns the residual (its hidden states).
``auto`` (the default) fills it too but does not compensate the norms: eps kept and the weights x sqrt(d'/d), so
the stream's old units grow by d'/d; not exact by choice (it trains best on the masked-LM encoder: docs/savings.md),
warned and measured.
"""

from __future__ import annotations

import warnings

import torch
from transformers import BertForMaskedLM

import growir
from zoo import make


def masked_lm(spread: float = 0.05):
    """The zoo's BERT with its masked-LM head and LayerNorm weights ``1 ± spread``, biases ``± spread / 4``."""
    model = BertForMaskedLM(make("bert").config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + spread * torch.randn(p.shape) / (
                    1 if name.endswith("weight") else 4))
    return model


def grow(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return growir.grow(model, **kw).growir_record


def hidden(rec) -> str:
    return rec.filled[next(label for label in rec.filled if label.endswith(":hidden"))]


def test_fill_fills_a_post_norm_residual_and_says_it_is_not_exact():
    rec = grow(masked_lm(), width=2.0, width_method="fill")
    assert hidden(rec) == "mean" and "random" in rec.filled.values()
    assert not rec.exact and any("post-norm" in r and "filled anyway" in r for r in rec.reasons)
    assert 1e-5 < rec.deviation < 0.1, rec.deviation


def test_at_a_ratio_that_is_not_whole_the_fill_deviates_less_than_copies():
    """At ×1.5 nothing is exact; balanced copies change the LayerNorm's statistics (the old default), the fill
    only its mean at the fill."""
    fill, copies = (grow(masked_lm(), width=1.5, width_method=m) for m in ("fill", "fpi"))
    assert hidden(fill) == "mean" and not fill.exact and not copies.exact
    assert fill.deviation < copies.deviation / 3, (fill.deviation, copies.deviation)


def test_strict_and_returned_hidden_states_keep_the_exact_copies():
    for rec in (grow(masked_lm(), width=2.0, strict=True),
                grow(masked_lm(), width=2.0, width_method="fill", strict=True),
                grow(make("bert"), width=2.0), grow(make("bert"), width=2.0, width_method="fill")):
        assert rec.exact and rec.deviation < 1e-6 and hidden(rec).startswith("copies (")


def test_auto_fills_a_post_norm_residual_raising_the_norm_weights_and_warns():
    """The default: the fill's norms keep eps and their weights grow by sqrt(2) at x2, so each LayerNorm sees the
    fill's lower variance (x sqrt(2)) and the stream's old units come out 2 times larger; not exact, warned,
    measured."""
    src = masked_lm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        big = growir.grow(src, width=2.0)
    rec = big.growir_record
    assert hidden(rec) == "mean" and not rec.exact and any("weights grow by sqrt(d'/d)" in r for r in rec.reasons)
    assert 0.01 < rec.deviation < 2.0, rec.deviation
    assert any("not function-preserving" in str(w.message) for w in caught)
    ln, ln0 = big.bert.embeddings.LayerNorm, src.bert.embeddings.LayerNorm
    assert torch.allclose(ln.weight[:32], ln0.weight * 2 ** 0.5) and ln.eps == ln0.eps
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old, new = src.bert.embeddings(ids), big.eval().bert.embeddings(ids)
    assert torch.allclose(new[..., :32] - ln0.bias, (old - ln0.bias) * 2, atol=1e-4)


def test_auto_at_a_ratio_that_is_not_whole_raises_the_norm_weights_by_the_ratio():
    """At x1.5 no growth is exact either; the weights grow by sqrt(1.5) (eps kept), so the stream's old units come
    out 1.5 times larger: measured to train best there (docs/savings.md, encoder-x1.5). The record says so."""
    src = masked_lm()
    rec = grow(src, width=1.5)
    assert hidden(rec) == "mean" and not rec.exact and 0.01 < rec.deviation < 2.0, rec.deviation
    assert any("weights grow by sqrt(d'/d)" in r for r in rec.reasons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = growir.grow(src, width=1.5).eval()
    ln, ln0 = big.bert.embeddings.LayerNorm, src.bert.embeddings.LayerNorm
    assert torch.allclose(ln.weight[:32], ln0.weight * 1.5 ** 0.5) and ln.eps == ln0.eps
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old, new = src.bert.embeddings(ids), big.bert.embeddings(ids)
    assert torch.allclose(new[..., :32] - ln0.bias, (old - ln0.bias) * 1.5, atol=1e-4)


def test_pre_norm_models_are_unchanged():
    rec = grow(make("llama"), width=2.0)
    assert rec.exact and hidden(rec) == "zero"
