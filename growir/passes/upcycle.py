"""Experts from a dense FFN: the constructions that make a mixture-of-experts layer compute the FFN it replaces.

With every routed expert a copy of the FFN and shared experts silenced, the layer computes
``y = s(x) · FFN(x)`` where ``s(x) = Σ_{e ∈ top-k} w_e(x)`` is the sum of the combine weights the router gives the
chosen experts. The growth is exact iff ``s`` is one constant ``c`` for every token: then the copies' output
projections are divided by ``c`` (``c = 1`` under softmax → top-k → renormalise; ``c = routed_scaling_factor``
where the normalised weights are scaled). Where ``s`` varies (top-k without renormalisation), a shared expert can
carry the FFN instead: routed output projections zero, every gate's weights zero, so a gate ``σ(0) = ½`` is a
constant ``c`` too, and the shared expert's output projection is divided by it. A zero router makes the
probabilities uniform, ``s = k/E``, the last exact construction (exact at initialisation only). Experts smaller
than the FFN (fine-grained) are its neurons in G shards (``shards``): expert ``e`` holds shard ``e mod G`` of copy
``e // G``, the G router rows of a copy tied (equal logits, so the copy's shards are chosen together wherever
top-k is a multiple of G) and the factor G on the output projection alone (a gated activation is not
homogeneous: G on the input projections is not G on the output). Which holds is
*measured* on the region itself (the target graph's nodes evaluated on many tokens with the construction's
weights), so any router the graph expresses (sigmoid or softmax, group-limited choice, bias-corrected scores,
scaling factors) is judged by what it computes; ``CONSTRUCTIONS`` is the order they are tried in.

The router's matrices are drawn before any construction (``draw_routers``): N(0, 1/fan_in), so its logits have the
scale of its input's entries and the top-k choice is decisive from the first step. Where the copies are exact the
router is free (it decides only which copies run), and its scale decides how fast the copies part: a class's own
initialisation (std 0.02) gives logits of ~0.1, a near-uniform choice, and copies that see the same tokens for
longer (docs/upcycling.md, "Training after upcycling": 76.7% saved vs 72.4%, final loss 1.403 vs 1.428).

>>> [c[0] for c in CONSTRUCTIONS]
['copies', 'shards', 'shared', 'uniform router']
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.fx as fx

# (name, why it is exact when the measured factor is constant)
CONSTRUCTIONS = (
    ("copies", "every routed expert a copy of the FFN, shared experts' output zero: the chosen experts' combine "
               "weights sum to {c} for every token, so the copies' output projections are divided by it"),
    ("shards", "fine-grained experts: the FFN's neurons in G shards per copy, the G router rows of a copy tied so "
               "its shards are chosen together, the output projections x G: the chosen shards' weights sum to {c} "
               "for every token (top-k a multiple of G), so the output projections are divided by it; exact at "
               "initialisation (while the tied rows stay tied)"),
    ("shared", "a shared expert carries the FFN, every gate's weights and the routed experts' output zero: the "
               "shared expert's factor is {c} for every token (a gate at zero), its output projection divided by it; "
               "the router gets no gradient until the routed experts move"),
    ("uniform router", "every routed expert a copy, the router zero: the chosen experts' weights sum to {c} for "
                       "every token (uniform probabilities); exact at initialisation only, while the router is zero"),
)


@dataclass
class Construction:
    """A construction for one region: its name, the measured factor and its spread over tokens, and why."""
    name: str
    factor: float
    spread: float  # max over tokens of |s(x) · FFN(x) - layer(x)| / |FFN(x)| with s the mean factor
    why: str = ""

    @property
    def exact(self) -> bool:
        """Every token's factor is the one constant (within float32 rounding), and not zero."""
        return self.spread <= 1e-5 and abs(self.factor) > 1e-6


