"""A small pass manager: passes are data (a name, a function of one context, what it reads, writes and
mutates), and one engine runs a declared list of them in order.

A pass is declared where its function is (``@declare(reads=..., writes=..., mutates=...)`` turns the function
into a ``Pass``). ``reads`` are fields the pass needs set (a trailing ``?``: it may find None there);
``writes`` are fields it sets (``?``: maybe to None); ``mutates`` are fields whose object it changes in
place (a dict it adds to).
The engine checks that what a pass reads is on the context before it runs and that what it writes is there
afterwards (a pipeline bug, not a user error), wraps an unexpected exception as the pass's ``GrowthError``
subclass naming its stage and the pass (``errors.stage``; GrowthErrors pass through), and records each pass's
name and wall time on the context (``ctx.ran``, ``ctx.timings``). Under ``checking()`` (the tests) it also
checks that every declared name is a field of the context and that a pass touched nothing it did not declare.

A pass that finds the growth must start again raises ``Restart(why, passes)``: the driver resets the context
to its inputs (``ctx.restart(why)``), runs ``passes`` and goes on after the pass that raised.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Ctx:
...     x: int | None = None
...     y: int | None = None
...     ran: list = field(default_factory=list)
...     timings: dict = field(default_factory=dict)
>>> @declare(reads=("x",), writes=("y",))
... def double(c):
...     c.y = 2 * c.x
>>> run_passes([double], Ctx(x=3)).y
6
>>> check_order([double], given=())
Traceback (most recent call last):
...
growir.errors.RewriteError: pass `double` reads `x`, which nothing before it writes
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import RewriteError, stage

_UNSET = object()
_BOOKKEEPING = ("ran", "timings", "reruns")  # the manager's own fields: every pass may touch them
_checking = [False]


@dataclass(frozen=True)
class Pass:
    """One step of the pipeline: ``run(ctx)`` reads ``reads``, sets ``writes`` and changes ``mutates`` in place.

    ``what`` says, in words, the stage the pass belongs to (it starts the error message of an unexpected
    failure); ``error`` is the GrowthError subclass such a failure becomes.
    """
    name: str
    run: Callable
    reads: tuple = ()
    writes: tuple = ()
    what: str = "computing the grown tensors and rewriting the graph"
    error: type = RewriteError
    mutates: tuple = ()

    def __call__(self, ctx):
        return self.run(ctx)

    @property
    def needs(self) -> tuple:
        """The fields that must be set (not None) before the pass runs."""
        return tuple(r for r in self.reads if not r.endswith("?"))

    @property
    def sets(self) -> tuple:
        """The fields the pass sets (``writes``, the optional marks removed)."""
        return tuple(w.rstrip("?") for w in self.writes)

    @property
    def touches(self) -> set:
        """Every field name the pass declares, the optional marks removed."""
        return {n.rstrip("?") for n in self.reads + self.writes + self.mutates}


def declare(reads=(), writes=(), mutates=(), *, name=None, what=None, error=None):
    """The decorated function as a ``Pass`` named after it (its leading underscore dropped)."""
    def wrap(fn):
        extra = {k: v for k, v in (("what", what), ("error", error)) if v is not None}
        return Pass(name or fn.__name__.lstrip("_"), fn, tuple(reads), tuple(writes), mutates=tuple(mutates),
                    **extra)
    return wrap


class Restart(Exception):
    """Raised by a pass: the growth starts again from its inputs (``why`` says why), ``passes`` run first."""

    def __init__(self, why: str, passes):
        super().__init__(why)
        self.why, self.passes = why, tuple(passes)


@contextlib.contextmanager
def checking():
    """Within it, ``run_passes`` checks every pass's declaration against what it touched (slower: tests)."""
    before, _checking[0] = _checking[0], True
    try:
        yield
    finally:
        _checking[0] = before


