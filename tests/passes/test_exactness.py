"""A tied head (passes/exactness.py ``compensate_tied``): the norm before it is divided by the copy count once per
tensor, however many places apply that norm before the head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_archs import assert_same, grow_quietly
from zoo import VOCAB, nudge


class TiedTwoStreams(nn.Module):
    """A pre-norm block, and one final LayerNorm applied to two streams (before and after the block), each read by
    the head tied to the embedding."""

    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.norm, self.final = nn.Embedding(VOCAB, d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        nudge(self.final)

    def forward(self, idx):
        x = self.emb(idx)
        y = x + self.down(F.gelu(self.up(self.norm(x))))
        return F.linear(self.final(x), self.emb.weight) + F.linear(self.final(y), self.emb.weight)


@pytest.mark.parametrize("width", [2.0, 1.5])
def test_a_norm_before_a_tied_head_at_two_places_is_divided_once(width):
    source = TiedTwoStreams().eval()
    grown = grow_quietly(source, width=width, example_inputs=(torch.randint(0, VOCAB, (2, 5)),))
    notes = grown.growir_record.rules["final.weight"].notes
    assert len([n for n in notes if "tied head" in n]) == 1, notes
    assert math.isclose(grown.growir_record.rules["final.bias"].scale, math.sqrt(1 / width))
    assert_same(source, grown, [(torch.randint(0, VOCAB, (2, 5)),), (torch.randint(0, VOCAB, (1, 9)),)])
