"""A "weighted" fill (ir/tensor_rule.py): the mean weighted by the donor, and the plain mean where the weights cancel
(``cancels``), up to rounding: a weighted mean over a sum of rounding size would be rounding noise times 1e7."""

from __future__ import annotations

import torch

from growir.ir.tensor_rule import AxisMap, TensorRule, cancels


def test_weights_that_cancel_up_to_rounding_take_the_plain_mean():
    rule = TensorRule("w", [AxisMap(torch.tensor([0, 1, 2, -1]), fill="weighted")], donor="l")
    old = torch.tensor([1.0, 2.0, 6.0])
    lam = torch.tensor([0.7, -0.3, -0.4], dtype=torch.float32)  # sums to ~3e-8 in float32, not 0
    assert cancels(lam) and float(lam.sum()) != 0.0
    assert rule.apply(old, lam).tolist() == [1.0, 2.0, 6.0, 3.0]
    assert not cancels(torch.tensor([0.7, -0.3, -0.3]))
    assert cancels(torch.zeros(3)) and cancels(torch.zeros(0))
