"""What the plan finds (checked by label), and how bad input is refused."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import torch.nn as nn

import growir
from zoo import example_inputs, make

ARCH_NAMES = re.compile(r"\b(bert|roberta|distilbert|gpt-?2|gpt_?neox|llama|mistral|qwen\d?|t5|vit|gemma|phi\d?"
                        r"|deberta|electra|bloom|falcon|mixtral)\b", re.IGNORECASE)


def test_gpt2_fused_qkv_is_three_groups():
    plan = growir.plan(make("gpt2"))
    kind, parts = plan.layout("transformer.h.0.attn.c_attn.weight", 1)
    assert kind == "cat" and len(parts) == 3
    assert all(p[0] == "prod" and p[1][0].endswith(":heads") and p[1][1].endswith(":head_dim") for p in parts)
    q, k, v = parts
    assert q == k  # query and key share head_dim (they are contracted together); value has its own
    assert "fused `transformer.h.0.attn.c_attn.weight`[1]" in str(plan)


def test_llama_plan_has_kv_heads_and_per_kv_heads():
    plan = growir.plan(make("llama"))
    kv, per = plan.by_role("kv_heads"), [g for g in plan.by_role("heads") if g.per_kv]
    assert len(kv) == 2 and len(per) == 2  # one pair per layer
    assert {g.size for g in kv} == {2} and {g.size for g in per} == {2}
    assert plan.layout("model.layers.0.self_attn.q_proj.weight", 0)[0] == "prod"
    assert {g.size for g in plan.by_role("hidden")} == {32}
    assert {g.size for g in plan.by_role("ffn")} == {64}
    vocab = [g for g in plan.groups if g.size == 100]
    assert vocab and all(g.role is None for g in vocab)


def test_plan_groups_agree_with_parameter_shapes():
    model = make("bert")
    plan = growir.plan(model)
    shapes = dict(model.named_parameters())
    for g in plan.groups:
        for pa in g.producers + g.consumers:
            assert shapes[pa.param].shape[pa.axis] % g.size == 0


# Config field names may appear only where a config is rebuilt (materialize/: any field), or, in this explicit list,
# read for what the graph cannot say: example inputs (frontend/inputs.py), which output is the vocabulary
# (verify/onnx_check.py), and the training experiments, which slice and size configs of their own (train/).
CONFIG_FIELDS = {
    "materialize/config.py": None, "materialize/hf.py": None,
    "materialize/faithful.py": {"transformers_version", "_name_or_path"},  # bookkeeping a config diff leaves out
    "frontend/inputs.py": {"image_size", "is_encoder_decoder", "max_position_embeddings", "n_positions", "max_seq_len",
                  "num_channels", "vocab_size"},
    "verify/onnx_check.py": {"vocab_size"},
    "train/baselines.py": {"num_hidden_layers"}, "train/blocks.py": {"num_hidden_layers"},
    "train/flops.py": {"hidden_size", "num_attention_heads", "n_layers"},  # n_layers: an argument's name
}
GENERIC_CLASSES = ("Auto", "PreTrained", "Pretrained", "Generation")  # transformers' own machinery, no architecture


def _architecture_names():
    """From transformers' own registry: every architecture's class-name prefix (``LlamaConfig`` -> ``Llama``, so
    ``LlamaAttention``, ``GPT2Block`` ...), its ``model_type`` (``"llama"``), and every exported class named like a
    model, a head or a config (``BertModel``, ``...For...``, ``...LMHeadModel``)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    prefixes = sorted({c[:-len("Config")] for c in CONFIG_MAPPING_NAMES.values() if c.endswith("Config")},
                      key=len, reverse=True)
    camel = re.compile(r"\b(" + "|".join(map(re.escape, prefixes)) + r")[A-Z]\w*")
    exported = {n for n in dir(transformers) if re.search(r"(Model|Config|For[A-Z]\w*)$", n)
                and not n.startswith(GENERIC_CLASSES)}
    return camel, set(CONFIG_MAPPING_NAMES), exported


def _code_strings_and_names(tree):
    """Identifiers and string constants of the code, docstrings left out (their examples name real classes)."""
    import ast
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n.lineno, n.value, "str"
        elif isinstance(n, ast.Name):
            yield n.lineno, n.id, "name"
        elif isinstance(n, ast.Attribute):
            yield n.lineno, n.attr, "name"


def _sources():
    import ast
    root = pathlib.Path(growir.__file__).parent
    for path in sorted(root.rglob("*.py")):
        yield path.relative_to(root), ast.parse(path.read_text())


