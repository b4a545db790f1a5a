"""Stages: lists of blocks inside the entries of an outer list (a hierarchical model's stages, each of its own
width, each holding its list of blocks), found from module paths. Each stage's list grows on its own, and only
where every stage's list can; lists beside the stages (a patch embedding and a norm per stage) are parts of the
stages, no stack.
"""

from __future__ import annotations

import re


def stages_grow_together(found: list, children: dict, stuck: dict) -> None:
    """A stage's list grows only where every stage's list can: where one cannot (a stage of one downsampling
    block, a post-norm stage), the others are marked not copyable, for its reason, not grown alone."""
    ready = {b.prefix for b in found if b.homogeneous}
    for b in found:
        outer, count = stage_lists(b.prefix, children) if b.homogeneous else (None, 0)
        if count < 2:
            continue
        m = re.fullmatch(r"(.+)\.(\d+)((?:\..+)?)", b.prefix)
        like = re.compile(re.escape(outer) + r"\.(\d+)" + re.escape(m.group(3)))
        odd = next((key for key in children if like.fullmatch(key) and key not in ready), None)
        if odd is not None:
            b.homogeneous = False
            b.why_not = f"the list `{odd}` of another stage cannot grow with it: {stuck.get(odd, 'no block list')}"


def in_stages(prefix: str, children: dict) -> bool:
    """Whether ``prefix`` is a list inside one entry of an outer list (a stage) whose other entries hold the same
    list: a nested stack, whose stages' lists grow each, even a stage of one block.

    >>> in_stages("stages.0.layers", {"stages.0.layers": {0: "x"}, "stages.1.layers": {0: "y"}})
    True
    >>> in_stages("block.1", {"block.0": {0: "x"}, "block.1": {0: "y"}})  # a list of lists
    True
    """
    return stage_lists(prefix, children)[1] > 1


def stage_lists(prefix: str, children: dict) -> tuple:
    """(the outer list, how many of its entries hold a list like ``prefix``); (None, 0) where it is in none."""
    m = re.fullmatch(r"(.+)\.(\d+)((?:\..+)?)", prefix)
    if not m:
        return None, 0
    like = re.compile(re.escape(m.group(1)) + r"\.(\d+)" + re.escape(m.group(3)))
    return m.group(1), sum(1 for key in children if like.fullmatch(key))


def stage_parts(b, found: list, children: dict) -> bool:
    """Whether ``b``, a list whose entries differ, runs beside a list of stages: as many entries as there are
    stages, next to them (a patch embedding and a norm per stage), so a part of the stages, not a stack."""
    parent = b.prefix.rpartition(".")[0]
    for c in found:
        outer, count = stage_lists(c.prefix, children) if c.homogeneous else (None, 0)
        if count == b.count and outer.rpartition(".")[0] == parent and not c.prefix.startswith(b.prefix + "."):
            return True
    return False
