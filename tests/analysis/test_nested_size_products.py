"""A size computed as a product of products: hiera's unroll views its tokens with ``[mul_1, 7, 2, 7, 2, C]``
where ``mul_1 = (batch * 4) * 4``. Each literal factor is rewritten to what it covers of the grown axis, not to
the whole axis's static size (which made the batch 16 times too large after any width growth)."""

import torch
from torch import nn

import growir


class Unroll(nn.Module):
    """Tokens regrouped twice into the batch axis (each regrouping's batch size a product of the previous one),
    an MLP on the channels, then back."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.up, self.down = nn.Linear(3, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, pixels):  # (batch, 8, 3): a static token count, as an image's patches
        x = self.inp(pixels)
        b, s, d = x.shape
        n = b  # hiera's unroll: the batch size kept as a running product, one factor per regrouping
        x = x.view(n, 4, 2, d).transpose(1, 2).flatten(0, 1)
        n = n * 2
        x = x.view(n, 2, 2, d).transpose(1, 2).flatten(0, 1)
        n = n * 2  # (b * 2) * 2: a product of a product
        x = x.view(n, 2, d)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x.reshape(b, s, d))


def test_each_literal_of_a_nested_size_product_keeps_its_own_factor():
    torch.manual_seed(0)
    model = Unroll().eval()
    grown = growir.grow(model, example_inputs=(torch.randn(3, 8, 3),), width=2.0)
    assert grown.growir_record.exact
    fresh = torch.randn(5, 8, 3)
    with torch.no_grad():
        a, b = model(fresh), grown(fresh)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
