"""Library noise off for the duration of one library call: growir's own messages are what the user reads.

Only messages that say nothing to the user are hidden, and only while growir's call runs (never globally,
never at import): torch's ``LeafSpec`` deprecation (raised from inside torch.export, not from user code),
the ONNX exporter's "torchvision is not installed" lines (torchvision ops are not used), and Hugging Face's
progress bars and info logs while growir loads or saves a model.

>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")  # the caller's filters, then growir's call inside them
...     with library_noise_off():
...         warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
>>> caught
[]
"""

from __future__ import annotations

import contextlib
import logging
import warnings

# (category, regular expression matched at the start of the message)
WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)
# loggers raised to ERROR during the call: their warnings are about the exporter's own registry
LOGGERS = ("torch.onnx._internal.exporter._registration",)


@contextlib.contextmanager
def library_noise_off():
    """Hide the known, meaningless library warnings and log lines while the body runs; restore after."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for category, message in WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


@contextlib.contextmanager
def hf_quiet():
    """Hugging Face's progress bars ("Loading weights", "Writing model shards") and info logs off, then restored.

    >>> with hf_quiet():
    ...     pass
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
