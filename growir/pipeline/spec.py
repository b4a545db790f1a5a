"""The growth spec as the caller gives it, checked: width and depth methods, presets, materialize modes.

>>> options("bert2bert", "auto", "auto", 0.0, 0)[1].width_method
'aki'
"""

from __future__ import annotations

from ..errors import SpecError
from ..materialize.hf import MATERIALIZE as MATERIALIZE_MODES
from ..passes.depth import DEPTH_METHODS
from .context import Options


WIDTH_METHODS = ("auto", "fill", "fresh", "fpi", "fpi_balanced", "fpi_random", "aki")


PRESETS = {"bert2bert": {"width_method": "aki", "depth_method": "stack"}}  # the paper's recipe


def options(method, width_method: str, depth_method: str, noise, seed) -> tuple[str, Options]:
    """(the width method asked for, the options the passes run with): presets expanded, every name checked;
    "auto" decides per group (copies when noise is asked: noise breaks the symmetry of copies)."""
    if method is not None:
        if method not in PRESETS:
            raise SpecError(f"unknown method {method!r}: the presets are {', '.join(PRESETS)}")
        width_method, depth_method = PRESETS[method]["width_method"], PRESETS[method]["depth_method"]
    if not isinstance(noise, (int, float)) or noise < 0:
        raise SpecError(f"noise must be a number >= 0 (a std relative to each weight's std), got {noise!r}")
    if width_method not in WIDTH_METHODS:
        raise SpecError(f"unknown width_method {width_method!r}: choose one of {', '.join(WIDTH_METHODS)}")
    if depth_method not in DEPTH_METHODS:
        raise SpecError(f"unknown depth_method {depth_method!r}: choose one of {', '.join(DEPTH_METHODS)}")
    if width_method == "auto" and noise:  # noise is symmetry breaking for copies: the user asks for copies
        width_method = "fpi"
    return width_method, Options(width_method, depth_method, seed, float(noise))


def check_mode(mode: str) -> None:
    """SpecError unless ``mode`` is one of grow's ``materialize`` modes."""
    if mode not in MATERIALIZE_MODES:
        raise SpecError(f"unknown materialize {mode!r}: choose one of {', '.join(MATERIALIZE_MODES)}")
