"""Streaming a sharded bf16 checkpoint disk to disk, and planning from config.json alone.

The streamed folder must equal the in-memory ``growir.grow`` of the same model tensor by tensor (rules in
float32, one cast to bf16), reload with ``from_pretrained`` to the same outputs, and never appear half-written.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import growir
from growir.stream import grow as stream
from growir.api import Options, growth_rules
from growir.frontend.folder import load_config, meta_model
from growir.stream.plan import plan_folder
from growir.cli import main
from growir.analysis.plan import resolve_width
from zoo import randomize_norms

BF16 = torch.bfloat16


def llama_config(layers=2):
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True,
                       architectures=["LlamaForCausalLM"])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tied 2-layer Llama in bf16, saved in several shards, with a tokenizer file to carry along."""
    torch.manual_seed(0)
    model = randomize_norms(LlamaForCausalLM(llama_config())).to(BF16).eval()
    folder = tmp_path_factory.mktemp("src") / "llama"
    model.save_pretrained(folder, max_shard_size="20KB")
    (folder / "tokenizer.json").write_text("{}")
    assert len(list(folder.glob("*.safetensors"))) > 2 and "lm_head.weight" not in _stored(folder)
    return folder, model


def _stored(folder) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("spec", [dict(width=1.5), dict(width=2.0, depth=2.0), dict(width=2.0, width_method="aki")],
                         ids=["x1.5-fill", "x2-depth2", "aki"])
def test_streamed_equals_in_memory_and_reloads(sharded, tmp_path, spec):
    folder, model = sharded
    verify = spec.get("depth") == 2.0 and "onnx"  # ONNX Runtime on both models, loaded in float32
    report = growir.grow_checkpoint(folder, tmp_path / "out", max_shard_size="40KB", verify=verify, **spec)
    assert (report.check is not None and report.check.preserved) == bool(verify)
    # the same growth in memory, of the same bf16 model (width_method "auto" decides by the stored dtype)
    with pytest.warns(UserWarning) if spec.get("width_method") == "aki" or "depth" not in spec else _nothing():
        memory = growir.grow(model, **spec).float()
    stored = _stored(tmp_path / "out")
    expected = {k: v.to(BF16) for k, v in memory.state_dict().items() if k in stored}
    assert set(stored) == set(expected) and "lm_head.weight" not in stored
    for name, tensor in stored.items():
        assert tensor.dtype == BF16 and torch.equal(tensor, expected[name]), name
    # AKI is not exact by design; x1.5 rescales the residual stream, and bf16 rounds the rescaled values
    assert report.exact == ("depth" in spec)
    assert ("cannot hold the grown values" in str(report)) == (spec.get("width") == 1.5)
    assert len(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]) == len(stored)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and os.listdir(tmp_path) == ["out"]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ref = LlamaForCausalLM(memory.config).float().eval()  # its rotary table computed in float32, as reloaded's
    ref.load_state_dict({k: v.to(BF16).float() for k, v in memory.state_dict().items()})
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ref(ids).logits)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_interrupted_stream_leaves_no_output(sharded, tmp_path, monkeypatch):
    folder, _ = sharded
    made = []
    real = stream.make_tensor

    def failing(*args):
        if len(made) == 5:
            raise RuntimeError("disk full")
        made.append(1)
        return real(*args)
    monkeypatch.setattr(stream, "make_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        growir.grow_checkpoint(folder, tmp_path / "out", width=2.0, max_shard_size="20KB")
    assert os.listdir(tmp_path) == []


def test_plan_from_config_alone(tmp_path, capsys):
    llama_config(layers=6).save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]
    fp = plan_folder(tmp_path)
    assert fp.counts == {"model.layers": 6} and fp.plan.blocks[0].count == 2
    assert sorted({g.role for g in fp.plan.groups if g.role}) == ['ffn', 'head_dim', 'heads', 'hidden', 'kv_heads']
    assert main(["plan", str(tmp_path)]) == 0
    assert "blocks `model.layers`: 6 x pre-norm" in capsys.readouterr().out


def _same_rule(a, b) -> bool:
    same = lambda x, y: (x is None) == (y is None) and (x is None or torch.equal(x, y))
    return (a.source, a.donor, a.scale, a.zero) == (b.source, b.donor, b.scale, b.zero) and all(
        same(p.index, q.index) and same(p.divide, q.divide) and same(p.scale, q.scale) and p.fill == q.fill
        and same(p.source, q.source) for p, q in zip(a.axes, b.axes)) and (
        (a.donor_axis is None) == (b.donor_axis is None)
        and (a.donor_axis is None or (a.donor_axis[0] == b.donor_axis[0]
                                      and torch.equal(a.donor_axis[1], b.donor_axis[1]))))


