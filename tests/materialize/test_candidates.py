"""A config candidate that fails while it is built or run is skipped with its reason, and the search goes on
(issue 21, item 5); learned tokens beside the input's (registers) are a count of tokens, never a width the config
search sizes (a token count equal to a head count once made the registers grow with the heads)."""

from __future__ import annotations

import warnings

import torch
import transformers as T

import growir
import growir.materialize.hf as hf
from growir.materialize.hf import output_only_groups
from zoo import make

TOL = 1e-5


def tiny_registers():
    """DINOv2 with 4 register tokens and 4 heads: the register count equals the head count."""
    torch.manual_seed(0)
    cfg = T.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                      image_size=32, patch_size=16, num_register_tokens=4,
                                      out_features=["stage2"], out_indices=[2])
    model = T.Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():  # the class starts its tokens at zero: random ones make a dropped token visible
        for p in model.embeddings.parameters():
            p.normal_()
    return model


def test_register_tokens_are_not_sized_by_the_config_search():
    source = tiny_registers()
    plan = growir.plan(source)
    registers = [g for g in plan.groups if any(pa.param == "embeddings.register_tokens" and pa.axis == 1
                                               for pa in g.producers)]
    assert [g.size for g in registers] == [4]
    assert registers[0] not in output_only_groups(plan)  # attention mixes over it: it keeps its size


def test_registers_model_grows_x2_into_its_class_keeping_the_token_count():
    source, x = tiny_registers(), torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact, into its own class: nothing to warn about
        grown = growir.grow(source, width=2.0)
    assert isinstance(grown, T.Dinov2WithRegistersModel)
    rec = grown.growir_record
    assert rec.exact and rec.deviation <= TOL
    assert rec.config_changes == {"hidden_size": 64, "num_attention_heads": 8}
    assert grown.embeddings.register_tokens.shape == (1, 4, 64)
    with torch.no_grad():
        small, big = source(x).last_hidden_state, grown(x).last_hidden_state
    assert big.shape == (2, 1 + 4 + 4, 64)  # cls, 4 registers, 2 x 2 patches: as many tokens as the source's
    assert (big[..., :32] - small).abs().max() <= TOL * small.abs().max()


def _failing_first(monkeypatch, which: str):
    """Make the first candidate's ``which`` ("grown": the rebuilt class, "graph": its rewritten graph) raise in
    its forward while that candidate is checked; returns the rebuilt models checked."""
    checked, check = [], hf.differs

    def fail(module, args):
        raise RuntimeError("a candidate that fails in its forward")

    def first_fails(model, candidate, grown, *args, **kwargs):
        checked.append(grown)
        target = grown if which == "grown" else candidate.grown
        handle = target.register_forward_pre_hook(fail) if len(checked) == 1 else None
        try:
            return check(model, candidate, grown, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
    monkeypatch.setattr(hf, "differs", first_fails)
    return checked


def _grow_and_reason(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = growir.grow(model, width=2.0, materialize="auto")
    return grown, " ".join(str(w.message) for w in caught)


def test_a_candidate_raising_in_its_forward_is_skipped_with_its_reason(monkeypatch):
    """The tiny Llama has one candidate: where its rebuilt model raises, the rewritten graph comes back, with a
    warning that names the candidate and why it was passed over (no internal error)."""
    checked = _failing_first(monkeypatch, "grown")
    grown, warned = _grow_and_reason(make("llama"))
    assert len(checked) == 1 and isinstance(grown, torch.fx.GraphModule)
    assert "'hidden_size': 64" in warned
    assert "(the rebuilt model fails on the example: RuntimeError: a candidate that fails in its forward)" in warned
    assert grown.growir_record.exact


def test_a_candidate_whose_rewritten_graph_fails_is_skipped(monkeypatch):
    checked = _failing_first(monkeypatch, "graph")
    grown, warned = _grow_and_reason(make("llama"))
    assert len(checked) == 1 and isinstance(grown, torch.fx.GraphModule)
    assert "(the rewritten graph at its sizes fails on the example: RuntimeError: a candidate that fails" in warned


def test_old_register_sizing_ends_in_the_class_not_an_internal_error(monkeypatch):
    """With the registers taken for a width again (the old output-only groups), a candidate grows them and the
    rewritten graph at its sizes fails on the example; it is skipped with its reason and the next candidate
    rebuilds the class."""
    monkeypatch.setattr(hf, "mixed_positions", lambda p: set())
    reasons, try_one = [], hf._try_candidate

    def noted(model, p, cfg, *args):
        out = try_one(model, p, cfg, *args)
        reasons.append((cfg["num_register_tokens"], out[2]))
        return out
    monkeypatch.setattr(hf, "_try_candidate", noted)
    grown = growir.grow(tiny_registers(), width=2.0)
    assert isinstance(grown, T.Dinov2WithRegistersModel)
    assert grown.growir_record.exact and grown.embeddings.register_tokens.shape == (1, 4, 64)
    assert any(n == 8 and "fails on the example" in (why or "") for n, why in reasons), reasons
