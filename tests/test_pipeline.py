"""The pipeline as public stages: plan -> rules -> materialize (or stream) -> check, each a declared list of
passes run by growir.manager on one Context."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import growir
import growir.api as api
from growir.pipeline.context import Context
from growir.errors import RewriteError, SpecError
from growir.pipeline.manager import Pass, check_order, run_passes

INPUTS = ("opts", "model", "example_inputs", "width", "depth", "layers", "counts", "asked_method", "materialize",
          "strict", "verify")


def llama(device="cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


def names(passes) -> list[str]:
    return [p.name for p in passes]


def test_the_declared_stages_are_well_ordered_and_named_once():
    check_order(api.GROW, given=INPUTS)  # every field a pass reads is an input or written before it
    assert len(set(names(api.GROW))) == len(api.GROW)
    assert names(api.GROW) == names(api.PLAN + api.SPEC + api.RULES + api.MATERIALIZE + api.CHECK)
    assert names(api.PLAN) == ["capture", "analyse"]
    assert names(api.CHECK)[-3:] == ["measure", "judge", "release"]


def test_grow_runs_the_declared_pass_list_in_order(monkeypatch):
    contexts = []

    def spy(passes, ctx):
        contexts.append((names(passes), ctx))
        return run_passes(passes, ctx)
    monkeypatch.setattr(api, "run_passes", spy)
    grown = growir.grow(llama(), width=2.0, depth=2)
    assert [n for n, _ in contexts] == [names(api.GROW)]
    assert contexts[0][1].ran == names(api.GROW)
    assert list(grown.growir_record.timings) == names(api.GROW)  # per-pass seconds, for the benchmarks
    assert all(t >= 0 for t in grown.growir_record.timings.values())


@pytest.fixture(scope="module")
def meta_plan():
    return growir.plan(llama("meta"))


def test_streaming_builds_its_rules_with_the_same_passes(meta_plan):
    ctx, rules, *_ = api.growth_rules(meta_plan, {}, [], api.Options())
    assert ctx.ran == names(api.RULES) and rules


def test_rules_are_weight_free_and_reproduce_grow(meta_plan):
    """Rules from a meta-device plan, applied one tensor at a time, are the tensors grow() makes."""
    meta = growir.rules(meta_plan, width=1.5, depth=2)
    assert meta.exact and meta.layers == {"model.layers": (2, 4, "identity")}
    model = llama()
    grown = growir.grow(model, width=1.5, depth=2)
    assert set(meta.rules) == set(grown.growir_record.rules)
    applied = meta.apply({**dict(model.named_parameters()), **dict(model.named_buffers())})
    state = grown.state_dict()
    assert set(state) <= set(applied)
    for name, tensor in state.items():
        assert torch.equal(applied[name], tensor), name


def test_materialize_continues_the_rules_once():
    model = llama()
    r = growir.rules(model, width=2.0)
    grown = api.materialize(model, r)
    assert grown.config.hidden_size == 64 and grown.growir_record.exact
    assert grown.growir_record.deviation is not None and grown.growir_record.deviation <= api.TOLERANCE
    with pytest.raises(SpecError, match="already materialized"):
        api.materialize(model, r)


def test_the_manager_names_the_pass_and_checks_what_it_writes():
    def boom(c):
        raise KeyError("x")
    with pytest.raises(SpecError, match=r"resolving it \(pass `boom`\): KeyError") as info:
        run_passes([Pass("boom", boom, what="resolving it", error=SpecError)], Context())
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RewriteError, match="pass `lazy` did not write `sizes`"):
        run_passes([Pass("lazy", lambda c: None, writes=("sizes",))], Context())
    with pytest.raises(RewriteError, match="pass `early` reads `plan`"):
        run_passes([Pass("early", lambda c: None, reads=("plan",))], Context())
