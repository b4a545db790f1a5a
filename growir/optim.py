"""Grow an optimizer with its model: Adam's moments and SGD's momentum follow the parameters' index maps.

After function-preserving width growth every copy of a tensor entry receives the same gradient, and that
gradient is the source's divided by ``s * c``: ``s`` is the rule's scale and ``c`` the product, over the
tensor's *producer* axes (gathered, not divided), of the copy count of the entry's old position
(docs/optimizer.md derives it on ``y = w2 relu(w1 x)``). A state tensor that scales like the gradient to the
power ``k`` therefore grows as

    state'[j0, j1, ...] = state[g0(j0), g1(j1), ...] / (s * prod_k c_k(g_k(j_k))) ** k   (over producer axes k)

Consumer axes are gathered and left alone: their division is already in the weights. Which state key scales
with which power is data (``STATE_RULES``); an optimizer or key not listed there is refused, not guessed.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from .errors import GrowthError, SpecError
from .ir.tensor_rule import TensorRule

KEEP = "keep"  # copied as is (a step counter); fresh blocks' writers restart it at zero

# optimizer class -> {state key: KEEP, or the power of the gradient the stored tensor scales with}
STATE_RULES = {
    torch.optim.Adam: {"step": KEEP, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.AdamW: {"step": KEEP, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.SGD: {"momentum_buffer": 1},
}


def grow_with_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **spec):
    """Grow ``model`` as ``growir.grow(model, **spec)`` does, and its optimizer with it; return both.

    The new optimizer has the same class, hyperparameters and param groups (a grown parameter joins the
    group of the source parameter it was made from; a new depth block's, the group of the block it copies).
    Its state is the source's, grown by each parameter's index maps and scaled to the gradients the grown
    model produces, so training resumes where it stopped. Neither the model nor the optimizer is modified.

    >>> import growir, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> small = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    >>> opt = torch.optim.AdamW(small.parameters(), lr=1e-3)
    >>> small(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward(); opt.step()
    >>> big, big_opt = growir.grow_with_optimizer(small, opt, width=2.0)
    >>> big_opt.state[big.lm_head.weight]["exp_avg"].shape
    torch.Size([100, 64])
    """
    table = state_rules(optimizer)
    owner = _owners(model, optimizer)
    grown = _grow(model, spec)
    rules = grown.growir_record.rules
    source = dict(model.named_parameters(remove_duplicate=False))
    groups = [[] for _ in optimizer.param_groups]
    state = {}
    for name, param in grown.named_parameters():
        rule = rules.get(name)
        if rule is None or rule.source not in source:
            raise GrowthError(f"grown parameter `{name}` has no growth rule naming a source parameter "
                              f"({'no rule' if rule is None else f'source `{rule.source}`'}); its optimizer state "
                              f"cannot be derived. This is a growir bug: please report it with the model's config")
        old = source[rule.source]
        if id(old) not in owner:
            continue  # the source parameter is not optimized (frozen): neither is its growth
        groups[owner[id(old)]].append(param)
        if optimizer.state.get(old):
            donor = source.get(getattr(rule, "donor", None) or "")
            state[param] = grow_param_state(rule, optimizer.state[old], table, old.shape, name, param.device,
                                            optimizer.state.get(donor) if donor is not None else None)
    new = _rebuild(optimizer, groups)
    for param, entry in state.items():
        new.state[param] = entry
    return grown, new


def state_rules(optimizer: torch.optim.Optimizer) -> dict:
    """The ``STATE_RULES`` entry for ``optimizer``; refuse state keys nobody has said how to grow."""
    cls = next((c for c in type(optimizer).__mro__ if c in STATE_RULES), None)
    table = STATE_RULES.get(cls, {})
    keys = {k for s in optimizer.state.values() for k in s}
    unknown = sorted(keys - set(table))
    if unknown:
        known = ", ".join(c.__name__ for c in STATE_RULES)
        raise SpecError(f"growir does not know how {type(optimizer).__name__}'s state "
                        f"{', '.join(repr(k) for k in unknown)} scales when the gradients split among copies "
                        f"(it knows {known}); add an entry to growir.optim.STATE_RULES mapping each key to the "
                        f"power of the gradient it scales with, or grow before the first step")
    return table


def grow_param_state(rule: TensorRule, old_state: dict, table: dict, old_shape, name: str = "?",
                     device=None, donor_state: dict | None = None) -> dict:
    """One parameter's optimizer state, grown by its ``rule``. Zeroed writers (identity blocks) start fresh.

    ``donor_state``: the state of the rule's donor tensor (AKI), which fills the same new positions."""
    out = {}
    for key, value in old_state.items():
        how = table[key]
        if value is None or not isinstance(value, torch.Tensor):
            out[key] = copy.deepcopy(value)
            continue
        if how == KEEP:
            out[key] = torch.zeros_like(value) if rule.zero else value.detach().clone()
            continue
        if value.shape != tuple(old_shape):
            raise SpecError(f"optimizer state {key!r} of `{name}` has shape {tuple(value.shape)}, not its "
                            f"parameter's {tuple(old_shape)}; growir only grows per-entry state")
        mapped = moment_rule(rule, how, old_shape)
        if getattr(rule, "donor", None):
            donor = (donor_state or {}).get(key)
            out[key] = mapped.apply(value, donor if donor is not None else torch.zeros_like(value))
        else:
            out[key] = mapped.apply(value)
        out[key] = out[key].to(device or value.device)
    return out


def moment_rule(rule: TensorRule, power: int, old_shape) -> TensorRule:
    """The rule for a state tensor scaling like gradient**power: gather every axis, divide producer axes by
    (copy count)**power and the whole by scale**power. Filled units (repeat-and-fill) have no history: their
    first moment starts at zero and their second at the mean of the old entries, so their first updates are
    of the usual size. Symmetry-breaking noise is for weights only."""
    axes = []
    for m, size in zip(rule.axes, old_shape):
        producer = m.index is not None and m.divide is None
        counts = None
        if producer:
            counts = torch.bincount(m.index[m.index >= 0], minlength=size).clamp(min=1).to(torch.float64) ** power
        change = {"divide": counts}
        if getattr(m, "scale", None) is not None:  # per-position factors scale the gradient like the rule's
            change["scale"] = m.scale.pow(-power)
        if getattr(m, "fill", None) is not None:
            change["fill"] = "zero" if power == 1 else "mean"
        axes.append(dataclasses.replace(m, **change))
    change = {"axes": axes, "scale": float(rule.scale) ** -power, "notes": [], "offset": 0.0}  # moments: linear
    if hasattr(rule, "noise"):
        change["noise"] = None
    return dataclasses.replace(rule, **change)


def _owners(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """id(parameter) -> index of its param group; every optimized tensor must be one of the model's."""
    ours = {id(p) for p in model.parameters()}
    owner = {}
    for i, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            if id(p) not in ours:
                raise SpecError(f"parameter {k} of the optimizer's param group {i} (shape {tuple(p.shape)}) is "
                                f"not a parameter of {type(model).__name__}; growir can only grow an optimizer "
                                f"over the model it grows")
            owner[id(p)] = i
    return owner


def _grow(model, spec: dict):
    from .api import grow
    return grow(model, **spec)


def _rebuild(optimizer: torch.optim.Optimizer, groups: list) -> torch.optim.Optimizer:
    """A new optimizer of the same class: every group's hyperparameters copied, its params replaced."""
    param_groups = [{**copy.deepcopy({k: v for k, v in g.items() if k != "params"}), "params": params}
                    for g, params in zip(optimizer.param_groups, groups)]
    try:
        new = type(optimizer)(param_groups)
    except (TypeError, ValueError) as e:
        raise SpecError(f"could not rebuild {type(optimizer).__name__} over the grown parameters from its "
                        f"param groups ({e}); build it yourself and copy the state") from e
    new.defaults = copy.deepcopy(optimizer.defaults)
    return new
