"""Every savings number quoted in README.md and docs/savings.md is generated from the committed JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_report():
    path = os.path.join(ROOT, "benchmarks", "savings_report.py")
    spec = importlib.util.spec_from_file_location("savings_report", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["savings_report"] = module
    spec.loader.exec_module(module)
    return module


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_quoted_numbers_match_the_committed_json():
    report = load_report()
    result = json.loads(read("benchmarks/results/savings.json"))
    assert report.docs_tables(result) in read("docs/savings.md"), "run: python benchmarks/savings_report.py"
    assert report.readme_line(result) in read("README.md"), "run: python benchmarks/savings_report.py"
    assert read("docs/savings.md").count(report.BEGIN) == 1 and read("README.md").count(report.BEGIN) == 1
    if os.path.exists(report.SCALED):  # the --scale 2 run of the headline, beside the default run
        scaled = json.loads(read("benchmarks/results/scale2/savings.json"))
        assert report.scaled_table(scaled, result) in read("docs/savings.md"), "run: python benchmarks/savings_report.py"
    if os.path.exists(report.GPU):  # the --device cuda run at a larger width
        gpu = json.loads(read("benchmarks/results/gpu/savings.json"))
        assert report.gpu_table(gpu) in read("docs/savings.md"), "run: python benchmarks/savings_report.py"
    if os.path.exists(report.SURVEY):  # the width methods' deviations where no growth is exact
        survey = json.loads(read("benchmarks/results/width_deviation.json"))
        assert report.survey_table(survey) in read("docs/savings.md"), "run: python benchmarks/savings_report.py"


def test_ranking_counts_an_unreached_seed_as_zero():
    report = load_report()
    setting = {"methods": [
        {"name": "lucky", "available": True, "saving": 0.9, "saving_ranked": 0.3, "reached_seeds": 1, "seeds": 3,
         "per_seed_saving": {"0": 0.9, "1": None, "2": None}, "per_seed_final_val_loss": {"0": 1.0, "1": 2.0, "2": 2.0}},
        {"name": "steady", "available": True, "saving": 0.5, "saving_ranked": 0.5, "reached_seeds": 3, "seeds": 3,
         "per_seed_saving": {"0": 0.5, "1": 0.5, "2": 0.5}, "per_seed_final_val_loss": {"0": 1.0, "1": 1.0, "2": 1.0}},
        {"name": "gone", "available": False, "reason": "not run"}]}
    assert [m["name"] for m in report.ranked(setting)] == ["steady", "lucky"]
    seeds = report.seed_table(setting)
    assert seeds[0] == "| method | seed 0 | seed 1 | seed 2 |" and seeds[3] == "| lucky | 90.0% (1.000) | — (2.000) | — (2.000) |"


def _row(name, savings, finals=None, **extra):
    per = {str(i): v for i, v in enumerate(savings)}
    reached = [v for v in savings if v is not None]
    return {"name": name, "available": True, "per_seed_saving": per, "seeds": len(savings),
            "per_seed_final_val_loss": {k: (finals or {}).get(k, 1.0) for k in per},
            "reached_seeds": len(reached), "reached": len(reached) == len(savings),
            "saving_ranked": sum(v or 0.0 for v in savings) / len(savings), **extra}


def test_goal_is_checked_on_the_seeds_both_methods_ran():
    report = load_report()
    mine = _row("growir", [0.7, 0.5, 0.6, 0.2, 0.2])  # seeds 3 and 4 are worse, and the baseline lacks them
    other = _row("directcopy", [0.6, 0.5, 0.6])
    verdict = report.goal_check({}, mine, [other], headline=False)
    assert verdict.startswith("goal met against the baselines run") and "stackbert, mslt" in verdict
    everyone = [_row(name, [0.1, 0.1, 0.1]) for name in report.BASELINES]
    assert report.goal_check({}, mine, everyone, headline=False) == "goal met"
    verdict = report.goal_check({}, mine, [_row("stackbert", [0.9, 0.5, 0.6, 0.2, 0.2])], headline=True)
    assert "below 60.0%" in verdict and "behind stackbert" in verdict
    saturated = _row("growir", [1.0, 1.0, 1.0])  # both reached the target before training: a tie, not a lead
    verdict = report.goal_check({}, saturated, [_row("fpi", [1.0, 1.0, 1.0])], headline=False)
    assert verdict.startswith("goal not met") and "tied with fpi" in verdict


def test_sweep_table_compares_policies_on_common_seeds():
    report = load_report()
    sizes = {"target_steps": 600, "warmup": 0.05}
    growir = _row("growir", [0.6, 0.5, 0.4, 0.9])
    setting = {"methods": [growir], "lr_sweep": [{**_row("growir-w0", [0.7, 0.6, None]), "policy": {"warmup": 0.0}}]}
    lines = report.sweep_table(setting, {"sizes": sizes, "growir_policy": {}})
    assert lines[2].startswith("| run | warmup | peak |") and "seed 3" not in lines[2]
    assert lines[4].startswith("| growir | 30 | ×1 | 50.0% | 3/3 |")
    assert lines[5].startswith("| growir-w0 | 0 | ×1 | 43.3% | 2/3 |")


def test_scaled_run_is_shown_beside_the_default_run_on_its_seeds():
    report = load_report()
    setting = lambda rows: {"name": "h", "source": {"final_val_loss": 2.0},  # noqa: E731
                            "target": {"scratch_below_source": 0.5, "scratch_final_val_loss": 1.5}, "methods": rows}
    scaled = {"headline": "h", "sizes": {"source_steps": 1200, "target_steps": 1200},
              "settings": [setting([_row("growir", [0.5]), _row("directcopy", [0.6])])]}
    default = {"settings": [setting([_row("growir", [0.7, 0.1]), _row("directcopy", [0.4, 0.4])])]}
    lines = report.scaled_table(scaled, default).split("\n")
    assert lines[0] == report.SCALED_BEGIN and lines[-1] == report.SCALED_END
    rows = [line for line in lines if line.startswith("| directcopy") or line.startswith("| growir")]
    assert rows == ["| directcopy | 60.0% | 1.000 | 40.0% | 1.000 |", "| growir | 50.0% | 1.000 | 70.0% | 1.000 |"]


def test_upcycling_setting_says_what_its_flops_count_and_ranks_every_method():
    report = load_report()
    target = {"hidden": 32, "layers": 4, "experts": 8, "top_k": 2, "tokens": 1024, "scratch_flops": 1e9,
              "scratch_below_source": 0.1, "scratch_final_val_loss": 1.6, "scratch_final_val_loss_std": 0.01}
    rows = [_row("scratch", [0.0]), _row("dense", [0.4], final_val_loss=1.55),
            _row("growir", [0.7], final_val_loss=1.5), _row("drop-upcycling", [None], final_val_loss=1.7)]
    setting = {"name": "decoder-moe", "arch": "decoder", "methods": rows, "target": target,
               "source": {"hidden": 32, "layers": 4, "final_val_loss": 1.7}}
    header = report.setting_header(setting)
    assert header[0] == "### decoder-moe: decoder 32×4 → 32×4, 8 experts (top-2)"
    assert any("FLOPs per active parameter (top-2 of 8 experts" in line for line in header)
    line = report.findings({"settings": [setting], "headline": "decoder-wide"})[0]
    assert line.startswith("- `decoder-moe` (dense → 8 experts, top-2; FLOPs per active parameter): growir 70.0% "
                           "(1/1 seeds reached, final loss 1.500), dense 40.0%") and "goal" not in line
    assert "drop-upcycling 0.0% (0/1 seeds reached, final loss 1.700)" in line
    assert report.resisting({"settings": [setting], "headline": "decoder-wide"}) == []
    head = {"name": "decoder-wide", "methods": [_row("growir", [0.6])], "target": {}}
    readme = report.readme_line({"headline": "decoder-wide", "settings": [head, setting]})
    assert readme.endswith(" Upcycling (decoder-moe: dense → 8 experts, top-2, 1 seeds, FLOPs per active parameter): "
                           "growir 70.0%, dense 40.0%, drop-upcycling 0.0%." + report.END)
