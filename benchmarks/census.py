"""The census: every transformers model class that builds from a tiny config, grown three ways. Not a test.

    nice -n 10 python benchmarks/census.py [--reuse] [--only TYPE ...] [--timeout 180] [--table]
    python benchmarks/census.py --merge full.json=RUN1 rerun.json=RUN2 ... --out census.json

One class per model type of ``transformers`` (its auto mappings): the causal-LM head where the type has one,
else the masked-LM head, else the base model (``MODEL_MAPPING_NAMES``); a class two types share is counted once.
Each is built from its config class's defaults shrunk by ``tiny_config`` (a generic shrinker of size fields: a
benchmark may read field names, growir may not), then grown with ``width=2.0``, ``width=2.0, depth=2`` and
``width=1.5``. Each growth is ``exact`` (no reason found and the measured deviation <= growir's TOLERANCE),
``warned`` (inexact, and growir warned), ``refused`` (a GrowthError: its class and first line), ``crashed`` (any
other exception: a growir bug) or ``silent`` (inexact and no warning: a bug too); a class that does not build, or
whose export fails (growir's TraceError), is ``no build`` / ``no export`` and is not counted in the share.
Whether growir's reload check (save_pretrained / from_pretrained, ``growir/materialize/reload.py``) ran is kept.
Where ``auto`` fills a post-norm residual inexactly by choice (it trains better than the exact copies:
docs/savings.md), the growth is run again with ``strict=True`` and that verdict counts (``default`` keeps auto's).

Every class runs in its own forked process with a timeout (a hang or a crash stops only that class) and one thread;
results go to ``benchmarks/results/census.json`` after every class (``--reuse`` skips classes already there) and
the table to ``census.md`` (``--table`` rebuilds it from the JSON alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
JSON = RESULTS / "census.json"
GROWTHS = {"x2": {"width": 2.0}, "x2+depth2": {"width": 2.0, "depth": 2}, "x1.5": {"width": 1.5}}
BY_CHOICE = "it is filled anyway"  # auto's inexact post-norm fill, chosen where copies would be exact
# shrinker targets: field-name fragments -> a small value (first match wins; a benchmark may read names)
SMALL = (("kv_heads", 2), ("key_value_heads", 2), ("head_dim", 8), ("heads", 4), ("experts_per_tok", 2),
         ("experts", 4), ("intermediate", 64), ("ffn", 64), ("d_ff", 64), ("inner", 64), ("layers", 2),
         ("hidden_size", 32), ("d_model", 32), ("n_embd", 32), ("embed_dim", 32), ("embedding_size", 32),
         ("d_kv", 8), ("image_size", 32), ("max_position_embeddings", 128), ("n_positions", 128))
WIDTH_WORDS = ("hidden", "intermediate", "ffn", "d_model", "n_embd", "embed_dim", "embedding_size", "dim", "d_ff",
               "inner", "d_kv", "lora_rank", "projection", "d_head", "head_size")
LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers", "encoder_layers")


def chosen_classes() -> dict:
    """model type -> the class name the census grows (causal LM, else masked LM, else the base model)."""
    from transformers.models.auto import modeling_auto as auto
    chosen, seen, dropped = {}, {}, set()
    for kind in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                 auto.MODEL_MAPPING_NAMES):
        for model_type, name in kind.items():
            name = name if isinstance(name, str) else name[0]
            if model_type in chosen or model_type in dropped or name in seen and not _named_after(name, model_type):
                dropped.add(model_type)
                continue
            dropped.add(seen.get(name))  # a class several types share: counted once, under its own type
            chosen.pop(seen.get(name), None)
            chosen[model_type], seen[name] = name, model_type
    return chosen


def _named_after(class_name: str, model_type: str) -> bool:
    """Whether a class is its model type's own (LlamaForCausalLM for llama, not for internlm3)."""
    return class_name.lower().startswith(model_type.replace("_", "").replace("-", ""))