def test_meta_and_proxy_rules_equal_the_rules_built_with_weights(tmp_path, method="aki"):
    """Rules of a 4-block model: from a two-block proxy on meta, expanded by index (AKI: each block's donor is
    the next block, the last has none), and from the real model."""
    llama_config(layers=4).save_pretrained(tmp_path)
    fp = plan_folder(tmp_path)
    depth_plan = [(fp.plan.blocks[0], 8)]
    opts = Options(width_method=method, depth_method="identity")
    _, proxy_rules, *_ = growth_rules(fp.plan, resolve_width(fp.plan, 2.0), depth_plan, opts, fp.counts)
    torch.manual_seed(0)
    with pytest.warns(UserWarning) if method == "aki" else _nothing():
        grown = growir.grow(LlamaForCausalLM(llama_config(layers=4)), width=2.0, depth=2.0,
                            width_method=method, depth_method="identity")
    weighted = grown.growir_record.rules
    assert set(proxy_rules) == set(weighted)
    for name in weighted:
        assert _same_rule(proxy_rules[name], weighted[name]), name


def test_meta_model_is_built_without_memory(tmp_path):
    llama_config(layers=3).save_pretrained(tmp_path)
    model = meta_model(*load_config(tmp_path))
    assert all(p.device.type == "meta" for p in model.parameters())


def _gpt2_four_heads_four_blocks():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=300, n_positions=256,
                                      architectures=["GPT2LMHeadModel"]))


def _llama_untied_300():
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                        tie_word_embeddings=False, architectures=["LlamaForCausalLM"]))


@pytest.mark.parametrize("build", [_llama_untied_300, _gpt2_four_heads_four_blocks], ids=["llama", "gpt2"])
def test_one_export_on_a_small_vocabulary_proxy(tmp_path, monkeypatch, build):
    """The folder is planned once, on the random-weight proxy (two blocks; the vocabulary, and GPT-2's position
    table, shrunk to 128 rows); that plan gives the full model's rules and the proxy's own growth (the config
    choice): one torch.export, and the streamed folder still equals the in-memory growth of the whole model.
    GPT-2 with as many heads as blocks: n_head is no block count (setting it to two shapes no tensor)."""
    from growir.frontend import export
    from growir.pipeline import stages

    torch.manual_seed(0)
    model = randomize_norms(build()).to(BF16).eval()
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    exports = []
    monkeypatch.setattr(stages, "capture", lambda *a: exports.append(1) or export.capture(*a))
    report = growir.grow_checkpoint(tmp_path / "src", tmp_path / "out", width=2.0)
    assert len(exports) == 1 and report.exact
    assert all(300 not in t.shape for t in report.plan.captured.gm.parameters())  # the small vocabulary's plan
    stored = _stored(tmp_path / "out")
    memory = growir.grow(model, width=2.0)
    config = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert config(type(model).from_pretrained(tmp_path / "out").config) == config(memory.config)
    state = memory.state_dict()
    assert set(stored) <= set(state)
    for name, tensor in stored.items():
        assert torch.equal(tensor, state[name]), name


def test_verify_checkpoint_takes_the_dtype_the_growth_was_written_in(sharded, tmp_path):
    """bf16 stored x2: 'auto' copies the residual stream (sqrt(2) would round); written in float32 it fills.
    The check rebuilds the maps of the growth that wrote the folder, so it needs the same dtype."""
    folder, _ = sharded
    growir.grow_checkpoint(folder, tmp_path / "out", width=2.0, dtype=torch.float32)
    assert growir.verify_checkpoint(folder, tmp_path / "out", width=2.0, dtype=torch.float32).preserved
    assert not growir.verify_checkpoint(folder, tmp_path / "out", width=2.0).preserved


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    folders = {}
    for tied in (True, False):
        cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                       vocab_size=100, tie_word_embeddings=tied)
        folders[tied] = tmp_path_factory.mktemp("t5") / "src"
        T5ForConditionalGeneration(cfg).save_pretrained(folders[tied])
    return folders


def test_t5_streams_untied_and_refuses_what_no_checkpoint_can_hold(t5_folders, tmp_path):
    """Untied T5 (v1.1, flan-t5) streams x2 exactly. A tied T5 scales its output by d_model**-0.5, which no grown
    config computes: a MaterializeError says why and what to do. Depth: block 0 alone holds the relative
    attention bias, so it is a kind of its own: its run is kept and the other blocks' run grows, exactly."""
    from growir.errors import MaterializeError

    assert growir.grow_checkpoint(t5_folders[False], tmp_path / "untied", width=2.0).exact
    with pytest.raises(MaterializeError, match="cannot stream this growth.*materialize='graph'"):
        growir.grow_checkpoint(t5_folders[True], tmp_path / "tied", width=2.0)
    deep = growir.grow_checkpoint(t5_folders[False], tmp_path / "deep", width=2.0, depth=2.0)
    assert deep.exact and "first run kept" in deep.layers["encoder.block"][2]
    assert sorted(os.listdir(tmp_path)) == ["deep", "untied"]
