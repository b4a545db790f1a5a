"""Norms recognised from the graph's arithmetic, not from module classes: LayerNorm and RMSNorm written out (rsqrt
or a division by sqrt, eps on either side, casts between the steps, with or without weight and bias), and a norm
over a slice of a projection's output. Each recognised pre-norm grows x1.5 exactly by repeat-and-fill."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import growir
from growir.analysis.norms import norm_sites


class CenteredRsqrt(nn.Module):
    """LayerNorm without bias, in float32 whatever the input (as Cohere writes it)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))

    def forward(self, x):
        x = x.to(torch.float32)
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return self.weight.to(torch.float32) * ((x - mean) * torch.rsqrt(var + 1e-5))


class CenteredDivide(nn.Module):
    """LayerNorm as a division by sqrt(eps + var), then weight and bias (as I-BERT writes it)."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(1 + 0.3 * torch.randn(d)), nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        y = x - x.mean(-1, keepdim=True)
        return y / torch.sqrt(1e-5 + torch.mean(y ** 2, -1, keepdim=True)) * self.weight + self.bias


class RootDivide(nn.Module):
    """RMS-style norm as a division by sqrt(mean(x^2) + eps), then a weight (as ImageGPT writes it)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))

    def forward(self, x):
        return x / torch.sqrt(torch.mean(torch.square(x), -1, keepdim=True) + 1e-5) * self.weight


