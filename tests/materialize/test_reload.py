"""A grown Hugging Face model is the same model after save_pretrained / from_pretrained, or its record says why
not (issue 21, item 2: Marian's sinusoidal tables, recomputed at load, moved the outputs by 0.66 silently)."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
import transformers as T

import growir
import growir.materialize.reload as reload_mod
from growir.errors import MaterializeError
from growir.materialize.reload import dropped_on_save, reload_check
from zoo import example_inputs, make

TOL = 1e-5


def tiny_marian():
    torch.manual_seed(0)
    return T.MarianMTModel(T.MarianConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=1,
        decoder_start_token_id=1, eos_token_id=0, bos_token_id=0, use_cache=False)).eval()


def marian_inputs():
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(2, 100, (2, 7), generator=gen),
            "attention_mask": torch.ones(2, 7, dtype=torch.long),
            "decoder_input_ids": torch.randint(2, 100, (2, 5), generator=gen)}


def first_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


def after_reload(model):
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return type(model).from_pretrained(folder).eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(1.0, float(a.abs().max())))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5", "opt", "marian"])
def test_grown_model_survives_save_and_reload(name):
    """x2 in width: the reloaded model computes what the grown one does (float32), or a note says how far not."""
    source, inputs = (tiny_marian(), marian_inputs()) if name == "marian" else (make(name), example_inputs(name))
    grown = growir.grow(source, width=2.0, example_inputs=inputs if name == "marian" else None)
    error = relative(first_output(grown, inputs), first_output(after_reload(grown), inputs))
    said = [n for n in grown.growir_record.notes if "after save_pretrained" in n]
    assert error <= TOL or said, f"{name}: the reloaded model moved by {error:.3g} and the record says nothing"
    assert error <= TOL, f"{name}: {said}"


def test_marian_keeps_its_grown_position_tables():
    """The class drops its sinusoidal tables on save and recomputes them at the grown d_model; the grown model
    saves them instead, so the reloaded model is exact, and the record says so."""
    source, inputs = tiny_marian(), marian_inputs()
    assert dropped_on_save(source)  # the class's own choice, unchanged for the source
    grown = growir.grow(source, width=2.0, example_inputs=inputs)
    assert dropped_on_save(grown) == []
    assert dropped_on_save(type(grown)(grown.config)), "the class itself still drops them"
    assert any("save_pretrained keeps 2 tensors" in n for n in grown.growir_record.notes)
    reloaded = after_reload(grown)
    table = "model.encoder.embed_positions.weight"
    assert torch.equal(reloaded.state_dict()[table], grown.state_dict()[table])
    assert relative(first_output(source, inputs), first_output(reloaded, inputs)) <= TOL


def test_a_tensor_rebuilt_at_load_is_reported():
    """A non-persistent buffer (rotary inv_freq) that the grown model holds with other values than the class
    computes cannot be saved: the check names it and measures the deviation after reload."""
    grown = growir.grow(make("llama"), width=2.0)
    rotary = grown.model.rotary_emb
    rotary.inv_freq.mul_(1.5)
    result = reload_check(grown, grown.growir_record.plan.captured, len(grown.growir_record.plan.facts.outputs))
    assert result.changed == ["model.rotary_emb.inv_freq"] and result.kept == []
    assert result.moved and result.deviation > TOL and "move by" in result.note()


def test_strict_refuses_a_model_that_changes_at_reload(monkeypatch):
    """What from_pretrained would change is a warning with the deviation, and under strict=True an error."""
    monkeypatch.setattr(reload_mod, "recomputed_rounded", lambda grown: None)  # no shortcut: save and load
    monkeypatch.setattr(reload_mod, "reloaded_difference", lambda grown, captured, n: (["lm_head.weight"], 0.25))
    with pytest.warns(UserWarning, match=r"after save_pretrained / from_pretrained .* move by 0\.25"):
        grown = growir.grow(make("llama"), width=2.0)
    assert any("move by 0.25" in n for n in grown.growir_record.notes)
    with pytest.raises(MaterializeError, match="strict=True and after save_pretrained"):
        growir.grow(make("llama"), width=2.0, strict=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_exact_reload_adds_no_note(dtype):
    """bfloat16: the reloaded rotary inv_freq is not the source's rounded one, but the outputs stay within
    TOLERANCE, so nothing is said."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        grown = growir.grow(make("llama").to(dtype), width=2.0)
    assert not [n for n in grown.growir_record.notes if "save_pretrained" in n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shortcut_agrees_with_a_real_save_and_load(dtype):
    """Where nothing the class recomputes at load differs (llama), or differs only as the class's value before
    rounding to the model's dtype (bfloat16's rotary inv_freq), no save is made, and a real save and load agree:
    the same tensors change, and the outputs stay within TOLERANCE."""
    grown = growir.grow(make("llama").to(dtype), width=2.0)
    rounded = reload_mod.recomputed_rounded(grown)
    changed, deviation = reload_mod.reloaded_difference(grown, grown.growir_record.plan.captured, 1)
    assert sorted(rounded) == changed and deviation <= TOL
    assert ("model.rotary_emb.inv_freq" in rounded) == (dtype == torch.bfloat16)


def test_a_non_persistent_table_made_from_a_width_is_grown_and_its_reload_reported():
    """XGLM makes its sinusoidal table (a non-persistent buffer of width d_model) at construction: the rebuilt
    class holds the grown table, so it computes the source's function; from_pretrained would make the class's
    own table again, which the warning says with the deviation."""
    torch.manual_seed(0)
    source = T.XGLMForCausalLM(T.XGLMConfig(vocab_size=128, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
                                            max_position_embeddings=64)).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"after save_pretrained / from_pretrained .*embed_positions\.weights"):
        grown = growir.grow(source, width=2.0)
    assert type(grown) is T.XGLMForCausalLM and grown.growir_record.exact
    assert relative(first_output(source, {"input_ids": ids}), first_output(grown, {"input_ids": ids})) <= TOL
