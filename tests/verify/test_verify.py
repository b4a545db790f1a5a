"""growir.check and growir.export_onnx: exact growths pass, single faults fail and are named, exports are faithful.

Besides growir.grow's own output, faulty "grown" models are built by hand with the Net2Net copy (producers
copy rows W[g], consumers copy columns and divide by the copy count, LayerNorm copies its affine parameters):
the faults then do not depend on the core, and the maps need not be the identity on the first indices.
"""

from __future__ import annotations

import copy
import logging
import os
from types import SimpleNamespace

import onnx
import onnxruntime
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import growir
from growir.errors import TraceError
from growir.frontend.inputs import hf_example_inputs
from growir.verify.compare import map_source_output
from growir.verify.onnx_check import compare_output, default_tolerance

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

HIDDEN, HEADS, INTER = 32, 4, 64


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                        intermediate_size=INTER, vocab_size=100, max_position_embeddings=32)
    return BertModel(config).eval()


def twice_each(n: int, gen: torch.Generator | None) -> torch.Tensor:
    """A map of length 2n that copies every source index exactly twice (LayerNorm statistics stay exact)."""
    if gen is None:
        return torch.arange(2 * n) % n  # identity on the first n indices, as growir's maps are
    return torch.cat([torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)])


def net2net_double(small: BertModel, seed: int | None = None) -> tuple[BertModel, torch.Tensor]:
    """``small`` at twice the hidden size, heads and intermediate size; returns the model and its hidden map."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS
    g_hidden, g_inter, g_head = twice_each(HIDDEN, gen), twice_each(INTER, gen), twice_each(HEADS, gen)
    g_attn = (g_head[:, None] * head_dim + torch.arange(head_dim)).flatten()  # whole heads are copied
    config = copy.deepcopy(small.config)
    config.hidden_size, config.num_attention_heads, config.intermediate_size = 2 * HIDDEN, 2 * HEADS, 2 * INTER
    big = BertModel(config).eval()

    def out_map(name):
        return g_attn if name.endswith(("query", "key", "value")) else g_inter if "intermediate" in name else g_hidden

    def in_map(name):
        return g_attn if name.endswith("attention.output.dense") else g_inter if name.endswith(
            "output.dense") else g_hidden

    small_modules = dict(small.named_modules())
    with torch.no_grad():
        for name, module in big.named_modules():
            src = small_modules[name]
            if isinstance(module, torch.nn.Linear):
                g_out, g_in = out_map(name), in_map(name)
                module.weight.copy_(src.weight[g_out][:, g_in] / 2.0)  # every input index is copied twice
                module.bias.copy_(src.bias[g_out])
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(src.weight[:, g_hidden])
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(src.weight[g_hidden])
                module.bias.copy_(src.bias[g_hidden])
    return big, g_hidden


@pytest.fixture(scope="module")
def small():
    return tiny_bert()


@pytest.fixture(scope="module")
def wide_report(small):
    return growir.check(small, growir.grow(small, width=2.0), samples=3)


def test_growir_widening_is_preserved(wide_report):
    assert wide_report.preserved, str(wide_report)
    assert [out.name for out in wide_report.outputs] == ["last_hidden_state", "pooler_output"]
    hidden = wide_report["last_hidden_state"]
    assert hidden.source_shape == (2, 8, HIDDEN) and hidden.grown_shape == (2, 8, 2 * HIDDEN)
    assert hidden.compared == "index map"  # through grown.growir_record.output_maps
    assert wide_report.max_abs_error < 1e-5
    assert all(out.error_to_bound < 0.1 for out in wide_report.outputs)
    assert wide_report.export_faithful and max(wide_report.export_error.values()) < 1e-5
    assert wide_report.samples == ["input_ids 2×8", "input_ids 1×5", "input_ids 3×13"]


def test_report_prints_as_a_table(wide_report):
    text = str(wide_report)
    assert text.splitlines()[0] == "growir check: PRESERVED"
    assert "last_hidden_state  2×8×32        2×8×64" in text and "index map" in text
    assert "export fidelity (torch vs onnxruntime, max abs): source" in text


@pytest.fixture(scope="module")
def faulty_reports(small):
    """One check per fault: a perturbed pooler weight in a scrambled copy (compared through its output maps),
    and one consumer column whose split was undone."""
    perturbed, g_hidden = net2net_double(small, seed=3)  # not the identity on the first 32: needs the maps
    perturbed.growir_record = SimpleNamespace(output_maps=[[None, None, g_hidden], [None, g_hidden]])
    undone, _ = net2net_double(small)
    with torch.no_grad():
        perturbed.pooler.dense.weight[5, 7] += 0.01
        undone.encoder.layer[0].output.dense.weight[:, 3] *= 2.0
    return {"perturbed": growir.check(small, perturbed, samples=2), "undone": growir.check(small, undone, samples=2)}


def test_scrambled_copy_is_compared_through_its_output_maps(faulty_reports):
    hidden = faulty_reports["perturbed"]["last_hidden_state"]
    assert hidden.compared == "index map" and hidden.grown_shape == (2, 8, 2 * HIDDEN)
    assert hidden.preserved and hidden.max_abs_error < 1e-5  # only if every grown column met its own source


def test_one_perturbed_weight_is_caught_and_named(faulty_reports):
    report = faulty_reports["perturbed"]
    assert not report.preserved
    assert report.failed == ["pooler_output"]  # the encoder output did not move
    assert report["last_hidden_state"].max_abs_error < 1e-5
    assert report["pooler_output"].max_abs_error > 1e-3
    assert "NOT PRESERVED (pooler_output)" in str(report)


def test_an_undone_consumer_split_is_caught(faulty_reports):
    report = faulty_reports["undone"]
    assert not report.preserved
    assert report.failed == ["last_hidden_state", "pooler_output"]
    assert report["last_hidden_state"].error_to_bound > 2


def test_lm_logits_get_kl_and_top1():
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=32,
                                    bos_token_id=0, eos_token_id=0)).eval()
    moved = copy.deepcopy(lm)
    with torch.no_grad():
        moved.transformer.ln_f.bias[0] += 0.5
    report = growir.check(lm, moved, samples=2)
    logits = report["logits"]
    assert report.failed == ["logits"] and logits.grown_shape == (2, 8, 50)
    assert logits.kl_divergence > 0 and 0.0 <= logits.top1_agreement <= 1.0
    assert "KL" in str(report)


def test_identical_logits_have_zero_kl_and_full_agreement():
    logits = [torch.randn(2, 5, 11), torch.randn(1, 3, 11)]
    out = compare_output("logits", logits, [t.clone() for t in logits], vocab=11)
    assert out.preserved and out.max_abs_error == 0.0
    assert out.kl_divergence == pytest.approx(0.0, abs=1e-12) and out.top1_agreement == 1.0


def test_tolerance_scales_with_the_output_magnitude():
    source = [torch.tensor([1000.0, -2.0])]
    assert default_tolerance(torch.float32) == (1e-4, 0.0)
    # bound = 1e-4 * max(1, 1000) = 0.1
    assert compare_output("y", source, [source[0] + torch.tensor([0.09, 0.0])]).preserved
    assert not compare_output("y", source, [source[0] + torch.tensor([0.0, 0.11])]).preserved
    nan = [torch.tensor([float("nan"), 1.0])]
    assert not compare_output("y", source, nan).preserved
    assert compare_output("y", nan, [nan[0].clone()]).preserved


class TwoLayer(torch.nn.Module):
    """Returns (output, hidden): a tuple, so the outputs are named output[0] and output[1]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, hidden), torch.nn.Linear(hidden, 3)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(h), h


