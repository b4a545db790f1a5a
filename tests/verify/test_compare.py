"""growir.verify.compare: one alignment, one deviation formula and one TOLERANCE for every check growir makes."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import growir
from growir.api import TOLERANCE as API_TOLERANCE
from growir.verify.compare import TOLERANCE, bound, deviation, map_source_output, relative_scale
from growir.verify.measure import measure
from growir.verify.onnx_check import compare_output

ROOT = Path(__file__).resolve().parents[2]
SHARED = {"TOLERANCE", "output_maps", "axis_maps", "map_source_output", "deviation", "relative_scale", "abs_diff",
          "bound"}


def test_tolerance_and_the_comparison_are_defined_once():
    defined = []
    for path in sorted((ROOT / "growir").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level: what other modules could import
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else []
            defined += [(name, path.relative_to(ROOT).as_posix()) for name in names if name in SHARED]
    assert sorted(defined) == sorted((name, "growir/verify/compare.py") for name in SHARED)
    assert API_TOLERANCE is TOLERANCE == 1e-5


def test_deviation_is_relative_to_the_larger_of_one_and_the_output():
    assert deviation(torch.tensor([0.5]), torch.tensor([0.6])) == pytest.approx(0.1, rel=1e-6)
    assert deviation(torch.tensor([100.0]), torch.tensor([101.0])) == pytest.approx(0.01, rel=1e-6)
    assert relative_scale(torch.empty(0)) == 1.0 and deviation(torch.empty(0), torch.empty(0)) is None


def test_nan_on_one_side_never_passes_and_on_both_is_equal():
    nan = float("nan")
    assert deviation(torch.tensor([1.0, 2.0]), torch.tensor([1.0, nan])) == math.inf
    assert deviation(torch.tensor([nan, 2.0]), torch.tensor([nan, 2.0])) == 0.0


def test_fill_positions_compare_only_the_copies():
    source = torch.tensor([[1.0, 2.0]])
    grown = torch.tensor([[1.0, 2.0, 123.0, 1.0]])  # position 2 is a fill (-1): no source value to match
    maps = [None, torch.tensor([0, 1, -1, 0])]
    assert deviation(source, grown, maps) == 0.0
    assert deviation(source, grown + torch.tensor([0.0, 0.0, 0.0, 0.5]), maps) == 0.25  # 0.5 / max(1, 2)


def test_low_precision_is_compared_in_float32():
    source = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    assert deviation(source, source.float() + 1e-6) <= TOLERANCE


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.floats(1e-3, 1e4), st.floats(1e-8, 1e-2), st.integers(0, 2**16))
def test_the_self_measure_is_the_onnx_bound_with_atol_tolerance_and_no_rtol(magnitude, step, seed):
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(3, 4, generator=gen, dtype=torch.float64) * magnitude
    grown = source + step * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    dev = deviation(source, grown)
    if abs(dev - TOLERANCE) < 1e-9:
        return  # on the boundary: rounding may fall either way
    out = compare_output("y", [source], [grown], atol=TOLERANCE, rtol=0.0)
    assert out.preserved == (dev <= TOLERANCE)
    assert bool(((grown - source).abs() <= bound(source, TOLERANCE)).all()) == (dev <= TOLERANCE)


def test_map_source_output_is_the_one_the_onnx_check_uses():
    from growir.verify import onnx_check
    assert onnx_check.map_source_output is map_source_output


def test_grow_measures_through_the_output_maps_and_a_nan_fails_the_measure():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    grown = growir.grow(net, width=2.0, example_inputs=(torch.randn(2, 4),))
    record = grown.growir_record
    assert record.deviation is not None and record.deviation <= TOLERANCE
    assert measure(net, grown, record.plan.captured, record.output_maps) == pytest.approx(record.deviation, abs=1e-7)
    weight = next(p for p in grown.parameters() if p.dim() == 2)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    assert measure(net, grown, record.plan.captured, record.output_maps) == math.inf
