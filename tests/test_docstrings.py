"""Every docstring example in growir runs and shows what it says (the public functions' examples are the
first documentation a user reads, so a stale one is a bug)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import growir

MODULES = sorted(m.name for m in pkgutil.walk_packages(growir.__path__, "growir.")
                 if not m.name.endswith("__main__"))  # __main__ runs the command line on import


def test_every_module_is_found():
    assert {"growir.api", "growir.passes.fresh", "growir.analysis.ops", "growir.train.loop"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
