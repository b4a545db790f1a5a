"""A LayerNorm's mean fill through a layer scale λ (passes/layer_scale.py): the writer's fill row is its rows' mean
weighted by λ, so x1.5 is exact for any λ, not only a uniform one."""

from __future__ import annotations

import torch
import transformers as T

import growir
from growir.ir.tensor_rule import AxisMap, TensorRule
from zoo import randomize_norms


def dinov2(seed: int = 0):
    """A tiny DINOv2 (a layer scale after attention and after the MLP) with λ drawn in (0.2, 1.5): far from the
    uniform init, where a plain mean fill would be exact by accident."""
    torch.manual_seed(seed)
    model = T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                         image_size=16, patch_size=4)).eval()
    randomize_norms(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.2, 1.5)
            elif name.endswith("bias") and "norm" not in name:
                p.normal_(0.0, 0.1)
    return model


def test_layer_scaled_writers_fill_with_the_scale_weighted_mean():
    source = dinov2()
    for method in ("auto", "fpi"):
        grown = growir.grow(source, width=1.5, width_method=method)
        record = grown.growir_record
        assert record.exact and record.deviation < 1e-5, (method, record.reasons, record.deviation)
        rule = record.rules["encoder.layer.0.mlp.fc2.weight"]
        assert rule.donor == "encoder.layer.0.layer_scale2.lambda1" and rule.axes[0].fill == "weighted"
        bias, lam = source.encoder.layer[0].mlp.fc2.bias.detach(), source.encoder.layer[0].layer_scale2.lambda1.detach()
        fill = grown.encoder.layer[0].mlp.fc2.bias[-1].item()
        assert abs(fill - float((lam * bias).sum() / lam.sum())) < 1e-6
        assert abs(fill - float(bias.mean())) > 1e-3  # not the plain mean


def test_the_optimizer_state_of_a_weighted_fill_starts_like_any_fill():
    """Adam's moments of a writer with a weighted fill: zero first moment, mean second moment at the fill (the
    moments' rule drops the weights: the scale's own moments are no weights)."""
    source = dinov2()
    opt = torch.optim.AdamW(source.parameters(), lr=1e-3)
    source(pixel_values=torch.randn(2, 3, 16, 16)).pooler_output.pow(2).mean().backward()
    opt.step()
    grown, grown_opt = growir.grow_with_optimizer(source, opt, width=1.5)
    state = grown_opt.state[grown.encoder.layer[0].mlp.fc2.weight]
    assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
    assert state["exp_avg"][-1].abs().max() == 0


def test_a_weighted_fill_rule_reads_its_weights_from_the_donor():
    rule = TensorRule("w", [AxisMap(torch.tensor([0, 1, -1]), fill="weighted")], donor="l")
    assert rule.apply(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])).tolist() == [1.0, 3.0, 1.5]
    assert rule.apply(torch.tensor([1.0, 3.0]), torch.tensor([1.0, -1.0])).tolist() == [1.0, 3.0, 2.0]  # sum 0
