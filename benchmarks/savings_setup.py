"""What the savings benchmark runs: its methods, sizes, settings, models and pre-trained sources.

Used by ``benchmarks/savings.py`` (the driver); every size of a run lives in ``Sizes``.

    >>> sizes = Sizes().scaled(2)
    >>> (sizes.target_steps, sizes.eval_every, target_config(SETTINGS["decoder-x1.5"], sizes).hidden_size)
    (1200, 80, 48)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from growir.train.data import MLM_VOCAB, VOCAB, Batcher, load_corpus
from growir.train.loop import TrainConfig, make_optimizer, train

METHODS = ["scratch", "stackbert", "mslt", "directcopy", "fpi", "aki", "bert2bert", "fpi+noise", "growir",
           "growir+optimizer"]
# The learning-rate sweep after growth, on growir's default growth: TrainConfig fields changed from the shared
# schedule (``lr`` as a factor of the peak; ``warmup`` a fraction of the steps: 0 = start at the peak, 0.15 =
# 90 of 600 steps; the shared schedule warms up over 0.05 = 30 steps). Reported as a sweep, not as rows.
LR_SWEEP = {"growir-w0": {"warmup": 0.0}, "growir-w90": {"warmup": 0.15}, "growir-lr.5": {"lr": 0.5},
            "growir-w0-lr.5": {"warmup": 0.0, "lr": 0.5}, "growir-w90-lr.5": {"warmup": 0.15, "lr": 0.5}}
GROWIR_POLICY: dict = {}  # the policy the growir rows train with (the sweep's winner, if one wins clearly)
LR_POLICIES = {**LR_SWEEP, **({"growir": GROWIR_POLICY, "growir+optimizer": GROWIR_POLICY} if GROWIR_POLICY else {})}
GROWIR = {"growir", "growir+optimizer", *LR_SWEEP}  # grown with growir's default recipe
# The upcycling settings' methods (dense source -> mixture of experts; benchmarks/savings_upcycle.py).
MOE_METHODS = ["scratch", "growir", "drop-upcycling", "drop-upcycling+router", "dense"]
USES_SOURCE = {"directcopy", "fpi", "aki", "bert2bert", "fpi+noise", "drop-upcycling", "drop-upcycling+router", "dense",
               *GROWIR}
ALL_METHODS = METHODS + list(LR_SWEEP) + [m for m in MOE_METHODS if m not in METHODS]
HEADLINE = "decoder-wide"


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the cost of a run; ``--scale K`` multiplies the step budgets."""
    hidden: int = 32            # source width; targets are 2× wider
    layers: int = 4             # source depth
    head_dim: int = 16          # fixed: width growth adds heads
    seq: int = 64
    batch: int = 16
    source_steps: int = 600     # the source sees the same token budget as each target
    target_steps: int = 600     # the token budget of every method: target_steps·batch·seq
    eval_every: int = 40
    lr_decoder: float = 3e-3    # peak LR, identical for all methods (and the source)
    lr_encoder: float = 1e-3
    # The encoder source's own peak LR (None: lr_encoder). 3e-3 takes the 32-wide BERT source further off the
    # masked-LM plateau (2.99-3.02 vs 3.08), but then scratch ends only 0.03-0.07 below it on encoder-wide and
    # above it on one encoder-x1.5 seed (saturated): docs/savings.md, "The encoder setting".
    lr_encoder_source: float | None = None
    warmup: float = 0.05        # linear warmup fraction, then cosine to 10%: every method restarts it
    rewarmup: int = 20          # after StackBERT/MSLT stackings (fresh optimizer state)
    stage1_fraction: float = 0.25   # bert2BERT stage 1 share of the steps
    mslt_final_fraction: float = 0.2  # MSLT's last all-layer stage
    noise: float = 1e-3         # the fpi+noise method's symmetry-breaking noise
    corpus_bytes: int = 4_000_000
    val_windows: int = 128

    def scaled(self, k: float) -> "Sizes":
        return dataclasses.replace(self, source_steps=round(self.source_steps * k),
                                   target_steps=round(self.target_steps * k), eval_every=round(self.eval_every * k))