def test_no_architecture_names_in_growir():
    root = pathlib.Path(growir.__file__).parent
    camel, model_types, exported = _architecture_names()
    hits = [f"{path.relative_to(root)}:{i}: {line.strip()}" for path in root.rglob("*.py")
            for i, line in enumerate(path.read_text().splitlines(), 1) if ARCH_NAMES.search(line)]
    for path, tree in _sources():
        for i, text, kind in _code_strings_and_names(tree):
            if camel.search(text) or text in exported or any(w in exported for w in re.findall(r"\w+", text)):
                hits.append(f"{path}:{i}: class name in {text[:80]!r}")
            elif kind == "str" and text.lower().replace("-", "_") in model_types:
                hits.append(f"{path}:{i}: model_type {text!r}")
    assert not hits, "growir must decide from the graph, not from names:\n" + "\n".join(hits[:20])


def test_the_name_checks_catch_what_they_look_for():
    """The greps above find CamelCase classes of any architecture transformers knows, and a model_type string."""
    import ast
    camel, model_types, exported = _architecture_names()
    code = ("if type(m).__name__ == 'LlamaForCausalLM' or isinstance(m, SwinModel) or cfg.model_type == 'falcon':\n"
            "    TABLE[type(m).__name__] = GPTJAttention, MobileBertForMaskedLM\n")
    found = [t for _, t, _ in _code_strings_and_names(ast.parse(code)) if camel.search(t) or t in exported]
    assert {"LlamaForCausalLM", "SwinModel", "GPTJAttention", "MobileBertForMaskedLM"} <= set(found), found
    assert "falcon" in model_types and "PreTrainedModel" not in exported
    assert len(_class_name_matches(ast.parse(code))) == 2  # the comparison and the table keyed by class name


def _class_name_matches(tree) -> list:
    """Line numbers where a class's name is compared, searched or used as a key (``"CausalLM" in
    type(m).__name__``, ``TABLE[type(m).__name__]``, ``table.get(m.__class__.__name__)``)."""
    import ast
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            parts = [n.left, *n.comparators]
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in (
                "startswith", "endswith", "find", "index", "count", "match", "search", "fullmatch", "get"):
            parts = [n.func.value, *n.args]
        elif isinstance(n, ast.Subscript):
            parts = [n.slice]
        else:
            continue
        if any(isinstance(a, ast.Attribute) and a.attr in ("__name__", "__qualname__", "__class__")
               and not (isinstance(a.value, ast.Attribute) and a.value.attr == "_overloadpacket")  # an op
               for p in parts for a in ast.walk(p)):
            hits.append(n.lineno)
    return hits


def test_no_class_name_matching_in_growir():
    """A class's ``__name__`` may be printed, never compared, searched or looked up."""
    hits = [f"{path}:{line}" for path, tree in _sources() for line in _class_name_matches(tree)]
    assert not hits, "growir decides from the model, not its class name:\n" + "\n".join(hits)


def test_config_field_names_only_where_a_config_is_rebuilt():
    from transformers import AutoConfig, PretrainedConfig
    from growir.analysis.plan import WIDTH_ROLES
    fields = {k for k in PretrainedConfig().to_dict() if "_" in k}
    for kind in ("bert", "gpt2", "llama", "mistral", "qwen2", "t5", "opt", "gpt_neox", "phi3", "vit", "falcon",
                 "bloom", "mixtral", "gemma2", "swin", "whisper", "mpt", "olmoe"):
        fields |= {k for k in AutoConfig.for_model(kind).to_dict() if "_" in k}
    fields -= set(WIDTH_ROLES) | {"use_cache", "return_dict", "output_attentions", "output_hidden_states"}
    hits = []
    for path, tree in _sources():
        allowed = CONFIG_FIELDS.get(path.as_posix(), set())
        hits += [f"{path}:{i}: {text}" for i, text, _ in _code_strings_and_names(tree)
                 if allowed is not None and text in fields and text not in allowed]
    assert not hits, "config field names belong where a config is rebuilt, or in CONFIG_FIELDS:\n" + "\n".join(hits)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(width=0.5), growir.SpecError, "only grows"),
    (dict(width="wide"), growir.SpecError, "must be a number"),
    (dict(depth=0.5), growir.SpecError, "only grows"),
    (dict(width={"hiden": 64}), growir.SpecError, "unknown width role"),
    (dict(width_method="magic"), growir.SpecError, "unknown width_method"),
    (dict(depth_method="magic", depth=2), growir.SpecError, "unknown depth_method"),
    (dict(width=1.3), growir.SpecError, "multipliers that give whole sizes for every group: 1.5, 2"),
    (dict(width={"heads": 6, "kv_heads": 4}), growir.SpecError, "not a multiple of kv_heads"),
    (dict(layers=3.5), growir.SpecError, "whole number"),
    (dict(depth=1.25), growir.SpecError, "whole number"),
    (dict(width={"head_dim": 15}), growir.SpecError, "grow by a whole factor"),
    (dict(width={"head_dim": 12}), growir.SpecError, "8 -> 16, 24, 32"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        growir.grow(make("llama"), **kwargs)


def test_plain_module_needs_example_inputs():
    with pytest.raises(growir.TraceError, match="pass example_inputs"):
        growir.grow(make("nanogpt"), width=2.0)


def test_model_without_parameters():
    with pytest.raises(growir.TraceError, match="no parameters"):
        growir.grow(nn.ReLU(), example_inputs=(torch.randn(2, 3),))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if y.sum() > 0 else y  # control flow on a value (y[y > 0], a shape that depends on values,
        # is traced and read: tests/test_census_classes.py)


def test_untraceable_model_names_the_model():
    with pytest.raises(growir.GrowthError, match="DataDependent"):
        growir.grow(DataDependent(), width=2.0, example_inputs=(torch.randn(2, 4),))


class Complex(nn.Module):
    """An op with no hand rule whose kernel takes only one size of an axis (a complex view needs pairs): no probe
    at prime sizes can derive its rule (an op like ``bessel_j0`` gets one: tests/analysis/test_derived_rules.py)."""
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 8), nn.Linear(8, 8)
        self.inner = nn.Sequential(nn.Linear(8, 8))

    def forward(self, idx):
        z = torch.view_as_complex(self.inner(self.emb(idx)).unflatten(-1, (4, 2)))
        return self.lin(torch.view_as_real(z * z).flatten(-2))


