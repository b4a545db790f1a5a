"""bfloat16/float16 models: grown in their own dtype, judged in float32 (growir.precision), bugs still caught."""

from __future__ import annotations

import warnings

import pytest
import torch

import growir
from growir.api import TOLERANCE
from growir.errors import NotExactError
from growir.ir.tensor_rule import AxisMap, TensorRule
from growir.verify.precision import float32_twin
from zoo import example_inputs, make

LOW = [torch.bfloat16, torch.float16]


def grow_quietly(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = growir.grow(model, **kw)
    return grown, [str(w.message) for w in caught if "growir" in str(w.message)]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ["llama", "gpt2", "nanogpt"])
def test_low_precision_width_two_is_exact_and_keeps_the_dtype(name, dtype):
    source = make(name).to(dtype)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    example = example_inputs(name) if name == "nanogpt" else None
    grown, warned = grow_quietly(source, width=2.0, example_inputs=example)
    record = grown.growir_record
    assert record.exact and not warned, record.reasons
    assert record.deviation <= TOLERANCE  # measured in float32: bf16 rounding of a wider matmul is not counted
    assert {t.dtype for t in grown.parameters()} == {dtype}
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())  # source untouched


def test_rounding_that_shows_is_a_reason_and_strict_refuses_it():
    source = make("llama").to(torch.bfloat16)
    grown, warned = grow_quietly(source, width=3.0)  # divides by 3: not representable in bfloat16
    record = grown.growir_record
    assert not record.exact and warned
    assert "bfloat16 cannot hold the grown values" in record.reasons[-1]
    with pytest.raises(NotExactError, match="bfloat16 cannot hold"):
        growir.grow(source, width=3.0, strict=True)


def test_check_judges_bfloat16_in_float32_and_catches_a_perturbed_weight():
    source = make("llama").to(torch.bfloat16)
    grown = growir.grow(source, width=2.0)
    with torch.no_grad():
        grown.model.layers[0].mlp.down_proj.weight[0, 0] += 0.05  # a bug of about bfloat16's epsilon
    report = growir.check(source, grown, samples=1)
    assert not report.preserved and report.outputs[0].max_abs_error < 0.05
    assert grown.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16  # check() cast nothing back


def test_rule_computes_in_float32_and_casts_once():
    rule = TensorRule("w", [AxisMap(torch.tensor([0, 1, 0, 1, 0]), torch.tensor([3, 2]))])
    old = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    new, rounded = rule.apply_checked(old)
    assert new.dtype == torch.bfloat16 and rounded  # 1/3 has no bfloat16 value
    expected = old.float()[[0, 1, 0, 1, 0]] / torch.tensor([3.0, 2.0, 3.0, 2.0, 3.0])
    assert torch.equal(new, expected.to(torch.bfloat16))
    halves = TensorRule("w", [AxisMap(torch.tensor([0, 1, 0, 1]), torch.tensor([2, 2]))])
    assert not halves.apply_checked(old)[1]


def test_integer_tensors_are_only_gathered_and_nothing_aliases_the_source():
    ids = torch.arange(6).reshape(1, 6)
    out = TensorRule("ids", [AxisMap(), AxisMap()]).apply(ids)
    assert out.dtype == torch.int64 and torch.equal(out, ids) and out.data_ptr() != ids.data_ptr()


def test_rules_run_on_the_meta_device():
    rule = TensorRule("w", [AxisMap(torch.tensor([0, 1, 0, -1]), torch.tensor([2, 1]), fill="zero"), AxisMap()])
    out = rule.apply(torch.empty(2, 5, device="meta", dtype=torch.bfloat16))
    assert out.is_meta and out.shape == (4, 5) and out.dtype == torch.bfloat16


def test_float32_twin_of_a_graph_module_rewrites_its_casts():
    source = make("nanogpt").to(torch.bfloat16)
    grown = growir.grow(source, width=2.0, example_inputs=example_inputs("nanogpt"))
    twin = float32_twin(grown)
    assert {t.dtype for t in twin.parameters()} == {torch.float32}
    assert {t.dtype for t in grown.parameters()} == {torch.bfloat16}
    casts = [n for n in twin.graph.nodes if torch.bfloat16 in list(n.args) + list(n.kwargs.values())]
    assert not casts


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_module_by_module_float32_equals_the_float32_twin_and_restores_the_model(name):
    from growir.verify.precision import float32_modules
    from growir.verify.measure import eval_outputs
    source = make(name).to(torch.bfloat16)
    before = {k: v for k, v in source.named_parameters()}
    inputs = [((), {"input_ids": torch.randint(0, 100, (2, 7))})]
    with float32_modules(source) as wide:
        lazy = eval_outputs(wide, inputs)[0][0]
    twin = eval_outputs(float32_twin(source), inputs)[0][0]
    assert lazy.dtype == torch.float32 and torch.allclose(lazy, twin, atol=1e-6, rtol=0)
    assert all(p is before[k] and p.dtype == torch.bfloat16 for k, p in source.named_parameters())


def test_graph_module_read_in_float32_shares_its_tensors():
    from growir.verify.precision import float32_modules
    source = make("nanogpt").to(torch.bfloat16)
    grown = growir.grow(source, width=2.0, example_inputs=example_inputs("nanogpt"))
    x = example_inputs("nanogpt")[0]
    with float32_modules(grown) as lazy:
        shared = {t.data_ptr() for t in grown.parameters()} == {t.data_ptr() for t in lazy.parameters()}
        out = lazy(x)
    assert shared and out.dtype == torch.float32
    assert torch.allclose(out, float32_twin(grown)(x), atol=1e-6, rtol=0)
