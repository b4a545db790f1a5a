"""Verify: that a grown model computes its source's function. ``compare`` holds the one comparison every check
shares (alignment by output maps, the deviation max|Δ| / max(1, max|y|), ``TOLERANCE``); ``measure`` runs both
models in PyTorch (the self-measure of every ``grow``), ``onnx_check`` compares them in ONNX Runtime
(``growir.check``), ``blocks`` compares two folders block by block without loading either; ``precision`` makes
every comparison float32.

ONNX tooling loads on first use: ``check``, ``export_onnx`` and ``CheckReport`` are resolved lazily.
"""

from .compare import TOLERANCE, deviation, map_source_output, output_maps
from .measure import measure

__all__ = ["TOLERANCE", "deviation", "map_source_output", "measure", "output_maps", "check", "export_onnx",
           "CheckReport"]


def __getattr__(name):
    if name in ("check", "export_onnx", "CheckReport"):
        from . import onnx_check
        return getattr(onnx_check, name)
    raise AttributeError(f"module 'growir.verify' has no attribute {name!r}")
