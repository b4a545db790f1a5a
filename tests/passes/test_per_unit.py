"""Constants the forward makes from literals alone are evaluated once to find per-unit tables (passes/per_unit.py).
One made on the device of a meta-device model (the two-block proxy, ``growir.rules`` on meta) holds no values: it
is evaluated on the CPU instead (xlstm's initial states, ``torch.zeros(..., device=x.device)``, once failed with
"Tensor.item() cannot be called on meta tensors")."""

import torch
from torch import nn

import growir


class MadeState(nn.Module):
    """An FFN whose units are scaled by a table the forward makes on the input's device, one value per unit."""

    def __init__(self, d=8, units=16):
        super().__init__()
        self.up, self.down, self.units = nn.Linear(d, units), nn.Linear(units, d), units

    def forward(self, x):
        table = torch.zeros(2, self.units, device=x.device) + torch.arange(self.units, device=x.device)
        return self.down(torch.relu(self.up(x)) * table)


def test_a_constant_made_on_the_meta_device_is_evaluated_on_the_cpu():
    model, x = MadeState().to("meta"), torch.randn(2, 8, device="meta")
    rules = growir.rules(model, width=2.0, example_inputs=(x,))
    assert rules.rules["up.weight"].new_shape((16, 8)) == (32, 8)


def test_the_per_unit_table_grows_with_its_units():
    torch.manual_seed(0)
    model, x = MadeState().eval(), torch.randn(2, 8)
    grown = growir.grow(model, example_inputs=(x,), width=2.0)
    assert grown.growir_record.exact, grown.growir_record.reasons
    with torch.no_grad():
        assert torch.allclose(model(x), grown(x), atol=1e-5)
