"""A composite model's sub-configs (``text_config``, ``vision_config``) are searched like its own fields, and a
depth growth of the text stack carries the sub-config's per-layer lists (``text_config.layer_types``) along: the
grown model comes back as its own class, not as a GraphModule (lighton_ocr, aya_vision at x2 + depth x2)."""

from __future__ import annotations

import torch
import transformers as T

import growir


def _llava():
    text = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         layer_types=["full_attention", "sliding_attention"], use_sliding_window=True,
                         sliding_window=16, use_cache=False)
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    config = T.LlavaConfig(text_config=text, vision_config=vision, image_token_index=127)
    torch.manual_seed(0)
    return T.LlavaForConditionalGeneration(config).eval()


def test_a_depth_growth_follows_the_sub_configs_per_layer_lists():
    model = _llava()
    ids = torch.randint(0, 120, (2, 9))
    grown = growir.grow(model, width=2.0, depth=2)
    assert type(grown) is T.LlavaForConditionalGeneration
    text = grown.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (64, 4)
    assert list(text.layer_types) == [model.config.text_config.layer_types[i] for i in (0, 0, 1, 1)] or \
        list(text.layer_types) == [model.config.text_config.layer_types[i] for i in (0, 1, 0, 1)]
    assert grown.growir_record.exact
    with torch.no_grad():
        a, b = model(ids).logits, grown(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
