"""Axis rules derived from the op's own meta kernel (growir/analysis/probe.py).

Three things are checked: the probe reads the relations a hand rule encodes (on every op that has a hand rule and
can be probed, the walker's facts with the derived rule agree with the hand rule's); a model using an op that
was refused before (``tensor_split`` inside a block) now grows exactly; and where the probe cannot decide, growir
refuses, naming the op and why.
"""

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growir
from facts_compare import agreement
from growir.analysis.probe import Operand, relations
from growir.frontend.export import capture

A = torch.ops.aten


class Fn(nn.Module):
    """A function of one input as a module (a weight so that capture has a parameter to find)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.w = fn, nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fn(x * self.w)


# (op row, function, input shape): ops that have a hand rule and whose meta kernel accepts prime sizes
HAND_AND_PROBED = [
    ("aten.transpose", lambda x: x.transpose(1, 2), (2, 5, 6)),
    ("aten.permute", lambda x: x.permute(2, 0, 1), (2, 5, 6)),
    ("aten.relu", torch.relu, (2, 5, 6)),
    ("aten.gelu", F.gelu, (2, 5, 6)),
    ("aten.add", lambda x: x + x.sum(-1, keepdim=True), (2, 5, 6)),
    ("aten.mul", lambda x: x * x[0], (2, 5, 6)),
    ("aten.cat", lambda x: torch.cat([x, x[..., :2]], -1), (2, 5, 6)),
    ("aten.chunk", lambda x: torch.chunk(x, 3, -1)[1], (2, 5, 6)),
    ("aten.unsqueeze", lambda x: x.unsqueeze(1), (2, 5, 6)),
    ("aten.flatten", lambda x: x.flatten(1), (2, 5, 6)),
    ("aten.sum", lambda x: x.sum(-1), (2, 5, 6)),
    ("aten.mean", lambda x: x.mean(1, keepdim=True), (2, 5, 6)),
    ("aten.amax", lambda x: x.amax(-1), (2, 5, 6)),
    ("aten.softmax", lambda x: x.softmax(-1), (2, 5, 6)),
    ("aten.cumsum", lambda x: x.cumsum(-1), (2, 5, 6)),
    ("aten.flip", lambda x: x.flip(-1), (2, 5, 6)),
    ("aten.select", lambda x: x.select(2, 1), (2, 5, 6)),
    ("aten.matmul", lambda x: x @ x.transpose(1, 2), (2, 5, 6)),
    ("aten.where", lambda x: torch.where(x > 0, x, x[0]), (2, 5, 6)),
]


@pytest.mark.parametrize("row,fn,shape", HAND_AND_PROBED, ids=[r for r, _, _ in HAND_AND_PROBED])
def test_derived_rule_agrees_with_the_hand_rule(row, fn, shape):
    gm = capture(Fn(fn), (torch.randn(*shape),)).gm
    assert any(f"aten.{getattr(n.target, '_overloadpacket', n.target).__name__}" == row
               for n in gm.graph.nodes if n.op == "call_function"), f"{row} not in the export"
    assert agreement(gm, row) in ("agrees", "more careful")


def test_the_probe_reads_merges_concatenations_parts_and_reductions():
    f32 = [torch.float32]
    kinds = lambda rel, j=0: [k for k, _ in rel.outputs[j]]  # noqa: E731
    assert kinds(relations(A.flatten.using_ints, [(2, 5, 8)], (Operand(0), 1, 2), {}, f32)) == ["eq", "prod"]
    rel = relations(A.cat.default, [(2, 5), (2, 3)], ([Operand(0), Operand(1)], 1), {}, f32 * 2)
    assert rel.outputs[0][1] == ("cat", [((0, 1),), ((1, 1),)])
    rel = relations(A.tensor_split.sections, [(2, 12)], (Operand(0), 3, 1), {}, f32)
    assert rel.parts == [(((0, 1),), [(0, 1), (1, 1), (2, 1)])]
    rel = relations(A.sum.dim_IntList, [(2, 5, 8)], (Operand(0), [1]), {}, f32)
    assert kinds(rel) == ["eq", "eq"] and rel.mixed == [((0, 1),)]
    rel = relations(A.diff.default, [(2, 5, 8)], (Operand(0), 1, -1), {}, f32)  # n - 1: no relation, pinned
    assert kinds(rel) == ["eq", "eq", "follows"] and rel.tied == [((0, 2),)]
    rel = relations(A.narrow_copy.default, [(2, 5, 8)], (Operand(0), -1, 0, 4), {}, f32)  # a literal length
    assert kinds(rel)[-1] == "fixed" and rel.mixed == [((0, 2),)]


def test_the_numeric_probe_tells_copies_carried_from_copies_mixed():
    f32 = [torch.float32]
    for op, args in ((A.logcumsumexp.default, (Operand(0), 1)), (A.roll.default, (Operand(0), [1], [1])),
                     (A._softmax.default, (Operand(0), 1, False))):
        assert relations(op, [(2, 8)], args, {}, f32).uncopied == [((0, 1),)], op
    assert relations(A.special_bessel_j0.default, [(2, 8)], (Operand(0),), {}, f32).uncopied == []


def test_the_probe_is_cached_per_signature():
    args = (Operand(0), 4, -1)
    first = relations(A.tensor_split.sections, [(3, 16)], args, {}, [torch.float32])
    start = time.perf_counter()
    again = relations(A.tensor_split.sections, [(3, 16)], args, {}, [torch.float32])
    assert again is first and time.perf_counter() - start < 1e-3


def test_data_dependent_shapes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="DynamicOutputShape"):
        relations(A.nonzero.default, [(4, 5)], (Operand(0),), {}, [torch.float32])


class SplitGate(nn.Module):
    """A gated block on ``tensor_split`` (state-space and hybrid mixers cut their projections so), an op with no
    hand rule, between an embedding and a head, with ops of no hand rule along the sequence and elementwise."""

    def __init__(self, vocab=50, d=16, inner=24):
        super().__init__()
        self.emb, self.norm, self.out_norm = nn.Embedding(vocab, d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.proj, self.back = nn.Linear(d, 3 * inner), nn.Linear(inner, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        q, k, v = torch.tensor_split(self.proj(self.norm(x)), 3, dim=-1)
        gate = torch.logcumsumexp(k, dim=1)  # along the sequence: the inner width passes through
        x = x + self.back(q * torch.sigmoid(gate) + torch.special.i0(v * 0.1))
        return self.head(self.out_norm(x))


def test_a_block_on_tensor_split_grows_exactly():
    torch.manual_seed(0)
    model, idx = SplitGate().eval(), torch.randint(0, 50, (2, 7))
    big = growir.grow(model, width=2.0, example_inputs=(idx,))
    record = big.growir_record
    assert record.exact, record
    state = big.state_dict()
    assert state["proj.weight"].shape == (144, 32) and state["back.weight"].shape == (32, 48)
    torch.testing.assert_close(big(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_mamba_grows_exactly_through_its_derived_tensor_split():
    """transformers' Mamba cuts its scan inputs with ``tensor_split`` at the (dynamic) sequence length, a size
    computed in the graph: the probe evaluates it at its own sizes, and the model grows x2 exactly in its class."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=100, expand=2)
    model, ids = transformers.MambaForCausalLM(config).eval(), torch.randint(0, 100, (2, 7))
    big = growir.grow(model, width=2.0)
    assert big.growir_record.exact and big.config.hidden_size == 64 and big.config.intermediate_size == 128
    torch.testing.assert_close(big(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_kernel_that_needs_divisible_sizes_is_probed_at_multiples():
    """group_norm rejects a channel count its groups do not divide (every prime): probed at the real sizes times
    distinct primes, its channels are the input's, tied to the weight and bias, and read (copies of channels move
    their group's statistics), never refused (bit)."""
    f32 = [torch.float32] * 3
    rel = relations(A.group_norm.default, [(2, 32, 6, 6), (32,), (32,)],
                    (Operand(0), 8, Operand(1), Operand(2), 1e-5, False), {}, f32)
    assert rel.outputs[0][1] == ("eq", [((0, 1), (1, 0), (2, 0))])
    assert ((0, 1), (1, 0), (2, 0)) in rel.uncopied


class Diagonal(nn.Module):
    """Attention-like scores with the diagonal masked by ``torch.eye(seq_len)``: an op with no operand, sized by a
    dynamic length (xlnet)."""

    def __init__(self, d=8, ffn=16):
        super().__init__()
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        scores = h @ h.transpose(1, 2) - 1e4 * torch.eye(x.shape[1], dtype=x.dtype)
        return x + scores.softmax(-1) @ h


def test_a_size_argument_of_no_operand_makes_new_axes():
    torch.manual_seed(0)
    model, x = nn.Sequential(Diagonal(), Diagonal()).eval(), torch.randn(2, 5, 8)
    big = growir.grow(model, width=2.0, example_inputs=(x,))
    assert big.growir_record.exact and big.get_parameter("0.up.weight").shape == (32, 8)
    torch.testing.assert_close(big(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big(x[:, :3]), model(x[:, :3]), rtol=1e-5, atol=1e-5)  # the eye follows the length