QUICK = Sizes(hidden=16, layers=2, seq=32, batch=8, source_steps=40, target_steps=40, eval_every=10,
              corpus_bytes=300_000, val_windows=16, rewarmup=3)
# ``--preset gpu``: one H100/H200, decoder-wide, ~10 minutes. The lent H200 run (benchmarks/results/gpu/) trained
# 128 -> 256 wide for 1200 steps each in 40-60 s per run with 15 workers, and saturated: the source (1200 steps)
# ended below scratch's final loss, so every exact growth saved 100%. Here the target's budget is four times the
# source's, so scratch ends below the source and the methods are compared: 30 runs of ~200 s in two rounds of 15.
GPU_PRESET = {"sizes": {"hidden": 128, "source_steps": 1200, "target_steps": 4800, "eval_every": 160},
              "settings": ["decoder-wide"], "device": "cuda", "workers": 15}


@dataclass(frozen=True)
class Setting:
    name: str
    arch: str       # "decoder" (pre-norm Llama, causal LM) or "encoder" (post-norm BERT, masked LM)
    width: float
    depth: float
    experts: int = 0    # > 0: the target is the source's mixture-of-experts class, each FFN made this many experts
    top_k: int = 0      # experts each token runs (the FLOPs count these, not all experts)


def methods_of(setting: Setting, asked: list[str] | None = None) -> list[str]:
    """The methods ``setting`` trains (``asked``: of those, the ones named; the LR sweep only when named)."""
    own = MOE_METHODS if setting.experts else METHODS + list(LR_SWEEP)
    return [m for m in (asked or (MOE_METHODS if setting.experts else METHODS)) if m in own]


SETTINGS = {s.name: s for s in [Setting("decoder-wide", "decoder", 2.0, 1.0),
                                Setting("decoder-wide-deep", "decoder", 2.0, 2.0),
                                Setting("decoder-x1.5", "decoder", 1.5, 1.0),  # bert2BERT's 512 -> 768
                                Setting("encoder-wide", "encoder", 2.0, 1.0),
                                Setting("encoder-x1.5", "encoder", 1.5, 1.0),
                                Setting("encoder-wide-deep", "encoder", 2.0, 2.0),
                                Setting("decoder-moe", "decoder", 1.0, 1.0, experts=8, top_k=2)]}  # upcycling
DEFAULT_SETTINGS = ["decoder-wide", "decoder-wide-deep", "decoder-x1.5", "encoder-wide", "encoder-x1.5", "decoder-moe"]

# --- models ---------------------------------------------------------------------------------------------

def model_config(arch: str, hidden: int, layers: int, sizes: Sizes):
    heads = max(1, hidden // sizes.head_dim)
    if arch == "decoder":
        from transformers import LlamaConfig
        return LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                           max_position_embeddings=sizes.seq, tie_word_embeddings=False)
    from transformers import BertConfig
    return BertConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, vocab_size=MLM_VOCAB, max_position_embeddings=sizes.seq)


def model_class(arch: str, config=None):
    """The architecture's class; for a ``config`` of the upcycling settings' MoE class, that class."""
    from transformers import BertForMaskedLM, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    if isinstance(config, MixtralConfig):
        return MixtralForCausalLM
    return LlamaForCausalLM if arch == "decoder" else BertForMaskedLM


def new_model(arch: str, config, seed: int):
    torch.manual_seed(seed)
    return model_class(arch, config)(config)


def target_config(setting: Setting, sizes: Sizes):
    if setting.experts:  # the source's own sizes, each FFN made ``experts`` experts of the FFN's size
        from savings_upcycle import moe_config
        return moe_config(model_config(setting.arch, sizes.hidden, sizes.layers, sizes), setting.experts,
                          setting.top_k)
    return model_config(setting.arch, round(sizes.hidden * setting.width), round(sizes.layers * setting.depth),
                        sizes)