def test_plain_modules_need_example_inputs_and_compare_tuple_outputs():
    torch.manual_seed(0)
    source, grown = TwoLayer(8), TwoLayer(16)
    g = torch.arange(16) % 8
    counts = torch.bincount(g).float()
    with torch.no_grad():
        grown.up.weight.copy_(source.up.weight[g])
        grown.up.bias.copy_(source.up.bias[g])
        grown.down.weight.copy_(source.down.weight[:, g] / counts[g])
        grown.down.bias.copy_(source.down.bias)
    with pytest.raises(TraceError, match="example_inputs"):
        growir.check(source, grown)
    report = growir.check(source, grown, (torch.randn(5, 4),), samples=3)
    assert report.preserved, str(report)
    assert [out.name for out in report.outputs] == ["output[0]", "output[1]"]
    assert report["output[1]"].compared == "leading slice" and report["output[1]"].grown_shape == (5, 16)
    assert report.max_abs_error < 1e-5 and len(report.samples) == 3
    with torch.no_grad():
        grown.down.weight[0, 12] += 0.01  # a copy that only the second half of the hidden layer feeds
    assert growir.check(source, grown, (torch.randn(5, 4),), samples=2).failed == ["output[0]"]


def test_map_source_output_refuses_shapes_that_cannot_correspond():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="number of axes"):
        map_source_output(s, (2, 3, 1))
    with pytest.raises(ValueError, match="shrank"):
        map_source_output(s, (2, 2))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        map_source_output(s, (2, 4), [None, torch.tensor([0, 1, 2, 3])])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.data())
