"""The axis graph: every tensor axis in the program is a node; equal axes are joined by edges.

Two axes joined by an edge index the same group with the same index map. Reshapes, slices and
concatenations relate axes structurally: an axis may be the row-major *product* of finer axes
(hidden -> heads x head_dim) or the *concatenation* of others (fused QKV -> q | k | v). Such an axis carries
a ``Structure`` over finer atoms; a *leaf* is an axis class without structure, and the leaves are the width
groups that can grow.

The union-find gives cheap incremental merging (structures merge when their owners do), and a leaf's class
is its root: the width groups are the union-find's classes, so no separate graph is kept.

>>> ag = AxisGraph()
>>> hidden, heads, head_dim = ag.add("hidden", 32), ag.add("heads", 4), ag.add("head_dim", 8)
>>> ag.set_structure(hidden, PROD, [heads, head_dim], "a view")
>>> ag.expand(hidden)
('prod', ['heads', 'head_dim'])
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import sympy

from ..errors import AnalysisError

Axis = Hashable  # ("node_name", axis_index) for tensor axes, ("seg", k) for refinement atoms
PROD, CAT = "prod", "cat"
ONE = sympy.Integer(1)


def as_expr(size) -> sympy.Expr:
    """A tensor size (int, SymInt or sympy expression) as a sympy expression."""
    if isinstance(size, int):
        return sympy.Integer(size)
    node = getattr(size, "node", None)
    if node is not None:
        return node.expr
    return sympy.sympify(size)


def divides(a: sympy.Expr, b: sympy.Expr, assumed: Sequence = ()) -> bool:
    """Whether ``a`` divides ``b`` as a product of sizes (b / a is a polynomial in the shape symbols, or, for
    sizes with floor/Mod, a whole number at every point of ``_grid`` where the ``assumed`` sizes are 0)."""
    ratio = sympy.cancel(b / a)
    _, den = sympy.fraction(ratio)
    if den == 1:
        return not ratio.is_number or (ratio.is_integer and ratio >= 1)
    if not _rounded(ratio):
        return False
    return all(v.is_integer and v >= 1 for point in _grid(ratio, assumed) if (v := _at(ratio, point)) is not None)


def same_size(a: sympy.Expr, b: sympy.Expr, assumed: Sequence = ()) -> bool:
    """Whether two sizes are equal: symbolically, or, where floor/Mod hide it from sympy (a sequence padded to a
    multiple of a chunk and cut into chunks: ``s + (4 - s % 4) % 4 == 4 * ((s + (4 - s % 4) % 4) // 4)``), at
    every point of ``_grid`` where the ``assumed`` sizes are 0 (``AxisGraph.assumed``).

    >>> s = sympy.Symbol("s", integer=True, positive=True)
    >>> padded = s + sympy.Mod(4 - sympy.Mod(s, 4), 4)
    >>> same_size(padded, 4 * sympy.floor(padded / 4)), same_size(padded, s)
    (True, False)
    """
    diff = sympy.expand(a - b)
    if diff.is_Number:
        return diff == 0
    if _rounded(diff):  # simplify is slow on floor/Mod terms and rarely decides them
        return all(v == 0 for point in _grid(diff, assumed) if (v := _at(diff, point)) is not None)
    if diff.is_polynomial(*diff.free_symbols):  # expanded, a polynomial is 0 only as the literal 0
        return False
    return sympy.simplify(diff) == 0


def _rounded(e: sympy.Expr) -> bool:
    """Whether ``e`` has shape symbols under a function (floor, Mod, torch's FloorDiv), where sympy's algebra
    cannot decide equality."""
    return bool(e.free_symbols) and bool(e.atoms(sympy.Function))


def _grid(e: sympy.Expr, assumed: Sequence = ()) -> list:
    """Points for deciding a rounded size identity ``e``: each symbol takes 64 consecutive values from 2 (the
    smallest dynamic size torch.export allows), so every residue modulo a chunk up to 64, the symbols on co-prime
    strides; and, for each literal over 32 in ``e`` (a chunk of 256: at 2..65 a sequence padded to it is always
    one chunk, and a chunk count equals 1), values across its first multiples. Only the points where every
    ``assumed`` size over these symbols is 0 are kept (all of them if none is).

    >>> s = sympy.Symbol("s", integer=True, positive=True)
    >>> sorted({p[s] for p in _grid(sympy.Mod(s, 256))})[63:]
    [65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 767, 768, 769, 1279, 1280, 1281]
    """
    symbols = sorted(e.free_symbols, key=str)
    held = [d for d in assumed if d.free_symbols <= e.free_symbols]
    literals = {int(abs(n)) for x in (e, *held) for n in x.atoms(sympy.Integer)}
    large = sorted(n for n in literals if 32 < n < 2 ** 20)[-4:]
    extra = {j * m + r for m in large for j in (1, 2, 3, 5) for r in (-1, 0, 1)} | {m // 2 + r for m in large
                                                                                     for r in (-1, 0, 1)}
    values = [2 + i for i in range(64)] + sorted(v for v in extra if v > 65)
    points = [{s: sympy.Integer(values[(i * (2 * k + 1)) % len(values)]) for k, s in enumerate(symbols)}
              for i in range(len(values))]
    return [p for p in points if all(_at(d, p) == 0 for d in held)] or points


def _at(e: sympy.Expr, point: dict):
    """``e`` at ``point``, or None where it divides by zero there (a size floor-divided down to 0, then used as a
    divisor: no model runs at that point, so it decides nothing)."""
    try:
        return e.xreplace(point)
    except ZeroDivisionError:
        return None


def _by_data(diff: sympy.Expr) -> bool:
    """Whether a size difference holds a data-dependent (unbacked) size: a count of tokens routed to each expert
    (``u0 + u1 + u2 + u3`` against ``2·batch·seq``). No algebra decides it; the op that equates the two checks it
    when it runs, so the graph holds only where they agree (an assumption, as ``equal_as_traced``'s). Never a
    width group: parameters have no data-dependent sizes."""
    from torch.utils._sympy.symbol import SymT, symbol_is_type
    return any(symbol_is_type(x, (SymT.UNBACKED_INT, SymT.UNBACKED_FLOAT)) for x in sympy.expand(diff).free_symbols)


def _both(why: str) -> str:
    return (f"{why}: one axis is both split by a slice/split/cat and reshaped into a product; growir cannot "
            f"reconcile the two layouts")


def is_structured(tree) -> bool:
    """Whether an ``AxisGraph.expand`` tree is a (PROD|CAT, [subtrees]) node rather than a leaf root."""
    return isinstance(tree, tuple) and len(tree) == 2 and tree[0] in (PROD, CAT) and isinstance(tree[1], list)


def tree_leaves(tree) -> list:
    """The leaf roots of an ``expand`` tree, left to right (repeats kept)."""
    return [leaf for t in tree[1] for leaf in tree_leaves(t)] if is_structured(tree) else [tree]


@dataclass
class Structure:
    """An axis class made of finer ones: their row-major product (PROD) or their concatenation (CAT)."""
    kind: str  # PROD (row-major: first part is the major one) or CAT
    parts: list  # axis ids; their classes are found through the union-find


@dataclass
class AxisGraph:
    """Every tensor axis of a program, joined into classes of equal axes (a union-find), each class possibly
    the product or concatenation of finer classes (``structure``); the leaf classes are the width groups."""
    parent: dict = field(default_factory=dict)
    size: dict = field(default_factory=dict)  # root -> sympy size
    structure: dict = field(default_factory=dict)  # root -> Structure
    names: dict = field(default_factory=dict)  # size symbol -> what it is, in words (for error messages)
    origin: dict = field(default_factory=dict)  # fresh atom -> what made it, in words (for debugging)
    traced: dict = field(default_factory=dict)  # size symbol -> its value in the traced example
    assumed: list = field(default_factory=list)  # size differences the trace fixed at 0 (``equal_as_traced``)
    data: list = field(default_factory=list)  # axes sized by the data: model inputs', pooled (a batch, a sequence)
    opaque: dict = field(default_factory=dict)  # axis -> (why it is kept from growing, the refusal if a width)
    fixed: dict = field(default_factory=dict)  # axis -> why it is kept from growing (a chunk's part index)
    counts: dict = field(default_factory=dict)  # literal count -> why it is kept unless it equals another axis
    _fresh: int = 0

    # --- nodes -----------------------------------------------------------------------------------
    def add(self, axis: Axis, size) -> Axis:
        """Add ``axis`` of ``size`` as its own class (nothing if it is known); returns it."""
        if axis not in self.parent:
            self.parent[axis] = axis
            self.size[axis] = as_expr(size)
        return axis

    def fresh(self, size, why: str = "") -> Axis:
        """A new atom of ``size`` (a part of a structure), described by ``why``."""
        self._fresh += 1
        axis = ("seg", self._fresh)
        self.add(axis, size)
        self.origin[axis] = why
        return axis

    def find(self, axis: Axis) -> Axis:
        """The root of ``axis``'s class."""
        root = axis
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[axis] != root:  # path compression
            self.parent[axis], axis = root, self.parent[axis]
        return root

    def size_of(self, axis: Axis) -> sympy.Expr:
        """The size of ``axis``'s class."""
        return self.size[self.find(axis)]

    # --- equalities ------------------------------------------------------------------------------
    def unify(self, a: Axis, b: Axis, why: str) -> None:
        """Make ``a`` and ``b`` one class (their structures merge); ``why`` names the op, for the error raised
        when their sizes differ."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if not self.same(self.size[ra], self.size[rb]):
            if not (self.equal_as_traced(self.size[ra], self.size[rb]) or _by_data(self.size[ra] - self.size[rb])):
                raise AnalysisError(f"{why}: axes of sizes {self.size[ra]} and {self.size[rb]} were found equal; "
                                    f"growir's rule for this op is wrong or the graph is inconsistent")
            self.assumed.append(sympy.expand(self.size[ra] - self.size[rb]))
        if self.size[ra].free_symbols and not self.size[rb].free_symbols:
            ra, rb = rb, ra  # the class keeps a literal size (a chunk count the trace holds as 1, a chunk of 256)
        sa, sb = self.structure.pop(ra, None), self.structure.pop(rb, None)
        self.parent[rb] = ra
        if sa is None:
            if sb is not None:
                self.structure[ra] = sb
        elif sb is None:
            self.structure[ra] = sa
        else:
            self.structure[ra] = sa
            self._merge_structures(sa, sb, why)

    def same(self, a: sympy.Expr, b: sympy.Expr) -> bool:
        """``same_size`` where this graph's trace holds (``assumed``)."""
        return same_size(a, b, self.assumed)

    def equal_as_traced(self, a: sympy.Expr, b: sympy.Expr) -> bool:
        """Whether two sizes, one with floor/Mod of a sequence length, are equal at the traced example: a graph
        holds the branches its example took, so where torch.export fixed a size the example gave (a chunked scan
        traced as one chunk, its chunk count a literal 1 beside the symbolic one), the graph is only valid where
        they agree, and ``unify`` keeps that as an assumption for later size identities. A sequence axis is never
        a width group, so no group is decided by this.

        >>> ag, s = AxisGraph(), sympy.Symbol("s", integer=True, positive=True)
        >>> ag.traced[s] = 8
        >>> chunks = sympy.floor((s + sympy.Mod(256 - sympy.Mod(s, 256), 256)) / 256)
        >>> ag.equal_as_traced(chunks, sympy.Integer(1)), ag.equal_as_traced(s, sympy.Integer(8))
        (True, False)
        """
        diff = sympy.expand(a - b)
        if not _rounded(diff) or not diff.free_symbols <= set(self.traced):
            return False
        return diff.xreplace({k: sympy.Integer(v) for k, v in self.traced.items()}) == 0

    def set_structure(self, axis: Axis, kind: str, parts: Sequence[Axis], why: str) -> None:
        """Declare ``axis`` to be the product or concatenation of ``parts`` (merging with what it was)."""
        parts = list(parts)
        if len(parts) == 1:
            self.unify(axis, parts[0], why)
            return
        root = self.find(axis)
        old = self.structure.get(root)
        new = Structure(kind, parts)
        if old is None:
            self.structure[root] = new
        else:
            self._merge_structures(old, new, why)

    def _merge_structures(self, a: Structure, b: Structure, why: str) -> None:
        if a.kind != b.kind and self.is_data(a.parts + b.parts):
            # a relative-position shift: (s, 2s) viewed as (2s, s), a row sliced off, viewed back
            self._make_opaque(a.parts + b.parts, why, _both(why))
        elif a.kind != b.kind:
            cat, prod = (a, b) if a.kind == CAT else (b, a)
            self._distribute(cat.parts, prod.parts, why)
            return
        self.align(a.kind, a.parts, b.parts, why)

    def _distribute(self, cat: list, prod: list, why: str) -> None:
        """A concatenation that is also a product: ``cat(p1..pk) == prod(f0, f1..fn)`` holds as a layout where
        every part is whole rows of the minor factors, ``pi == prod(gi, f1..fn)`` with ``f0 == cat(g1..gk)``
        (row-major: a cut at a multiple of ``f1 x .. x fn`` splits the major factor only). Differential
        attention chunks its heads in two where they are also a product of kv heads and repeats; a fused
        projection viewed as heads and split into head groups is the same law. Any other cut splits a minor
        factor's rows and has no layout to grow."""
        factors, parts = self.leaves(PROD, prod), self.leaves(CAT, cat)
        for j in range(len(factors)):  # the first factor whose minor rows every part is made of
            minor = sympy.Integer(1)
            for f in factors[j + 1:]:
                minor = minor * self.size_of(f)
            if all(divides(minor, self.size_of(p), self.assumed) for p in parts):
                break
        else:
            raise AnalysisError(_both(why))
        if not all(self.same(self.size_of(f), ONE) for f in factors[:j]):  # a cut inside a major factor's rows
            raise AnalysisError(_both(why))
        if self.same(self.size_of(factors[j]), sympy.Integer(len(parts))):
            # each part is one row: the major factor indexes the parts, and their number is the split's own
            self.fixed.setdefault(factors[j], f"it indexes the {len(parts)} parts of a split at {why}, and a split "
                                              "keeps its number of parts")
            for p in parts:
                self.set_structure(p, PROD, [*factors[:j], *factors[j + 1:]], why)
            return
        rows = [self.fresh(sympy.cancel(self.size_of(p) / minor), why) for p in parts]
        self.set_structure(factors[j], CAT, rows, why)
        for p, r in zip(parts, rows):  # size-one factors are kept: a class of one head may grow
            self.set_structure(p, PROD, [*factors[:j], r, *factors[j + 1:]], why)

    # --- alignment (the reshape rule and its cat twin) ----------------------------------------------
    def leaves(self, kind: str, parts: Sequence[Axis]) -> list:
        """Flatten nested structures of the same kind into their finest parts."""
        out = []
        for p in parts:
            s = self.structure.get(self.find(p))
            if s is not None and s.kind == kind:
                out.extend(self.leaves(kind, s.parts))
            else:
                out.append(p)
        return out

    def align(self, kind: str, a_parts: Sequence[Axis], b_parts: Sequence[Axis], why: str) -> None:
        """Make two decompositions of one flat index agree: ``kind`` of ``a_parts`` == ``kind`` of ``b_parts``.

        Cut points (running products for PROD, running sums for CAT) from both sides are merged into one
        chain; each part becomes the ``kind`` of the segments it spans. For a reshape (s, 32) -> (4s, 8)
        the chain is s | 4s | 32s, so 32 = 4 x 8 and 4s = s x 4.
        """
        a = [p for p in self.leaves(kind, a_parts) if not (kind == PROD and self.same(self.size_of(p), ONE))]
        b = [p for p in self.leaves(kind, b_parts) if not (kind == PROD and self.same(self.size_of(p), ONE))]
        if len(a) == len(b) and all(self.same(self.size_of(x), self.size_of(y)) for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.unify(x, y, why)
            return
        cuts_a, cuts_b = self._cuts(kind, a), self._cuts(kind, b)
        chain = self._merge_chains(kind, cuts_a, cuts_b)
        if chain is None and not (kind == PROD and self._opaque_middle(a, b, why, cuts_a, cuts_b)):
            raise AnalysisError(self._unaligned(why, cuts_a, cuts_b))
        if chain is None:
            return
        segments = self._segments(kind, chain, why)
        for parts, cuts in ((a, cuts_a), (b, cuts_b)):
            start = 0
            for part, end_cut in zip(parts, cuts):
                end = next(k for k in range(start, len(chain)) if self.same(chain[k], end_cut))
                self.set_structure(part, kind, segments[start:end + 1], why)
                start = end + 1

    def _cuts(self, kind: str, parts: list) -> list:
        cuts, acc = [], sympy.Integer(1 if kind == PROD else 0)
        for p in parts:
            acc = acc * self.size_of(p) if kind == PROD else acc + self.size_of(p)
            cuts.append(sympy.expand(acc))
        return cuts

    def _merge_chains(self, kind: str, x: list, y: list) -> list | None:
        chain, i, j = [], 0, 0
        before = ((lambda p, q: divides(p, q, self.assumed)) if kind == PROD
                  else (lambda p, q: bool(sympy.simplify(q - p) >= 0)))
        while i < len(x) or j < len(y):
            if i < len(x) and j < len(y) and self.same(x[i], y[j]):
                chain.append(x[i]); i += 1; j += 1
            elif j >= len(y) or (i < len(x) and before(x[i], y[j])):
                chain.append(x[i]); i += 1
            elif i >= len(x) or before(y[j], x[i]):
                chain.append(y[j]); j += 1
            else:
                return None
        return chain

    def _opaque_middle(self, a: list, b: list, why: str, cuts_a: list, cuts_b: list) -> bool:
        """Where a reshape regroups data-sized axes among themselves (a relative-position shift views (s, 2s) as
        (2s, s)), align the parts before and after that region and make the region's axes opaque: related to
        nothing and kept from growing. Width groups never depend on how the data's axes are regrouped; one
        caught in such a region (features regrouped with the sequence) is refused by the walker when it finds a
        parameter contracting it. False, changing nothing, where the region holds no data-sized axis."""
        i, j = self._common(a, b)
        k, m = self._common(a[i:][::-1], b[j:][::-1])
        middle = a[i:len(a) - k] + b[j:len(b) - m]
        if not self.is_data(middle):
            return False
        self.align(PROD, a[:i], b[:j], why)
        self.align(PROD, a[len(a) - k:], b[len(b) - m:], why)
        self._make_opaque(middle, why, self._unaligned(why, cuts_a, cuts_b))
        return True

    def _common(self, a: list, b: list) -> tuple:
        """(i, j): the longest prefixes ``a[:i]``, ``b[:j]`` of one size whose reshape ``align`` can follow."""
        best, ca, cb = (0, 0), self._cuts(PROD, a), self._cuts(PROD, b)
        for i, x in enumerate(ca):
            j = next((j for j, y in enumerate(cb) if self.same(x, y)), None)
            if j is not None:
                if self._merge_chains(PROD, ca[:i + 1], cb[:j + 1]) is None:
                    break
                best = (i + 1, j + 1)
        return best

    def is_data(self, parts: Sequence[Axis]) -> bool:
        """Whether any of ``parts`` is sized by the data: a size with a shape symbol, or one of ``data`` (a
        sequence that a static export holds as a literal, a pooled sequence) or ``opaque``, or a part of one of
        them, among its classes."""
        data = {r for x in [*self.data, *self.opaque] for r in (self.find(x), *self.leaf_roots(x))}
        return any(self.size_of(p).free_symbols or self.find(p) in data or data & set(self.leaf_roots(p))
                   for p in parts)

    def _make_opaque(self, parts: Sequence[Axis], why: str, refusal: str) -> None:
        for p in parts:
            self.opaque.setdefault(p, (f"regrouped with the data's axes (a batch, a sequence) at {why}", refusal))

    def _unaligned(self, why: str, x: list, y: list) -> str:
        """A reshape growir cannot follow, in plain words: the running sizes of both sides, what each
        symbol is (an input's batch or sequence length), and the form growir needs."""
        symbols = sorted({s for e in x + y for s in sympy.sympify(e).free_symbols}, key=str)
        legend = "; ".join(f"{s} is {self.names.get(s, 'a size only known at run time')}" for s in symbols)
        return (f"{why}: this reshape regroups elements in a way growir cannot follow: one side's axes end after "
                f"{', '.join(map(str, x))} elements, the other's after {', '.join(map(str, y))}, and neither "
                "boundary divides the other" + (f" ({legend})" if legend else "") + ". growir follows reshapes "
                "that split or merge whole axes, like (batch, seq, heads*head_dim) <-> (batch, seq, heads, "
                "head_dim); one that mixes a batch or sequence axis with feature sizes cannot be grown. "
                "Reshape over whole axes there, or report the model")

    def _segments(self, kind: str, chain: list, why: str) -> list:
        segs, prev = [], sympy.Integer(1 if kind == PROD else 0)
        for cut in chain:
            size = sympy.cancel(cut / prev) if kind == PROD else sympy.simplify(cut - prev)
            segs.append(self.fresh(size, why))
            prev = cut
        return segs

    # --- queries ---------------------------------------------------------------------------------
    def alone(self, axes: Sequence[Axis]) -> list:
        """Those of ``axes`` whose class is the axis itself only: no other axis was found equal to it, and it has
        no parts (one pass over the graph for all of them)."""
        members = Counter(self.find(a) for a in self.parent)
        return [a for a in axes if self.find(a) not in self.structure and members[self.find(a)] == 1]

    def expand(self, axis: Axis) -> tuple:
        """The axis as a tree over leaf roots: a leaf root, or (kind, [subtrees])."""
        root = self.find(axis)
        s = self.structure.get(root)
        if s is None:
            return root
        return (s.kind, [self.expand(p) for p in s.parts])

    def leaf_roots(self, axis: Axis) -> list:
        """The distinct leaf roots of the axis's tree, in order."""
        return list(dict.fromkeys(tree_leaves(self.expand(axis))))
