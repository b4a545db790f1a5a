"""In-memory growth on a two-block proxy: the same rules and tensors as the full capture, a fallback that says
why, and the source's weights not kept alive."""

import gc
import weakref

import pytest
import torch
import transformers as T

import growir
from growir.api import Options, growth_rules
from growir.frontend.proxy import make_model_proxy, state_of
from growir.analysis.plan import resolve_width

MODELS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      vocab_size=100)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=100)),
    # Gemma scales its embedding by sqrt(hidden) held in a 0-d buffer: the proxy must keep that value
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                                      vocab_size=100)),
    "bert": lambda: T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=100)),
}


def _grown_tensors(model, p, counts, method: str, width=2.0) -> dict:
    _, rules, *_ = growth_rules(p, resolve_width(p, width), [], Options(method), counts)
    state = state_of(model)
    return {name: rule.apply(state[rule.source], state.get(rule.donor)) for name, rule in rules.items()}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_proxy_rules_equal_full_capture_rules(family):
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    proxy = make_model_proxy(model)
    plans = (growir.plan(model), None), (growir.plan(proxy.model), proxy.counts)
    for method in ("fpi", "auto"):
        full, cut = (_grown_tensors(model, p, counts, method) for p, counts in plans)
        assert set(full) == set(cut)
        for name in full:
            assert torch.equal(full[name], cut[name]), (method, name)


def test_grow_runs_on_the_proxy_and_measures_the_real_models():
    torch.manual_seed(0)
    model = MODELS["llama"]()
    grown = growir.grow(model, width=2.0, depth=2)
    record = grown.growir_record
    assert record.capture.startswith("a 2-block proxy of"), record.capture
    assert record.exact and record.deviation is not None and record.deviation < 1e-5
    assert "real source and grown models" in record.measured
    assert type(grown) is type(model) and grown.config.num_hidden_layers == 8
    assert "rewrite_graph" in record.timings and "measure" in record.timings


def test_blocks_that_differ_fall_back_to_the_full_capture_with_a_reason():
    torch.manual_seed(0)
    model = MODELS["llama"]()
    model.model.layers[3].mlp.act_fn = torch.nn.GELU()  # block 3 is no longer like the others
    with pytest.warns(UserWarning):  # no config rebuilds a GELU block: the rewritten graph is returned
        grown = growir.grow(model, width=2.0)
    assert grown.growir_record.capture.startswith("the full model (no proxy: no list of more than 2 identical")
    assert grown.growir_record.exact


def test_a_model_with_two_blocks_says_why_it_was_captured_whole():
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    assert "no list of more than 2" in growir.grow(model, width=2.0).growir_record.capture


def test_a_growth_that_is_not_exact_is_checked_against_the_proxy_graph_copied_out():
    """No second export: the proxy's graph, its blocks copied out to the full grown list, is the reference the
    rebuilt class is checked against, and it grows the tensors the full graph grows."""
    torch.manual_seed(0)
    model = MODELS["llama"]()
    with pytest.warns(UserWarning, match="not function-preserving"):
        grown = growir.grow(model, width=2.0, depth=2, width_method="aki", depth_method="stack")
    record = grown.growir_record
    assert record.capture.startswith("a 2-block proxy") and record.reruns == [], record.capture
    assert not record.exact and "a second shape" in record.measured
    with pytest.warns(UserWarning, match="not function-preserving"):
        full = growir.grow(model, width=2.0, depth=2, width_method="aki", depth_method="stack", materialize="graph")
    assert full.growir_record.capture.startswith("the full model")
    state, graph_state = dict(grown.named_parameters()), dict(full.named_parameters())
    assert set(graph_state) == set(state) and all(torch.equal(state[k], v) for k, v in graph_state.items())
    assert record.deviation == pytest.approx(full.growir_record.deviation, rel=1e-5)


def test_the_record_does_not_keep_the_source_alive():
    model = MODELS["llama"]()
    grown = growir.grow(model, width=2.0)
    alive = weakref.ref(model.model.layers[1].mlp.up_proj.weight)
    del model
    gc.collect()
    assert alive() is None and grown.growir_record.exact
