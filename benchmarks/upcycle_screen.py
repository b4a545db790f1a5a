#!/usr/bin/env python
"""Screen of what trains best after exact upcycling (the savings benchmark's ``decoder-moe`` setting): the router's
scale, an exact reparametrisation of the experts, and the learning-rate policy.

    python benchmarks/upcycle_screen.py VARIANT SEED... [--base growir|drop-upcycling] [--out DIR]

Each run is the savings benchmark's own job (``savings.run_job``: the cached source of the seed, the shared
schedule, FLOPs per active parameter) with one change after ``build``:

* ``class-router``: the router drawn as the class initialises it (normal, std ``initializer_range``), what growir
  left it at before it drew routers itself (commit 934f3d8, where the screen in
  ``benchmarks/results/upcycle_screen.json`` ran; every variant below starts from it);
* ``routerK``: that router × K; ``routerfanin``: drawn from N(0, 1/fan_in) (what growir does since);
* ``rescaleS``: each expert's up rows × a and down columns / a, a = exp(N(0, S²)) per expert and neuron (exact);
* ``lr.5``, ``lr.3``, ``w90``, ``w90-lr.5``: the class router and the peak learning rate × 0.5 / 0.3, a 90-step
  warm-up, or both.

Writes ``DIR/BASE~VARIANT-SEED.json`` (the run); ``docs/upcycling.md`` ("What the savings run showed") reads the
summary, ``benchmarks/results/upcycle_screen.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import savings  # noqa: E402
import savings_setup as S  # noqa: E402
from savings_upcycle import routers  # noqa: E402

POLICIES = {"lr.5": {"lr": 0.5}, "lr.3": {"lr": 0.3}, "w90": {"warmup": 0.15}, "w90-lr.5": {"warmup": 0.15, "lr": 0.5}}


@torch.no_grad()
def change(model, variant: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1234)
    for w in routers(model):
        w.normal_(0.0, model.config.initializer_range, generator=gen)  # the class's router
        if variant == "routerfanin":
            w.copy_(torch.randn(w.shape, generator=gen) / w.shape[1] ** 0.5)
        elif variant.startswith("router"):
            w.mul_(float(variant[len("router"):]))
    if variant.startswith("rescale"):
        for m in model.modules():
            if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
                experts, neurons = m.down_proj.shape[0], m.down_proj.shape[-1]
                a = torch.exp(torch.randn(experts, neurons, generator=gen) * float(variant[len("rescale"):]))
                m.gate_up_proj[:, neurons:, :].mul_(a[:, :, None])
                m.down_proj.div_(a[:, None, :])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant")
    p.add_argument("seeds", type=int, nargs="+")
    p.add_argument("--base", default="growir", choices=["growir", "drop-upcycling"])
    p.add_argument("--out", default="/tmp/upcycle_screen")
    args = p.parse_args(argv)
    name = f"{args.base}~{args.variant}"
    S.LR_POLICIES[name] = savings.LR_POLICIES[name] = POLICIES.get(args.variant, {})
    build = savings.build

    def changed(method, setting, sizes, seed, source, optimizer=None):
        model, callbacks, info = build(args.base, setting, sizes, seed, source, optimizer)
        x = torch.randint(0, 100, (2, 16))
        with torch.no_grad():
            before = model(x).logits
            change(model, args.variant, seed)
            info["check"] = float((model(x).logits - before).abs().max())  # the change's own deviation
        return model, callbacks, info

    savings.build = changed
    sizes = S.Sizes()
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:
        out = savings.run_job("decoder-moe", name, seed, sizes, S.pretrain_source("decoder", sizes, seed,
                                                                              os.path.join(HERE, "cache")))
        with open(os.path.join(args.out, f"{name}-{seed}.json"), "w") as f:
            json.dump({**out, "method": name}, f)
        print(name, seed, out["log"][-1]["val_loss"], flush=True)


if __name__ == "__main__":
    main()
