"""``verify_checkpoint`` on encoder-decoders grown width-only: the block check runs both block lists (the decoder's
cross-attention reads the grown encoder's output), says preserved for an exact growth, and names the first block
that a perturbed grown tensor changes."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import growir


def _t5():
    return T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                                   num_heads=4, vocab_size=100, tie_word_embeddings=False))


def _bart():
    return T.BartForConditionalGeneration(T.BartConfig(d_model=32, encoder_layers=3, decoder_layers=3,
                                                       encoder_attention_heads=4, decoder_attention_heads=4,
                                                       encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                                       max_position_embeddings=64))


# per model: its block lists and their length, and per place a grown tensor there with the block the check must name
NAMES = {
    "t5": (["encoder.block", "decoder.block"], 2,
           {"cross-attention": ("decoder.block.0.layer.1.EncDecAttention.v.weight", "decoder.block.0"),
            "last block": ("decoder.block.1.layer.2.DenseReluDense.wo.weight", "decoder.block.1")}),
    "bart": (["model.encoder.layers", "model.decoder.layers"], 3,
             {"cross-attention": ("model.decoder.layers.0.encoder_attn.v_proj.weight", "model.decoder.layers.0"),
              "last block": ("model.decoder.layers.2.final_layer_norm.weight", "model.decoder.layers.2")}),
}


@pytest.fixture(scope="module", params=[_t5, _bart], ids=["t5", "bart"])
def grown(request, tmp_path_factory):
    """(kind, source folder, its streamed x2 growth): an untied pre-norm T5; a post-norm BART with a tied head and
    three blocks in each list, so that its two-block proxy needs each list's own count field (stream/sample.py)."""
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("src") / "model"
    request.param().save_pretrained(src)
    out = src.parent / "grown"
    assert growir.grow_checkpoint(src, out, width=2.0).exact
    return request.param.__name__.strip("_"), src, out


def _perturb(folder, name: str, by: float = 0.05) -> None:
    """Add random noise to ``name`` (a constant would be no test: a LayerNorm takes a shift of all its channels
    back out, and a row added to a projection of a LayerNorm's zero-mean output adds nothing)."""
    (shard,) = folder.glob("*.safetensors")
    tensors = load_file(shard)
    tensors[name] += by * torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, shard, metadata={"format": "pt"})


def test_an_exact_encoder_decoder_growth_is_preserved_in_every_block(grown):
    """Both lists are compared block by block. BART's head is tied, so growir divides the norm before it by 2;
    post-norm, that norm is the last decoder layer's output, which the check takes as half the copies (it read as
    a 0.5 departure before), and the root's own tensor (final_logits_bias) is named by the class."""
    kind, src, out = grown
    check = growir.verify_checkpoint(src, out, width=2.0)
    assert check.preserved and check.exact and check.worst[1] < 1e-6, str(check)
    blocks = [name for name in check.deviations if not name.startswith(("input", "outputs"))]
    assert blocks == [f"{prefix}.{i}" for prefix in NAMES[kind][0] for i in range(NAMES[kind][1])]
    assert all("(after ," not in name for name in check.deviations)


@pytest.mark.parametrize("where", ["cross-attention", "last block"])
def test_a_perturbed_grown_tensor_is_named_by_its_block(grown, tmp_path, where):
    """A change in the decoder's cross-attention (which reads the grown encoder's output) is named at its decoder
    block; one in the last block (BART: the norm scaled for the tied head) at that block."""
    kind, src, out = grown
    name, block = NAMES[kind][2][where]
    changed = shutil.copytree(out, tmp_path / "grown")
    _perturb(changed, name)
    check = growir.verify_checkpoint(src, changed, width=2.0)
    assert not check.preserved and check.first_failing == block, str(check)


def test_a_folder_whose_class_recomputes_a_grown_table_at_load_is_not_reported_exact(tmp_path):
    """M2M100 recomputes its sinusoidal position table from ``d_model`` at load: the grown table (the old
    columns, copied) is not what ``from_pretrained`` gives, and the folder is all a streamed growth delivers. The
    proxy's reload check says so, so the report is not exact, names the class and the deviation, and strict stops."""
    cfg = T.M2M100Config(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    T.M2M100ForConditionalGeneration(cfg).save_pretrained(tmp_path / "src")
    with pytest.warns(UserWarning, match="loaded by M2M100ForConditionalGeneration"):
        report = growir.grow_checkpoint(tmp_path / "src", tmp_path / "out", width=2.0)
    assert not report.exact and any("from_pretrained" in r and "embed_positions" in r for r in report.reasons)
    with pytest.raises(growir.GrowthError, match="from_pretrained"):
        growir.grow_checkpoint(tmp_path / "src", tmp_path / "strict", width=2.0, strict=True)
    assert not (tmp_path / "strict").exists()
