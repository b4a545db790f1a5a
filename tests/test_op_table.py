"""One table of op traits (growir/analysis/ops.py): no other module keeps its own collection of op names.

A set of op names written in a pass drifts from the others (one walk passes ``aten.t``, the next forgets it);
the passes ask the table for a trait instead. The axis rules are the one other place keyed by op, on purpose:
``rules.py``, ``shape_rules.py`` and ``routing_rules.py`` map each op to the function that says what it does to
axes (one rule per op), while ``ops.py`` says what it does to values.
"""

import ast
import pathlib
import re

import growir
from growir.analysis.ops import CONTRACTIONS, LAYOUT, PART, TRAITS, kinds
from growir.analysis.rules import RULES

ROOT = pathlib.Path(growir.__file__).parent
TABLE = "analysis/ops.py"
ALLOWED = {  # module -> why it may hold op names in a collection
    "analysis/rules.py": "the axis rule registry: op -> the function saying what the op does to axes",
    "analysis/shape_rules.py": "the axis rules of shape-changing ops, merged into that registry",
    "analysis/routing_rules.py": "the axis rules of routing ops (mixture of experts), merged into that registry",
}
OP_NAME = re.compile(r"^(aten|prims|transformers)\.\w+$")


def _op_names(node: ast.AST) -> list[str]:
    """Op-name strings (``"aten.add"``, ``f"aten.{n}"``) directly inside a collection literal or comprehension."""
    if isinstance(node, ast.Dict):
        items = [k for k in node.keys if k is not None] + list(node.values)
    elif isinstance(node, (ast.Set, ast.List, ast.Tuple)):
        items = node.elts
    elif isinstance(node, (ast.SetComp, ast.ListComp, ast.DictComp, ast.GeneratorExp)):
        items = [node.key] if isinstance(node, ast.DictComp) else [node.elt]
    else:
        return []
    found = []
    for item in items:
        if isinstance(item, ast.Constant) and isinstance(item.value, str) and OP_NAME.match(item.value):
            found.append(item.value)
        elif isinstance(item, ast.JoinedStr) and item.values and isinstance(item.values[0], ast.Constant) \
                and str(item.values[0].value).startswith(("aten.", "prims.", "transformers.")):
            found.append(ast.unparse(item))
    return found


def test_no_op_name_collections_outside_the_table():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == TABLE or rel in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = _op_names(node)
            if names:
                offenders.append(f"{rel}:{node.lineno}: {', '.join(names[:3])}")
    assert not offenders, ("op names collected outside growir/analysis/ops.py (give the op a trait there and ask "
                           "for the trait):\n" + "\n".join(offenders))


def test_the_check_sees_collections():
    tree = ast.parse('X = {"aten.view", "aten.t"}\nY = ("aten.mul", 1)\nZ = {f"aten.{n}": 1 for n in "ab"}\n'
                     'W = op == "aten.add"')
    found = [n for node in ast.walk(tree) for n in _op_names(node)]
    assert found == ["aten.view", "aten.t", "aten.mul", "f'aten.{n}'"]


def test_every_traited_op_has_an_axis_rule():
    """A trait for an op the analysis refuses would be dead: only assertions and random draws have none."""
    missing = [op for op, t in TRAITS.items() if op not in RULES and t.kind != "assert" and not t.random]
    assert missing == []


def test_named_sets_are_unions_of_kinds():
    assert LAYOUT == kinds("cast", "copy", "view", "permute")
    assert {"aten.t", "aten.transpose", "aten.view", "aten.to", "aten.detach"} <= LAYOUT
    assert {"aten.slice", "aten.dropout"} <= PART - LAYOUT
    assert {"aten.linear", "aten.conv3d", "aten.einsum", "transformers.grouped_mm_fallback"} <= CONTRACTIONS


def test_a_pad_is_zero_with_its_input_only_when_it_pads_with_zero():
    """``constant_pad_nd(x, pad, 1.0)`` of a zero ``x`` is not zero: a block ending in it is no identity."""
    import torch
    from torch import fx

    from growir.analysis.ops import ZERO_WITH_FIRST

    def f(x):
        return torch.ops.aten.constant_pad_nd.default(x, [1, 1], 1.0), torch.ops.aten.constant_pad_nd.default(x, [1, 1])

    pads = [n for n in fx.symbolic_trace(f).graph.nodes if n.op == "call_function"]
    assert [ZERO_WITH_FIRST(n) for n in pads] == [False, True]
