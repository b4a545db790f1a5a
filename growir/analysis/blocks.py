"""Blocks: repeated, identical subgraphs that depth growth can copy.

A block list is a module container whose integer-indexed children have the same class, the same parameter
shapes and the same sequence of aten ops, and that run one after another with each block's residual input
being the previous block's output. Blocks may also be stored as parallel lists (``ln1[i]``, ``attn[i]``,
``mlp[i]``): block i is then the stretch of the graph from the first op of any list's i-th entry to the first
op of the (i+1)-th entries, glue included, and the same tests apply. Names decide nothing here; indices and
the graph do.

Blocks may also differ by design (SSM and attention layers, sliding and full attention, dense and MoE
feed-forwards): blocks with the same class, parameter shapes, ops and shared inputs (the values computed before
the list that a block reads, such as one of several masks) are one *kind*, and a list whose kinds repeat with a
period (``[ssm, attn, ssm, attn]``: period 2; a list whose kinds never repeat is one period) is copyable when
each block keeps the stream's shape and every kind is identity-ready. Depth growth then copies whole periods.
Two shapes of difference are allowed besides: a first block that changes the stream's shape (a stage's
downsample: ``shaping``, kept first and alone, never copied), and a first block that hands later blocks a value of
their own besides the stream (a relative position bias made by block 0 only): the stream is the value shaped like the
one that leaves the list.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx

from .chain import chain_blocks, changes_shape
from .residual import stream_terms, zeroing_params
from .stages import in_stages, stage_parts, stages_grow_together
from .nodes import is_tensor, op_name
from .walker import Facts


@dataclass
class Blocks:
    """A list of repeated blocks: their module paths, graph nodes, shared parameter suffixes, residual chain,
    whether they are pre-norm, and the parameters whose zeroing makes a new block an identity."""
    prefix: str  # module path of the container, e.g. "model.layers"
    paths: list  # block module paths in order
    nodes: list  # per block: fx nodes in graph order
    suffixes: list  # parameter names relative to a block, shared by all blocks
    homogeneous: bool = True
    why_not: str = ""
    chain_in: list = field(default_factory=list)  # per block: the node carrying the residual input
    chain_out: list = field(default_factory=list)  # per block: the node carrying the residual output
    pre_norm: bool = False
    writers: list = field(default_factory=list)  # parameter suffixes whose zeroing makes a block an identity
    containers: list = field(default_factory=list)  # parallel lists (block i = their i-th entries); [] if nested
    period: int = 1  # blocks i and i + period are of one kind (1: all blocks alike)
    period_writers: list = field(default_factory=list)  # per position in the period: its writers ([] if period 1)
    period_suffixes: list = field(default_factory=list)  # per position in the period: its parameter suffixes
    alike: bool = True  # every block has the same parameters (kinds may still differ by ops or shared inputs)
    kinds: list = field(default_factory=list)  # per block: the first block of its kind ([] where all are alike)
    layout: str = "period"  # how depth grows the list: one of ``layouts`` (a config rebuild may try the others)
    shaping: bool = False  # block 0 changes the stream's shape (a stage's downsample): it is never copied

    @property
    def mixed(self) -> bool:
        """Whether the blocks differ by design (kinds that repeat with ``period``); ``alike`` says whether their
        parameters still match (AKI's next-block units need them to)."""
        return self.period > 1

    def writers_of(self, i: int) -> list:
        """The writer suffixes of block ``i`` (its kind's; ``i`` old or new, as whole periods move)."""
        return self.period_writers[i % self.period] if self.mixed else self.writers

    def suffixes_of(self, i: int) -> list:
        """The parameter suffixes of block ``i`` (its kind's; ``i`` old or new, as whole periods move)."""
        return self.period_suffixes[i % self.period] if self.mixed else self.suffixes

    @property
    def runs(self) -> list:
        """(first block, length) of each maximal run of same-kind blocks (one run where all are alike).

        >>> Blocks("h", ["h.0", "h.1", "h.2"], [], [], kinds=[0, 1, 1]).runs
        [(0, 1), (1, 2)]
        """
        kinds = self.kinds if len(self.kinds) == self.count else [0] * self.count
        starts = [i for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
        return [(s, e - s) for s, e in zip(starts, starts[1:] + [self.count])]

    @property
    def layouts(self) -> tuple:
        """How depth may grow the list, the default first. Kinds that repeat (``[s, f, s, f]``): by whole periods.
        Kinds that never repeat (first-k-dense ``[d, m, m]``) are no period: each run of one kind grows
        (``"runs"``: ``[d, d', m, m', m, m']``), or all but the first run (``"first"``: ``[d, m, m', m, m', m]``),
        or, last, the whole list as one period. Where every run is one block (``[a, b]``: a period or two runs
        alike) whole periods come first. Which one a config can state, the config rebuild decides.

        >>> Blocks("h", ["h.0", "h.1", "h.2"], [], [], period=3, kinds=[0, 1, 1]).layouts
        ('runs', 'first', 'period')
        """
        if self.period < self.count or len(self.kinds) != self.count or self.count < 2:
            return ("period",)
        if self.shaping:  # no copy of block 0 could follow it: its run is kept
            return ("first",)
        return ("period", "runs", "first") if len(self.runs) == self.count else ("runs", "first", "period")

    @property
    def count(self) -> int:
        """How many blocks the list holds."""
        return len(self.paths)

    def name(self, i: int, suffix: str) -> str:
        """The state name of a block parameter in block ``i`` (old or new position).

        >>> Blocks("h", ["h.0", "h.1"], [], ["ln.weight"]).name(3, "ln.weight")
        'h.3.ln.weight'
        >>> Blocks("ln1, mlp", ["ln1.0", "ln1.1"], [], [], containers=["ln1", "mlp"]).name(3, "mlp.{}.fc.weight")
        'mlp.3.fc.weight'
        """
        return suffix.format(i) if self.containers else f"{self.prefix}.{i}.{suffix}"

    def suffix_of(self, i: int, state: str) -> str | None:
        """The suffix of ``state`` if it belongs to block ``i``, else None (the inverse of ``name``)."""
        for c in self.containers or [self.prefix]:
            head = f"{c}.{i}."
            if state.startswith(head):
                rest = state[len(head):]
                return f"{c}.{{}}.{rest}" if self.containers else rest
        return None


def _stack_paths(node: fx.Node) -> list:
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]


def _classes(gm: fx.GraphModule) -> dict:
    out = {}
    for n in gm.graph.nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            out[path] = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return out


def find_blocks(gm: fx.GraphModule, facts: Facts) -> list[Blocks]:
    """Every block list of the graph (nested module lists and parallel lists), with whether each is
    homogeneous and pre-norm (why not, in words) and the parameters that make a new block an identity."""
    classes = _classes(gm)
    children = defaultdict(dict)
    for path in classes:
        m = re.fullmatch(r"(.+)\.(\d+)", path)
        if m:
            children[m.group(1)][int(m.group(2))] = path
    members = defaultdict(list)
    for n in gm.graph.nodes:
        for path in set(_stack_paths(n)):
            members[path].append(n)
    found, stuck, loose = [], {}, []
    for prefix, kids in children.items():
        idx = sorted(kids)
        if idx != list(range(len(idx))) or len(idx) < 2 and not in_stages(prefix, children):
            continue
        if any(prefix.startswith(b.prefix + ".") and b.homogeneous for b in found):
            continue
        paths = [kids[i] for i in idx]
        b = _describe(gm, facts, prefix, [members[p] for p in paths], Blocks(prefix, paths, [], []),
                      [classes[p] for p in paths])
        if not b.homogeneous:  # a stage's list that cannot be copied says why the stages' depth cannot grow
            stuck.setdefault(prefix, b.why_not)
        if not b.homogeneous and (len(idx) == 1 or _independent(b.nodes) or _all_shaping(b)):
            continue  # a stage's one block that cannot be copied, side-by-side entries or a pyramid: no stack
        if b.homogeneous or len({classes[p] for p in paths}) == 1 or 1 < b.period < b.count:
            found.append(b)  # children of other classes: blocks if copyable, or a pattern of kinds that repeats
        else:
            loose.append(b)  # mixers of other classes (attention, SSM) in a parallel list: one block's part
    # layers of different kinds inside one entry of an outer list (a block's sub-layers: attention, then FFN) are
    # no stack of their own: the outer list is, and its reason stands; a stage's list that starts with the block
    # that changes the stream's shape (its downsample) is the stage's stack
    found = [b for b in found if not b.mixed or b.shaping or not any(b.prefix.startswith(c.prefix + ".")
                                                                     for c in found)]
    # stages that differ (a downsampling layer here and there) are no blocks, but the block lists inside them are
    found = [b for b in found if b.homogeneous or not any(
        c.prefix.startswith(b.prefix + ".") and c.homogeneous for c in found) and not stage_parts(b, found, children)]
    for b in found:
        inner = next((f"`{p}`: {why}" for p, why in stuck.items() if p.startswith(b.prefix + ".")), None)
        b.why_not += f"; nor can its stages' own lists grow ({inner})" if inner and not b.homogeneous else ""
    stages_grow_together(found, children, stuck)
    return _merge_parallel(gm, facts, found, members, loose)


def _independent(nodes: list) -> bool:
    """Whether the second entry computes nothing from the first (side-by-side embeddings or heads, summed after):
    no stream runs through them, so they are no stack, not even one that cannot grow."""
    seen, todo, second = set(), list(nodes[0]), set(nodes[1])
    while todo:
        n = todo.pop()
        if n in second:
            return False
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return True


def _all_shaping(b: Blocks) -> bool:
    """Whether every block changes the stream's shape (a pyramid of downsampling layers): no stack."""
    chained = len(b.chain_in) == len(b.chain_out) == b.count
    return chained and all(changes_shape(b, i) for i in range(b.count))


def _merge_parallel(gm, facts, found: list, members: dict, loose: list = ()) -> list:
    """Lists of equal length whose entries do not chain on their own: try them as one block list, block i
    being the graph from the first op of their i-th entries up to the first op of their (i+1)-th. ``loose``:
    lists of entries of several classes that are no stack on their own (a mixed stack's mixers, attention here
    and SSM there), which join a merge but are dropped where none takes them."""
    by_count = defaultdict(list)
    for b in [*found, *loose]:
        if not b.homogeneous:
            by_count[b.count].append(b)
    for count, lists in by_count.items():
        lists = [b for b in lists if not any(b.prefix.startswith(f"{o.prefix}.") for o in lists)]  # not nested
        if len(lists) < 2:
            continue
        spans = _spans(gm, [[members[b.paths[i]] for b in lists] for i in range(count)])
        if spans is None:
            continue
        names = [b.prefix for b in lists]
        merged = Blocks(", ".join(names), [f"{names[0]}.{i}" for i in range(count)], [], [], containers=names)
        merged = _describe(gm, facts, merged.prefix, spans, merged)
        if merged.homogeneous:
            found = [b for b in found if b not in lists] + [merged]
    return [b for b in found if b.homogeneous or not _inside_blocks(b, found)]


def _inside_blocks(b: Blocks, found: list) -> bool:
    """Whether ``b`` is a list inside the blocks of a block list (experts inside parallel ``mlp[i]`` lists):
    those blocks are copied whole, so the inner list is no depth of its own."""
    return any(b.prefix.startswith(f"{c}.") for o in found if o.homogeneous and o is not b
               for c in (o.containers or [o.prefix]))


def _spans(gm, entries: list) -> list | None:
    """Per block, the nodes from its first entry op to the next block's (the last block: to its last entry op
    and as many tensor ops after it as the block before it has); None where the entries of different blocks
    interleave."""
    order = [n for n in gm.graph.nodes if n.op == "call_function"]
    pos = {n: k for k, n in enumerate(order)}
    ranges = [(min(pos[n] for ns in e for n in ns if n in pos), max(pos[n] for ns in e for n in ns if n in pos))
              for e in entries]
    starts = [r[0] for r in ranges] + [len(order)]
    if any(ranges[i][1] >= starts[i + 1] for i in range(len(ranges))) or starts != sorted(starts):
        return None
    spans = [order[starts[i]:starts[i + 1]] for i in range(len(ranges) - 1)]
    # the last block: its own entries' ops, then as many tensor ops after them as the block before it has after
    # its own (the residual add in the parent's forward); not as many ops as the first block has, since blocks of
    # other kinds (a sliding window's mask ops) run other numbers of ops
    want, taken = sum(map(is_tensor, order[ranges[-2][1] + 1:starts[-2]])), 0
    last = order[starts[-2]:ranges[-1][1] + 1]
    for n in order[ranges[-1][1] + 1:]:
        if taken == want:
            break
        last.append(n)
        taken += is_tensor(n)
    return spans + [last]


def _param_suffixes(gm: fx.GraphModule, b: Blocks, i: int) -> dict:
    tensors = list(gm.named_parameters()) + list(gm.named_buffers())
    return {b.suffix_of(i, name): tuple(p.shape) for name, p in tensors if b.suffix_of(i, name) is not None}


def _describe(gm, facts, prefix, nodes, b: Blocks, classes: list | None = None) -> Blocks:
    paths = b.paths
    shapes = [_param_suffixes(gm, b, i) for i in range(len(paths))]
    sigs = [tuple(op_name(n) for n in ns if is_tensor(n)) for ns in nodes]
    b.nodes, b.suffixes = nodes, sorted(shapes[0])
    keys = [(c, tuple(sorted(sh.items())), sig) for c, sh, sig in zip(classes or [None] * len(paths), shapes, sigs)]
    if any(s != shapes[0] for s in shapes):
        odd = next(i for i, s in enumerate(shapes) if s != shapes[0])
        extra = sorted(set(shapes[odd]) ^ set(shapes[0]))
        why = (f"block `{paths[odd]}` has other parameters than `{paths[0]}` "
               f"({', '.join(extra[:3]) or 'different shapes'})")
        return _mixed(gm, facts, b, keys, why)
    if any(s != sigs[0] for s in sigs):
        odd = next(i for i, s in enumerate(sigs) if s != sigs[0])
        return _mixed(gm, facts, b, keys, f"block `{paths[odd]}` runs other ops than `{paths[0]}`")
    try:
        chain_blocks(b, _kinds(keys))
    except ValueError as exc:
        b.homogeneous, b.why_not = False, str(exc)
        return b
    if changes_shape(b, 0):
        b.homogeneous = False
        b.why_not = (f"block `{paths[0]}` changes the shape of the stream (a stage's downsample), and `{prefix}` "
                     f"holds no block of a kind that keeps it, to copy" if len(paths) == 1 else
                     "its blocks change the shape of the stream: no copy of one can follow it")
        return b
    keys = [k + (shared,) for k, shared in zip(keys, _shared_inputs(b))]
    if len(set(keys)) > 1:  # alike blocks that read different shared values (a sliding and a full mask)
        return _mixed(gm, facts, b, keys, "")
    b.pre_norm, b.writers = _residual_structure(gm, facts, b)
    return b


def _kinds(keys: list) -> list:
    """Per block, the index of the first block with the same key (its kind)."""
    return [keys.index(k) for k in keys]


def _period(kinds: list) -> int:
    """The shortest period of the kinds that divides their count (the count itself where none is shorter).

    >>> _period([0, 1, 0, 1]), _period([0, 1, 1, 1]), _period([0, 0, 0])
    (2, 4, 1)
    """
    n = len(kinds)
    return next(p for p in range(1, n + 1) if n % p == 0 and all(k == kinds[i % p] for i, k in enumerate(kinds)))


def _mixed(gm, facts, b: Blocks, keys: list, why: str) -> Blocks:
    """Blocks that differ by design: copyable by whole periods when they chain, each keeps the stream's shape
    and every kind is identity-ready; otherwise not copyable, for ``why`` (or the first thing that fails)."""
    b.homogeneous, b.why_not = False, why
    try:
        chain_blocks(b, _kinds(keys))
    except ValueError as exc:
        b.why_not = why or str(exc)
        return b
    if len(keys[0]) == 3:
        keys = [k + (shared,) for k, shared in zip(keys, _shared_inputs(b))]
    kinds = _kinds(keys)
    shaping = changes_shape(b, 0) and kinds.count(kinds[0]) == 1  # a stage's downsample, then its blocks
    odd = next((i for i in range(int(shaping), b.count) if changes_shape(b, i)), None)
    if odd is not None:  # only a first block may change it: kept in place, its run never grows
        b.why_not = (f"{why}; " if why else "") + f"block `{b.paths[odd]}` changes the shape of the stream " + (
            "and is not the list's first block" if odd else "as every block of its kind does")
        return b
    b.shaping = shaping
    b.period = period = _period(kinds)
    structures = [(True, []) if i == 0 and shaping else _residual_structure(gm, facts, b, i)
                  for i in range(period)]
    if not all(ready for ready, _ in structures):
        odd = next(i for i, (ready, _) in enumerate(structures) if not ready)
        b.why_not = (f"{why}; " if why else "") + (f"block `{b.paths[odd]}` is not identity-ready (post-norm: its "
                                                   "stream is not only added to; a norm, gate or scale acts on it)")
        return b
    b.homogeneous, b.why_not, b.pre_norm = True, "", True
    b.period_writers = [writers for _, writers in structures] if period > 1 else []
    b.period_suffixes = [sorted(_param_suffixes(gm, b, i)) for i in range(period)] if period > 1 else []
    b.alike = len({k[1] for k in keys}) == 1
    b.writers = structures[0][1]
    b.kinds = kinds
    b.layout = b.layouts[0]
    return b


def _shared_inputs(b: Blocks) -> list:
    """Per block, the values computed before the list that it reads, besides its stream input (masks, rotary
    tables), as graph positions: blocks reading different ones are of different kinds. Values made between
    blocks (a per-layer slice in the caller's loop) are left out."""
    first = b.nodes[0][0] if b.nodes and b.nodes[0] else None
    before, seen = set(), first.graph.nodes if first is not None else []
    for n in seen:
        if n is first:
            break
        before.add(n)
    out = []
    for i, ns in enumerate(b.nodes):
        inside = set(ns)
        reads = {a for n in ns for a in n.all_input_nodes if a not in inside and a in before and is_tensor(a)
                 and a.op != "get_attr" and a is not b.chain_in[i]}
        out.append(tuple(sorted(a.name for a in reads)))
    return out


def _residual_structure(gm, facts, b: Blocks, i: int = 0):
    """(identity-ready, writer suffixes) of block ``i``: the stream from input to output only adds terms, and
    zeroing the writers zeroes every term (see ``residual.py``)."""
    terms = stream_terms(b.chain_in[i], b.chain_out[i])
    if terms is None:
        return False, []
    owns = lambda state: b.suffix_of(i, state) is not None
    memo, writers = {}, set()
    for t in terms:
        z = zeroing_params(t, facts, owns, memo)
        if z is None:
            return False, []
        writers |= z
    return True, sorted(b.suffix_of(i, facts.params[w]) for w in writers)
