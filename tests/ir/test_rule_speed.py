"""Per-tensor rules: block copies, low-precision slices and the fast path give the same bits as the plain
axis-by-axis computation (the cast-once rule holds)."""

import pytest
import torch

from growir.ir.gathers import gather
from growir.ir.shares import exact_shares, split_factors
from growir.ir.tensor_rule import AxisMap, TensorRule


def test_gather_by_slices_equals_index_select():
    t = torch.randn(5, 7, 6)
    for index in (torch.arange(7).repeat(2), torch.tensor([6, 5, 0, 1, 2, 2, 3]), torch.randint(0, 7, (40,))):
        assert torch.equal(gather(t, 1, index), t.index_select(1, index))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_pure_gather_in_low_precision_equals_float32_then_cast(dtype):
    """Every bfloat16/float16 value is a float32 value and a gather only copies: computing in the source dtype
    gives bitwise what computing in float32 and casting once gives (the cast-once rule holds)."""
    old = torch.randn(300, 24).to(dtype)
    index = torch.cat([torch.arange(24), torch.tensor([3, 7, 7, 20])])
    rule = TensorRule("w", [AxisMap(), AxisMap(index, fill=None)])
    assert not rule.arithmetic
    assert torch.equal(rule.apply(old), rule.apply(old.float()).to(dtype))
    assert rule.apply(old).dtype == dtype


def test_a_low_precision_rule_computed_by_slices_gives_the_same_bits(monkeypatch):
    import growir.ir.tensor_rule as tr
    old = torch.randn(3000, 48).to(torch.bfloat16)
    index = torch.cat([torch.arange(48), torch.arange(0, 48, 3)])
    rule = TensorRule("w", [AxisMap(), AxisMap(index, torch.bincount(index, minlength=48))], scale=0.7)
    whole = rule.apply_checked(old)
    monkeypatch.setattr(tr, "SLICE_BYTES", 4096)
    assert rule._slice_axis(old) == 0
    sliced = rule.apply_checked(old)
    assert torch.equal(whole[0], sliced[0]) and whole[1] == sliced[1]
    assert torch.equal(sliced[0], rule._mapped(old.float()).to(torch.bfloat16))  # float32 then cast, once


