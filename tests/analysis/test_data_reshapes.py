"""Width groups do not depend on how the data's axes are regrouped. Two mechanisms, each on a tiny model that the
analysis refused before (``growir/ir/axes.py``):

- a chunked scan whose chunk is longer than the traced sequence: the export holds one chunk, as a literal 1 beside
  the symbolic chunk count (linear attention, gated delta nets, Zamba2's Mamba2 layers with chunks of 64 or 256);
- a Transformer-XL relative shift: scores for every relative distance, (seq, 2·seq) viewed as (2·seq, seq), a row
  sliced off and viewed back (Funnel's relative attention; with a static sequence the slice cuts an axis that a
  reshape made a product). The sequence axes there are related to nothing; heads and head_dim still grow.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import growir
from zoo import ChunkedSum

CHUNK, HEADS, SEQ = 64, 4, 8


class RelShift(nn.Module):
    """Self-attention with relative-position scores shifted into place (Transformer-XL); ``fixed``: the position
    table fits one sequence length, so the export is static in the sequence."""

    def __init__(self, fixed: bool):
        super().__init__()
        self.fixed, d = fixed, 16
        self.emb, self.norm = nn.Embedding(50, d), nn.LayerNorm(d)
        self.qkv, self.rel, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 50)
        self.pos = nn.Parameter(torch.randn(2 * SEQ, d))

    def forward(self, ids):
        x = self.emb(ids)
        b, s, d = x.shape
        if self.fixed and s != SEQ:
            raise ValueError(f"this model takes {SEQ} tokens")
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        r = self.rel(self.pos[:2 * s]).view(2 * s, HEADS, d // HEADS).transpose(0, 1)
        pos = (q @ r.transpose(-1, -2)).reshape(b, HEADS, 2 * s, s)[:, :, 1:].reshape(b, HEADS, s, 2 * s - 1)
        att = ((q @ k.transpose(-1, -2) + pos[..., :s]) / math.sqrt(d // HEADS)).softmax(-1)
        return self.head(x + self.out((att @ v).transpose(1, 2).reshape(b, s, d)))


def test_a_chunk_longer_than_the_traced_sequence_grows_exactly():
    torch.manual_seed(0)
    model = ChunkedSum(CHUNK, carry=True).eval()
    big = growir.grow(model, width=2.0, example_inputs=(torch.randint(0, 50, (2, 7)),))
    assert big.growir_record.exact, big.growir_record.reasons
    assert big.state_dict()["up.weight"].shape == (48, 32)
    for seq in (5, 8, 30):  # the lengths the traced graph runs (one chunk)
        ids = torch.randint(0, 50, (3, seq))
        torch.testing.assert_close(big(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "static"])
def test_a_relative_shift_grows_exactly_with_its_heads(fixed):
    torch.manual_seed(0)
    model = RelShift(fixed).eval()
    example = (torch.randint(0, 50, (2, SEQ)),)
    plan = growir.plan(model, example_inputs=example)
    assert {g.role: g.size for g in plan.groups if g.role in ("heads", "head_dim")} == {"heads": 4, "head_dim": 4}
    assert not any(g.pinned for g in plan.groups if g.role)
    big = growir.grow(model, width=2.0, example_inputs=example)
    assert big.growir_record.exact, big.growir_record.reasons
    assert big.state_dict()["qkv.weight"].shape == (96, 32)  # 8 heads of 4
    for seq in (SEQ,) if fixed else (3, 5, SEQ):  # the position table holds 8 tokens
        ids = torch.randint(0, 50, (3, seq))
        torch.testing.assert_close(big(ids), model(ids), rtol=1e-5, atol=1e-5)
