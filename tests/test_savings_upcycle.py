"""The savings benchmark's upcycling setting: FLOPs per active parameter, Drop-Upcycling, and the pipeline."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys

import pytest
import torch

from growir.train.flops import step_flops, training_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("savings", os.path.join(ROOT, "benchmarks", "savings.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["savings"] = module  # dataclasses look their module up; puts benchmarks/ on sys.path
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


TINY = dict(hidden=16, layers=2, seq=16, batch=4, source_steps=6, target_steps=6, eval_every=3,
            corpus_bytes=200_000, val_windows=4, rewarmup=2)


def tiny_moe(bench, experts=4, top_k=2):
    sizes = dataclasses.replace(bench.QUICK, **TINY)
    setting = dataclasses.replace(bench.SETTINGS["decoder-moe"], experts=experts, top_k=top_k)
    return bench.new_model("decoder", bench.target_config(setting, sizes), 0), sizes


def test_flops_count_the_top_k_experts_and_the_whole_router(bench):
    import savings_setup
    import savings_upcycle as up
    moe, sizes = tiny_moe(bench, experts=4, top_k=2)
    cfg = moe.config
    expert = 3 * cfg.hidden_size * cfg.intermediate_size  # gate, up, down of one expert
    assert up.inactive_params(moe) == cfg.num_hidden_layers * 2 * expert  # 2 of 4 experts idle per token
    batch, seq = 4, 8
    counted = step_flops(moe, batch, seq) * up.active_fraction(moe, batch, seq)
    assert counted == pytest.approx(training_flops(up.active_params(moe), cfg.num_hidden_layers, seq,
                                                   cfg.hidden_size, batch * seq))
    dense = bench.new_model("decoder", savings_setup.model_config("decoder", sizes.hidden, sizes.layers, sizes), 0)
    router = cfg.num_hidden_layers * cfg.hidden_size * cfg.num_local_experts
    # the MoE runs the dense FFN's cost twice (top-2) plus its router: one expert and the router more than dense
    assert up.active_params(moe) == up.active_params(dense) + cfg.num_hidden_layers * expert + router
    assert up.active_fraction(dense, batch, seq) == 1.0


def test_drop_upcycling_redraws_the_same_neurons_of_gate_up_and_down_in_every_expert(bench):
    import savings_upcycle as up
    moe, _ = tiny_moe(bench, experts=4, top_k=2)
    layer = next(m for m in moe.modules() if hasattr(m, "gate_up_proj"))
    with torch.no_grad():  # every expert a copy of expert 0, as after upcycling
        layer.gate_up_proj.copy_(layer.gate_up_proj[:1].clone().expand_as(layer.gate_up_proj))
        layer.down_proj.copy_(layer.down_proj[:1].clone().expand_as(layer.down_proj))
    before_gu, before_down = layer.gate_up_proj.detach().clone(), layer.down_proj.detach().clone()
    neurons = layer.down_proj.shape[-1]
    router = next(m for m in moe.modules() if getattr(m, "num_experts", None) and hasattr(m, "weight"))
    with torch.no_grad():
        router.weight.fill_(1.0)
    drawn = up.drop_upcycle(moe, 0.5, seed=0)
    assert abs(float(router.weight.detach().std()) - moe.config.initializer_range) < 0.01  # the class's own router init
    assert drawn == moe.config.num_hidden_layers * 4 * neurons // 2
    chosen = []
    for e in range(4):
        gate = (layer.gate_up_proj[e, :neurons] != before_gu[e, :neurons]).any(1)
        upr = (layer.gate_up_proj[e, neurons:] != before_gu[e, neurons:]).any(1)
        down = (layer.down_proj[e] != before_down[e]).any(0)
        assert torch.equal(gate, upr) and torch.equal(gate, down) and int(gate.sum()) == neurons // 2
        chosen.append(gate)
    assert any(not torch.equal(chosen[0], c) for c in chosen[1:])  # each expert draws its own neurons


def test_the_upcycling_setting_runs_its_five_methods(bench, tmp_path):
    sizes = dataclasses.replace(bench.QUICK, **TINY)
    bench.run(sizes, [0], ["decoder-moe"], str(tmp_path / "out"), str(tmp_path / "cache"))
    result = json.loads((tmp_path / "out" / "savings.json").read_text())
    setting = result["settings"][0]
    rows = {m["name"]: m for m in setting["methods"]}
    assert list(rows) == ["scratch", "growir", "drop-upcycling", "drop-upcycling+router", "dense"]
    assert all(m["available"] for m in rows.values())
    assert setting["target"]["experts"] == 8 and setting["target"]["top_k"] == 2
    assert rows["growir"]["grown"]["exact"] and not rows["drop-upcycling"]["grown"]["exact"]
    assert rows["growir"]["initial_val_loss"] == pytest.approx(setting["source"]["final_val_loss"], abs=1e-5)
    assert rows["dense"]["steps"] > sizes.target_steps  # the dense source's steps are cheaper
    logs = {r["method"]: r["log"] for r in json.loads((tmp_path / "out" / "savings_logs.json").read_text())["runs"]}
    assert logs["dense"][-1]["flops"] == pytest.approx(logs["scratch"][-1]["flops"], rel=0.1)  # the same budget
    assert "8 experts (top-2)" in (tmp_path / "out" / "savings.md").read_text()


def test_the_gpu_preset_sizes_a_run_whose_scratch_target_has_more_budget_than_the_source(bench, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda sizes, seeds, settings, out, cache, workers, reuse, methods, device:
                        seen.update(sizes=sizes, settings=settings, workers=workers, device=device))
    bench.main(["--preset", "gpu", "--device", "cpu", "--workers", "2"])  # flags after it win
    assert seen["settings"] == ["decoder-wide"] and seen["device"] == "cpu" and seen["workers"] == 2
    assert seen["sizes"].hidden == 128 and seen["sizes"].target_steps == 4 * seen["sizes"].source_steps
    with pytest.raises(SystemExit):  # no CUDA here: the preset asks for it and is refused by name
        bench.main(["--preset", "gpu"])
