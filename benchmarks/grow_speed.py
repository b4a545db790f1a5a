"""How fast growir grows, against what a user would do instead. Not a test: it writes a table.

    python benchmarks/grow_speed.py [--sections memory,stream,plan] [--sizes 30M,134M] [--dtype float32,bfloat16]
        [--repeats 3] [--quick]

Sections (``--sections`` picks some, comma-separated; results of sections not run are kept from the last run):
  memory  in-memory ``growir.grow`` of Llama-shaped models at x2 width, against building the target with
          ``from_config`` (random init) and against cloning the target's state dict (the copy floor), and the
          extra peak RSS of the grow over the target's bytes; each case ``--repeats`` times, grow and from_config
          back to back, medians and the ratios' ranges.
  stream  ``growir grow SRC OUT`` streaming a synthesised sharded bf16 Llama (~250M -> ~0.9B, ~1.6B) against the
          I/O floor, peak RSS against "imports + 3x the largest target tensor" (``stream_speed.py``).
  plan    ``growir plan`` on 7B- and 70B-shaped Llama folders holding only config.json (``stream_speed.py``).
Each measurement runs in its own subprocess, so its peak RSS is its own (the kernel's high-water mark is
reset once the source model is built). Writes ``benchmarks/results/grow_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from memory import peak, reset_peak, rss_now

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Llama-shaped sources (vocab 32000, untied head); grown x2 in width.
SIZES = {
    "30M": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6),
    "134M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "500M": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=20, num_attention_heads=20),
}
GOALS = {"grow / from_config": 1.0, "extra peak / target bytes": 1.3}
ONLY_DTYPES = {"500M": ("bfloat16",)}  # a 1.75B float32 target and its from_config do not fit the shared 23 GiB


# --- measurements, each run in a child process -------------------------------------------------------------------
def _config(size: str, scale: int = 1):
    from transformers import LlamaConfig
    shape = {k: v * scale for k, v in SIZES[size].items() if k != "num_hidden_layers"}
    cfg = LlamaConfig(**shape, num_hidden_layers=SIZES[size]["num_hidden_layers"],
                      num_key_value_heads=shape["num_attention_heads"], vocab_size=32000)
    return cfg


def child_grow(size: str, dtype: str) -> dict:
    import torch
    import growir
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    source = LlamaForCausalLM(_config(size)).to(getattr(torch, dtype))
    base = rss_now()
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    grown = growir.grow(source, width=2.0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    top = peak()
    target_bytes = sum(t.numel() * t.element_size() for t in grown.state_dict().values())
    record = grown.growir_record
    return {"grow_s": seconds, "grow_cpu_s": cpu, "extra_peak_bytes": top - base, "target_bytes": target_bytes,
            "capture": record.capture, "measured": record.measured,
            "source_params": sum(p.numel() for p in source.parameters()),
            "target_params": sum(p.numel() for p in grown.parameters()),
            "exact": grown.growir_record.exact, "deviation": grown.growir_record.deviation}


def child_from_config(size: str, dtype: str) -> dict:
    """The alternatives: the target class built from its config (random init, in float32 then cast, as the
    earlier runs did; and built directly in the dtype), and a copy of its weights."""
    import torch
    from transformers import LlamaForCausalLM
    cfg = _config(size, scale=2)
    start, cpu = time.perf_counter(), time.process_time()
    target = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    from_config, cpu = time.perf_counter() - start, time.process_time() - cpu
    state = target.state_dict()
    start = time.perf_counter()
    copy = {k: v.clone() for k, v in state.items()}
    clone = time.perf_counter() - start
    out = {"from_config_s": from_config, "from_config_cpu_s": cpu, "clone_s": clone, "copied": len(copy)}
    del target, state, copy
    if dtype != "float32":
        torch.set_default_dtype(getattr(torch, dtype))
        start, cpu = time.perf_counter(), time.process_time()
        LlamaForCausalLM(cfg)
        out.update(from_config_direct_s=time.perf_counter() - start, from_config_direct_cpu_s=time.process_time() - cpu)
    return out


CHILDREN = {"grow": child_grow, "from_config": child_from_config}


def run_child(kind: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- sections ----------------------------------------------------------------------------------------------------
RATIOS = {"grow / from_config": ("grow_s", "from_config_s"),
          "grow / from_config (CPU)": ("grow_cpu_s", "from_config_cpu_s"),
          "grow / clone": ("grow_s", "clone_s"), "extra peak / target bytes": ("extra_peak_bytes", "target_bytes")}


def section_memory(args) -> dict:
    """Each case ``--repeats`` times, grow and from_config back to back (their order alternating), so both see the
    same load; a row holds the median of each time and ratio, and the ratios' range over the repeats."""
    rows, load = [], [os.getloadavg()[0]]
    for size, dtype in ((s, d) for d in args.dtype.split(",") for s in args.sizes.split(",")
                        if d in ONLY_DTYPES.get(s, (d,))):
        runs = []
        for i in range(args.repeats):
            kinds = ("grow", "from_config") if i % 2 == 0 else ("from_config", "grow")
            runs.append({k: v for kind in kinds for k, v in run_child(kind, size, dtype).items()})
            runs[-1].update({name: runs[-1][a] / runs[-1][b] for name, (a, b) in RATIOS.items()})
        rows.append(_median_row(size, dtype, runs))
        print(f"memory {size} {dtype}: {rows[-1]['grow / from_config']:.2f}x from_config "
              f"({_spread(rows[-1], 'grow / from_config')}), {rows[-1]['extra peak / target bytes']:.2f}x target "
              f"bytes", file=sys.stderr)
    load.append(os.getloadavg()[0])
    return {"rows": rows, "goals": GOALS, "load_average": load[-1], "load_average_start": load[0],
            "repeats": args.repeats}


