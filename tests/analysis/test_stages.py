"""Stages of a hierarchical model (growir/analysis/stages.py, growir/analysis/chain.py): each stage holds its own
block list, whose first block may change the stream's shape (its downsample, kept first and alone) while the others
grow; lists beside the stages and lists that carry no stream (side-by-side embeddings, a pyramid of strided
layers) are no stacks. Found from the graph and the module paths, never from names.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growir
from growir.frontend.export import capture
from growir.analysis.plan import make_plan

D, V = 16, 50
IDS = (torch.randint(0, V, (2, 7)),)


def test_a_list_of_stage_lists_grows_each_and_its_parallel_parts_stay():
    """PVT: ``encoder.block`` is a list of lists (one per stage, of other widths) beside per-stage lists that
    differ (``patch_embeddings``, one per stage): each stage's own list grows, the parallel parts are no stack,
    and the config's per-stage ``depths`` follow."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PvtConfig(image_size=32, num_encoder_blocks=2, depths=[1, 2], hidden_sizes=[16, 32],
                                    sequence_reduction_ratios=[2, 1], patch_sizes=[4, 2], strides=[4, 2],
                                    num_attention_heads=[1, 2], mlp_ratios=[2, 2])
    model = transformers.PvtModel(config).eval()
    assert [b.prefix for b in make_plan(capture(model)).blocks] == ["encoder.block.0", "encoder.block.1"]
    grown = growir.grow(model, depth=2)
    record = grown.growir_record
    assert type(grown).__name__ == "PvtModel" and record.exact, record.reasons
    assert record.layers == {"encoder.block.0": (1, 2, "identity"), "encoder.block.1": (2, 4, "identity")}
    assert grown.config.depths == [2, 4]
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(grown(pixels).last_hidden_state, model(pixels).last_hidden_state,
                               rtol=1e-5, atol=1e-5)


class Down(nn.Module):
    """A stage's first block: it changes the stream's width (a downsample), so no copy of it can follow it."""

    def __init__(self, d: int, e: int):
        super().__init__()
        self.proj, self.ln = nn.Linear(d, e), nn.LayerNorm(e)

    def forward(self, x):
        return self.ln(self.proj(x))


class Res(nn.Module):
    """A pre-norm residual block of width ``d``."""

    def __init__(self, d: int):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.ln(x))))


class Stages(nn.Module):
    """Two stages, each a list: its downsample, then ``depths[i]`` residual blocks; the second stage's list
    follows the first's directly (no layer between)."""

    def __init__(self, depths):
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.stages = nn.ModuleList(nn.ModuleList([Down(d, e)] + [Res(e) for _ in range(n)])
                                    for d, e, n in zip((8, 16), (16, 24), depths))

    def forward(self, ids):
        x = self.emb(ids)
        for stage in self.stages:
            for layer in stage:
                x = layer(x)
        return x


def test_a_stage_list_keeps_its_downsample_and_grows_the_rest():
    """A stage's list ``[down, res, res]``: the downsample changes the stream's shape, so it is a kind of its own
    that stays first and alone; the other run grows by identities, in every stage."""
    torch.manual_seed(0)
    model = Stages([2, 1]).eval()
    plan = make_plan(capture(model, IDS))
    assert [(b.prefix, b.kinds, b.shaping, b.layouts) for b in plan.blocks] == [
        ("stages.0", [0, 1, 1], True, ("first",)), ("stages.1", [0, 1], True, ("first",))]
    grown = growir.grow(model, depth=2, example_inputs=IDS)
    record = grown.growir_record
    assert record.exact and record.layers["stages.1"] == (2, 4, "identity; the first run kept, the others "
                                                                 "grown: blocks 0 (1 -> 1), 1 (1 -> 3)")
    state = grown.state_dict()
    assert "stages.0.5.up.weight" in state and "stages.0.1.proj.weight" not in state
    ids = torch.randint(0, V, (3, 11))
    torch.testing.assert_close(grown(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_a_stage_of_only_its_downsample_stops_every_stage_and_says_why():
    """A stage whose list is its downsample alone has no block to copy: no stage grows alone, and the error
    names that stage's list."""
    plan = make_plan(capture(Stages([2, 0]).eval(), IDS))
    assert all(not b.homogeneous for b in plan.blocks)
    with pytest.raises(growir.GrowthError, match=r"`stages\.1` of another stage.*changes the shape of the stream"):
        growir.grow(Stages([2, 0]).eval(), depth=2, example_inputs=IDS)


def test_side_by_side_entries_are_no_stack():
    """A list of embeddings of other sizes, summed after (MarkupLM's xpath sub-embeddings): no entry computes
    from another, so no stream runs through it and it is no block list that stops depth growth."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.subs = nn.ModuleList(nn.Embedding(V + k, D) for k in range(3))
            self.layers = nn.ModuleList([Res(D), Res(D)])

        def forward(self, ids):
            x = sum(e(ids) for e in self.subs)
            for layer in self.layers:
                x = layer(x)
            return x

    model = Model().eval()
    assert [b.prefix for b in make_plan(capture(model, IDS)).blocks] == ["layers"]
    grown = growir.grow(model, depth=2, example_inputs=IDS)
    assert grown.growir_record.exact and grown.growir_record.layers == {"layers": (2, 4, "identity")}


def test_a_pyramid_of_downsampling_layers_is_no_stack():
    """Alike strided convolutions, each shortening the stream (a feature extractor's): no copy of one could
    follow it, so they are no block list; the residual stack after them grows alone, exactly."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv1d(D, D, 3, stride=2) for _ in range(2))
            self.layers = nn.ModuleList([Res(D), Res(D)])

        def forward(self, x):
            for conv in self.convs:
                x = conv(x)
            x = x.transpose(1, 2)
            for layer in self.layers:
                x = layer(x)
            return x

    signal = (torch.randn(2, D, 40),)
    model = Model().eval()
    assert [b.prefix for b in make_plan(capture(model, signal)).blocks] == ["layers"]
    grown = growir.grow(model, depth=2, example_inputs=signal)
    assert grown.growir_record.exact and grown.growir_record.layers == {"layers": (2, 4, "identity")}
