"""The GrowthError family: every refusal says what, where, why and what to do."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager


class GrowthError(Exception):
    """Base class of every error growir raises on purpose."""


class SpecError(GrowthError, ValueError):
    """The growth spec itself is wrong: a width below 1, an unknown role or method, a fractional head count."""


class TraceError(GrowthError):
    """The model could not be turned into a graph (torch.export failed, or no example inputs were given)."""


class UnsupportedOpError(GrowthError):
    """The analysis met an aten op it has no rule for; it names the op and the module it came from."""


class AnalysisError(GrowthError):
    """The graph's dimensions could not be reconciled (a reshape or a block structure growir does not understand)."""


class NotExactError(GrowthError):
    """``strict=True`` and the requested growth cannot preserve the function exactly."""


class MaterializeError(GrowthError):
    """The grown tensors do not fit the rebuilt model (config fields, shapes); nothing was loaded."""


class PreservationError(GrowthError):
    """A growth that should be exact measured a deviation beyond tolerance."""


class RewriteError(GrowthError):
    """growir could not build or run the grown model (a pass, the rewritten graph); the message names the
    stage and, where known, the op and module, and the original exception is its ``__cause__``."""


@contextmanager
def stage(what: str, error: type = RewriteError, advice: str = ""):
    """Turn an unexpected exception inside one of growir's stages into ``error`` that says which stage
    failed and why, keeping the original as ``__cause__``; GrowthErrors pass through unchanged.

    >>> try:
    ...     with stage("resolving the width spec", SpecError):
    ...         {}["hidden"]
    ... except SpecError as e:
    ...     print(str(e).split(":")[0], type(e.__cause__).__name__)
    growir failed while resolving the width spec KeyError
    """
    try:
        yield
    except GrowthError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised as a GrowthError, the original chained
        raise error(f"growir failed while {what}: {type(exc).__name__}: {first_line(exc)}. "
                    + (advice or "This is a limitation of growir, not of your model: the source is unchanged; "
                       "please report it with the model's definition")) from exc


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, at most ``limit`` characters."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:limit]


def first_sentence(error: Exception) -> str:
    """The first sentence of an error's message (at most 300 characters), on one line.

    >>> first_sentence(ValueError("shapes differ.  See\\nthe log. And more"))
    'shapes differ.'
    """
    text = " ".join(str(error).split())
    cut = text.find(". ")
    return text[:cut + 1] if 0 < cut < 300 else text[:300]


_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")  # growir/: never "the user's line"


def warn(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside growir: the user's line, however deep the call that warns.

    Python 3.11 has no ``skip_file_prefixes``, and a hand-counted ``stacklevel`` goes stale when the pass
    manager or a public function gains a frame.

    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn("growir: a note")
    >>> str(caught[0].message), caught[0].filename.startswith("<doctest")  # this line, not growir's
    ('growir: a note', True)
    """
    frame, level = sys._getframe(1), 2  # stacklevel 2 is warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
