"""A LayerNorm's mean fill through a layer scale λ (passes/layer_scale.py): the writer's fill row is its rows' mean
weighted by λ, so x1.5 is exact for any λ, not only a uniform one."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import growir
from growir.ir.tensor_rule import AxisMap, TensorRule
from test_archs import assert_same, grow_quietly
from zoo import VOCAB, randomize_norms


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


def cancelled_dinov2():
    """``dinov2`` with one layer scale's entries summing to zero: no weighted fill has a value there."""
    source = dinov2()
    with torch.no_grad():
        lam = source.encoder.layer[0].layer_scale2.lambda1
        lam.sub_(lam.mean())
    return source


def test_a_layer_scale_summing_to_zero_is_a_named_reason_and_the_plain_mean_fills():
    """Σλ = 0: mean(λ)·(any fill row) is zero, the old channels' mean term is not, so x1.5 is not exact. It was
    claimed exact (the rule fell back to the plain mean silently: a PreservationError, 0.0068); now the reason
    names λ, the fill is the plain mean, the growth warns with the measured deviation."""
    with pytest.warns(UserWarning, match="not function-preserving"):
        record = growir.grow(cancelled_dinov2(), width=1.5).growir_record
    assert not record.exact and record.deviation > 1e-4
    assert any("`encoder.layer.0.layer_scale2.lambda1`" in r and "sum to zero" in r and "plain mean" in r
               for r in record.reasons), record.reasons
    rule = record.rules["encoder.layer.0.mlp.fc2.weight"]
    assert rule.donor is None and rule.axes[0].fill == "mean", (rule.donor, rule.notes)
    assert record.rules["encoder.layer.0.attention.o_proj.weight"].axes[0].fill == "weighted"  # λ1: fine


def test_a_layer_scale_summing_to_zero_is_copied_at_a_whole_ratio():
    """At x2 the group is copied instead (exact), and the record says why it is not filled."""
    record = growir.grow(cancelled_dinov2(), width=2.0).growir_record
    assert record.exact and record.deviation < 1e-5, record.reasons
    assert "sum to zero" in record.filled[record.plan.by_role("hidden")[0].label], record.filled


class ReshapedWriters(nn.Module):
    """Pre-norm branches behind layer scales whose writers are a Linear, GPT-2's Conv1D (``addmm`` on the tokens
    flattened, reshaped back to the input's sizes) and a square Linear; all with biases."""

    def __init__(self, d: int = 8):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, 5)
        self.n1, self.n2, self.n3, self.nf = (nn.LayerNorm(d) for _ in range(4))
        self.up, self.down, self.up2, self.mix = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 2 * d), \
            nn.Linear(d, d)
        self.w2 = nn.Parameter(0.3 * torch.randn(2 * d, d, generator=gen))
        self.b2 = nn.Parameter(torch.randn(d, generator=gen))
        self.l1, self.l2, self.l3 = (nn.Parameter(0.2 + torch.rand(d, generator=gen)) for _ in range(3))
        with torch.no_grad():
            for b in (self.down.bias, self.mix.bias):
                b.normal_(0.0, 1.0, generator=gen)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.l1 * self.down(F.gelu(self.up(self.n1(x))))
        h = F.gelu(self.up2(self.n2(x)))
        x = x + self.l2 * torch.addmm(self.b2, h.reshape(-1, h.shape[-1]), self.w2).reshape(x.shape)
        x = x + self.l3 * self.mix(self.n3(x))
        return self.head(self.nf(x))


@pytest.mark.parametrize("width", [1.5, 2.0])
def test_writers_reshaped_to_sizes_and_their_biases_take_the_weighted_fill(width):
    """A reshape's sizes (SymInts) are no term, and a bias is added, not a product: every writer's fill is weighted
    by its λ, and x1.5 is exact (the Conv1D branch was refused as a per-channel product before)."""
    source = ReshapedWriters().eval()
    grown = grow_quietly(source, width=width, example_inputs=(torch.randint(0, VOCAB, (2, 5)),))
    rules = grown.growir_record.rules
    for writer, lam in (("down.bias", "l1"), ("b2", "l2"), ("w2", "l2"), ("mix.bias", "l3"), ("mix.weight", "l3")):
        assert rules[writer].donor == lam and "weighted" in [a.fill for a in rules[writer].axes], writer
    assert_same(source, grown, [(torch.randint(0, VOCAB, (2, 5)),), (torch.randint(0, VOCAB, (1, 9)),)])
