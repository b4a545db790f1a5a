"""The savings benchmark's upcycling settings: a dense decoder source grown into a mixture of experts (MoE).

The target is the source's sizes with each FFN made ``experts`` experts of the FFN's size, ``top_k`` run per
token (a Mixtral of the Llama source). Its methods (``savings_setup.MOE_METHODS``; docs/savings.md, "The
upcycling setting"):

* ``scratch``: the MoE from random initialisation (its final loss is the target loss, as everywhere);
* ``growir``: ``growir.grow(source, into=moe_config)``, exact (every expert a copy of the FFN, router random);
* ``drop-upcycling``: the same upcycled model, then in every expert a fraction ``DROP`` of the FFN neurons (the
  same indices in gate, up and down) drawn again from a normal with the dense matrix's mean and std
  (Drop-Upcycling, Nakamura et al., ICLR 2025), and the router drawn as the class initialises it (normal, std
  ``initializer_range``), as the paper's model does; ``growir.grow``'s own ``drop=`` applies only to new copies
  of an MoE's experts (``experts=``), so the benchmark re-initialises here;
* ``drop-upcycling+router``: the same, with the router ``growir`` drew kept (N(0, 1/fan_in)): what the re-drawn
  neurons add to growir's router, and what the router adds to Drop-Upcycling;
* ``dense``: the source itself trained on (fresh AdamW, the shared schedule) for the FLOPs of the MoE's budget.

FLOPs are counted per *active* parameter: of each expert tensor only ``top_k / experts`` runs for a token, so
``6·(E − k)/E`` FLOPs per token and per parameter of the expert tensors are taken off ``growir.train.flops``'
count (which counts every parameter). The router (``d × E``, every token) stays counted as a parameter; its
softmax and top-k (``O(E)`` per token) are not counted, like the other element-wise ops.

    >>> from savings_setup import SETTINGS, Sizes, target_config
    >>> cfg = target_config(SETTINGS["decoder-moe"], Sizes())
    >>> type(cfg).__name__, cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    ('MixtralConfig', 32, 96, 8, 2)
"""

from __future__ import annotations

import torch
from torch import nn

from growir.train.flops import non_embedding_params, step_flops

DROP = 0.5  # Drop-Upcycling's re-initialised share of each expert's neurons (the paper's best, r = 0.5)
# The dense config's fields the MoE keeps (the two classes' defaults differ: eps, rotary base, ...).
SHARED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "rope_parameters",
          "hidden_act", "head_dim")


def moe_config(dense, experts: int, top_k: int):
    """The MoE config of ``dense`` (a LlamaConfig): the same sizes, each FFN ``experts`` experts, ``top_k`` per
    token; no load-balancing loss in the training loss (``output_router_logits=False``), for every MoE method."""
    from transformers import MixtralConfig
    fields = dense.to_dict()
    return MixtralConfig(**{k: fields[k] for k in SHARED if k in fields}, num_local_experts=experts,
                         num_experts_per_tok=top_k, output_router_logits=False)