def test_rules_without_fills_give_the_stepwise_bits():
    """The fast path (arithmetic on the old tensor, then one pass of block copies) equals the axis-by-axis one."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        shape = [int(n) for n in torch.randint(2, 7, (1 + trial % 3,), generator=gen)]
        old = torch.randn(shape, generator=gen)
        axes = []
        for n in shape:
            kind = int(torch.randint(0, 3, (1,), generator=gen))
            index = None if kind == 0 else torch.cat([torch.arange(n).repeat(2), torch.randint(0, n, (kind,),
                                                                                               generator=gen)])
            divide = torch.bincount(index, minlength=n) if index is not None and trial % 2 else None
            scale = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 if trial % 5 == 0 else None
            axes.append(AxisMap(index, divide, scale=scale))
        rule = TensorRule("w", axes, scale=0.3 if trial % 4 == 0 else 1.0, offset=1.0 if trial % 8 == 0 else 0.0)
        assert torch.equal(rule._copies(old), rule._stepwise(old)), trial


def test_random_fills_are_drawn_at_the_fill_only_and_reproducible():
    old = torch.randn(6, 4).to(torch.bfloat16).float()  # bfloat16 values: the same std either way
    index = torch.tensor([0, 1, 2, 3, -1, -1])
    rule = TensorRule("w", [AxisMap(), AxisMap(index, fill="random")], fill_seed=7)
    a, b = rule.apply(old), rule.apply(old)
    assert torch.equal(a, b) and torch.equal(a[:, :4], old)
    assert a[:, 4:].abs().min() > 0 and a.data_ptr() != old.data_ptr()
    low = rule.apply(old.to(torch.bfloat16), store=torch.bfloat16)
    assert torch.equal(low[:, 4:], a[:, 4:].to(torch.bfloat16))  # drawn in float32, rounded once


def test_gather_leaves_zeros_where_the_index_is_a_fill():
    t = torch.randn(5, 7)
    for index in (torch.cat([torch.arange(7), torch.full((7,), -1)]), torch.randint(-1, 7, (60,))):
        want = t.index_select(1, index.clamp(min=0))
        want[:, index < 0] = 0
        assert torch.equal(gather(t, 1, index), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_power_of_two_rules_in_the_own_dtype_give_the_cast_once_bits(dtype):
    """Copies divided by 2 and scaled by 0.5/4 compute in bfloat16/float16 directly: the same bits as float32
    then one cast, and no rounding; values that would fall below the normal range take the float32 path."""
    from growir.ir.tensor_rule import exact_in_own_dtype
    index = torch.cat([torch.arange(16), torch.arange(16)])
    scale = torch.tensor([0.5, 4.0] * 8, dtype=torch.float64)
    rule = TensorRule("w", [AxisMap(), AxisMap(index, torch.full((16,), 2), scale=scale)], scale=0.25)
    gen = torch.Generator().manual_seed(0)  # magnitudes in [0.5, 1.5): far from float16's subnormals
    old = ((torch.rand(40, 16, generator=gen) + 0.5) * torch.tensor([1.0, -1.0]).repeat(8)).to(dtype)
    assert exact_in_own_dtype(rule, old)
    new, lossy = rule.apply_checked(old)
    assert torch.equal(new, rule._mapped(old.float()).to(dtype)) and not lossy and new.dtype == dtype
    tiny = old.clone()
    tiny[0, 0] = torch.finfo(dtype).tiny * 3
    assert not exact_in_own_dtype(rule, tiny)
    assert torch.equal(rule.apply_checked(tiny)[0], rule._mapped(tiny.float()).to(dtype))


def test_power_of_two_rules_with_fills_in_bfloat16_give_the_float32_bits():
    index = torch.cat([torch.arange(8), torch.full((8,), -1)])
    rows = torch.cat([torch.arange(6), torch.full((3,), -1)])
    rule = TensorRule("w", [AxisMap(rows, fill="random"), AxisMap(index, torch.full((8,), 2), fill="zero")],
                      fill_seed=3)
    old = torch.randn(6, 8).to(torch.bfloat16)
    new, lossy = rule.apply_checked(old)
    assert torch.equal(new, rule._mapped(old.float(), torch.bfloat16).to(torch.bfloat16)) and not lossy


def test_split_shares_sum_to_the_old_weight_where_factors_tie():
    """Two copies drawn the same factor (float32 draws tie a few times in a million): one of them, not both,
    takes the whole minus the other (both did, and the real MiniLM grown x2 moved by 4.6e-5)."""
    w = torch.tensor([[0.3, -1.7, 2.5]])
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    factors = torch.tensor([[0.5, 0.25, 0.5, 0.5, 0.75, 0.5]])
    shares = exact_shares(w, w[:, index] * factors, factors, 1, index)
    assert torch.equal(shares[:, :3] + shares[:, 3:], w)
    f = split_factors((64, 4096), 1, torch.arange(4096) % 2048, (0.25, 0.75), seed=3)
    s = exact_shares(torch.ones(64, 2048), f.clone(), f, 1, torch.arange(4096) % 2048)
    assert torch.equal(s[:, :2048] + s[:, 2048:], torch.ones(64, 2048))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_fills_in_one_pass_give_the_stepwise_bits(dtype):
    """Copies with zero and random fills (fresh units), written block by block into the grown tensor, equal the
    axis-by-axis gathers and fills: the same draws land at the same positions, scaled the same way."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        shape = [int(n) for n in torch.randint(2, 6, (1 + trial % 3,), generator=gen)]
        old = torch.randn(shape, generator=gen).to(dtype)
        axes = []
        for n in shape:
            kind = int(torch.randint(0, 4, (1,), generator=gen))
            holes = torch.full((int(torch.randint(1, 4, (1,), generator=gen)),), -1)
            index = [None, torch.cat([torch.arange(n), holes]), torch.cat([holes, torch.arange(n), holes]),
                     torch.cat([torch.arange(n), holes, torch.arange(n)])][kind]
            fill = [None, "zero", "random"][int(torch.randint(0, 3, (1,), generator=gen))] if kind else None
            axes.append(AxisMap(index, fill=fill))
        rule = TensorRule("w", axes, scale=[1.0, 0.7, -2.0][trial % 3], fill_seed=trial)
        store = torch.bfloat16 if trial % 2 else None
        fast = rule._filled_blocks(old, store)
        assert fast is not None and torch.equal(fast, rule._stepwise(old, store)), trial
        assert torch.equal(fast.signbit(), rule._stepwise(old, store).signbit()), trial  # -0.0 where scaled by < 0
    meta = rule._filled_blocks(old.to("meta"))
    assert meta.is_meta and meta.shape == rule._stepwise(old).shape
