"""Materializing without random init: the rebuilt class on the meta device, grown tensors assigned."""

from __future__ import annotations

import torch

import growir
from zoo import make


def test_rebuilt_class_computes_its_non_persistent_buffers():
    source = make("llama").to(torch.bfloat16)  # rotary inv_freq: a non-persistent buffer, in no state_dict
    grown = growir.grow(source, width=2.0)
    fresh = type(grown)(grown.config).model.rotary_emb.inv_freq
    buf = grown.model.rotary_emb.inv_freq
    assert not buf.is_meta and buf.dtype == source.model.rotary_emb.inv_freq.dtype
    assert torch.equal(buf, fresh.to(buf.dtype))
    assert not any(t.is_meta for t in list(grown.parameters()) + list(grown.buffers()))


def test_tied_head_stays_one_parameter():
    source = make("gpt2")
    assert source.lm_head.weight is source.transformer.wte.weight
    grown = growir.grow(source, width=2.0)
    assert grown.lm_head.weight is grown.transformer.wte.weight


def test_record_keeps_the_graph_not_the_source_weights():
    source = make("llama")
    grown = growir.grow(source, width=2.0)
    gm = grown.growir_record.plan.captured.gm
    assert all(t.is_meta for t in list(gm.parameters()) + list(gm.buffers()))
    assert not any(t.is_meta for t in source.parameters())  # the source keeps its own
    assert "hidden" in str(grown.growir_record)


def test_meta_device_model_grows_to_meta_and_says_it_was_not_measured():
    with torch.device("meta"):
        source = type(make("llama"))(make("llama").config)
    grown = growir.grow(source, width=2.0)
    record = grown.growir_record
    assert all(t.is_meta for t in grown.parameters())
    assert grown.config.hidden_size == 2 * source.config.hidden_size
    assert record.deviation is None and "not measured" in str(record)