def draw_routers(state: dict, routers: set, experts: int, generator: torch.Generator) -> list[str]:
    """Draw every router matrix in ``state`` (a parameter that reaches the choice of experts, with two axes, one
    of them over the ``experts``) from N(0, 1/fan_in), fan_in its other axis; biases (a bias-corrected choice's
    correction) keep their values. Returns the names drawn, in order.

    >>> state = {"gate.weight": torch.zeros(8, 64), "gate.bias": torch.zeros(8)}
    >>> draw_routers(state, {"gate.weight", "gate.bias"}, 8, torch.Generator().manual_seed(0))
    ['gate.weight']
    >>> round(float(state["gate.weight"].std() * 8), 1)  # 1 / sqrt(64)
    1.0
    """
    drawn = []
    for name in sorted(routers):
        t = state[name]
        if t.dim() == 2 and experts in t.shape:
            t.copy_(torch.randn(t.shape, generator=generator) / math.sqrt(t.numel() // experts))
            drawn.append(name)
    return drawn


def evaluate(nodes: list, env: dict, values: dict) -> dict:
    """The values of ``nodes`` (one region, in graph order) from ``env`` (node -> value of the region's inputs)
    and ``values`` (state_dict name -> tensor for its parameters)."""
    local = dict(env)
    for n in nodes:
        if n.op == "get_attr":
            local[n] = values[n.target]
        elif n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: local[a])
            local[n] = n.target(*args, **kwargs)
    return local


def write_chain(state: dict, chain, source: dict, scale: float, experts: int | None) -> None:
    """Make ``chain``'s weights in ``state`` the source FFN's (``source``: its state_dict), for every expert of an
    expert chain; the output projection scaled by ``scale``. A larger intermediate size keeps the extra neurons'
    input rows as initialised and zeroes their columns in the output projection (they then add nothing)."""
    for i, (sv, tv) in enumerate(chain.pairs):
        w = sv.weight(source[sv.param])
        last = i == len(chain.pairs) - 1
        for e in range(experts if tv.expert else 1):
            dst = tv.weight(state[tv.param], e)
            if last:
                dst.zero_()
            dst[:w.shape[0], :w.shape[1]].copy_(w * scale if last else w)


def fits(state: dict, chain, source: dict) -> bool:
    """Whether every weight of ``chain`` holds the FFN's (at least its sizes)."""
    for sv, tv in chain.pairs:
        w, dst = sv.weight(source[sv.param]), tv.weight(state[tv.param], 0)
        if dst.shape[0] < w.shape[0] or dst.shape[1] < w.shape[1]:
            return False
    return True


def silence(state: dict, chain, experts: int | None) -> None:
    """Zero ``chain``'s output projection: it adds nothing."""
    tv = chain.pairs[-1][1]
    for e in range(experts if tv.expert else 1):
        tv.weight(state[tv.param], e).zero_()


def build(kind: str, state: dict, source: dict, chains: list, routers: set, gates: set, experts: int,
          scale: float = 1.0) -> bool:
    """Write construction ``kind`` into ``state``: the chains (copies or silenced), and the ``routers`` zeroed for a
    uniform router or the ``gates`` (the region's other parameters) for a shared expert. False where it does not
    apply (no chain of the kind, or one smaller than the FFN)."""
    zeroed = routers if kind == "uniform router" else gates if kind == "shared" else set()
    shared = [c for c in chains if not c.expert]
    routed = [c for c in chains if c.expert]
    if kind == "shards":
        return build_shards(state, source, routed, shared, routers, experts, scale)
    if kind == "shared":
        carriers = [c for c in shared if fits(state, c, source)]
        if not carriers:
            return False
        carrier, rest = carriers[0], [c for c in shared if c is not carriers[0]]
        write_chain(state, carrier, source, scale, None)
        for c in rest + routed:
            silence(state, c, experts)
    else:
        if not routed or not all(fits(state, c, source) for c in routed):
            return False
        for c in routed:
            write_chain(state, c, source, scale, experts)
        for c in shared:
            silence(state, c, experts)
    for name in zeroed:
        state[name].zero_()
    return True


def factor(out: torch.Tensor, ffn: torch.Tensor) -> tuple[float, float]:
    """(the mean factor s with out ≈ s · ffn per token, the largest per-token miss relative to |ffn|)."""
    out, ffn = out.reshape(-1, out.shape[-1]).double(), ffn.reshape(-1, ffn.shape[-1]).double()
    norms = ffn.norm(dim=-1).clamp_min(1e-30)
    s = (out * ffn).sum(-1) / norms ** 2
    mean = float(s.mean())
    return mean, float(((out - mean * ffn).norm(dim=-1) / norms).max())


def shard_count(state: dict, chain, source: dict, experts: int) -> int | None:
    """G where each expert of ``chain`` holds 1/G of the FFN's neurons (its input projections' rows, its output
    projection's columns, G > 1 dividing the expert count), else None."""
    counts = set()
    for i, (sv, tv) in enumerate(chain.pairs):
        w, dst = sv.weight(source[sv.param]), tv.weight(state[tv.param], 0)
        inner, outer = (1, 0) if i == len(chain.pairs) - 1 else (0, 1)  # the neurons' axis, the other one
        if dst.shape[outer] < w.shape[outer] or dst.shape[inner] == 0 or w.shape[inner] % dst.shape[inner]:
            return None
        counts.add(w.shape[inner] // dst.shape[inner])
    g = counts.pop() if len(counts) == 1 else None
    return g if g and g > 1 and experts % g == 0 else None


def build_shards(state: dict, source: dict, routed: list, shared: list, routers: set, experts: int,
                 scale: float) -> bool:
    """The ``shards`` construction (module docstring): False where the experts are not 1/G of the FFN."""
    counts = {shard_count(state, c, source, experts) for c in routed}
    if not routed or len(counts) != 1 or None in counts:
        return False
    g = counts.pop()
    for c in routed:
        for i, (sv, tv) in enumerate(c.pairs):
            w, last = sv.weight(source[sv.param]), i == len(c.pairs) - 1
            for e in range(experts):
                dst = tv.weight(state[tv.param], e)
                if last:
                    n = dst.shape[1]
                    dst.zero_()
                    dst[:w.shape[0]].copy_(w[:, (e % g) * n:(e % g + 1) * n] * (g * scale))
                else:
                    n = dst.shape[0]
                    dst[:, :w.shape[1]].copy_(w[(e % g) * n:(e % g + 1) * n])
    for c in shared:
        silence(state, c, experts)
    for name in routers:  # one logit per copy: rows e of a copy take the row of its first shard
        t = state[name]
        if t.dim() and t.shape[0] == experts:
            t.copy_(t[::g].repeat_interleave(g, dim=0))
    return True
