#!/usr/bin/env python
"""Where no growth is exact (the post-norm encoder at ×1.5): how far each width method moves the function.

    python benchmarks/width_deviation.py [--setting encoder-x1.5] [--seeds 0 1 2]

Grows each seed's pre-trained source of the savings benchmark (``benchmarks/cache``, trained there if missing)
with every width method ``growir.grow`` offers and records, per method and seed, what it resolved to, whether
it is exact, its measured float32 deviation (``growir_record.deviation``: max |Δ| / max(1, max |y|) over the
outputs) and the validation loss it starts training from, beside the source's. Writes
``benchmarks/results/width_deviation.json``; ``savings_report.py`` tables it in docs/savings.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from growir.pipeline.spec import WIDTH_METHODS  # noqa: E402
from growir.api import grow  # noqa: E402
from growir.train.loop import evaluate  # noqa: E402
from savings_setup import SETTINGS, Sizes, batcher, load_source, pretrain_source  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def survey_seed(setting_name: str, sizes: Sizes, seed: int, cache: str) -> dict:
    """Every width method on one seed's source: {"source_val_loss", "methods": {name: figures}}."""
    setting = SETTINGS[setting_name]
    source = load_source(setting.arch, pretrain_source(setting.arch, sizes, seed, cache))[0]
    val = batcher(setting.arch, sizes, seed).val_batches()
    out = {"source_val_loss": evaluate(source, val), "methods": {}}
    for method in WIDTH_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the inexact growth's warning: its deviation is recorded below
            grown = grow(source, width=setting.width, depth=setting.depth, width_method=method, seed=seed,
                         materialize="hf")
        record = grown.growir_record
        out["methods"][method] = {"resolved": record.width_method, "exact": record.exact,
                                  "deviation": record.deviation, "val_loss": evaluate(grown, val)}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="encoder-x1.5", choices=sorted(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", default=os.path.join(HERE, "cache"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "width_deviation.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = Sizes()
    result = {"setting": args.setting, "sizes": dataclasses.asdict(sizes),
              "seeds": {str(s): survey_seed(args.setting, sizes, s, args.cache) for s in args.seeds}}
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return result


if __name__ == "__main__":
    main()
