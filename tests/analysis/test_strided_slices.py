"""A strided slice over a whole axis, ``x[..., j::k]``, keeps entries i·k + j: the axis is the product (m, k) and the
slice its outer m, so m grows with whatever it meets and k (the pair) is pinned. Interleaved rotary pairs are read
this way (``q[..., 0::2]``, ``q[..., 1::2]``: glm_moe_dsa's and mistral_large4's indexers), where the slice once
read as an opaque index left m unrelated to the rotary table it multiplies, and the grown model failed to run."""

import torch
import torch.nn.functional as F
from torch import nn

from zoo import grow_block_lm


class PairGLU(nn.Module):
    """An FFN whose up projection writes interleaved (value, gate) pairs, read back by strided slices, each pair's
    product scaled by a per-unit table (a buffer, as a rotary table is)."""

    def __init__(self, d=32, units=48):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * units), nn.Linear(units, d)
        self.register_buffer("table", torch.rand(units) + 0.5)

    def forward(self, x):
        h = self.up(self.ln(x))
        value, gate = h[..., 0::2], h[..., 1::2]
        return x + self.down(value * F.silu(gate) * self.table)


def test_a_strided_slice_grows_its_pairs_whole():
    model, grown, x = grow_block_lm(PairGLU, width=2.0)
    assert grown.growir_record.exact, grown.growir_record.reasons
    assert grown.get_parameter("blocks.0.up.weight").shape == (192, 64)  # 96 pairs, each written whole
    assert grown.get_buffer("blocks.0.table").shape == (96,)
    with torch.no_grad():
        a, b = model(x), grown(x)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
