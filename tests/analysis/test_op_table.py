"""One op table (growir/analysis/ops.py): every op growir knows, with its axis rule and its value traits.

A set of op names written in a pass drifts from the others (one walk passes ``aten.t``, the next forgets it),
and two tables keyed by op drift apart (an op with a rule but no row counted silently as "other"). So the
rule modules (``rules.py``, ``shape_rules.py``, ``routing_rules.py``) hold rule *functions* only, the table
registers each op once with its rule and its kind, and no other module compares or collects op names.
"""

import ast
import inspect
import pathlib
import re

import torch
from torch import fx

import growir
from growir.analysis import derived_rules, norm_rules, routing_rules, rules, shape_rules
from growir.analysis.ops import CONTRACTIONS, KINDS, LAYOUT, PART, TRAITS, ZERO_WITH_FIRST, kinds

ROOT = pathlib.Path(growir.__file__).parent
TABLE = "analysis/ops.py"
RULE_MODULES = (rules, shape_rules, norm_rules, routing_rules, derived_rules)
OP_NAME = re.compile(r"^(aten|prims|transformers)\.\w+$")


def _op_names(node: ast.AST) -> list[str]:
    """Op-name strings (``"aten.add"``, ``f"aten.{n}"``) directly inside a collection literal or comprehension, or
    compared with ``==``, ``!=`` or ``in``."""
    if isinstance(node, ast.Dict):
        items = [k for k in node.keys if k is not None] + list(node.values)
    elif isinstance(node, (ast.Set, ast.List, ast.Tuple)):
        items = node.elts
    elif isinstance(node, (ast.SetComp, ast.ListComp, ast.DictComp, ast.GeneratorExp)):
        items = [node.key] if isinstance(node, ast.DictComp) else [node.elt]
    elif isinstance(node, ast.Compare):
        items = [node.left] + node.comparators
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


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel != TABLE:
            yield rel, path.read_text()


def test_no_op_name_comparisons_or_collections_outside_the_table():
    offenders = [f"{rel}:{node.lineno}: {', '.join(names[:3])}" for rel, text in _modules()
                 for node in ast.walk(ast.parse(text)) if (names := _op_names(node))]
    assert not offenders, ("op names compared or collected outside growir/analysis/ops.py (give the op a row or a "
                           "family there and ask for it):\n" + "\n".join(offenders))


def test_no_op_name_string_outside_the_table():
    """Any string that is an op name (an argument, a default, a return value), not only in a comparison: what a
    grep for ``"aten.`` finds in code, docstrings and examples aside."""
    found = [f"{rel}:{node.lineno}: {node.value}" for rel, text in _modules() for node in ast.walk(ast.parse(text))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and OP_NAME.match(node.value)]
    assert found == []


def test_the_check_sees_collections_and_comparisons():
    tree = ast.parse('X = {"aten.view", "aten.t"}\nY = ("aten.mul", 1)\nZ = {f"aten.{n}": 1 for n in "ab"}\n'
                     'W = op == "aten.add"\nV = name in ("aten.t",)\nU = "relu" == op')
    found = [n for node in ast.walk(tree) for n in _op_names(node)]
    assert sorted(found) == sorted(["aten.view", "aten.t", "aten.mul", "f'aten.{n}'", "aten.add", "aten.t"])


def _rule_functions() -> dict:
    """Every public function of the rule modules that is a rule (takes a walker and a node) or makes one."""
    out = {}
    for module in RULE_MODULES:
        for name, f in vars(module).items():
            if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_"):
                out[f"{module.__name__}.{name}"] = f
    return out


def test_every_rule_function_is_registered_and_every_registered_rule_is_a_rule_function():
    """Both ways: a rule written but in no row is dead, and a row's rule comes from a rule module."""
    registered = {f"{r.__module__}.{r.__qualname__.split('.')[0]}" for r in (t.rule for t in TRAITS.values()) if r}
    helpers = {f"growir.analysis.rules.{n}" for n in ("broadcast", "matmul", "grouped_channels", "argument")}
    helpers |= {"growir.analysis.derived_rules.signature"}  # the probe's view of a node, which the derived rule reads
    assert registered <= set(_rule_functions()), registered - set(_rule_functions())
    assert set(_rule_functions()) - registered == helpers  # called by other rules, not registered themselves


def test_no_rule_registry_outside_the_table():
    for module in RULE_MODULES:
        assert not [n for n, v in vars(module).items() if isinstance(v, dict) and n.isupper()], module.__name__


def test_every_op_has_a_kind_and_only_asserts_and_random_draws_lack_a_rule():
    assert {t.kind for t in TRAITS.values()} == set(KINDS)  # every row has a known kind, and every kind a row
    no_rule = sorted(op for op, t in TRAITS.items() if t.rule is None)
    assert all(TRAITS[op].kind == "assert" or TRAITS[op].random for op in no_rule), no_rule
    assert len(TRAITS) >= 225  # the ops the rule files knew before the table joined them


def test_named_sets_are_unions_of_kinds():
    assert LAYOUT == kinds("cast", "copy", "view", "permute")
    assert {"aten.t", "aten.transpose", "aten.view", "aten.to", "aten.detach"} <= LAYOUT
    assert {"aten.slice", "aten.dropout"} <= PART - LAYOUT
    assert {"aten.linear", "aten.conv3d", "aten.einsum", "transformers.grouped_mm_fallback"} <= CONTRACTIONS


def test_a_pad_is_zero_with_its_input_only_when_it_pads_with_zero():
    """``constant_pad_nd(x, pad, 1.0)`` of a zero ``x`` is not zero: a block ending in it is no identity."""
    def f(x):
        return torch.ops.aten.constant_pad_nd.default(x, [1, 1], 1.0), torch.ops.aten.constant_pad_nd.default(x, [1, 1])

    pads = [n for n in fx.symbolic_trace(f).graph.nodes if n.op == "call_function"]
    assert [ZERO_WITH_FIRST(n) for n in pads] == [False, True]