def _small(key: str, value):
    """The shrunk value of one config field (or ``value`` where no size rule applies)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return value
    low = key.lower()
    if low.endswith("token_id") or low.endswith("token_index"):
        return value if value < 100 else 1 + value % 7  # ids must fall inside the small vocabulary
    if "vocab_size" in low:
        return 128
    for fragment, small in SMALL:
        if fragment in low:
            return min(value, small)
    return value


def shrink(cfg: dict) -> dict:
    """A config dict with every size field small, sub-configs (dicts with a model_type) shrunk alike, and
    per-layer lists cut to the new layer count."""
    out = {k: _small(k, v) for k, v in cfg.items()}
    layers = {cfg[k]: out[k] for k in LAYER_FIELDS if isinstance(cfg.get(k), int)}
    for key, value in cfg.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = shrink(value)
        elif isinstance(value, list) and len(value) in layers and len(value) > layers[len(value)]:
            out[key] = value[:layers[len(value)]]
        elif isinstance(value, list) and "depths" in key.lower():
            out[key] = [min(v, 1) if isinstance(v, int) else v for v in value]
    # a backbone's named stages follow its (now fewer) layers: the config derives them again when absent
    for drop in ("id2label", "label2id", "transformers_version", "architectures", "out_features", "out_indices",
                 "stage_names"):
        out.pop(drop, None)
    return out


def proportional(cfg: dict) -> dict:
    """The gentler shrink, tried where ``shrink`` does not build or run: layer counts, vocabulary and token ids as
    in ``shrink``, and every width field divided by one power of two (the hidden size down to about 64), so the
    products a config validates (heads x head_dim, SSM heads x head size = expand x hidden) still hold."""
    hidden = max((v for k, v in cfg.items() if k in ("hidden_size", "d_model", "n_embd") and isinstance(v, int)),
                 default=64)
    widths = {k: v for k, v in cfg.items() if any(w in k.lower() for w in WIDTH_WORDS) and "token" not in k.lower()
              and isinstance(v, int) and not isinstance(v, bool) and v > 0}
    smallest = min(widths.values(), default=64)  # no width below 8: a rotary half, a head, must stay real
    factor = 1 << max(0, min((hidden // 64).bit_length(), (smallest // 8).bit_length()) - 1)
    out = {k: proportional(v) if isinstance(v, dict) and "model_type" in v else v for k, v in cfg.items()}
    out.update({k: v // factor for k, v in widths.items() if v % factor == 0})
    kept = {k: v for k, v in shrink(cfg).items()
            if any(w in k.lower() for w in ("layers", "vocab", "token", "experts"))}
    return {**out, **{k: v for k, v in kept.items() if not isinstance(v, dict)}, **_lists_cut(cfg)}


def _lists_cut(cfg: dict) -> dict:
    """Per-layer lists of ``cfg`` cut to ``shrink``'s layer count."""
    small = shrink(cfg)
    return {k: v for k, v in small.items() if isinstance(v, list) and v != cfg.get(k)}


def tiny_model(model_type: str, class_name: str):
    """(a seeded random instance of ``class_name`` from its config class's defaults shrunk, in eval mode, that
    runs a forward on growir's example inputs; which shrink built it). Raises the first shrink's error where
    neither builds and runs."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING
    from growir.frontend.inputs import hf_example_inputs
    config_class, errors, built = CONFIG_MAPPING[model_type], [], []
    for how, shrunk in (("small", shrink), ("proportional", proportional)):
        try:
            config = config_class(**shrunk(config_class().to_dict()))
            torch.manual_seed(0)
            built.append((getattr(transformers, class_name)(config).eval(), how))
            with torch.no_grad():
                built[-1][0](**hf_example_inputs(built[-1][0]))
            return built[-1]
        except Exception as exc:  # noqa: BLE001 - the next shrink may build; the first error is reported
            errors.append(exc)
    if built:  # it builds but does not run on growir's example inputs: the growth says why (no export)
        return built[0][0], built[0][1] + " (its forward fails on growir's example inputs)"
    raise errors[0]


def grow_one(model, spec: dict) -> dict:
    """One growth's verdict: exact / warned / refused / crashed / silent / no export, and the reload check."""
    import warnings
    import growir
    from growir.errors import GrowthError, TraceError, first_line
    from growir.pipeline import stages
    from growir.verify.compare import TOLERANCE
    reload_seen = []
    check = stages.reload_check

    def watched(*args, **kwargs):
        result = check(*args, **kwargs)
        reload_seen.append({"deviation": result.deviation, "moved": result.moved, "note": result.note()[:200]})
        return result
    stages.reload_check = watched
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grown = growir.grow(model, **spec)
            record = grown.growir_record
    except TraceError as exc:
        return {"verdict": "no export", "why": f"TraceError: {first_line(exc)}", "s": time.perf_counter() - start}
    except GrowthError as exc:
        return {"verdict": "refused", "why": f"{type(exc).__name__}: {first_line(exc)}",
                "s": time.perf_counter() - start, "reload": reload_seen[0] if reload_seen else None}
    except Exception as exc:  # noqa: BLE001 - a census records any crash as a growir bug
        return {"verdict": "crashed", "why": f"{type(exc).__name__}: {first_line(exc)}",
                "s": time.perf_counter() - start}
    finally:
        stages.reload_check = check
    said = [str(w.message)[:300] for w in caught if "growir" in str(w.message)]
    exact = record.exact and record.deviation is not None and record.deviation <= TOLERANCE
    verdict = "exact" if exact else "warned" if said else "silent"
    return {"verdict": verdict, "deviation": record.deviation, "reasons": [r[:300] for r in record.reasons],
            "by_choice": any(BY_CHOICE in r for r in record.reasons),  # before the reasons are cut to 300
            "warnings": said[:3], "s": time.perf_counter() - start, "returned": type(grown).__name__,
            "notes": [n[:300] for n in record.notes], "reload": reload_seen[0] if reload_seen else None}


