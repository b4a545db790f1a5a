"""A reduction that keeps its reduced axis (``keepdim``) makes it size 1 in every output: the values and the indices
of ``max`` / ``min`` alike. The indices' axes were once made equal to the input's without that check, so a max over
an axis of size n with ``keepdim`` found "axes of sizes n and 1 equal" (attention sinks: gpt_oss, deepseek_v4;
a router's max: phimoe). Shown on a hand-made attention with sinks and a router that masks by its max."""

import torch
import torch.nn.functional as F
from torch import nn

from zoo import grow_block_lm


class SinkBlock(nn.Module):
    """Pre-norm attention with one learned sink logit per head (the softmax's extra column, dropped after it),
    stabilised by the max over keys and sink together; then an FFN whose units are gated by a max-based mask
    (``x >= x.max(-1, keepdim=True).values * 0.5``), which reads the max's indices too."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln1, self.ln2, self.heads = nn.LayerNorm(d), nn.LayerNorm(d), heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.sinks = nn.Parameter(torch.randn(heads))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, s, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        logits = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, 1)
        joined = torch.cat([logits, sinks], dim=-1)
        top = joined.max(dim=-1, keepdim=True)
        probs = F.softmax(joined - top.values, dim=-1)[..., :-1]
        probs = probs * (top.indices >= 0)  # the indices are used, so their axes are analysed
        x = x + self.o((probs @ v).transpose(1, 2).reshape(b, s, d))
        h = self.up(self.ln2(x))
        return x + self.down(F.gelu(h))


def test_a_max_with_keepdim_keeps_a_size_one_axis_in_values_and_indices():
    model, grown, x = grow_block_lm(SinkBlock, width=2.0)
    assert grown.growir_record.exact, grown.growir_record.reasons
    assert grown.get_parameter("blocks.0.sinks").shape == (8,)  # one sink per head, the heads doubled
    with torch.no_grad():
        a, b = model(x), grown(x)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