def run_passes(passes, ctx):
    """Run ``passes`` in order on ``ctx`` and return it (see the module docstring)."""
    with collector_paused():
        for p in passes:
            try:
                _run_one(p, ctx)
            except Restart as restart:
                ctx.restart(restart.why)
                ctx.reruns.append(f"{p.name}: {restart.why}")
                run_passes(restart.passes, ctx)
    return ctx


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector paused while the passes run, as ``timeit`` pauses it, and restored
    as it was. A grow makes many small objects (the export's graph, shape symbols), and a full collection
    then walks every object of the process (torch's and transformers' modules too): measured 0.2 s of a 3.5 s
    134M grow in a fresh process. Tensors are freed by reference counting as before; only cycles wait for the
    next collection after the grow.

    >>> import gc
    >>> with collector_paused():
    ...     gc.isenabled()
    False
    >>> gc.isenabled()
    True
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _run_one(p: Pass, ctx) -> None:
    missing = [r for r in p.needs if getattr(ctx, r, None) is None]
    if missing:
        raise RewriteError(f"growir's pipeline is broken: pass `{p.name}` reads `{missing[0]}`, which no "
                           f"earlier pass wrote; this is a growir bug, please report it")
    watched = _Watched(ctx, p) if _checking[0] else None
    started = time.perf_counter()
    restart = None
    with stage(f"{p.what} (pass `{p.name}`)", p.error):
        try:
            p.run(watched or ctx)
        except Restart as raised:  # not a failure: the driver's to handle, after the bookkeeping
            restart = raised
    ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - started
    ctx.ran.append(p.name)
    if restart is not None:
        raise restart
    if watched is not None:
        watched.check()
    unwritten = [w for w in p.writes if not w.endswith("?") and getattr(ctx, w, _UNSET) is None]
    if unwritten:
        raise RewriteError(f"growir's pipeline is broken: pass `{p.name}` did not write `{unwritten[0]}`; "
                           f"this is a growir bug, please report it")


def check_order(passes, given=()) -> None:
    """Raise RewriteError where a pass reads a field that neither ``given`` nor an earlier pass writes."""
    known = set(given)
    for p in passes:
        for r in p.needs:
            if r not in known:
                raise RewriteError(f"pass `{p.name}` reads `{r}`, which nothing before it writes")
        known.update(p.sets)


def check_declared(passes, context_type) -> None:
    """Raise RewriteError where a pass declares a name that is not a field of ``context_type`` (a typo)."""
    fields = {f.name for f in dataclasses.fields(context_type)}
    for p in passes:
        unknown = sorted(p.touches - fields)
        if unknown:
            raise RewriteError(f"pass `{p.name}` declares `{unknown[0]}`, which is not a field of "
                               f"{context_type.__name__}")


class _Watched:
    """The context as one pass sees it under ``checking()``: reads and writes recorded, objects fingerprinted."""

    def __init__(self, ctx, p: Pass):
        check_declared([p], type(ctx))
        fields = [f.name for f in dataclasses.fields(ctx) if f.name not in _BOOKKEEPING]
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_pass", p)
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_seen", set())
        object.__setattr__(self, "_before", {k: _fingerprint(getattr(ctx, k)) for k in fields})

    def __getattr__(self, name):
        self._seen.add(name)
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        self._seen.add(name)
        setattr(self._ctx, name, value)

    def check(self) -> None:
        """Raise RewriteError where the pass read, wrote or changed a field it did not declare."""
        p, ctx = self._pass, self._ctx
        declared = p.touches | set(_BOOKKEEPING)
        undeclared = sorted(n for n in self._seen & set(self._fields) if n not in declared)
        changed = [k for k in self._fields if _fingerprint(getattr(ctx, k)) != self._before[k]]
        unsaid = sorted(k for k in changed if k not in set(p.sets) | set(p.mutates))
        if undeclared or unsaid:
            raise RewriteError(f"pass `{p.name}` touched `{(undeclared + unsaid)[0]}`, which it does not declare "
                               f"(reads, writes or mutates)")


def _fingerprint(value, depth: int = 3):
    """What identifies ``value``'s contents a few levels down: the identities of what it holds."""
    if depth == 0 or isinstance(value, (str, int, float, bool, type(None))):
        return id(value) if depth == 0 else value
    if isinstance(value, dict):
        return tuple((id(k), _fingerprint(v, depth - 1)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_fingerprint(v, depth - 1) for v in value))
    if isinstance(value, (set, frozenset)):
        return frozenset(id(v) for v in value)
    if hasattr(value, "__dict__") and not callable(value) and not hasattr(value, "graph"):
        return (id(value), tuple((k, _fingerprint(v, depth - 1)) for k, v in vars(value).items()))
    return id(value)