def train_config(arch: str, sizes: Sizes, steps: int, method: str = "", source: bool = False) -> TrainConfig:
    """The shared schedule; the LR_POLICIES methods change one field of it (the peak ``lr`` by a factor);
    ``source``: the source's schedule (the encoder source has its own peak, ``lr_encoder_source``)."""
    lr = sizes.lr_decoder if arch == "decoder" else (source and sizes.lr_encoder_source) or sizes.lr_encoder
    cfg = TrainConfig(steps=steps, lr=lr, warmup=sizes.warmup, eval_every=sizes.eval_every, rewarmup=sizes.rewarmup)
    change = dict(LR_POLICIES.get(method, {}))
    if "lr" in change:
        change["lr"] *= lr
    return dataclasses.replace(cfg, **change)


def batcher(arch: str, sizes: Sizes, seed: int, device: str = "cpu") -> Batcher:
    return Batcher(load_corpus(sizes.corpus_bytes), seq=sizes.seq, batch=sizes.batch, mlm=arch == "encoder",
                   seed=seed, val_windows=sizes.val_windows, device=device)


def to_device(model, device: str, optimizer=None):
    """Move ``model`` (and ``optimizer``'s state, which load_state_dict puts on each parameter's device)."""
    if device != "cpu":
        model.to(device)  # in place: the optimizer's parameters stay the same objects
        if optimizer is not None:
            optimizer.load_state_dict(optimizer.state_dict())
    return model


# --- source -----------------------------------------------------------------------------------------------

def source_path(arch: str, sizes: Sizes, seed: int, cache: str, device: str = "cpu") -> str:
    fields = {k: v for k, v in dataclasses.asdict(sizes).items() if v is not None}  # unset: as before it existed
    key = [arch, fields, load_corpus(sizes.corpus_bytes).digest()] + ([device] if device != "cpu" else [])
    key = json.dumps(key, sort_keys=True)
    return os.path.join(cache, f"source-{arch}-{hashlib.sha256(key.encode()).hexdigest()[:10]}-seed{seed}.pt")


def pretrain_source(arch: str, sizes: Sizes, seed: int, cache: str, device: str = "cpu") -> str:
    """Train (or find cached) the seed's source; returns the cache file (state_dict, config, log, optimizer;
    saved on the CPU). A cache file from before the optimizer state was kept is trained again (deterministic)."""
    path = source_path(arch, sizes, seed, cache, device)
    if not os.path.exists(path) or "optimizer" not in torch.load(path, weights_only=False, map_location="cpu"):
        torch.set_num_threads(1)
        config = model_config(arch, sizes.hidden, sizes.layers, sizes)
        model = to_device(new_model(arch, config, seed), device)
        cfg = train_config(arch, sizes, sizes.source_steps, source=True)
        opt = make_optimizer(model, cfg)
        log = train(model, batcher(arch, sizes, seed + 1000, device), cfg, progress=False, optimizer=opt)
        model.cpu()
        opt.load_state_dict(opt.state_dict())  # the state follows its parameters to the CPU
        os.makedirs(cache, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "config": config.to_dict(), "log": log,
                    "optimizer": opt.state_dict()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def load_source(arch: str, path: str, sizes: Sizes | None = None):
    """(model, log), and with ``sizes`` also the source's AdamW with its final state."""
    blob = torch.load(path, weights_only=False, map_location="cpu")
    config = type(model_config(arch, 16, 1, QUICK)).from_dict(blob["config"])
    model = model_class(arch)(config)
    model.load_state_dict(blob["state_dict"])
    if sizes is None:
        return model, blob["log"]
    opt = make_optimizer(model, train_config(arch, sizes, sizes.source_steps, source=True))
    opt.load_state_dict(blob["optimizer"])
    return model, blob["log"], opt
