"""einsum with an ellipsis (``...d,de->...e``): the ellipsis is written out with letters of its own and
broadcast against the output, so a model that writes its projections that way grows like one written out."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo import VOCAB, grow_block_lm


class EllipsisBlock(nn.Module):
    """Pre-norm block whose every projection is an einsum with an ellipsis (a broadcast 1 in the bias too)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln1, self.ln2, self.heads = nn.LayerNorm(d), nn.LayerNorm(d), heads
        self.wqkv = nn.Parameter(torch.randn(d, 3, heads, d // heads) * 0.2)
        self.wo = nn.Parameter(torch.randn(heads, d // heads, d) * 0.2)
        self.w1, self.w2 = nn.Parameter(torch.randn(d, 2 * d) * 0.2), nn.Parameter(torch.randn(2 * d, d) * 0.2)
        self.b1 = nn.Parameter(torch.randn(1, 2 * d) * 0.2)

    def forward(self, x):
        q, k, v = torch.einsum("...d,dthe->t...he", self.ln1(x), self.wqkv).transpose(-2, -3).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + torch.einsum("...hse,hed->...sd", y, self.wo)
        h = F.gelu(torch.einsum("...d,df->...f", self.ln2(x), self.w1) + torch.einsum("...f->...f", self.b1))
        return x + torch.einsum("...f,fd", h, self.w2)


def test_einsum_with_an_ellipsis_grows_exactly():
    model, grown, x = grow_block_lm(EllipsisBlock, width=2.0, depth=2)
    assert grown.growir_record.exact
    assert grown.growir_record.deviation <= 1e-5
    assert grown.get_parameter("blocks.0.w1").shape == (64, 128)
    fresh = torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        a, b = model(fresh), grown(fresh)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
