"""growir: grow a pretrained transformer into a larger one that starts out computing the same function.

>>> import growir, torch
>>> from transformers import BertConfig, BertModel
>>> small = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
...                              intermediate_size=64, vocab_size=100))
>>> big = growir.grow(small, width=2.0)
>>> big.config.hidden_size
64
"""

from .errors import (AnalysisError, GrowthError, MaterializeError, NotExactError, PreservationError, SpecError,
                     TraceError, UnsupportedOpError)

import sys  # noqa: E402
import types  # noqa: E402

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it

__all__ = ["GrowthError", "SpecError", "TraceError", "UnsupportedOpError", "AnalysisError", "NotExactError",
           "MaterializeError", "PreservationError", "grow", "plan", "rules", "grow_with_optimizer", "check",
           "export_onnx", "grow_checkpoint", "verify_checkpoint", "doctor"]


# lazy: torch and the core load on first use, so the CLI reports a usage error before importing them
_LAZY = {"grow": "api", "plan": "api", "rules": "api", "grow_with_optimizer": "optim",
         "grow_checkpoint": "stream.grow", "verify_checkpoint": "stream.check", "doctor": "doctor",
         "check": "verify.onnx_check", "export_onnx": "verify.onnx_check", "CheckReport": "verify.onnx_check"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'growir' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """growir's module type: ``growir.doctor`` stays the function even after the submodule of that name is
    imported (the import system binds a submodule on its package; before, the eager import came after it)."""

    @property
    def doctor(self):
        from .doctor import doctor
        return doctor

    @doctor.setter
    def doctor(self, value):
        pass  # the import system binding the submodule `growir.doctor`: the function stays the public name


sys.modules[__name__].__class__ = _Package
