"""Image patches (``F.unfold`` / ``F.fold``: aten.im2col / col2im) and group norms, as MobileViTV2 uses them: the
patches' channel axis is the product (channels, kernel entries), channel-major, so the channels grow through it;
a group norm reads its channels as a norm per group (exact under uniform copies), or, with one channel per
group, is a map per channel whose ``num_groups`` literal grows with them. col2im was refused (its meta kernel
rejects the probe's prime sizes) and im2col's derived rule pinned the channels."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growir


class Patches(nn.Module):
    """A convolution, then its 2x2 patches normalised per channel group, mixed across channels by a 1x1
    convolution on (B, C, K, L) and folded back onto the image as a residual term."""

    def __init__(self, c=8, groups=1, classes=5):
        super().__init__()
        self.c = c
        self.conv_in, self.gn = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.mix, self.head = nn.Conv2d(c, c, 1), nn.Linear(c, classes)
        nn.init.uniform_(self.gn.weight, 0.5, 1.5), nn.init.uniform_(self.gn.bias, -0.5, 0.5)

    def forward(self, x):
        h = self.conv_in(x)
        b = h.shape[0]
        p = F.unfold(h, kernel_size=2, stride=2).reshape(b, self.c, 4, -1)
        p = self.mix(F.gelu(self.gn(p)))
        h = h + F.fold(p.reshape(b, self.c * 4, -1), output_size=h.shape[-2:], kernel_size=2, stride=2)
        return self.head(h.mean((-2, -1)))


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_patches_and_group_norms_grow_their_channels_exactly(groups):
    torch.manual_seed(0)
    model, x = Patches(groups=groups).eval(), torch.randn(2, 3, 8, 8)
    grown = growir.grow(model, example_inputs=(x,), width=2.0)
    assert grown.growir_record.exact, grown.growir_record.reasons
    assert grown.get_parameter("mix.weight").shape == (16, 16, 1, 1)
    assert grown.get_parameter("gn.weight").shape == (16,)
    with torch.no_grad():
        a, b = model(x), grown(x)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5


def test_uneven_copies_under_a_group_norm_are_reported():
    torch.manual_seed(0)
    model, x = Patches(groups=1).eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="group_norm"):
        grown = growir.grow(model, example_inputs=(x,), width=1.5)
    assert not grown.growir_record.exact
    assert any("norm(s) average over" in r and "group_norm" in r for r in grown.growir_record.reasons)
