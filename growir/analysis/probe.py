"""Axis rules derived from the op itself: the distinct-prime probe.

Every aten op has a meta (fake) kernel that computes its output's shape from its operands'. Give each operand
axis its own prime size and run that kernel on fake tensors: an output axis whose size is one operand axis's
prime *is* that axis; a product of primes is a merge of those axes (row-major, in operand order); a sum of primes
is a concatenation; output axes of several outputs whose sizes add up to one operand's prime are its parts (a
split). Running it again with one prime changed to another says which output sizes depend on which operand axes,
which tells these relations from sizes set by literals (a narrow's length: ``fixed``) and sizes that follow an
operand by some other law (a diff's n - 1: ``follows``). That is how torch's own shape propagation works; growir
reads it instead of hand-writing a rule per op (see the op table, ``ops.py``).

Shapes do not say what an op does to values along an axis it keeps: a cumulative sum or a flip keeps the shape
and still mixes the axis. So each kept axis is also checked numerically, once: on small random operands, copying
units of the axis (the index map a width growth applies) before the op must equal copying them after it
(``uncopied`` lists the axes where it does not).

What the probe cannot state as an axis relation it keeps from growing: an operand axis whose size an output
follows by another law, or whose size the op constrains (a literal that must match), is pinned, and so is an
output axis of such a size; an operand axis no output keeps (reduced, contracted, indexed), or that copies do
not pass through, is read as an index, so a growth through it is reported inexact, never silently wrong. Where
it cannot probe at all (no meta kernel, data-dependent output shapes, a kernel that refuses prime sizes, a size
argument computed from sizes that are not its operands'), it refuses, naming the op and why. A size argument
computed from its operands' dynamic sizes (``seq_len - 1``) is evaluated at the probe's sizes.

Operands whose axes must be equal (``x + y``) reject distinct primes; they are probed again with the axes at the
same right-aligned position and of the same size sharing one prime (broadcasting's convention), then with all
axes of one size sharing one (a contraction's), and such axes are made one.

>>> rel = relations(torch.ops.aten.tensor_split.sections, [(2, 12)], (Operand(0), 3, -1), {}, [torch.float32])
>>> [kind for kind, _ in rel.outputs[0]], rel.parts  # axis 1 is the concatenation of the three outputs' axis 1
(['eq', 'part'], [(((0, 1),), [(0, 1), (1, 1), (2, 1)])])
>>> rel = relations(torch.ops.aten.cumsum.default, [(2, 12)], (Operand(0), 1), {}, [torch.float32])
>>> [kind for kind, _ in rel.outputs[0]], rel.uncopied  # same shape, but copies along axis 1 do not carry through
(['eq', 'eq'], [((0, 1),)])
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from math import prod

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from ..ir.axes import CAT, PROD


@dataclass
class Relations:
    """What the probe found for one op and argument signature.

    outputs: per output (a tensor result is one output), per axis, ``(kind, classes)``: ``eq`` [the operand
        axes it is], ``prod`` / ``cat`` [its factors / pieces, in operand order], ``fixed`` (set by literals),
        ``one`` (size 0 or 1), ``follows`` [what its size depends on, by no relation above], ``part`` (below)
    parts: ``(class, [(output, axis) ...])``: the operand axes of ``class`` are the concatenation of these
    mixed / tied: operand-axis classes no output keeps (read as an index) / whose size the op constrains (pinned)
    uncopied: classes the op keeps in shape but whose copies (an index map on the axis) it does not carry through
        (a cumulative sum, a flip along it): read as an index too
    A class is a tuple of operand axes ``(operand, axis)`` that the probe gave one prime.
    """
    outputs: list = field(default_factory=list)
    parts: list = field(default_factory=list)
    mixed: list = field(default_factory=list)
    tied: list = field(default_factory=list)
    uncopied: list = field(default_factory=list)


MODES = ("own", "broadcast", "size")  # tried in turn: the first whose sizes the kernel accepts is used
_known: dict = {}  # (op, argument template, operand shapes and dtypes) -> Relations or a refusal (str)


def relations(op, shapes: list, args: tuple, kwargs: dict, dtypes: list) -> Relations:
    """The axis relations of ``op`` for operands of these ``shapes`` (ints or symbolic sizes) and ``dtypes``,
    placed in ``args``/``kwargs`` by ``Operand(k)`` (sizes computed in the graph by ``Size``: see ``signature``);
    cached per signature. Raises ``ValueError`` with the reason where the probe cannot decide."""
    key = (str(op), repr((args, kwargs)), tuple(tuple(map(str, s)) for s in shapes), tuple(map(str, dtypes)))
    if key not in _known:
        try:
            _known[key] = _probe(op, shapes, args, kwargs, dtypes)
        except ValueError as exc:
            _known[key] = str(exc)
    found = _known[key]
    if isinstance(found, str):
        raise ValueError(found)
    return found


def _hint(d) -> int:
    """A concrete size for a real (possibly symbolic) one: its hint, else a typical one."""
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if hint is not None else 8


def _classes(shapes: list, mode: str) -> dict:
    """Operand axes grouped into the classes that get one prime each: every axis its own (``own``), axes at the
    same right-aligned position and of the same size together (``broadcast``), or all axes of the same size
    (``size``: a contraction's shared axis sits anywhere). Sizes 0 and 1 stay as they are."""
    classes = {}
    for k, shape in enumerate(shapes):
        for a, d in enumerate(shape):
            if _hint(d) in (0, 1):
                continue
            key = {"own": (k, a), "broadcast": (a - len(shape), str(d)), "size": str(d)}[mode]
            classes.setdefault(key, []).append((k, a))
    return {tuple(m): max(_hint(shapes[k][a]) for k, a in m) for m in classes.values()}


def _primes(floors: dict, taken: set, scaled: bool = False) -> dict:
    """A distinct prime above each class's real size (so literals valid for the real sizes stay valid); ``scaled``:
    the real size times such a prime, for a kernel that needs an axis divisible by a literal (group_norm's
    channels by its groups). Both are distinct across classes: a prime above the larger real size divides
    neither's."""
    out = {}
    for c, floor in floors.items():
        p = sympy.nextprime(max(floor, 10))
        while p in taken or (scaled and p * floor in taken):
            p = sympy.nextprime(p)
        out[c] = int(p * floor if scaled else p)
        taken.update({int(p), out[c]})
    return out


@contextlib.contextmanager
def _kernel_errors_quiet():
    """FakeTensorMode logs every kernel error; here an error is an answer (these sizes are refused), not news."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run(op, shapes: list, primes: dict, arguments: tuple, dtypes: list):
    """Output shapes of ``op`` on fake operands with these primes for their classes: a list per output (None for
    a non-tensor one)."""
    sizes = _sized(shapes, primes)
    with _kernel_errors_quiet(), FakeTensorMode():
        operands = [torch.empty(s, dtype=t) for s, t in zip(sizes, dtypes)]
        args, kwargs = _filled(*arguments, operands, _binding(shapes, sizes))
        out = op(*args, **kwargs)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [tuple(int(d) for d in o.shape) if isinstance(o, torch.Tensor) else None for o in outs]


@dataclass(frozen=True)
class Operand:
    """Where operand ``k`` goes in an op's arguments (the probe puts a fake tensor there)."""
    k: int


@dataclass(frozen=True)
class Size:
    """A size argument computed in the graph (``seq_len - 1``): its expression in the operands' size symbols,
    evaluated at the probe's sizes so that it stays consistent with them. One in none of the operands' symbols
    (``eye(seq_len)`` has no operand) is held at its value in the graph (``hint``): what it sizes is new axes,
    set by that argument like a literal."""
    expr: object
    hint: int | None = None


def _binding(shapes: list, sizes: list) -> dict:
    """Each size symbol that is an operand axis (a dynamic batch or sequence) -> that axis's probe size."""
    return {d.node.expr: n for shape, size in zip(shapes, sizes) for d, n in zip(shape, size)
            if isinstance(getattr(getattr(d, "node", None), "expr", None), sympy.Symbol)}


def _filled(args: tuple, kwargs: dict, operands: list, binding: dict):
    """The op's arguments with operands in their places and size expressions evaluated."""
    def fill(leaf):
        if isinstance(leaf, Operand):
            return operands[leaf.k]
        if not isinstance(leaf, Size):
            return leaf
        expr = sympy.sympify(leaf.expr)
        return int(expr.subs(binding)) if expr.free_symbols & set(binding) or leaf.hint is None else leaf.hint
    return pytree.tree_map(fill, args), pytree.tree_map(fill, kwargs)


def _sized(shapes: list, primes: dict) -> list:
    sizes = [[_hint(d) for d in s] for s in shapes]
    for c, p in primes.items():
        for k, a in c:
            sizes[k][a] = p
    return sizes


def _probe(op, shapes: list, args: tuple, kwargs: dict, dtypes: list) -> Relations:
    """Run the meta kernel at distinct primes, then once per class at another prime, and read the relations."""
    bound = set(_binding(shapes, shapes))
    for leaf in pytree.tree_leaves((args, kwargs)):
        free = sympy.sympify(leaf.expr).free_symbols if isinstance(leaf, Size) else set()
        if not free <= bound and (free & bound or leaf.hint is None):
            raise ValueError(f"its size argument {leaf.expr} is computed from sizes that are not its operands', so "
                             "no probe at other sizes can keep it consistent")
    at = lambda primes: _run(op, shapes, primes, (args, kwargs), dtypes)  # noqa: E731
    mode, scaled, primes, base = _accepted(at, shapes)
    if mode != "own":
        primes = _refined(at, primes, shapes if scaled else None)
        base = at(primes)
    floors = {c: max(_hint(shapes[k][a]) for k, a in c) for c in primes}
    others, moved = _primes(floors, set(primes.values()), scaled), {}
    for c in primes:
        try:
            moved[c] = at({**primes, c: others[c]})
        except Exception:  # noqa: BLE001 - the op accepts only some sizes of this axis: tied to a literal
            continue
        if [None if s is None else len(s) for s in moved[c]] != [None if s is None else len(s) for s in base]:
            del moved[c]  # the number or rank of outputs follows this axis (one output per index): tied
    rel = _read(base, primes, others, moved)
    rel.uncopied = [c for c in primes if c not in rel.tied and c not in rel.mixed
                    and not _commutes(op, shapes, primes, (args, kwargs), dtypes, c, others[c], rel)]
    return rel


def _accepted(at, shapes: list) -> tuple:
    """(mode, scaled, sizes per class, output shapes) of the first assignment of sizes the kernel accepts: each
    ``MODES`` with primes, then with real sizes times primes."""
    errors = []
    for scaled in (False, True):
        for mode in MODES:
            primes = _primes(_classes(shapes, mode), set(), scaled)
            try:
                return mode, scaled, primes, at(primes)
            except Exception as exc:  # noqa: BLE001 - any kernel error means this assignment of sizes is refused
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    raise ValueError(f"its meta kernel rejects operands of distinct prime sizes, and of their real sizes times "
                     f"distinct primes ({errors[-1]})")


def _refined(at, primes: dict, shapes: list | None = None) -> dict:
    """Shared classes split where the kernel allows: a member that it accepts at a prime of its own gets one (two
    axes of one size are not the same axis unless the op needs them equal). ``shapes``: sizes are scaled (real
    size times a prime)."""
    out, taken = dict(primes), set(primes.values())
    for c in primes:
        rest = c
        for m in c:
            if len(rest) == 1:
                break
            q = int(sympy.nextprime(max(taken))) * (_hint(shapes[m[0]][m[1]]) if shapes else 1)
            trial = {**{d: p for d, p in out.items() if d != rest}, tuple(x for x in rest if x != m): out[rest],
                     (m,): q}
            try:
                at(trial)
            except Exception:  # noqa: BLE001 - the op needs this axis equal to the others of its class
                continue
            out, rest = trial, tuple(x for x in rest if x != m)
            taken.add(q)
    return out


def _relate(base, moved, primes, others, j, i):
    """The relation of output ``j``'s axis ``i`` to the operand classes."""
    s = base[j][i]
    dep = sorted((c for c in moved if moved[c][j][i] != s), key=min)
    if not dep:
        return ("one", []) if s in (0, 1) else ("fixed", [])
    if len(dep) == 1:
        c = dep[0]
        return ("eq" if s == primes[c] and moved[c][j][i] == others[c] else "follows"), dep
    for kind, law in ((PROD, prod), (CAT, sum)):
        at = lambda swap: [others[c] if c == swap else primes[c] for c in dep]  # noqa: E731
        if s == law(at(None)) and all(moved[c][j][i] == law(at(c)) for c in dep):
            return kind, dep
    return "follows", dep


def _read(base: list, primes: dict, others: dict, moved: dict) -> Relations:
    rel = Relations(outputs=[[_relate(base, moved, primes, others, j, i) for i in range(len(shape))]
                             if shape is not None else [] for j, shape in enumerate(base)])
    kept = {c for axes in rel.outputs for kind, dep in axes if kind in ("eq", PROD, CAT) for c in dep}
    for c in primes:
        if c in kept or c not in moved:
            continue
        pieces = [(j, i) for j, axes in enumerate(rel.outputs) for i, r in enumerate(axes) if r == ("follows", [c])]
        outs = [j for j, _ in pieces]
        if len(pieces) > 1 and len(set(outs)) == len(outs) and sum(base[j][i] for j, i in pieces) == primes[c] \
                and sum(moved[c][j][i] for j, i in pieces) == others[c]:
            rel.parts.append((c, pieces))
            for j, i in pieces:
                rel.outputs[j][i] = ("part", [c])
            kept.add(c)
    follow = {c for axes in rel.outputs for kind, dep in axes if kind == "follows" for c in dep}
    rel.tied = [c for c in primes if c not in kept and (c in follow or c not in moved)]
    rel.mixed = [c for c in primes if c not in kept and c not in rel.tied]
    return rel


NUMERIC_LIMIT = 1 << 20  # elements per operand above which the copy test is not run (the class is read instead)


def _copies(c: tuple, n: int, sizes: list):
    """An index map that grows class ``c`` to ``n`` by copies of random units, the originals first."""
    p = sizes[c[0][0]][c[0][1]]
    g = torch.Generator().manual_seed(n)
    return torch.cat([torch.arange(p), torch.randint(0, p, (n - p,), generator=g)])


def _mapped(y: torch.Tensor, axes: list, c: tuple, idx, sizes: dict):
    """``y`` with the copy map ``idx`` of class ``c`` applied where its axes carry ``c`` (by the relations)."""
    for i, (kind, dep) in enumerate(axes):
        if c not in dep:
            continue
        parts = [sizes[d] for d in dep]
        at = dep.index(c)
        if kind == "eq":
            y = y.index_select(i, idx)
        elif kind == PROD:
            y = y.unflatten(i, parts).index_select(i + at, idx).flatten(i, i + len(parts) - 1)
        elif kind == CAT:
            pieces = list(y.split(parts, i))
            pieces[at] = pieces[at].index_select(i, idx)
            y = torch.cat(pieces, i)
    return y


def _commutes(op, shapes: list, primes: dict, arguments: tuple, dtypes: list, c: tuple, n: int,
              rel: Relations) -> bool:
    """Whether ``op`` carries copies along class ``c`` through: op(x copied) == op(x) copied where its output axes
    carry ``c``. Run on small random operands; an op it cannot run that way counts as not carrying them."""
    sizes = _sized(shapes, primes)
    if any(c == d for d, _ in rel.parts):
        return True  # a split: the concatenation structure carries a growth part by part
    if any(prod(s) > NUMERIC_LIMIT for s in sizes):
        return False
    idx = _copies(c, n, sizes)
    g = torch.Generator().manual_seed(0)
    xs = [_random(s, t, g) for s, t in zip(sizes, dtypes)]
    grown = list(xs)
    for k, a in c:
        grown[k] = grown[k].index_select(a, idx)
    class_sizes = {d: sizes[d[0][0]][d[0][1]] for axes in rel.outputs for _, dep in axes for d in dep}
    try:
        before = _call(op, xs, arguments, _binding(shapes, sizes))
        after = _call(op, grown, arguments, _binding(shapes, [list(x.shape) for x in grown]))
        return all(b is None or _same(_mapped(b, axes, c, idx, class_sizes), a)
                   for b, a, axes in zip(before, after, rel.outputs))
    except Exception:  # noqa: BLE001 - a kernel that rejects the copied operands does not carry the copies
        return False


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a kernel run at another size (float), or exactly (ints, bools)."""
    if a.shape != b.shape:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    return torch.equal(a, b)


def _random(shape: list, dtype, g) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    return torch.randint(0, 3, shape, generator=g, dtype=dtype)


def _call(op, xs: list, arguments: tuple, binding: dict) -> list:
    args, kwargs = _filled(*arguments, xs, binding)
    with torch.no_grad():
        out = op(*args, **kwargs)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [o if isinstance(o, torch.Tensor) else None for o in outs]
