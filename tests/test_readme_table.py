"""The README's table of what is supported names only architectures the tests build."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def readme_tested_names() -> set:
    """The architecture names (transformers model types) in the table's "tested on" column."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    types = {_norm(t) for t in CONFIG_MAPPING_NAMES}
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What is supported", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # after the header and the rule
    names = set()
    for row in rows:
        cells = row.split("|")
        if len(cells) > 3:
            for word in re.findall(r"[A-Za-z][\w-]*", cells[3]):
                if _norm(word) in types:
                    names.add(_norm(word))
    return names


def test_every_architecture_the_table_names_is_built_by_a_test():
    this = pathlib.Path(__file__).name
    sources = _norm("".join(p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != this))
    names = readme_tested_names()
    assert {"llama", "mixtral", "qwen2moe", "gemma", "bloom", "mpt", "falcon", "swin"} <= names, sorted(names)
    missing = sorted(n for n in names if n not in sources)
    assert not missing, f"README's table names architectures no test builds: {missing}"
