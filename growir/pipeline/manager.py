"""A small pass manager: passes are data (a name, a function of one context, what it reads and writes), and
one engine runs a declared list of them in order.

The engine checks that what a pass reads is on the context before it runs and that what it declares it writes
is there afterwards (a pipeline bug, not a user error), wraps an unexpected exception as the pass's
``GrowthError`` subclass naming its stage and the pass (``errors.stage``; GrowthErrors pass through), and
records each pass's name and wall time on the context (``ctx.ran``, ``ctx.timings``) for the benchmarks.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Ctx:
...     x: int | None = None
...     y: int | None = None
...     ran: list = field(default_factory=list)
...     timings: dict = field(default_factory=dict)
>>> double = Pass("double", lambda c: setattr(c, "y", 2 * c.x), reads=("x",), writes=("y",))
>>> run_passes([double], Ctx(x=3)).y
6
>>> check_order([double], given=())
Traceback (most recent call last):
...
growir.errors.RewriteError: pass `double` reads `x`, which nothing before it writes
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..errors import RewriteError, stage

_UNSET = object()


@dataclass(frozen=True)
class Pass:
    """One step of the pipeline: ``run(ctx)`` reads ``reads`` and sets ``writes`` on the context.

    ``what`` says, in words, the stage the pass belongs to (it starts the error message of an unexpected
    failure); ``error`` is the GrowthError subclass such a failure becomes.
    """
    name: str
    run: Callable
    reads: tuple = ()
    writes: tuple = ()
    what: str = "computing the grown tensors and rewriting the graph"
    error: type = RewriteError

    def __call__(self, ctx):
        return self.run(ctx)


def run_passes(passes, ctx):
    """Run ``passes`` in order on ``ctx`` and return it (see the module docstring)."""
    for p in passes:
        missing = [r for r in p.reads if getattr(ctx, r, None) is None]
        if missing:
            raise RewriteError(f"growir's pipeline is broken: pass `{p.name}` reads `{missing[0]}`, which no "
                               f"earlier pass wrote; this is a growir bug, please report it")
        started = time.perf_counter()
        with stage(f"{p.what} (pass `{p.name}`)", p.error):
            p.run(ctx)
        ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - started
        ctx.ran.append(p.name)
        unwritten = [w for w in p.writes if getattr(ctx, w, _UNSET) is None]
        if unwritten:
            raise RewriteError(f"growir's pipeline is broken: pass `{p.name}` did not write `{unwritten[0]}`; "
                               f"this is a growir bug, please report it")
    return ctx


def check_order(passes, given=()) -> None:
    """Raise RewriteError where a pass reads a field that neither ``given`` nor an earlier pass writes."""
    known = set(given)
    for p in passes:
        for r in p.reads:
            if r not in known:
                raise RewriteError(f"pass `{p.name}` reads `{r}`, which nothing before it writes")
        known.update(p.writes)
