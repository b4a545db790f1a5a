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
