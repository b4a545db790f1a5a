"""bert2BERT's AKI, the bert2bert preset, and symmetry-breaking noise."""

from __future__ import annotations

import warnings

import pytest
import torch

import growir
from zoo import example_inputs, make


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


@pytest.fixture(scope="module")
def llama_pair():
    src = make("llama")
    return (src, quiet(growir.grow, src, width=2.0, width_method="fpi"),
            quiet(growir.grow, src, width=2.0, width_method="aki"))


def test_aki_differs_from_fpi_only_in_new_units_below_the_top(llama_pair):
    _, fpi, aki = llama_pair
    sf, sa = fpi.state_dict(), aki.state_dict()
    changed = {k for k in sf if not torch.equal(sf[k], sa[k])}
    assert changed and all(k.startswith("model.layers.0.") for k in changed)  # the top block falls back to FPI
    up_f, up_a = sf["model.layers.0.mlp.up_proj.weight"], sa["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(up_f[:64], up_a[:64]) and not torch.equal(up_f[64:], up_a[64:])
    # the new FFN neurons of block 0 are block 1's neurons (same expansion of their input axis)
    assert torch.equal(up_a[64:], sf["model.layers.1.mlp.up_proj.weight"][64:])
    down_a = sa["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(down_a[:, 64:], sf["model.layers.1.mlp.down_proj.weight"][:, 64:])


def test_aki_is_reported_as_not_exact(llama_pair):
    src, _, _ = llama_pair
    with pytest.warns(UserWarning, match="AKI"):
        grown = growir.grow(src, width=2.0, width_method="aki")
    assert not grown.growir_record.exact and grown.growir_record.deviation > 1e-3
    with pytest.raises(growir.NotExactError, match="AKI"):
        growir.grow(src, width=2.0, width_method="aki", strict=True)


def test_bert2bert_preset_is_aki_and_stacking():
    grown = quiet(growir.grow, make("gpt2"), width=2.0, depth=2, method="bert2bert")
    rec = grown.growir_record
    assert rec.layers["transformer.h"] == (2, 4, "stack")
    assert any("AKI" in r for r in rec.reasons)
    with pytest.raises(growir.SpecError, match="presets"):
        growir.grow(make("gpt2"), method="bert3bert")


def _copy_grad_gap(grown, inputs):
    """max |grad(row j) - grad(row j + n)| over the copies of block 0's FFN neurons."""
    grown.zero_grad()
    out = grown(*inputs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    w = dict(grown.named_parameters())["h.0.fc.weight"]
    n = w.shape[0] // 2
    return (w.grad[:n] - w.grad[n:]).abs().max().item()


def test_noise_keeps_the_function_and_breaks_symmetry():
    src, inputs = make("nanogpt"), example_inputs("nanogpt")
    plain = growir.grow(src, width=2.0, width_method="fpi", example_inputs=inputs)
    noisy = growir.grow(src, width=2.0, width_method="fpi", noise=0.05, example_inputs=inputs)
    assert noisy.growir_record.exact and noisy.growir_record.deviation < 1e-5
    assert _copy_grad_gap(plain, inputs) == 0.0  # copies get identical gradients and would stay identical
    assert _copy_grad_gap(noisy, inputs) > 1e-4


def test_noise_must_be_a_non_negative_number():
    with pytest.raises(growir.SpecError, match="noise"):
        growir.grow(make("gpt2"), width=2.0, noise=-1)
