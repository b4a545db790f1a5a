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

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it

__all__ = ["GrowthError", "SpecError", "TraceError", "UnsupportedOpError", "AnalysisError", "NotExactError",
           "MaterializeError", "PreservationError", "grow", "plan", "rules", "grow_with_optimizer", "check",
           "export_onnx", "grow_checkpoint", "verify_checkpoint", "doctor"]


from .api import grow, plan, rules  # noqa: E402  (after the errors)
from .optim import grow_with_optimizer  # noqa: E402
from .stream.grow import grow_checkpoint  # noqa: E402
from .stream.check import verify_checkpoint  # noqa: E402
from .doctor import doctor  # noqa: E402


def __getattr__(name):  # lazy: ONNX tooling loads on first use
    if name in ("check", "export_onnx", "CheckReport"):
        from .verify import onnx_check
        return getattr(onnx_check, name)
    raise AttributeError(f"module 'growir' has no attribute {name!r}")