def test_map_source_output_gathers_every_mapped_axis(data):
    rank = data.draw(st.integers(1, 3))
    old = data.draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    maps, grown_shape = [], []
    for size in old:
        if data.draw(st.booleans()):
            g = data.draw(st.lists(st.integers(0, size - 1), min_size=size, max_size=2 * size + 1))
            maps.append(torch.tensor(g))
            grown_shape.append(len(g))
        else:
            maps.append(None)
            grown_shape.append(size + data.draw(st.integers(0, 2)))
    source = torch.arange(torch.Size(old).numel(), dtype=torch.float64).reshape(old)
    expected, index = map_source_output(source, grown_shape, maps)
    assert list(expected.shape) == [len(m) if m is not None else s for m, s in zip(maps, old)]
    assert torch.zeros(grown_shape)[index].shape == expected.shape
    for position in torch.cartesian_prod(*[torch.arange(n) for n in expected.shape]).reshape(-1, rank):
        source_position = [int(m[p]) if m is not None else int(p) for m, p in zip(maps, position)]
        assert expected[tuple(position.tolist())] == source[tuple(source_position)]


def test_example_inputs_are_padded_and_seeded(small):
    x = hf_example_inputs(small, 4, 16, seed=1)
    assert x["attention_mask"].sum(1).tolist() == [16, 12, 8, 4]
    assert int(x["input_ids"].max()) < 100
    assert torch.equal(x["input_ids"], hf_example_inputs(small, 4, 16, seed=1)["input_ids"])
    assert hf_example_inputs(small, 2, 999)["input_ids"].shape == (2, 32)  # capped at max_position_embeddings


@pytest.fixture(scope="module")
def exported_bert(small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return growir.export_onnx(small, folder / "bert.onnx"), folder


def test_export_onnx_has_dynamic_text_axes_and_matches_torch_elsewhere(small, exported_bert):
    path, folder = exported_bert
    assert sorted(os.listdir(folder)) == ["bert.onnx"]  # single file, no temp leftovers
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for value in inputs.values():
        assert all(dim.dim_param for dim in value.type.tensor_type.shape.dim)  # batch and sequence symbolic
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = hf_example_inputs(small, 3, 11, seed=5)  # not the traced 2×8, and padded
    got = session.run(None, {k: v.numpy() for k, v in x.items() if isinstance(v, torch.Tensor)})
    with torch.no_grad():
        want = small(**x)  # with use_cache=False, as exported
    assert torch.allclose(torch.from_numpy(got[0]), want.last_hidden_state, atol=1e-5, rtol=0)
    assert torch.allclose(torch.from_numpy(got[1]), want.pooler_output, atol=1e-5, rtol=0)


def test_export_onnx_of_a_torch_export_graph_module(tmp_path):
    torch.manual_seed(0)
    net = TwoLayer(8).eval()
    batch = torch.export.Dim("batch")
    module = torch.export.export(net, (torch.randn(4, 4),), dynamic_shapes=({0: batch},)).module()
    assert isinstance(module, torch.fx.GraphModule)
    path = growir.export_onnx(module, tmp_path / "net.onnx", (torch.randn(4, 4),))
    onnx.checker.check_model(onnx.load(str(path)))
    x = torch.randn(7, 4)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want = net(x)
    assert torch.allclose(torch.from_numpy(got[0]), want[0], atol=1e-6, rtol=0)
    assert torch.allclose(torch.from_numpy(got[1]), want[1], atol=1e-6, rtol=0)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # torch.export cannot trace a branch on a tensor's value


def test_failed_export_raises_trace_error_and_writes_nothing(tmp_path):
    with pytest.raises(TraceError, match="ONNX export of DataDependent failed"):
        growir.export_onnx(DataDependent(), tmp_path / "bad.onnx", (torch.randn(3),))
    assert os.listdir(tmp_path) == []
    with pytest.raises(TraceError, match="example_inputs"):
        growir.export_onnx(DataDependent(), tmp_path / "bad.onnx")