def expert_tensors(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """(tensor, expert count) of every parameter whose leading axis indexes experts: the parameters of a module
    that holds ``num_experts`` and a 3-D weight of that leading size (the router's 2-D weight runs whole)."""
    found = []
    for module in model.modules():
        count = getattr(module, "num_experts", None)
        for p in module.parameters(recurse=False):
            if count and p.ndim == 3 and p.shape[0] == count:
                found.append((p, count))
    return found


def routers(model: nn.Module) -> list[nn.Parameter]:
    """Every router's weight: the 2-D weight of a module that holds ``num_experts`` (the experts' own 3-D tensors
    are in ``expert_tensors``)."""
    return [m.weight for m in model.modules() if getattr(m, "num_experts", None)
            and getattr(m, "weight", None) is not None and m.weight.dim() == 2]


def inactive_params(model: nn.Module) -> float:
    """Parameters a token does not run: ``(E − k)/E`` of each expert tensor (0 for a dense model)."""
    k = getattr(model.config, "num_experts_per_tok", None)
    return sum(p.numel() * (count - k) / count for p, count in expert_tensors(model)) if k else 0.0


def active_params(model: nn.Module) -> float:
    """``N`` of the FLOP formula per token: the non-embedding parameters a token runs."""
    return non_embedding_params(model) - inactive_params(model)


def active_fraction(model: nn.Module, batch: int, seq: int) -> float:
    """A full step's FLOPs per active parameter over ``step_flops``' count (which counts every parameter)."""
    full = step_flops(model, batch, seq)
    return (full - 6 * inactive_params(model) * batch * seq) / full


def honest_flops(model: nn.Module, log: list[dict], batch: int, seq: int) -> list[dict]:
    """``log`` with every row's FLOPs counted per active parameter (every step of these methods is a full step
    of an unchanging model, so one factor holds for the whole run)."""
    factor = active_fraction(model, batch, seq)
    return [{**row, "flops": row["flops"] * factor} for row in log]


def dense_steps(source: nn.Module, moe_config_, sizes) -> int:
    """Steps of the dense source that cost what ``sizes.target_steps`` steps of the MoE cost (active FLOPs)."""
    from transformers import MixtralForCausalLM
    with torch.device("meta"):
        moe = MixtralForCausalLM(moe_config_)
    per_step = step_flops(moe, sizes.batch, sizes.seq) * active_fraction(moe, sizes.batch, sizes.seq)
    return round(sizes.target_steps * per_step / step_flops(source, sizes.batch, sizes.seq))


@torch.no_grad()
def drop_upcycle(model: nn.Module, rate: float, seed: int, router: bool = True) -> int:
    """Drop-Upcycling, in place: in every expert of every fused expert module (``gate_up_proj`` [E, 2F, H],
    ``down_proj`` [E, H, F]) a fraction ``rate`` of the F neurons, the same indices in gate, up and down, drawn
    again from a normal with the mean and std of that matrix in the upcycled model (each expert a copy of the
    dense FFN, so these are the dense matrix's); with ``router``, every router's weight (a module holding
    ``num_experts`` and a 2-D weight) drawn from N(0, initializer_range²) as the class initialises it. Returns how
    many neurons were drawn again.

    >>> from savings_setup import SETTINGS, Sizes, new_model, target_config
    >>> moe = new_model("decoder", target_config(SETTINGS["decoder-moe"], Sizes()), 0)
    >>> drop_upcycle(moe, 0.5, seed=0)  # 4 layers x 8 experts x 48 of 96 neurons
    1536
    """
    gen = torch.Generator().manual_seed(seed * 7919 + 31)
    drawn = 0
    for weight in routers(model) if router else []:
        with torch.no_grad():
            weight.normal_(0.0, model.config.initializer_range, generator=gen)
    for module in model.modules():
        if not (isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and hasattr(module, "down_proj")):
            continue
        neurons = module.down_proj.shape[-1]
        # (tensor, axis of the neurons within one expert's matrix, offset): gate rows, up rows, down columns
        parts = [(module.gate_up_proj, 0, 0), (module.gate_up_proj, 0, neurons), (module.down_proj, 1, 0)]
        stats = [(float(m.mean()), float(m.std())) for m in (t[0].narrow(ax, off, neurons) for t, ax, off in parts)]
        for expert in range(module.down_proj.shape[0]):
            chosen = torch.randperm(neurons, generator=gen)[:round(rate * neurons)]
            for (t, ax, off), (mean, std) in zip(parts, stats):
                view = t[expert].narrow(ax, off, neurons)
                shape = list(view.shape)
                shape[ax] = len(chosen)
                view.index_copy_(ax, chosen, (torch.randn(shape, generator=gen) * std + mean).to(t.dtype))
            drawn += len(chosen)
    if not drawn:
        raise ValueError(f"drop_upcycle: no fused expert module (gate_up_proj, down_proj) in {type(model).__name__}")
    return drawn
