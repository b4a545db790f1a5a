"""Training after growth: corpus, FLOP counter, two-stage schedule, baselines and the savings benchmark."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from transformers import (BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)

from growir.errors import SpecError
from growir.train import baselines
from growir.train.blocks import find_blocks, sliced_blocks, stack_blocks
from growir.train.data import MASK_ID, MLM_VOCAB, Batcher, load_corpus, mask_tokens, stdlib_files
from growir.train.flops import non_embedding_params, step_flops, training_flops
from growir.train.loop import TrainConfig, train
from growir.train.schedule import TwoStage, hf_callback

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama(hidden=16, layers=4, inter=32, heads=2, vocab=256):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                        max_position_embeddings=32))


def bert(hidden=16, layers=2, inter=32, heads=2):
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=inter, vocab_size=MLM_VOCAB, max_position_embeddings=32))


def batch(n=2, seq=8, vocab=256):
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def with_grad(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None}


# --- corpus --------------------------------------------------------------------------------------------------

def test_corpus_split_is_deterministic_and_disjoint_by_file():
    a, b = load_corpus(max_bytes=300_000), load_corpus(max_bytes=300_000)
    assert a.train_files == b.train_files and a.val_files == b.val_files
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert set(a.train_files).isdisjoint(a.val_files)
    listed = stdlib_files()
    taken = [f for f in listed if f in set(a.train_files) | set(a.val_files)]
    assert taken == listed[:len(taken)]  # a prefix of the sorted listing
    assert list(a.val_files) == taken[9::10]
    assert not any(part in {"test", "tests", "idlelib", "site-packages"}
                   for f in listed for part in f.split(os.sep)[:-1])


def test_batches_are_seeded_and_validation_fixed():
    corpus = load_corpus(max_bytes=200_000)
    one, two = (Batcher(corpus, seq=16, batch=4, mlm=True, seed=3, val_windows=8) for _ in range(2))
    assert torch.equal(one.next_batch()["input_ids"], two.next_batch()["input_ids"])
    v1, v2 = one.val_batches(), two.val_batches()
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(v1, v2))


def test_mask_tokens_rates():
    ids = torch.full((64, 128), 65)
    inputs, labels = mask_tokens(ids, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert 0.13 < chosen.float().mean() < 0.17
    assert 0.75 < (inputs[chosen] == MASK_ID).float().mean() < 0.85
    assert bool((inputs[~chosen] == 65).all())


# --- FLOPs ---------------------------------------------------------------------------------------------------

def test_flops_formula_on_a_known_config():
    d, i, L, V, seq = 16, 32, 4, 256, 8
    m = llama(hidden=d, layers=L, inter=i)
    per_layer = 4 * d * d + 3 * d * i + 2 * d      # q, k, v, o; gate, up, down; two RMSNorms
    N = L * per_layer + d + d * V                  # final norm, untied lm_head
    assert non_embedding_params(m) == N
    T = 3 * seq
    assert step_flops(m, 3, seq) == 6 * N * T + 6 * 2 * L * seq * d * T == training_flops(N, L, seq, d, T)


def test_flops_count_tied_head_and_scale_linearly_with_tokens():
    m = bert()
    d, V = 16, MLM_VOCAB
    assert non_embedding_params(m) >= d * V        # the tied decoder's matmul is counted
    assert step_flops(m, 4, 8) == pytest.approx(2 * step_flops(m, 2, 8))


def test_stage1_flops_count_only_what_runs():
    m = llama(layers=4)
    full = step_flops(m, 2, 8)
    cb = TwoStage(block_size=1, stage1_steps=1, submodels="prefix")
    cb.rng.choice = lambda depths: 2                 # sub-model of depth 2, training block 1
    cb.on_step_begin(m, 0)
    part = step_flops(m, 2, 8)
    cb.on_step_end(m, 0)
    P = sum(p.numel() for p in find_blocks(m).blocks[0].parameters())
    H = 16 + 16 * 256
    att = 4 * 8 * 16
    expected = 2 * (2 * P + H) + 2 * att + (4 * P + 2 * att) + 2 * H
    assert part == expected * 16 and part < full / 2


# --- two-stage schedule ------------------------------------------------------------------------------------

def test_stage1_updates_only_the_sampled_submodels_top_blocks():
    m = llama(layers=4)
    cb = TwoStage(block_size=2, stage1_steps=5, seed=0, submodels="prefix")  # the paper's bottom-prefix sub-models
    seen = set()
    for step in range(5):
        m.zero_grad(set_to_none=True)
        cb.on_step_begin(m, step)
        depth, trained = cb.depth, cb.trained_blocks
        assert len(find_blocks(m).blocks) == depth
        m(**batch()).loss.backward()
        cb.on_step_end(m, step)
        assert len(find_blocks(m).blocks) == 4 and m.config.num_hidden_layers == 4
        seen.add(depth)
        assert trained == [depth - 2, depth - 1]
        assert with_grad(m) == {n for n, _ in m.named_parameters()
                                if any(n.startswith(f"model.layers.{i}.") for i in trained)}
    m.zero_grad(set_to_none=True)
    cb.on_step_begin(m, 5)                           # stage 2
    assert cb.depth is None
    m(**batch()).loss.backward()
    cb.on_step_end(m, 5)
    assert with_grad(m) == {n for n, _ in m.named_parameters()}
    assert seen == {2, 4}


def test_two_stage_in_the_plain_loop_changes_only_trained_blocks():
    m = llama(layers=4)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cb = TwoStage(block_size=1, stage1_steps=10, seed=1)
    picked = []
    original = cb.on_step_begin
    cb.on_step_begin = lambda model, step: (original(model, step), picked.append(list(cb.trained_blocks)))[0]
    b = Batcher(load_corpus(max_bytes=100_000), seq=8, batch=2, val_windows=2)
    train(m, b, TrainConfig(steps=1, eval_every=1), callbacks=[cb], progress=False)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith(f"model.layers.{picked[0][0]}.")}


def changed_blocks(model, before) -> set[int]:
    return {int(n.split(".")[2]) for n, p in model.named_parameters()
            if not torch.equal(p, before[n]) and n.startswith("model.layers.")} | \
        ({-1} if any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
                     if not n.startswith("model.layers.")) else set())


def test_two_stage_through_the_trainer_callback_handler():
    """Drives the callback the way ``Trainer`` does (begin, forward/backward, step, global_step += 1, end)."""
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler

    m = llama(layers=4)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cb = TwoStage(block_size=2, stage1_steps=100, seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    handler = CallbackHandler([hf_callback(cb)], m, None, opt, None)
    state, control = TrainerState(), TrainerControl()
    handler.on_step_begin(None, state, control)
    trained = set(cb.trained_blocks)
    m(**batch()).loss.backward()
    opt.step()
    state.global_step += 1
    handler.on_step_end(None, state, control)
    assert changed_blocks(m, before) == trained and len(trained) == 2
    assert len(find_blocks(m).blocks) == 4 and all(p.requires_grad for p in m.parameters())


def test_two_stage_in_a_real_trainer(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    m = llama(layers=4)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cb = TwoStage(block_size=2, stage1_steps=100, seed=0)
    data = [{"input_ids": x, "labels": x} for x in batch(4)["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", learning_rate=1e-2)
    Trainer(model=m, args=args, train_dataset=data, callbacks=[hf_callback(cb)]).train()
    assert changed_blocks(m, before) in ({0, 1}, {2, 3})
    assert len(find_blocks(m).blocks) == 4


def test_the_trainer_callback_refuses_ddp_that_ignores_frozen_blocks():
    from types import SimpleNamespace
    cb = hf_callback(TwoStage(block_size=1, stage1_steps=1))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        cb.on_train_begin(SimpleNamespace(world_size=2, ddp_find_unused_parameters=False), None, None)
    for world, unused in ((1, False), (2, None), (2, True)):
        cb.on_train_begin(SimpleNamespace(world_size=world, ddp_find_unused_parameters=unused), None, None)


def test_sliced_blocks_restores_on_error():
    m = bert(layers=3)
    with pytest.raises(RuntimeError):
        with sliced_blocks(m, 1):
            raise RuntimeError("boom")
    assert len(find_blocks(m).blocks) == 3 and find_blocks(m).path == "bert.encoder.layer"


# --- baselines ---------------------------------------------------------------------------------------------

def shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", [llama, bert])
def test_baselines_produce_target_shapes(make):
    src = make(hidden=16, layers=2, inter=32, heads=1)
    target = make(hidden=32, layers=4, inter=64, heads=2)
    direct = baselines.directcopy(src, target.config, seed=0)
    assert shapes(direct) == shapes(target)
    stacked = baselines.stackbert(src, 4)
    assert shapes(stacked) == shapes(make(hidden=16, layers=4, inter=32, heads=1))
    model, cb = baselines.progressive(type(target), target.config, baselines.doubling_stages(1, 4, 30), seed=0)
    for step in range(30):
        cb.on_step_begin(model, step)
    assert shapes(model) == shapes(target)


def test_mslt_trains_only_new_blocks_then_everything():
    model, cb = baselines.progressive(LlamaForCausalLM, llama(layers=4).config, {0: 1, 2: 2, 4: 4},
                                      new_only=True, unfreeze_at=6)
    for step in range(5):
        cb.on_step_begin(model, step)
    blocks = find_blocks(model).blocks
    assert [any(p.requires_grad for p in b.parameters()) for b in blocks] == [False, False, True, True]
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    assert cb.on_step_begin(model, 6) and all(p.requires_grad for p in model.parameters())


def test_stack_blocks_copies_bottom_up():
    m = llama(layers=3)
    stack_blocks(m, 5)
    blocks = find_blocks(m).blocks
    assert torch.equal(blocks[3].mlp.up_proj.weight, blocks[0].mlp.up_proj.weight)
    assert torch.equal(blocks[4].mlp.up_proj.weight, blocks[1].mlp.up_proj.weight)
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1, 2, 3, 4]


# --- the benchmark -----------------------------------------------------------------------------------------

def load_benchmark():
    spec = importlib.util.spec_from_file_location("savings", os.path.join(ROOT, "benchmarks", "savings.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["savings"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def stand_in_grow(model, width=2.0, depth=1.0, *, width_method="fpi", depth_method="auto", seed=0, materialize="hf",
                  **extra):
    """Shape-only stand-in for growir.grow (not a growth method): lets the pipeline run without the core."""
    if width_method != "fpi" or extra:
        raise SpecError(f"stand-in knows only width_method='fpi', got {width_method!r} {extra}")
    cfg = model.config.to_dict()
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if key in cfg:
            cfg[key] = round(cfg[key] * width)
    cfg["num_hidden_layers"] = round(cfg["num_hidden_layers"] * depth)
    return baselines.directcopy(model, type(model.config).from_dict(cfg), seed=seed)


def test_quick_benchmark_pipeline_and_schema(tmp_path, monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "grow_fn", lambda: stand_in_grow)
    result = bench.main(["--quick", "--seeds", "0", "1", "--settings", "decoder-wide", "encoder-wide",
                         "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    on_disk = json.loads((tmp_path / "out" / "savings.json").read_text())
    assert on_disk["seeds"] == [0, 1] == result["seeds"]
    names = [m["name"] for m in on_disk["methods"]]
    assert names == ["scratch", "stackbert", "mslt", "directcopy", "fpi", "aki", "bert2bert", "fpi+noise", "growir",
                     "growir+optimizer"]
    assert on_disk["device"] == "cpu" and all(s["lr_sweep"] == [] for s in on_disk["settings"])  # sweep: opt-in
    for m in on_disk["methods"]:
        assert {"name", "saving", "saving_std", "flops_to_target", "final_val_loss", "reached"} <= set(m)
        if m["available"]:
            assert {"saving_ranked", "per_seed_saving", "per_seed_final_val_loss", "seeds"} <= set(m)
    by_name = {m["name"]: m for m in on_disk["methods"]}
    assert by_name["scratch"]["saving"] == 0.0 and by_name["scratch"]["reached"]
    assert by_name["fpi"]["available"] and not by_name["aki"]["available"] and not by_name["growir"]["available"]
    assert "stand-in knows only" in by_name["aki"]["reason"]
    assert [s["name"] for s in on_disk["settings"]] == ["decoder-wide", "encoder-wide"]
    for s in on_disk["settings"]:
        assert {"name", "source", "target", "methods"} <= set(s)
        assert s["target"]["hidden"] == 2 * s["source"]["hidden"]
    assert (tmp_path / "out" / "savings.png").stat().st_size > 0
    assert "below the source" in (tmp_path / "out" / "savings.md").read_text()
    assert len(list((tmp_path / "cache").iterdir())) == 4   # one source per (arch, seed)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.data())
def test_full_step_flops_match_the_formula(data):
    heads = data.draw(st.integers(1, 4))
    head_dim = data.draw(st.sampled_from([4, 8]))
    layers = data.draw(st.integers(1, 3))
    seq, n = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 4))
    hidden = heads * head_dim
    for m in (llama(hidden=hidden, layers=layers, inter=2 * hidden, heads=heads),
              bert(hidden=hidden, layers=layers, inter=2 * hidden, heads=heads)):
        N = non_embedding_params(m)
        assert step_flops(m, n, seq) == training_flops(N, layers, seq, hidden, n * seq)


def test_savings_are_paired_with_the_scratch_run_of_the_same_seed():
    bench = load_benchmark()
    log = lambda *pts: [{"flops": f, "val_loss": v} for f, v in pts]  # noqa: E731
    scratch = {0: {"log": log((0, 5.0), (100, 2.0))}, 1: {"log": log((0, 5.0), (100, 3.0))}}
    runs = [{"seed": 0, "available": True, "params": 1, "seconds": 1.0, "log": log((0, 4.0), (50, 2.0))},
            {"seed": 1, "available": True, "params": 1, "seconds": 1.0, "log": log((0, 4.0), (50, 2.0))}]
    out = bench.summarize_method("fpi", runs, scratch, {0: 10.0, 1: 10.0})
    # seed 0 reaches 2.0 at 50 FLOPs (saving 0.5); seed 1 reaches 3.0 at 25 (saving 0.75)
    assert out["saving"] == pytest.approx(0.625) and out["reached"] and out["reached_seeds"] == 2
    assert out["saving_with_source"] == pytest.approx(0.525)
    never = [{**runs[0], "log": log((0, 4.0), (50, 2.5))}]
    assert bench.summarize_method("fpi", never, scratch, {0: 10.0})["reached"] is False
    half = bench.summarize_method("fpi", [runs[0], {**runs[1], "log": log((0, 4.0), (50, 3.5))}], scratch,
                                  {0: 10.0, 1: 10.0})
    # seed 1 never reaches 3.0: the mean over reached seeds is seed 0's 50%, the rank figure counts seed 1 as 0%
    assert half["saving"] == pytest.approx(0.5) and half["reached_seeds"] == 1 and half["seeds"] == 2
    assert half["saving_ranked"] == pytest.approx(0.25)
    assert half["per_seed_saving"] == {"0": pytest.approx(0.5), "1": None}


def test_reuse_keeps_earlier_runs_and_trains_only_missing_ones(tmp_path, monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "grow_fn", lambda: stand_in_grow)
    argv = ["--quick", "--seeds", "0", "--settings", "decoder-wide", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache")]
    bench.main(argv)
    first = json.loads((tmp_path / "out" / "savings_logs.json").read_text())["runs"]
    trained = []
    real = bench.run_job
    monkeypatch.setattr(bench, "run_job", lambda *a: trained.append(a[1]) or real(*a))
    bench.main(argv + ["--reuse"])
    second = json.loads((tmp_path / "out" / "savings_logs.json").read_text())["runs"]
    # the unavailable ones (the stand-in knows only plain fpi); growir+optimizer grows through the real core
    assert sorted(trained) == ["aki", "bert2bert", "fpi+noise", "growir"]
    assert [r["log"] for r in first if r["available"]] == [r["log"] for r in second if r["available"]]


def test_an_interrupted_invocation_keeps_its_finished_runs(tmp_path):
    bench = load_benchmark()
    sizes, out = bench.QUICK, tmp_path
    run = lambda method: {"setting": "decoder-wide", "method": method, "seed": 0, "available": True}  # noqa: E731
    (out / "savings.json").write_text(json.dumps({"sizes": dataclasses.asdict(sizes)}))
    (out / "savings_logs.json").write_text(json.dumps({"sources": {}, "runs": [run("fpi")]}))
    write = bench.keep_partial(str(out), sizes)
    write(run("growir"))
    write({**run("aki"), "available": False})
    done, _ = bench.previous_runs(str(out), sizes)
    assert sorted(k[1] for k in done) == ["fpi", "growir"]  # the unavailable one is retried
    assert bench.previous_runs(str(out), dataclasses.replace(sizes, seq=8)) == ({}, {})
