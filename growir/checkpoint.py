"""Model folders without their weights in memory: the model built from ``config.json`` on the meta device,
the safetensors files read one tensor at a time, and the weight-free plan on a shallow proxy.

A deep model is planned on a proxy that keeps two blocks of every repeated block list: a container whose
children are numbered 0..n-1 and identical in structure (classes, parameter and buffer shapes). Blocks are
identical by construction, so the block rules of the proxy hold, index for index, for every block of the full
model (``expand_block_rules``); the proxy's findings are checked against the full module tree first.

>>> import json, tempfile, pathlib
>>> from transformers import LlamaConfig
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
...             num_key_value_heads=2, vocab_size=100).save_pretrained(d)
>>> fp = plan_folder(d)
>>> fp.counts, fp.plan.blocks[0].count
({'layers': 6}, 2)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import GrowthError, MaterializeError

PROXY_BLOCKS = 2
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(GrowthError):
    """A model folder growir cannot read: no config, no weights, or weights that do not match the model."""


# --- the model from its config, on the meta device ----------------------------------------------------------
def load_config(folder):
    """The folder's config (offline) and the model class its ``architectures`` names (AutoModel otherwise)."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json here; expected a folder written by save_pretrained")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{folder}: cannot load the model: {first_sentence(error)}") from error
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel._model_mapping[type(config)]
    return config, cls


def meta_model(config, cls) -> torch.nn.Module:
    """``cls(config)`` with every tensor on the meta device: no memory, no random init."""
    with torch.device("meta"):
        return cls(config).eval()


# --- the proxy: two blocks per repeated block list ------------------------------------------------------------
def _signature(module: torch.nn.Module) -> tuple:
    """A module's structure: its submodules' classes and its tensors' names, shapes and dtypes."""
    mods = tuple((n, type(m).__qualname__) for n, m in module.named_modules())
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in
                    list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers()))
    return mods, tensors


def repeated_lists(model: torch.nn.Module) -> dict:
    """{module path: container} for containers whose children are numbered 0..n-1 (n > 2), all identical in
    structure; nested lists inside such a list are left alone (they are copied with their block)."""
    found = {}
    for path, mod in model.named_modules():
        keys = list(mod._modules)
        if len(keys) <= PROXY_BLOCKS or keys != [str(i) for i in range(len(keys))]:
            continue
        if any(path.startswith(p + ".") for p in found):
            continue
        sig = _signature(mod._modules["0"])
        if all(_signature(mod._modules[k]) == sig for k in keys[1:]):
            found[path] = mod
    return found


def make_proxy(model: torch.nn.Module) -> dict:
    """Truncate ``model``'s repeated block lists to two blocks, in place; returns {path: full count}."""
    counts = {}
    for path, mod in repeated_lists(model).items():
        counts[path] = len(mod._modules)
        for key in list(mod._modules)[PROXY_BLOCKS:]:
            del mod._modules[key]
    return counts


def expand_block_rules(rules: dict, counts: dict) -> dict:
    """Rules of a two-block proxy for the full block lists: block i < n-1 takes block 0's rule and block n-1
    block 1's (the last block differs where a rule reads the next block, as AKI's donor does), every name
    in the rule shifted by the same number of blocks."""
    out = {}
    for name, rule in rules.items():
        hit = _block_of(name, counts)
        if hit is None:
            out[name] = rule
            continue
        prefix, k = hit
        n = counts[prefix]
        targets = range(n - 1) if k == 0 else [n - 1]
        for i in targets:
            shift = lambda s: _shifted(s, prefix, i - k)
            out[shift(name)] = dataclasses.replace(rule, source=shift(rule.source),
                                                   donor=rule.donor and shift(rule.donor))
    return out


def _block_of(name: str, counts: dict):
    for prefix in counts:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
        if m:
            return prefix, int(m.group(1))
    return None


def _shifted(name: str, prefix: str, delta: int) -> str:
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return name if m is None else f"{prefix}.{int(m.group(1)) + delta}.{name[m.end():]}"


def check_proxy(plan, counts: dict) -> None:
    """The proxy's block lists are the ones the plan found, each with its two blocks."""
    found = {b.prefix: b for b in plan.blocks}
    for prefix in counts:
        b = found.get(prefix)
        if b is None or b.count != PROXY_BLOCKS or not b.homogeneous:
            why = "not found as blocks" if b is None else (b.why_not or f"{b.count} blocks")
            raise GrowthError(f"`{prefix}` has {counts[prefix]} identical children, but on the {PROXY_BLOCKS}-block "
                              f"proxy the graph does not run them as a chain of blocks ({why}); plan the full "
                              f"model with growir.plan(model) instead")