def _median_row(size: str, dtype: str, runs: list) -> dict:
    """The median of every number over the repeats (the other fields from the last run), and each ratio's range."""
    row = {"size": size, "dtype": dtype, **runs[-1], "repeats": len(runs), "exact": all(r["exact"] for r in runs)}
    for key, value in runs[-1].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in runs)
    row.update({f"{name} range": [min(r[name] for r in runs), max(r[name] for r in runs)] for name in RATIOS})
    return row


def _spread(row: dict, name: str) -> str:
    lo, hi = row.get(f"{name} range", (row[name], row[name]))
    return f"{lo:.2f}-{hi:.2f}"


def markdown_memory(result: dict) -> list[str]:
    lines = ["## In memory: `growir.grow(width=2.0)` of a Llama-shaped model", "",
             "| source | dtype | params (source -> target) | grow s (CPU s) | from_config s (CPU s) | clone s "
             "| grow / from_config: median, range (CPU) | grow / clone | extra peak / target bytes | exact "
             "| captured |",
             "|" + "---|" * 11]
    for r in result["rows"]:
        cpu = lambda key: f" ({r[key]:.1f})" if key in r else ""  # noqa: E731
        ratio = f" ({r['grow / from_config (CPU)']:.2f})" if "grow / from_config (CPU)" in r else ""
        direct = (f"; in {r['dtype']} directly {r['from_config_direct_s']:.1f}{cpu('from_config_direct_cpu_s')}"
                  if "from_config_direct_s" in r else "")
        lines.append(f"| {r['size']} | {r['dtype']} | {r['source_params'] / 1e6:.0f}M -> {r['target_params'] / 1e6:.0f}M "
                     f"| {r['grow_s']:.1f}{cpu('grow_cpu_s')} | {r['from_config_s']:.1f}{cpu('from_config_cpu_s')}"
                     f"{direct} | {r['clone_s']:.2f} "
                     f"| {r['grow / from_config']:.2f}, {_spread(r, 'grow / from_config')}{ratio} "
                     f"| {r['grow / clone']:.1f} | {r['extra peak / target bytes']:.2f} | {r['exact']} "
                     f"| {_captured(r.get('capture', '?'))} |")
    rows = result["rows"]
    how = f"Self-measure: {rows[0].get('measured', '?')}." if rows else ""
    lines += ["", "Goals: " + ", ".join(f"{k} <= {v}" for k, v in result["goals"].items()), "", how, "",
              NOTES.format(repeats=result.get("repeats", 1), start=result.get("load_average_start", 0.0),
                           end=result.get("load_average", 0.0)), ""]
    return lines


def _captured(how: str) -> str:
    """The capture column: "2-block proxy", or "full: why" (the reason cut short)."""
    return "2-block proxy" if how.startswith("a 2-block proxy") else how.replace("the full model (no proxy: ", "full: ")[:80]


NOTES = ("The model is exported as a two-block proxy on the meta device (no weights), its block rules replicated "
         "to every block and applied to the real tensors; the rebuilt class is checked once against the real "
         "source, which is also the self-measure. What remains: torch.export of the two blocks with symbolic "
         "batch and sequence axes (~2 CPU s, plus ~2 s of torch.export's first-call warm-up in a fresh process; "
         "independent of depth and width), the rules (drawing the fresh units' random values and copying the "
         "rest: about the target's bytes once), the one measurement (source and grown model's forward on the 2x8-token "
         "example) and building meta models while the config is searched. from_config is timed as "
         "`LlamaForCausalLM(cfg).to(dtype)` (as the earlier rows); built directly in bfloat16 where shown. "
         "500M: bfloat16 only (a 1.75B float32 target does not fit beside the machine's other jobs). Each row: "
         "the median of {repeats} repeats, grow and from_config run back to back in fresh processes (their order "
         "alternating), and the range of the per-repeat ratio. Machine shared with other jobs (load average "
         "{start:.1f} at the start of the section, {end:.1f} at the end): wall seconds are inflated, CPU seconds (in "
         "parentheses) are what an idle core would take.")


# Other sections (streaming, planning) register here: name -> (run, markdown).
sys.path.insert(0, str(HERE))
from stream_speed import SECTIONS as STREAM_SECTIONS  # noqa: E402  (stream, plan: benchmarks/stream_speed.py)

from hypercloning_speed import SECTIONS as HYPERCLONING_SECTIONS  # noqa: E402  (side by side, optional)

SECTIONS = {"memory": (section_memory, markdown_memory), **STREAM_SECTIONS, **HYPERCLONING_SECTIONS}


def write(results: dict, machine: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grow_speed.json").write_text(json.dumps({"machine": machine, **results}, indent=1) + "\n")
    lines = ["# grow_speed", "", f"Machine: {machine}. Written by `benchmarks/grow_speed.py`.", ""]
    for name, (_, markdown) in SECTIONS.items():
        if name in results:
            lines += markdown(results[name])
    (RESULTS / "grow_speed.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--sizes", default="30M,134M")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="stream: a 4-block source instead of 16 blocks")
    parser.add_argument("--repeats", type=int, default=3, help="memory: runs of each case (medians and ranges)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    old = RESULTS / "grow_speed.json"
    results = json.loads(old.read_text()) if old.exists() else {}
    results.pop("machine", None)
    for name in args.sections.split(","):
        results[name] = SECTIONS[name][0](args)
    write(results, f"{os.cpu_count()} CPUs, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")


if __name__ == "__main__":
    main()
