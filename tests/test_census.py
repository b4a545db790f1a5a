"""The census script (benchmarks/census.py): its shrinker, one tiny class run in a forked process, a class killed at
its timeout, and the table's counts and exclusion rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import census  # noqa: E402
import census_table  # noqa: E402


def test_shrink_makes_sizes_small_and_keeps_lists_per_layer():
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 6,
           "intermediate_size": 11008, "vocab_size": 32000, "eos_token_id": 31999, "layer_types": ["a", "b"] * 3,
           "rope_theta": 10000.0, "text_config": {"model_type": "x", "d_model": 512, "num_layers": 4}}
    small = census.shrink(cfg)
    assert (small["hidden_size"], small["num_attention_heads"], small["num_key_value_heads"]) == (32, 4, 2)
    assert (small["num_hidden_layers"], small["intermediate_size"], small["vocab_size"]) == (2, 64, 128)
    assert small["eos_token_id"] < 128 and small["layer_types"] == ["a", "b"] and small["rope_theta"] == 10000.0
    assert small["text_config"] == {"model_type": "x", "d_model": 32, "num_layers": 2}


def test_proportional_keeps_products_of_widths():
    cfg = {"hidden_size": 4096, "mamba_n_heads": 128, "mamba_d_head": 64, "mamba_expand": 2,
           "num_hidden_layers": 32, "vocab_size": 128000}
    small = census.proportional(cfg)
    assert small["mamba_n_heads"] * small["mamba_d_head"] == small["mamba_expand"] * small["hidden_size"]
    assert small["hidden_size"] < 4096 and small["num_hidden_layers"] == 2 and small["vocab_size"] == 128


def test_chosen_classes_prefer_a_language_model_head():
    chosen = census.chosen_classes()
    assert chosen["llama"] == "LlamaForCausalLM" and chosen["albert"] == "AlbertForMaskedLM"
    assert len(set(chosen.values())) == len(chosen)


def test_one_class_in_a_forked_process(monkeypatch):
    monkeypatch.setattr(census, "GROWTHS", {"x2": {"width": 2.0}})
    entry = census.run_class("llama", "LlamaForCausalLM", timeout=300)
    assert entry["build"] == "ok" and "process" not in entry
    x2 = entry["growths"]["x2"]
    assert x2["verdict"] == "exact" and x2["deviation"] <= 1e-5 and x2["returned"] == "LlamaForCausalLM"
    assert x2["reload"] is not None and not x2["reload"]["moved"]  # growir's reload check ran


def test_a_class_past_its_timeout_is_killed_and_recorded():
    entry = census.run_class("llama", "LlamaForCausalLM", timeout=0.01)
    assert entry["process"].startswith("timeout") and entry["growths"] == {}


@pytest.fixture
def done():
    exact = {"verdict": "exact", "deviation": 1e-7, "reasons": [], "reload": {"moved": False}}
    post_norm = {"verdict": "warned", "deviation": 0.3, "reasons": ["x: no exact construction exists"]}
    too_careful = {"verdict": "warned", "deviation": 1e-7, "reasons": ["x: no exact construction exists"]}
    refused = {"verdict": "refused", "why": "UnsupportedOpError: growir has no rule for the op `aten.diff` in 3"}
    return {"a": {"class": "A", "build": "ok", "growths": {"x2": exact, "x2+depth2": post_norm, "x1.5": refused}},
            "b": {"class": "B", "build": "ok", "growths": {"x2": too_careful, "x1.5": dict(refused)}},
            "c": {"class": "C", "build": "ValueError: bad config", "growths": {}}}


def test_the_share_excludes_theorem_backed_inexact_growths_only(done, tmp_path):
    c = census_table.counts(done)
    assert (c["built"], c["growths"]) == (2, 5)
    assert (c["exact"], c["allowed"]) == (1, 4)  # a warning measured exact stays counted, as not exact
    census_table.write_table(done, tmp_path / "census.md", 3)
    text = (tmp_path / "census.md").read_text()
    assert "**1 / 4 = 25%**" in text
    assert "| 2 | UnsupportedOpError: growir has no rule for the op `_` in N | a, b |" in text
    assert "| ValueError: bad config | c |" in text


def test_runs_merge_class_by_class_and_are_labelled(tmp_path):
    """A census merged from a full run and a rerun of some classes: the rerun's verdicts replace the full run's for
    those classes only, each class says which run measured it, and the table lists the runs."""
    import json
    exact = {"verdict": "exact", "deviation": 1e-7, "reasons": []}
    warned = {"verdict": "warned", "deviation": 0.1, "reasons": ["uneven copies"]}
    full = {"a": {"type": "a", "class": "A", "build": "ok", "growths": {"x2": warned}},
            "b": {"type": "b", "class": "B", "build": "ok", "growths": {"x2": exact}}}
    rerun = {"a": {"type": "a", "class": "A", "build": "ok", "growths": {"x2": exact}}}
    (tmp_path / "full.json").write_text(json.dumps(full))
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    done = census_table.merged([(tmp_path / "full.json", "full at abc"), (tmp_path / "rerun.json", "rerun at def")])
    assert done["a"]["run"] == "rerun at def" and done["a"]["growths"]["x2"]["verdict"] == "exact"
    assert done["b"]["run"] == "full at abc" and census_table.counts(done)["exact"] == 2
    census_table.write_table(done, tmp_path / "census.md", 2, "the runs listed below")
    text = (tmp_path / "census.md").read_text()
    assert "Merged from several runs" in text and "full at abc: 1 classes" in text and "rerun at def: 1 classes" in text


def test_an_exact_growth_that_moves_after_reload_counts_as_warned():
    """The model a user saves is what counts: an exact growth whose class recomputes a grown table at load (its
    reload moved) is warned in the share, the reload's note its reason."""
    moved = {"verdict": "exact", "deviation": 1e-7, "reasons": [],
             "reload": {"deviation": 0.8, "moved": True, "note": "after save_pretrained ... move by 0.8"}}
    kept = {"verdict": "exact", "deviation": 1e-7, "reasons": [], "reload": {"deviation": 0.0, "moved": False}}
    done = {"a": {"type": "a", "class": "A", "build": "ok", "growths": {"x2": moved, "x1.5": kept}}}
    c = census_table.counts(done)
    assert (c["exact"], c["allowed"], c["verdicts"]["warned"]) == (1, 2, 1)
    assert census_table.reloaded(done)["a"]["growths"]["x2"]["reasons"] == ["after save_pretrained ... move by 0.8"]
