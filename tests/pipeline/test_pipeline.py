"""The pipeline as public stages: plan -> rules -> materialize (or stream) -> check, each a declared list of
passes run by pipeline.manager on one Context; every pass touches only what it declares (``checking``), a restart
is the driver's, and a grow runs each stage once unless ``record.reruns`` says why."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import growir
import growir.api as api
from growir.pipeline.context import Context
from growir.errors import RewriteError, SpecError
from growir.pipeline import stages
from growir.pipeline.manager import Pass, Restart, check_declared, check_order, checking, declare, run_passes

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
    check_order(stages.GROW_PLANNED, given=INPUTS + ("plan",))
    assert len(set(names(api.GROW))) == len(api.GROW)
    assert names(api.GROW) == names(api.PLAN + api.SPEC + stages.STAND_IN + api.RULES + api.MATERIALIZE + api.CHECK)
    for passes in (api.GROW, stages.GROW_PLANNED, api.PLAN):
        check_declared(passes, Context)  # every name a pass declares is a field of the context
    assert names(api.PLAN) == ["capture", "analyse"]
    assert names(api.CHECK)[-4:] == ["measure", "reload", "judge", "release"]


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
    with checking():  # rules from a plan, and a grow without a proxy (two blocks): every pass as declared
        meta = growir.rules(meta_plan, width=1.5, depth=2)
        grown = growir.grow(llama(), width=1.5, depth=2)
    assert meta.exact and meta.layers == {"model.layers": (2, 4, "identity")}
    model = llama()
    assert set(meta.rules) == set(grown.growir_record.rules)
    applied = meta.apply({**dict(model.named_parameters()), **dict(model.named_buffers())})
    state = grown.state_dict()
    assert set(state) <= set(applied)
    for name, tensor in state.items():
        assert torch.equal(applied[name], tensor), name


def test_materialize_continues_the_rules_once():
    model = llama()
    with checking():
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


def test_a_declared_name_that_is_no_field_fails():
    with pytest.raises(RewriteError, match="pass `typo` declares `sizez`, which is not a field of Context"):
        check_declared([Pass("typo", lambda c: None, writes=("sizez",))], Context)


def test_checking_catches_what_a_pass_touches_without_declaring_it():
    @declare(reads=("plan",), writes=("sizes",))
    def sneaky(c):
        c.sizes = {}
        c.counts["x"] = 1  # mutates a field it does not declare
    with checking(), pytest.raises(RewriteError, match="pass `sneaky` touched `counts`"):
        run_passes([sneaky], Context(plan=object()))

    @declare(writes=("sizes",))
    def peeks(c):
        c.sizes = dict(c.counts)  # reads a field it does not declare
    with checking(), pytest.raises(RewriteError, match="pass `peeks` touched `counts`"):
        run_passes([peeks], Context())
    run_passes([peeks], Context())  # not checked outside checking(): no cost in a real growth


def test_a_restart_is_handled_by_the_driver():
    @declare(reads=("width",), writes=("sizes",))
    def sizes(c):
        c.sizes = {"w": c.width}

    @declare(reads=("how?",))
    def once(c):
        if not c.how:
            raise Restart("full, because", [sizes])
    ctx = run_passes([sizes, once], Context(width=2.0))
    assert ctx.how == "full, because" and ctx.sizes == {"w": 2.0}
    assert ctx.ran == ["sizes", "once", "sizes"] and ctx.reruns == ["once: full, because"]


def bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100)).eval()


def llama4():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


@pytest.mark.parametrize("make, spec", [
    (bert, {"width": 2.0}), (bert, {"depth": 2}), (bert, {"width": 2.0, "depth": 2}), (llama4, {"width": 2.0}),
    (llama4, {"width": 2.0, "depth": 2}),
], ids=["bert-x2", "bert-depth-x2", "bert-x2-depth-x2", "llama-x2", "llama-x2-depth-x2"])
def test_a_grow_exports_once_and_runs_each_pass_once(monkeypatch, make, spec):
    """Every pass declares what it touches (checked), and a grow exports once and runs every pass once: a pooler
    is sized as the config sizes it before any rule is made, and a depth growth that cannot be exact (post-norm
    BERT stacks) is checked against the proxy's graph copied out to the full grown one, not a second export."""
    exported, contexts = [], []
    real_export, real_run = torch.export.export, api.run_passes
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exported.append(a) or real_export(*a, **k))
    monkeypatch.setattr(api, "run_passes", lambda passes, ctx: contexts.append(ctx) or real_run(passes, ctx))
    with checking(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the depth growth of a post-norm model warns that it is not exact
        record = growir.grow(make(), **spec).growir_record
    ran = contexts[0].ran  # every pass that ran in the grow, nested rebuilds and restarts included
    assert len(exported) == 1
    assert ran == names(api.GROW) and record.reruns == []
    assert record.capture.startswith("a 2-block proxy"), record.capture
    assert record.exact == ("depth" not in spec or make is llama4) and record.deviation is not None


def test_each_context_field_belongs_to_the_stage_whose_passes_write_it():
    from dataclasses import fields
    from growir.pipeline.context import FIELD_STAGES
    grouped = [name for names in FIELD_STAGES.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in fields(Context))  # every field, once
    for stage, passes in stages.STAGES.items():
        group = FIELD_STAGES.get({"PROXY_PLAN": "PLAN"}.get(stage, stage), ())  # STAND_IN, CHECK: no field
        for p in passes:
            assert set(p.sets) <= set(group), (stage, p.name, set(p.sets) - set(group))


def test_the_design_doc_table_is_the_generated_one():
    from pathlib import Path
    from growir.pipeline.table import generated_part, stage_table
    doc = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()
    assert generated_part(doc) == stage_table(), "run `python -m growir.pipeline.table` and paste its output"
