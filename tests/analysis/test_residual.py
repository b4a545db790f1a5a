"""The residual stream's terms and readers (analysis/residual.terms_and_readers), for rescaling the stream: a
learned gain on the stream (``x = r ⊙ x + f(x)``) is no term, and a cast that reads only the stream's dtype
(``type_as(y, x)``) carries none of its values."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import growir
from growir.analysis.norms import norm_sites
from growir.analysis.residual import terms_and_readers
from test_archs import assert_same, grow_quietly, ids
from zoo import VOCAB


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Gained(nn.Module):
    """Doge's residual: each block scales the stream channel by channel before adding its branch."""

    def __init__(self, d=8, typed=False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb, self.up, self.down = nn.Embedding(VOCAB, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(d, generator=gen))
        self.w1, self.w2 = (nn.Parameter(1 + 0.3 * torch.randn(d, generator=gen)) for _ in range(2))
        self.head, self.typed = nn.Linear(d, 5), typed

    def norm(self, x, w):
        """Gemma's form when ``typed``: computed in float32, cast back to the stream's dtype by ``type_as``."""
        return (rms(x.float()) * (1.0 + w)).type_as(x) if self.typed else rms(x) * w

    def forward(self, idx):
        x = self.emb(idx)
        x = self.gain * x + self.down(F.gelu(self.up(self.norm(x, self.w1))))
        return self.head(self.norm(x, self.w2))


def terms_of(model):
    plan = growir.plan(model, example_inputs=(torch.randint(0, VOCAB, (2, 5)),))
    group = plan.by_role("hidden")[0]
    gm, facts = plan.captured.gm, plan.facts
    sites = [s for s in norm_sites(gm, facts) if group.root in facts.ag.leaf_roots(s.axis)]
    assert len(sites) == 2
    return terms_and_readers(gm, facts, group, sites)


@pytest.mark.parametrize("typed", [False, True])
def test_a_gain_on_the_stream_is_no_term(typed):
    """Rescaling the stream by c scales ``gain ⊙ x`` by c with the gain unchanged: the embedding and the branch's
    output projection are the terms, the gain is not (scaling it too would put c² on every later norm)."""
    found = terms_of(Gained(typed=typed).eval())
    assert found is not None
    terms, readers = found
    assert terms == {"emb.weight", "down.weight", "down.bias"} and not readers, found


@pytest.mark.parametrize("typed", [False, True])
def test_a_gained_stream_grows_any_ratio_exactly(typed):
    source = Gained(typed=typed).eval()
    x = torch.randint(0, VOCAB, (2, 5))
    grown = grow_quietly(source, width=1.5, example_inputs=(x,))
    notes = grown.growir_record.rules["emb.weight"].notes
    assert any("residual stream is rescaled" in n for n in notes), notes
    assert_same(source, grown, [(x,), (torch.randint(0, VOCAB, (3, 9)),)])


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_doge_grows_exactly_with_its_residual_gains(width):
    """Doge (``input_residual * residual + hidden_states``): every norm sees the rescaled stream, none a
    stream whose eps was silently changed (3e-4 before)."""
    torch.manual_seed(0)
    source = T.DogeForCausalLM(T.DogeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("_residual"):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    grown = grow_quietly(source, width=width)
    assert isinstance(grown, T.DogeForCausalLM)
    assert grown.config.rms_norm_eps == source.config.rms_norm_eps
    assert_same(source, grown, [ids(2, 9), ids(1, 13, seed=1)])


class Masked(nn.Module):
    """A pre-norm block whose projection reads the norm's output times a padding mask (as Mamba mixers do)."""

    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, 5)
        self.norm, self.final = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, idx, mask):
        x = self.emb(idx)
        x = x + self.down(F.gelu(self.up(self.norm(x) * mask.unsqueeze(-1))))
        return self.head(self.final(x))


def test_a_reader_of_a_masked_norm_output_keeps_the_stream_rescalable():
    """The mask leaves the norm's output unscaled: ``up`` reads no stream, so the stream is rescaled (eps kept)."""
    source = Masked().eval()
    inputs = (torch.randint(0, VOCAB, (2, 5)), torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2]))
    grown = grow_quietly(source, width=1.5, example_inputs=inputs, strict=True)
    notes = grown.growir_record.rules["emb.weight"].notes
    assert any("residual stream is rescaled" in n for n in notes), notes
    assert (grown(*inputs) - source(*inputs)).abs().max() < 1e-5