def child(model_type: str, class_name: str) -> None:
    """Build one class and grow it three ways, one JSON line per step on stdout (partial on a timeout)."""
    import torch
    from growir.quiet import hf_quiet
    torch.set_num_threads(1)
    try:
        with hf_quiet():
            model, how = tiny_model(model_type, class_name)
    except Exception as exc:  # noqa: BLE001 - any failure to build is recorded, not raised
        why = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())[:300]
        print(json.dumps({"build": f"{type(exc).__name__}: {why}"}), flush=True)
        return
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"build": "ok", "params": params, "shrink": how}), flush=True)
    for name, spec in GROWTHS.items():
        result = grow_one(model, spec)
        if result["verdict"] == "warned" and result.get("by_choice"):
            # auto trades exactness for training on a post-norm stream (docs/savings.md); the census counts
            # what growir can grow exactly: strict=True keeps the exact copies there
            strict = grow_one(model, {**spec, "strict": True})
            result = {**strict, "default": {k: result[k] for k in ("verdict", "deviation", "reasons")}}
        result.pop("by_choice", None)
        print(json.dumps({"growth": name, **result}, default=str), flush=True)
        if result["verdict"] == "no export":
            break  # the same export for every growth


def run_class(model_type: str, class_name: str, timeout: float) -> dict:
    """One class in a forked process (the imports are paid once, in the parent), killed after ``timeout``
    seconds: what its JSON lines said, and a timeout or a crash of the process itself."""
    entry = {"type": model_type, "class": class_name, "growths": {}}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = multiprocessing.get_context("fork").Process(target=_forked, args=(log.fileno(), model_type,
                                                                                  class_name))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            entry["process"] = f"timeout after {timeout:.0f} s"
        elif proc.exitcode:
            entry["process"] = f"the process died (exit code {proc.exitcode})"
        log.seek(0)
        out = log.read()
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "build" in row:
            entry.update(build=row["build"], params=row.get("params"), shrink=row.get("shrink"))
        else:
            entry["growths"][row.pop("growth")] = row
    entry["s"] = round(time.perf_counter() - start, 1)
    return entry


def _forked(fd: int, model_type: str, class_name: str) -> None:
    """The forked process: stdout into the parent's log file, then ``child``."""
    sys.stdout.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)  # warnings too: the lines that are not JSON are skipped
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    child(model_type, class_name)
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help="skip classes already in census.json")
    parser.add_argument("--only", nargs="+", help="model types to (re)run")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per class")
    parser.add_argument("--table", action="store_true", help="only rebuild census.md from census.json")
    parser.add_argument("--out", type=Path, default=JSON, help="the results file (census.md beside it)")
    parser.add_argument("--merge", nargs="+", metavar="FILE=RUN", help="merge results files into --out, later "
                        "ones replacing earlier ones class by class, each class labelled with its run; no class runs")
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from census_table import merged, write_table
    if args.merge:
        done = merged([tuple(m.split("=", 1)) for m in args.merge])
        args.out.write_text(json.dumps(done, indent=1, default=str))
        return write_table(done, args.out.with_suffix(".md"), len(chosen_classes()), "the runs listed below")
    os.nice(10)  # a shared machine: the census yields to everyone else
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    import torch
    __import__("growir")  # imported once here, inherited by every forked class
    torch.set_num_threads(1)
    done = json.loads(args.out.read_text()) if args.out.exists() and (args.reuse or args.only or args.table) else {}
    if not args.table:
        todo = chosen_classes()  # in a fixed pseudo-random order: a census cut short is still a fair sample
        todo = {t: todo[t] for t in sorted(todo, key=lambda t: hashlib.sha1(t.encode()).hexdigest())}
        if args.only:
            todo = {t: todo[t] for t in args.only}
        for model_type, class_name in todo.items():
            if args.reuse and not args.only and model_type in done:
                continue
            done[model_type] = run_class(model_type, class_name, args.timeout)
            print(model_type, class_name, {g: r["verdict"] for g, r in done[model_type]["growths"].items()},
                  done[model_type].get("build", ""), done[model_type].get("process", ""), flush=True)
            args.out.parent.mkdir(exist_ok=True)
            args.out.write_text(json.dumps(done, indent=1, default=str))
    growir = sys.modules["growir"]
    write_table(done, args.out.with_suffix(".md"), len(chosen_classes()),
                f"growir {growir.__version__} imported from `{Path(growir.__file__).parent.parent}`")


if __name__ == "__main__":
    main()
