"""A growth warning points at the user's line, the first frame outside growir, however many of growir's frames
(pass, manager, stage, public function) lie between: ``errors.warn`` counts them instead of a fixed stacklevel."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import growir
from growir.errors import warn
from zoo import make


def _growir_warnings(record) -> list:
    found = [w for w in record if str(w.message).startswith("growir")]
    assert found, [str(w.message) for w in record]
    return found


def test_a_direct_call_points_at_its_caller():
    with pytest.warns(UserWarning, match="a note") as record:
        warn("growir: a note")
    assert record[0].filename == __file__


def test_in_memory_growth_warnings_point_here():
    """OPT with hidden states as outputs keeps eps (a warning from the check stage, four frames down)."""
    source = make("opt")
    source.config.output_hidden_states = True
    with pytest.warns(UserWarning, match="eps was kept") as record:
        growir.grow(source, width=1.5)
    assert {w.filename for w in _growir_warnings(record)} == {__file__}


def test_a_graph_returned_instead_of_the_class_warns_here():
    """No config rebuilds a Llama whose one block has a GELU: the materialize stage warns and keeps the graph."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    model.model.layers[2].mlp.act_fn = torch.nn.GELU()
    with pytest.warns(UserWarning, match="returned the rewritten torch.fx.GraphModule") as record:
        growir.grow(model, width=2.0)
    assert {w.filename for w in _growir_warnings(record)} == {__file__}


def test_a_streamed_growth_warns_here(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    with pytest.warns(UserWarning, match="not function-preserving") as record:
        growir.grow_checkpoint(tmp_path / "src", tmp_path / "out", width=2.0, width_method="aki")
    assert {w.filename for w in _growir_warnings(record)} == {__file__}