def test_unknown_op_is_named_with_its_module():
    with pytest.raises(growir.UnsupportedOpError, match=r"view_as_complex.*module.*rejects operands of distinct prime"):
        growir.plan(Complex(), example_inputs=(torch.randint(0, 10, (2, 3)),))


def test_hidden_fed_by_the_input_cannot_grow():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True, dropout=0.0)
    with pytest.raises(growir.SpecError, match="model input"):
        growir.grow(layer.eval(), width={"hidden": 32}, example_inputs=(torch.randn(2, 5, 16),))


def test_error_messages_say_what_to_do():
    with pytest.raises(growir.SpecError) as info:
        growir.grow(make("gpt2"), width=1.3)
    msg = str(info.value)
    assert "1.3" in msg and "fractional" in msg and "multipliers that give whole sizes" in msg


def test_graph_module_example_inputs_as_dict():
    model = make("nanogpt")
    grown = growir.grow(model, width=2.0, example_inputs={"idx": example_inputs("nanogpt")[0]})
    assert grown.growir_record.exact


def test_a_multiplier_that_grows_no_group_is_refused_not_returned_unchanged():
    """A model whose only width is its input's (a scale of the input's features) has no group a multiplier grows;
    growir had returned such a model unchanged with a note, which read as an exact growth. It is a SpecError
    naming the groups it did find and what to do."""
    import torch.nn as nn

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.w

    with pytest.raises(growir.SpecError, match=r"width=2 grew nothing: .* its groups: .*width dict"):
        growir.grow(Scale(), width=2.0, example_inputs=(torch.randn(2, 4),))


def test_grouped_convolutions_grow_their_group_count():
    """SqueezeBERT's projections are grouped 1x1 convolutions over (batch, channels, tokens). A grouped
    convolution is block-diagonal, so a copied group copies its outputs: the group count grows with the channels
    and the `groups` literal (and the config's *_groups fields) follow. growir had pinned the count, found no
    group to grow, and refused."""
    import transformers as T
    model = T.SqueezeBertForMaskedLM(T.SqueezeBertConfig(vocab_size=100, hidden_size=32, embedding_size=32,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64, max_position_embeddings=64)).eval()
    grown = growir.grow(model, width=2.0)
    assert type(grown).__name__ == "SqueezeBertForMaskedLM" and grown.config.hidden_size == 64
    assert grown.growir_record.exact and grown.growir_record.deviation < 1e-5


def test_an_op_no_probe_can_read_says_why_no_rule_is_derived():
    """vmap leaves its batching calls in the export as Python functions (t5gemma2): no aten op, no meta kernel,
    so no derived rule; the refusal names the op and says why the probe cannot derive one."""
    import torch.nn as nn

    class Vmapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.vmap(lambda r: torch.relu(self.lin(r)))(x)

    with pytest.raises(growir.UnsupportedOpError, match=r"_add_batch_dim.*no aten op.*no meta kernel to probe"):
        growir.grow(Vmapped(), width=2.0, example_inputs=(torch.randn(3, 5, 4),))
