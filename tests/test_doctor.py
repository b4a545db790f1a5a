"""growir doctor: plain words about what the graph holds and what can grow exactly, all from the plan."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import growir
from growir.cli import main
from zoo import make


def lines(d, prefix: str) -> list[str]:
    return [f for f in d.facts if f.startswith(prefix)]


@functools.cache
def llama(kv: int):
    """The diagnosis of a tiny Llama with ``kv`` kv heads (traced once per module)."""
    torch.manual_seed(0)
    return growir.doctor(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=kv, vocab_size=100)))


@pytest.mark.parametrize("kv, kind", [(4, "multi-head (4 heads)"),
                                      (2, "grouped-query (4 query heads share 2 kv heads)"),
                                      (1, "multi-query (4 query heads share 1 kv head)")])
def test_attention_kind_from_the_head_axes(kv, kind):
    d = llama(kv)
    assert lines(d, "attention") == [f"attention: 2 x {kind}, head_dim 8, rotary"]


def test_pre_norm_decoder_grows_exactly_everywhere():
    d = llama(2)
    assert "pre-norm" in lines(d, "blocks")[0] and "`model.layers`, 2 " in lines(d, "blocks")[0]
    assert lines(d, "norms") == ["norms: 5 x RMS norm (a mean of squares, aten.mean) over hidden"]
    assert lines(d, "tied") == ["tied weights: none"]
    assert {k: v[0] for k, v in d.verdicts.items()} == {"width x2": "exact", "width x1.5": "exact",
                                                        "head_dim x2": "exact", "depth x2": "exact"}


def test_post_norm_encoder_says_what_cannot_be_exact_and_why():
    d = growir.doctor(make("bert"))
    assert "post-norm" in lines(d, "blocks")[0]
    assert lines(d, "norms") == ["norms: 5 x LayerNorm (aten.layer_norm) over hidden"]
    assert d.verdicts["width x2"] == ("exact", "")
    verdict, why = d.verdicts["width x1.5"]
    assert verdict.startswith("not exact") and "uneven" in why and "post-norm" in why
    verdict, why = d.verdicts["depth x2"]
    assert verdict.startswith("not exact") and "post-norm" in why and "`stack`" in why


def test_tied_embedding_and_head_are_named():
    d = growir.doctor(make("gpt2"))
    (tied,) = lines(d, "tied")
    assert "`lm_head.weight` and `transformer.wte.weight` are one tensor" in tied
    assert "embedding (copied) and as the head (contracted)" in tied


def test_any_module_and_the_printout():
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
    d = growir.doctor(layer, (torch.randn(2, 5, 32),))
    text = str(d)
    assert text.startswith("growir doctor: TransformerEncoderLayer\nfound in the graph:")
    assert "blocks: none repeated" in text and "depth x2     refused: no repeated blocks" in text
    assert "width x2     exact" in text


def test_cli_doctor(tmp_path, capsys):
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=32)).save_pretrained(tmp_path / "tiny")
    capsys.readouterr()  # the save's own progress bar
    assert main(["doctor", str(tmp_path / "tiny")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"growir doctor: BertModel ({tmp_path / 'tiny'})") and err == ""
    assert "post-norm" in out and "multi-head (4 heads)" in out


def test_cli_doctor_counts_the_full_model_not_its_proxy(tmp_path, capsys):
    """A 6-layer config is planned on a two-block proxy; the printout counts 6 blocks' norms and attentions."""
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    assert main(["doctor", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "`model.layers`, 6 of the same ops" in out
    assert "norms: 13 x RMS norm (a mean of squares, aten.mean) over hidden" in out  # 2 a block, and the final
    assert "attention: 6 x grouped-query (4 query heads share 2 kv heads)" in out
    assert "width groups: hidden 32, query heads per kv head 2 (x6), kv_heads 2 (x6)" in out  # one per block
    assert "ffn 64 (x6)" in out


def test_cli_doctor_plans_a_model_that_makes_its_own_tensors_as_grow_does(tmp_path, capsys):
    """Mamba's forward makes tensors of its own, so no meta-device trace: doctor plans it on grow's random-weight
    proxy instead, never showing the internal device error."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=4,
                                 expand=2)).save_pretrained(tmp_path / "mamba")
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "mamba")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "`backbone.layers`, 2 of the same ops" in out and "norms: 3 x RMS norm" in out


def test_cli_doctor_refuses_an_untraceable_model_as_grow_does(tmp_path, capsys, monkeypatch):
    """A forward that branches on a value cannot be exported: doctor says what grow says, in one line."""
    from transformers.models.bert import modeling_bert

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=32)).save_pretrained(tmp_path / "tiny")
    pool = modeling_bert.BertPooler.forward
    monkeypatch.setattr(modeling_bert.BertPooler, "forward",
                        lambda self, h: pool(self, h) if h.sum() > 0 else pool(self, -h))
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "tiny")]) == 1
    doctor_err = capsys.readouterr().err
    assert main(["grow", str(tmp_path / "tiny"), str(tmp_path / "out"), "--width", "2"]) == 1
    grow_err = capsys.readouterr().err
    # (torch logs the graph of a failed export on stderr above growir's line: the last line is growir's)
    doctor_err, grow_err = doctor_err.strip().splitlines()[-1], grow_err.strip().splitlines()[-1]
    assert doctor_err.removeprefix("growir doctor: ") == grow_err.removeprefix("growir grow: ")
    assert doctor_err.startswith("growir doctor: torch.export could not trace BertModel")
    assert "expected device meta" not in doctor_err
