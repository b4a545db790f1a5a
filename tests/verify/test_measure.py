"""The self-measure (verify/measure.py): a forward that branches on its inputs' values is exported along the
example's branch; where the source then differs from its own export at the second shape, the growth says so
(``export_gap``) instead of blaming itself with a PreservationError."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import growir
from growir.verify.compare import TOLERANCE
from zoo import VOCAB


class Branches(nn.Module):
    """Masks padded positions, except that an all-ones mask takes another path outside an export (as a
    transformers class that drops an all-ones mask and then attends both ways)."""

    def __init__(self, d=8):
        super().__init__()
        self.emb, self.up, self.down, self.head = (nn.Embedding(VOCAB, d), nn.Linear(d, 2 * d),
                                                   nn.Linear(2 * d, d), nn.Linear(d, 5))

    def forward(self, idx, mask):
        x = self.emb(idx)
        x = x + self.down(F.gelu(self.up(F.layer_norm(x, x.shape[-1:]))))
        if not torch.compiler.is_exporting() and bool(mask.all()):
            x = x.flip(1)
        else:
            x = x * mask[..., None]
        return self.head(F.layer_norm(x, x.shape[-1:]))


def test_a_forward_that_branches_on_input_values_is_reported_not_blamed_on_the_growth():
    idx = torch.randint(0, VOCAB, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])  # padded: the branch the export takes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = Branches().eval()
        grown = growir.grow(source, width=2.0, example_inputs=(idx, mask))
    record = grown.growir_record
    assert not record.exact and record.deviation > TOLERANCE
    assert any("branches on its inputs' values" in r for r in record.reasons), record.reasons
    assert any("branches on its inputs' values" in str(w.message) for w in caught)
    with torch.no_grad():  # on the example's branch the grown graph is the source
        assert torch.allclose(grown(idx, mask), source(idx, mask), atol=TOLERANCE)
