"""The config search never raises an internal error (issue 21, item 5): list-of-strings and per-stage fields are
read or skipped with a reason; a candidate that does not fit is told apart from a growir bug, which surfaces as a
GrowthError naming the stage instead of a quiet fallback."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import growir
import growir.materialize.hf as hf
from growir.materialize.config import int_fields, skipped_fields
from growir.materialize.hf import raised_in_model
from zoo import make

TOL = 1e-5


def tiny_swin():
    """Per-stage head counts (a list of ints) next to per-stage names (stage_names, out_features: strings)."""
    torch.manual_seed(0)
    return T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                    window_size=4, out_features=["stage1", "stage2"])).eval()


def test_per_stage_lists_and_names_rebuild_the_class():
    """Swin used to fail with "TypeError: '<' not supported between 'tuple' and 'str'" (a per-stage head count
    and a plain size in one change set); now its own class comes back, exact, stage names untouched."""
    source = tiny_swin()
    grown = growir.grow(source, width=2.0)
    assert isinstance(grown, T.SwinModel)
    rec = grown.growir_record
    assert rec.config_changes == {"embed_dim": 32, "num_heads": [4, 8]}
    assert rec.exact and rec.deviation <= TOL
    assert grown.config.stage_names == source.config.stage_names
    assert grown.config.out_features == source.config.out_features


def test_string_lists_are_not_size_fields():
    cfg = {"hidden_size": 8, "layer_types": ["full_attention", "sliding_attention"], "num_heads": [2, 4],
           "stage_names": ["stem", "stage1"], "nested": {"width": 8}}
    assert int_fields(cfg) == {"hidden_size": 8, ("num_heads", 0): 2, ("num_heads", 1): 4}
    assert skipped_fields(cfg, {8: {16}}) == {"nested": "a nested dict holds 8"}


def test_a_growir_bug_in_the_search_is_not_a_failed_candidate(monkeypatch):
    """An exception raised in growir's own code is not 'the rebuilt model fails on the example': it surfaces as
    a MaterializeError naming the stage, with the original as its cause (no GraphModule fallback)."""
    def broken(*args, **kwargs):
        raise TypeError("a growir bug")
    monkeypatch.setattr(hf, "differs", broken)
    with pytest.raises(growir.MaterializeError, match=r"rebuilding the model's class .*TypeError: a growir bug") \
            as err:
        growir.grow(make("llama"), width=2.0)
    assert isinstance(err.value.__cause__, TypeError)


def test_the_models_own_failure_is_a_candidate_failure():
    model = make("llama")
    with pytest.raises(Exception) as own:  # the model's own code raises
        model(input_ids=torch.zeros(2, 3, 4, dtype=torch.long))
    assert raised_in_model(own.value, model)
    with pytest.raises(Exception) as ours:  # growir's own code raises
        int_fields(None)
    assert not raised_in_model(ours.value, model)
