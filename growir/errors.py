"""The GrowthError family: every refusal says what, where, why and what to do."""

from __future__ import annotations


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