class PowRoot(nn.Module):
    """RMSNorm with its root as ``pow(., -0.5)`` and a (1 + w) weight (as MuseGlimmer writes it)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(d))

    def forward(self, x):
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5) * (1.0 + self.weight)


class Bare(nn.Module):
    """RMSNorm with no affine parameters."""

    def __init__(self, d):
        super().__init__()

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Net(nn.Module):
    """Embedding, one pre-norm MLP block and a normed head, every norm of one class."""

    def __init__(self, norm, d=8, vocab=11):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.n1, self.nf = nn.Embedding(vocab, d), norm(d), norm(d)
        self.up, self.down, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.down(torch.relu(self.up(self.n1(x))))
        return self.head(self.nf(x))


class SplitNorm(nn.Module):
    """A projection whose output is split, one part normed and read by a contraction (MLA's compressed kv, an SSM's
    dt/B/C), the other part used as it is."""

    def __init__(self, d=8, rank=8, rest=4, bare=False):
        super().__init__()
        torch.manual_seed(0)
        self.rank, self.rest, self.bare = rank, rest, bare
        self.emb, self.norm = nn.Embedding(11, d), nn.RMSNorm(d, eps=1e-6)
        self.a = nn.Linear(d, rank + rest, bias=False)
        self.a_norm = nn.Parameter(1 + 0.3 * torch.randn(rank))
        self.b, self.c, self.head = nn.Linear(rank, d), nn.Linear(rest, d), nn.Linear(d, 11)

    def forward(self, ids):
        x = self.emb(ids)
        kv, rope = torch.split(self.a(self.norm(x)), [self.rank, self.rest], dim=-1)
        if self.bare:  # no weight, computed in float64 and cast back (as FalconMamba's dt/B/C norms)
            wide = kv.double()
            kv = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(kv)
        else:
            kv = kv * torch.rsqrt(kv.pow(2).mean(-1, keepdim=True) + 1e-6) * self.a_norm
        return self.head(x + self.b(kv) + self.c(rope))


IDS = (torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0)),)
KINDS = {CenteredRsqrt: ("layer", True, False), CenteredDivide: ("layer", True, True),
         RootDivide: ("rms", True, False), PowRoot: ("rms", True, False), Bare: ("rms", False, False)}


def _sites(model):
    p = growir.plan(model, example_inputs=IDS)
    return norm_sites(p.captured.gm, p.facts)


@pytest.mark.parametrize("norm", list(KINDS), ids=lambda c: c.__name__)
def test_written_out_norm_is_recognised_with_its_parameters(norm):
    kind, weighted, biased = KINDS[norm]
    sites = _sites(Net(norm))
    assert len(sites) == 2 and {s.kind for s in sites} == {kind}
    assert {s.weight is not None for s in sites} == {weighted} and {s.bias is not None for s in sites} == {biased}
    assert all(s.eps in (1e-5, 1e-6) and s.input.op != "get_attr" for s in sites)
    assert all(len(s.reads) == (2 if kind == "layer" else 1) for s in sites)  # LayerNorm: mean of x and of (x-m)^2


@pytest.mark.parametrize("norm", list(KINDS), ids=lambda c: c.__name__)
def test_written_out_pre_norm_grows_one_and_a_half_exactly(norm):
    source = Net(norm).eval()
    grown = growir.grow(source, width=1.5, example_inputs=IDS, strict=True)
    rec = grown.growir_record
    assert rec.exact and rec.filled, rec.reasons
    assert (grown(*IDS) - source(*IDS)).abs().max() < 1e-5


def test_a_mean_of_squares_that_divides_another_tensor_is_no_norm():
    class Other(nn.Module):
        def forward(self, x):
            return x.flip(-1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    assert _sites(Net(lambda d: Other())) == []


def test_a_norm_over_a_split_of_a_projection_grows_one_and_a_half_exactly():
    source = SplitNorm().eval()
    sites = _sites(source)
    assert {s.weight for s in sites} == {"a_norm", "norm.weight"}
    assert {s.kind for s in sites} == {"rms"} and all(s.eps == 1e-6 for s in sites)  # aten.rms_norm: eps at 3
    assert all(s.nonlinear_source() is None for s in sites)  # a part of a linear output is linear in its rows
    grown = growir.grow(source, width=1.5, example_inputs=IDS, strict=True)
    assert grown.growir_record.exact, grown.growir_record.reasons
    assert (grown(*IDS) - source(*IDS)).abs().max() < 1e-5


class ShiftedNorm(nn.Module):
    """A pre-norm block whose norm reads its stream rolled along the sequence (a shifted window) and summed over
    two halves of a split: parts, rearrangements and sums over other axes are linear in what writes the stream."""

    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.norm, self.head = nn.Embedding(11, d), nn.LayerNorm(d), nn.Linear(d, 11)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5), self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, ids):
        x = self.emb(ids)
        pair = torch.stack([x, torch.roll(x, 1, dims=1)]).sum(0)
        x = x + self.down(torch.relu(self.up(self.norm(pair))))
        return self.head(x)


def test_a_norm_reading_a_roll_or_a_sum_over_another_axis_reads_a_linear_value():
    source = ShiftedNorm().eval()
    sites = [s for s in _sites(source) if s.weight == "norm.weight"]
    assert sites and sites[0].nonlinear_source() is None
    grown = growir.grow(source, width=1.5, example_inputs=IDS, strict=True)
    assert grown.growir_record.exact, grown.growir_record.reasons
    assert (grown(*IDS) - source(*IDS)).abs().max() < 1e-5


@pytest.mark.parametrize("bare", [False, True])
def test_a_split_norm_keeps_eps_by_rescaling_its_rows_only(bare):
    """The norm's group is one part of the projection's output: the stream rescale (which keeps eps, so a config
    with one shared eps still fits) scales that part's rows by 1/sqrt(8/12), not the other part's. Its reader
    may read the norm's output before a cast."""
    source = SplitNorm(bare=bare).eval()
    grown = growir.grow(source, width=1.5, example_inputs=IDS, strict=True)
    assert (grown(*IDS) - source(*IDS)).abs().max() < 1e-5
    rule = grown.growir_record.rules["a.weight"]
    assert rule.scale == 1.0 and torch.allclose(rule.axes[0].scale.float(), torch.tensor([1.5 ** 0.5] * 8 + [1.0] * 4))
    floats = [a for n in grown.graph.nodes for a in n.args if isinstance(a, float)]
    assert 1e-6 in floats and not any(abs(a - 1e-6 * 8 / 12) < 1e-12 for a in floats)  # no eps rewritten
