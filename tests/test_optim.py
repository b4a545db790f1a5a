"""Optimizer state grows with the model: gradients map back, Adam's moments follow them, training resumes.

The mapping is checked against gradients the grown model actually produces, not only against the rule:
a copy's gradient, gathered at the first copy of each old position and multiplied by the rule's scale and
the copy counts on its producer axes, is the source's gradient.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.utils._pytree as pytree

import growir
from zoo import example_inputs, make

TOL = 1e-5
SPECS = {"llama": dict(width=2.0), "nanogpt": dict(width=2.0),
         "nanogpt-ffn": dict(width={"ffn": 192}), "gpt2-deep": dict(width=2.0, depth=2),
         "nanogpt-headdim": dict(width={"head_dim": 16}),  # the query's rows of a fused QKV weight rescaled
         "qwen3-headdim": dict(width={"head_dim": 16}),  # rotary: zero query dims behind a per-head norm
         "llama-headdim": dict(width={"head_dim": 16})}  # rotary, no norm: the key's copies get no gradient


# Rotary head_dim growth copies the key into its new dimensions (so that they train). Behind a per-head norm
# those copies take part in the norm's mean of squares, which couples them to the old dimensions' gradient:
# the key projection's gradient does not map back exactly (docs/optimizer.md). Everything else does.
COUPLED = {"qwen3-headdim": "k_proj"}


def model_of(case: str):
    return case.split("-")[0]


def grow_kwargs(case: str) -> dict:
    name = model_of(case)
    # copies: the map-back below reads a copy's gradient (the fresh default copies nothing)
    return {"width_method": "fpi", **SPECS[case], "example_inputs": example_inputs(name) if name == "nanogpt" else None}


def logits(model, inputs):
    out = model(*inputs) if isinstance(inputs, tuple) else model(**inputs)
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())


def backward(model, inputs, weight):
    """Gradients of sum(logits * weight): a loss with no symmetry of its own."""
    model.zero_grad(set_to_none=True)
    (logits(model, inputs) * weight).sum().backward()


def trained(case: str, steps: int = 3, amsgrad: bool = False, optimizer=None):
    """The source after a few AdamW steps, with two param groups (matrices decay, vectors do not)."""
    name = model_of(case)
    model = make(name)
    params = list(model.parameters())
    opt = optimizer(model) if optimizer else torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0, "lr": 3e-3}],
        lr=1e-3, amsgrad=amsgrad)
    for i in range(steps):
        inputs = example_inputs(name, seed=10 + i)
        opt.zero_grad()
        (logits(model, inputs) * weight_for(name, inputs)).sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def weight_for(name: str, inputs=None, seed: int = 1):
    """A fixed random weight over the logits of ``inputs`` (the default example inputs)."""
    inputs = inputs if inputs is not None else example_inputs(name)
    ids = inputs[0] if isinstance(inputs, tuple) else inputs["input_ids"]
    shape = (*ids.shape, 100)  # the zoo's vocabulary
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / shape[-1] ** 0.5


@functools.lru_cache(maxsize=None)
def setup(case: str):
    """(source, its AdamW after 3 steps, grown, grown AdamW): grown once per case, shared read-only."""
    source, opt = trained(case, amsgrad=case == "llama")
    SNAPSHOTS[case] = copy.deepcopy((source.state_dict(), opt.state_dict()))
    return (source, opt, *growir.grow_with_optimizer(source, opt, **grow_kwargs(case)))


SNAPSHOTS = {}  # case -> the source's state_dict and its optimizer's, taken before growth


def clone_grown(grown, opt):
    """An independent copy of a grown model and its optimizer (the record holds traced fake tensors that
    deepcopy refuses, so it is shared, not copied)."""
    record = grown.__dict__.pop("growir_record")
    try:
        twin = copy.deepcopy(grown)
    finally:
        grown.growir_record = record
    twin.growir_record = record
    index = {id(p): i for i, p in enumerate(grown.parameters())}
    params = list(twin.parameters())
    twin_opt = type(opt)([{**{k: v for k, v in g.items() if k != "params"},
                           "params": [params[index[id(p)]] for p in g["params"]]} for g in opt.param_groups])
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


def first_copies(index: torch.Tensor, old: int) -> torch.Tensor:
    """For each old position, the first new position that copies it."""
    first = torch.full((old,), -1, dtype=torch.long)
    for j in reversed(range(len(index))):
        if index[j] >= 0:
            first[index[j]] = j
    assert (first >= 0).all(), "an old position has no copy"
    return first


def producer_factor(rule, old_shape) -> torch.Tensor:
    """scale * prod over producer axes of the copy count of each old entry (independent of growir.optim)."""
    factor = torch.full(tuple(old_shape), float(rule.scale), dtype=torch.float64)
    for axis, (m, n) in enumerate(zip(rule.axes, old_shape)):
        if m.index is not None and m.divide is None:
            counts = torch.bincount(m.index[m.index >= 0], minlength=n).to(torch.float64)
            shape = [1] * len(old_shape)
            shape[axis] = n
            factor = factor * counts.reshape(shape)
        if m.scale is not None:  # per-position factors (a fused projection's query rows)
            shape = [1] * len(old_shape)
            shape[axis] = n
            factor = factor * m.scale.to(torch.float64).reshape(shape)
    return factor


def mapped_back(rule, grown: torch.Tensor, old_shape) -> torch.Tensor:
    back = grown.detach()
    for axis, (m, n) in enumerate(zip(rule.axes, old_shape)):
        if m.index is not None:
            back = back.index_select(axis, first_copies(m.index, n))
    return back * producer_factor(rule, old_shape).to(back.dtype)


def mapped_forward(rule, state: torch.Tensor, power: int) -> torch.Tensor:
    """A source moment, gathered on every axis and divided by the producer factor**power."""
    out = state.detach() / producer_factor(rule, state.shape).to(state.dtype) ** power
    for axis, m in enumerate(rule.axes):
        if m.index is not None:
            out = out.index_select(axis, m.index)
    return out


def fresh_blocks(record) -> set:
    """Block prefixes ('h.1') of new identity blocks: those with a zeroed writer."""
    out = set()
    for name, rule in record.rules.items():
        for prefix in record.layers:
            if rule.zero and name.startswith(prefix + "."):
                out.add(".".join(name.split(".")[: prefix.count(".") + 2]))
    return out


def in_fresh_block(name: str, fresh: set) -> bool:
    return any(name.startswith(b + ".") for b in fresh)


def close(actual, expected, what):
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= TOL * scale, f"{what}: max|Δ| {err:.3g} > {TOL} * {scale:.3g}"


@pytest.mark.parametrize("case", list(SPECS))
def test_gradients_map_back_to_the_source(case):
    name = model_of(case)
    source, _, grown, _ = setup(case)
    rec = grown.growir_record
    assert rec.exact, rec.reasons
    inputs = example_inputs(name, batch=3, seq=6, seed=5)
    weight = weight_for(name, inputs, seed=2)
    backward(source, inputs, weight)
    backward(grown, inputs, weight)
    src = dict(source.named_parameters(remove_duplicate=False))
    fresh = fresh_blocks(rec)
    checked = 0
    for pname, p in grown.named_parameters(remove_duplicate=False):
        rule = rec.rules[pname]
        if in_fresh_block(pname, fresh):
            continue  # an identity block: not the image of any source parameter's gradient
        if case in COUPLED and COUPLED[case] in pname:
            checked += 1
            continue
        close(mapped_back(rule, p.grad, src[rule.source].shape), src[rule.source].grad, pname)
        checked += 1
    assert checked >= len(src) - 1  # every source parameter (a tie counts once in one of the two names)
    if fresh:
        assert any(rec.rules[n].zero and p.grad.abs().max() > 0 for n, p in grown.named_parameters()), \
            "zeroed writers of identity blocks still learn"


@pytest.mark.parametrize("case", ["llama", "gpt2-deep", "nanogpt-ffn", "nanogpt-headdim"])
def test_adam_moments_are_the_mapped_source_moments(case):
    source, opt, grown, new = setup(case)
    rec = grown.growir_record
    src = dict(source.named_parameters(remove_duplicate=False))
    for pname, p in grown.named_parameters():
        rule, old = rec.rules[pname], src[rec.rules[pname].source]
        state, old_state = new.state[p], opt.state[old]
        assert set(state) == set(old_state) >= {"step", "exp_avg", "exp_avg_sq"}
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2), ("max_exp_avg_sq", 2))[:len(state) - 1]:
            expected = torch.zeros_like(p) if rule.zero else mapped_forward(rule, old_state[key], power)
            close(state[key], expected, f"{pname} {key}")
        assert float(state["step"]) == (0.0 if rule.zero else float(old_state["step"]))


@pytest.mark.parametrize("case", ["gpt2-deep", "nanogpt"])
def test_a_step_with_lr_zero_changes_nothing_and_moments_stay_mapped(case):
    """lr=0 moves no weight; the moments then absorb one real gradient each, and must still map."""
    name = model_of(case)
    source, opt = copy.deepcopy(setup(case)[:2])
    grown, new = clone_grown(*setup(case)[2:])
    for o in (opt, new):
        for g in o.param_groups:
            g["lr"] = 0.0
    inputs = example_inputs(name, batch=3, seq=6, seed=7)
    before = logits(grown, inputs).detach()
    snapshot = {k: v.clone() for k, v in grown.state_dict().items()}
    for model, o in ((source, opt), (grown, new)):
        backward(model, inputs, weight_for(name, inputs))
        o.step()
    assert all(torch.equal(v, snapshot[k]) for k, v in grown.state_dict().items())
    assert torch.equal(logits(grown, inputs).detach(), before)
    src = dict(source.named_parameters(remove_duplicate=False))
    fresh = fresh_blocks(grown.growir_record)
    for pname, p in grown.named_parameters():
        rule = grown.growir_record.rules[pname]
        if in_fresh_block(pname, fresh):
            continue  # their gradients are not the source's (zero, or the writers' own)
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            close(new.state[p][key], mapped_forward(rule, opt.state[src[rule.source]][key], power), pname)


@pytest.mark.parametrize("case", ["gpt2-deep", "nanogpt"])
def test_shapes_groups_and_ties_line_up(case):
    source, opt, grown, new = setup(case)
    assert type(new) is type(opt) and new.defaults == opt.defaults
    assert len(new.param_groups) == len(opt.param_groups)
    for g_new, g_old in zip(new.param_groups, opt.param_groups):
        assert {k: v for k, v in g_new.items() if k != "params"} == {k: v for k, v in g_old.items() if k != "params"}
    group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    new_group_of = {id(p): i for i, g in enumerate(new.param_groups) for p in g["params"]}
    src = dict(source.named_parameters(remove_duplicate=False))
    unique = list(grown.parameters())
    assert set(new_group_of) == {id(p) for p in unique}, "every grown parameter is optimized exactly once"
    assert sum(len(g["params"]) for g in new.param_groups) == len(unique)
    for pname, p in grown.named_parameters(remove_duplicate=False):
        assert new_group_of[id(p)] == group_of[id(src[grown.growir_record.rules[pname].source])], pname
        assert all(v.shape == p.shape for k, v in new.state[p].items() if k != "step"), pname
    assert len(new.state) == len(unique)  # tied head and embedding: one parameter, one state entry
    tied = [n for n in ("lm_head.weight",) if n in dict(grown.named_parameters(remove_duplicate=False))]
    assert tied and len(unique) < len(list(grown.named_parameters(remove_duplicate=False)))


@pytest.mark.parametrize("case", ["gpt2-deep", "nanogpt"])
def test_source_model_and_optimizer_are_untouched(case):
    source, opt, grown, new = setup(case)
    model_before, opt_before = SNAPSHOTS[case]
    assert all(torch.equal(v, model_before[k]) for k, v in source.state_dict().items())
    after = opt.state_dict()
    assert after["param_groups"] == opt_before["param_groups"]
    assert after["state"].keys() == opt_before["state"].keys()
    for i, s in opt_before["state"].items():
        assert all(torch.equal(after["state"][i][k], v) for k, v in s.items())
    # the grown state shares no memory with the source's: stepping one cannot move the other
    old = {t.untyped_storage().data_ptr() for st in opt.state.values() for t in st.values()}
    old |= {p.untyped_storage().data_ptr() for p in source.parameters()}
    assert not old & {t.untyped_storage().data_ptr() for st in new.state.values() for t in st.values()}
    assert all(p not in new.state for p in source.parameters())


def test_sgd_momentum_scales_like_the_gradient():
    source, opt = trained("nanogpt", optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    grown, new = growir.grow_with_optimizer(source, opt, **grow_kwargs("nanogpt"))
    src = dict(source.named_parameters(remove_duplicate=False))
    for pname, p in grown.named_parameters():
        rule = grown.growir_record.rules[pname]
        close(new.state[p]["momentum_buffer"],
              mapped_forward(rule, opt.state[src[rule.source]]["momentum_buffer"], 1), pname)
    assert new.param_groups[0]["momentum"] == 0.9


def test_frozen_parameters_stay_out_and_unknown_state_is_refused():
    source = make("nanogpt")
    with pytest.raises(growir.SpecError, match="Adagrad.*'sum'"):
        growir.grow_with_optimizer(source, torch.optim.Adagrad(source.parameters()), width=2.0)
    with pytest.raises(growir.SpecError, match="not a parameter of NanoGPT"):
        growir.grow_with_optimizer(source, torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))]), width=2.0)
    # embeddings, final norm and head frozen; a fresh optimizer of any class has nothing to guess
    opt = torch.optim.RMSprop(source.h.parameters(), lr=0.1)
    grown, new = growir.grow_with_optimizer(source, opt, **grow_kwargs("nanogpt"))
    assert type(new) is torch.optim.RMSprop and new.param_groups[0]["lr"] == 0.1 and not new.state
    optimized = {id(p) for g in new.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in grown.named_parameters() if n.startswith("h.")}


def adamw_output_change(case: str, lr_scaling: str) -> float:
    """|Δ grown output| / |Δ source output| after one AdamW step at the same lr (docs/optimizer.md)."""
    name = model_of(case)
    small, small_opt = copy.deepcopy(setup(case)[:2])  # one memo: the copy's optimizer holds the copy's params
    grown, new = clone_grown(*setup(case)[2:])
    probe, batch = example_inputs(name, batch=4, seq=16), example_inputs(name, batch=4, seq=16, seed=99)
    y0 = logits(small, probe).detach()
    if lr_scaling != "none":
        new = per_tensor_lr(grown, new, exact=lr_scaling == "exact")
    for model, o in ((small, small_opt), (grown, new)):
        backward(model, batch, weight_for(name, batch))
        o.step()
    with torch.no_grad():
        return ((logits(grown, probe) - y0).norm() / (logits(small, probe) - y0).norm()).item()


def per_tensor_lr(grown, opt, exact: bool):
    """One group per tensor: lr / c on split consumer axes (exact: lr * scale / c and weight decay * c / scale,
    so that AdamW's update of the grown tensor is the rule applied to the source's update)."""
    rules, groups = grown.growir_record.rules, []
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for pname, p in grown.named_parameters():
        rule, g = rules[pname], group_of[id(p)]
        c = 1.0
        for m in rule.axes:
            if m.divide is not None and m.index is not None:
                c *= float(len(m.index)) / len(m.divide)  # uniform copy counts at width 2
        s = float(rule.scale) if exact else 1.0
        extra = {"weight_decay": g["weight_decay"] * c / s} if exact else {}
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "lr": g["lr"] * s / c, **extra,
                       "params": [p]})
    new = type(opt)(groups)
    for p in grown.parameters():
        new.state[p] = opt.state[p]
    return new


def test_same_lr_moves_the_grown_model_further_and_exact_scaling_restores_it():
    assert adamw_output_change("nanogpt", "none") > 1.5
    assert adamw_output_change("nanogpt", "exact") == pytest.approx(1.0, abs=1e-3)