@dataclass
class FolderPlan:
    """A plan made from ``config.json`` alone: ``plan`` is the proxy's, ``counts`` the full block counts."""
    plan: object
    counts: dict
    model: torch.nn.Module  # the full model, on the meta device
    config: object
    cls: type
    proxy: torch.nn.Module = None  # the two-block proxy, on the meta device
    notes: list = field(default_factory=list)
    # streaming (``proxy.plan_sample``): the random-weight proxy the config is chosen on, the config fields
    # that make it (field -> proxy value; block list -> its count fields), and whether ``plan`` is its plan
    sample: torch.nn.Module = None
    small: dict = field(default_factory=dict)
    layer_fields: dict = field(default_factory=dict)
    planned_sample: bool = False

    def __str__(self) -> str:
        text = str(self.plan)
        for prefix, n in self.counts.items():
            text = text.replace(f"blocks `{prefix}`: {PROXY_BLOCKS} x", f"blocks `{prefix}`: {n} x")
        return text + ("\n" + "\n".join(self.notes) if self.notes else "")


def plan_folder(folder, proxy: bool = True) -> FolderPlan:
    """Plan from ``folder/config.json`` alone on the meta device, deep models on a two-block proxy.

    >>> import tempfile
    >>> from transformers import GPT2Config
    >>> d = tempfile.mkdtemp()
    >>> GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100).save_pretrained(d)
    >>> str(plan_folder(d)).count("blocks `h`: 3 x")
    1
    """
    from .api import plan as make_plan

    config, cls = load_config(folder)
    full = meta_model(config, cls)
    model = meta_model(config, cls) if proxy else full
    counts = make_proxy(model) if proxy else {}
    p = make_plan(model)
    check_proxy(p, counts)
    notes = [f"planned on a {PROXY_BLOCKS}-block proxy of `{k}` ({n} blocks, identical in structure)"
             for k, n in counts.items()]
    return FolderPlan(p, counts, full, config, cls, model, notes)


# --- safetensors files, one tensor at a time -------------------------------------------------------------------
class Checkpoint:
    """The safetensors files of a folder, read lazily; key renames to module names resolved once.

    ``names``: the model's state_dict names. A checkpoint key equals a name, or differs from it by a leading
    module path (a checkpoint saved from the base model, loaded into a model with a head, or the reverse).
    """

    def __init__(self, folder, names):
        from safetensors import safe_open

        self.folder = Path(folder)
        from safetensors import SafetensorError

        try:
            self._open = {f: safe_open(str(self.folder / f), framework="pt") for f in self._files()}
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{self.folder}: cannot load the model: {first_sentence(error)}") from error
        self.where = {k: f for f, h in self._open.items() for k in h.keys()}
        self.key_of = _match_keys(set(self.where), set(names))

    def _files(self) -> list:
        index = self.folder / INDEX_FILE
        if index.is_file():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights next to config.json (a .bin checkpoint "
                                  f"can be converted with from_pretrained + save_pretrained)")
        return files

    def has(self, name: str) -> bool:
        return name in self.key_of

    def meta(self, name: str) -> torch.Tensor:
        """An empty tensor with the stored shape and dtype (nothing read)."""
        sl = self._open[self.where[self.key_of[name]]].get_slice(self.key_of[name])
        dtype = _DTYPES[sl.get_dtype()]
        return torch.empty(sl.get_shape(), dtype=dtype, device="meta")

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor, through a handle opened for this read only: a file stays memory-mapped while its
        handle is open, and every page read through a mapping counts in the process's RSS until it is
        unmapped, so reading all tensors through the long-lived handles would end with every shard resident
        (measured on a 111M-parameter bf16 decoder: peak RSS 1546 -> 1325 MiB streaming, 1899 -> 1330 verifying)."""
        from safetensors import safe_open

        key = self.key_of[name]
        with safe_open(str(self.folder / self.where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self._open)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _match_keys(keys: set, names: set) -> dict:
    """{module name: checkpoint key}: equal, else one leading path added to or removed from every key."""
    out = {n: n for n in names & keys}
    rest = keys - set(out.values())
    if not rest:
        return out
    prefixes = {}
    for k in rest:
        for n in names - set(out):
            if n.endswith("." + k):
                prefixes.setdefault(("add", n[:-len(k)]), {})[n] = k
            elif k.endswith("." + n):
                prefixes.setdefault(("drop", k[:-len(n)]), {})[n] = k
    if prefixes:
        out.update(max(prefixes.values(), key=len))
    return out


def first_sentence(error: Exception) -> str:
    text = " ".join(str(error).split())
    cut = text.find(". ")
    return text[:cut + 1] if 0 < cut < 300 else text[:300]


def check_shapes(expected: dict, built: dict, what: str) -> None:
    """Every tensor of ``built`` (name -> shape) exists in ``expected`` with the same shape."""
    for name, shape in built.items():
        if name in expected and tuple(expected[name]) != tuple(shape):
            raise MaterializeError(f"{what}: `{name}` would be {tuple(shape)} but the grown tensor is "
                                   f"{tuple(expected[name])}; nothing was written")
