"""The ``stream`` and ``plan`` sections of ``benchmarks/grow_speed.py`` (not a timed test), and the streaming
benchmark on its own:

    python benchmarks/grow_speed.py --sections stream,plan [--quick]
    python benchmarks/stream_speed.py [--size 850M] [--repeats 3]   # -> benchmarks/results/stream_speed.{md,json}

Each measurement runs in a fresh subprocess (``python benchmarks/stream_speed.py --child JOB``), so its peak
RSS is its own:
- ``stream``: a synthesised sharded bf16 Llama checkpoint (~250M parameters, or ~850M with ``--size 850M``)
  grown disk to disk by ``growir.grow_checkpoint`` x2 width (and x2 width + x2 depth in the section): seconds,
  seconds over the I/O floor (reading the source's bytes and writing the target's, measured right after each
  growth, so both see the same load), peak RSS against the bound "imports + 3x the largest target tensor in
  float32". With repeats: the median and the range of the per-repeat ratio.
- ``plan``: ``growir plan`` on folders holding only a 7B- and a 70B-shaped Llama ``config.json``: seconds and
  peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"stream": "time <= 2x the I/O floor; peak RSS <= imports + 3x the largest target tensor (float32)",
         "plan": "70B-shaped plan <= 10 s"}
LLAMA_250M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000)
LLAMA_850M = dict(LLAMA_250M, hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=8)
SIZES = {"250M": LLAMA_250M, "850M": LLAMA_850M}
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256)


# --- what runs inside the subprocesses ----------------------------------------------------------------------------
def _child(job: dict) -> dict:
    """One measured run in this (fresh) process; returns seconds and peak RSS."""
    sys.path.insert(0, str(ROOT))
    import growir  # noqa: F401  (imports are part of the baseline, not of the run)
    from growir.stream.plan import plan_folder
    import transformers  # noqa: F401

    base = _rss_mib()
    start = time.perf_counter()
    cpu = _cpu()
    extra = {}
    if job["kind"] == "imports":
        pass
    elif job["kind"] == "plan":
        fp = plan_folder(job["src"])
        extra["groups"] = len(fp.plan.groups)
    elif job["kind"] == "stream":
        import growir.stream.grow as stream

        write = stream.write_folder

        def timed_write(*args):  # the peak before any weight is read: imports, plan, config proxy, rules
            extra["peak_before_write_mib"] = round(_rss_mib())
            extra["prepare_cpu_seconds"] = _cpu() - cpu
            return write(*args)
        stream.write_folder = timed_write
        report = growir.grow_checkpoint(job["src"], job["out"], progress=False, **job["spec"])
        extra.update(params_after=report.params_after, bytes_written=report.bytes_written, exact=report.exact,
                     prepare_seconds=report.prepare_seconds)
    elif job["kind"] == "verify":
        extra.update(_verify_child(job))
    elif job["kind"] == "floor":
        extra["bytes"] = _io_floor(Path(job["src"]), Path(job["out"]), job["bytes"])
    return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu() - cpu,
            "peak_rss_mib": _rss_mib(), "rss_after_imports_mib": base, **extra}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _verify_child(job: dict) -> dict:
    """Block-by-block verify of a grown folder: the weight-free preparation (plan, config proxy, maps), then
    the check with the peak RSS reset in between, so the check's own peak is measured."""
    from growir.stream.grow import prepare
    from growir.verify.blocks import check_blocks

    spec = job["spec"]  # the streamed growth's own arguments (grow_checkpoint's defaults: width_method "auto")
    prepared = prepare(Path(job["src"]), spec.get("width", 1.0), spec.get("depth", 1.0), None, "auto", "auto",
                        None, False)
    before = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM, the peak RSS
        f.write("5")
    start, cpu = time.perf_counter(), _cpu()
    check = check_blocks(job["src"], job["out"], prepared.fp, prepared.choice.config,
                         (prepared.maps, prepared.scales), prepared.schedules, not prepared.reasons, prepared.rules)
    worst, deviation = check.worst
    return {"check_seconds": time.perf_counter() - start, "check_cpu_seconds": _cpu() - cpu,
            "rss_before_check_mib": before,
            "check_peak_rss_mib": _vm("VmHWM"), "weights_held_mib": check.peak_bytes / 2**20,
            "worst": worst, "worst_deviation": deviation, "units": len(check.deviations),
            "preserved": check.preserved, "deviations": check.deviations}


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def _rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: a child started by fork + exec inherits the
    parent's high-water mark there (the parent that synthesised the checkpoint: 1042 MiB reported as the
    "imports" of a child whose own peak was 289 MiB)."""
    return _vm("VmHWM")


def _io_floor(src: Path, out: Path, nbytes: int) -> int:
    """Read every source shard, write ``nbytes`` in 64 MiB chunks: what any disk-to-disk growth must do."""
    chunk = 64 * 2**20
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(chunk):
                pass
    out.mkdir(parents=True, exist_ok=True)
    block = os.urandom(chunk)
    with open(out / "floor.bin", "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(block[:min(chunk, left)])
            left -= chunk
    return nbytes


def run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode:
        raise RuntimeError(f"{job['kind']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- building the inputs ------------------------------------------------------------------------------------------
def synth_checkpoint(folder: Path, shape: dict, shard: str = "200MB") -> int:
    """A random bf16 LlamaForCausalLM saved in shards, built tensor by tensor (never as a whole model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from growir.stream.shards import parse_size

    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"], tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    shards, current, size, limit = [], {}, 0, parse_size(shard)
    for name, p in model.state_dict().items():
        t = (1 + 0.1 * torch.randn(p.shape, generator=gen)) if p.dim() == 1 else 0.02 * torch.randn(p.shape, generator=gen)
        t = t.to(torch.bfloat16)
        if current and size + t.numel() * 2 > limit:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + t.numel() * 2
    shards.append(current)
    folder.mkdir(parents=True)
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * 2 for part in shards for t in part.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(folder)
    return sum(t.numel() for part in shards for t in part.values())


# --- sections -----------------------------------------------------------------------------------------------------
def section_stream(work: Path, quick: bool, size: str = "250M", repeats: int = 1,
                   cases=(("x2 width", dict(width=2.0)), ("x2 width + x2 depth", dict(width=2.0, depth=2.0)))) -> list:
    shape = dict(SIZES[size], num_hidden_layers=4) if quick else SIZES[size]
    src = work / "src"
    params = synth_checkpoint(src, shape)
    imports = run_child({"kind": "imports"})
    rows = []
    for label, spec in cases:
        runs, floors, loads = [], [], []
        for _ in range(repeats):  # the growth, then the floor at once: both under the same load
            loads.append(os.getloadavg()[0])
            out = work / "out"
            runs.append(run_child({"kind": "stream", "src": str(src), "out": str(out), "spec": spec}))
            largest = max(_largest_f32(out), 0)
            shutil.rmtree(out)
            floors.append(run_child({"kind": "floor", "src": str(src), "out": str(work / "floor"),
                                     "bytes": runs[-1]["bytes_written"]}))
            shutil.rmtree(work / "floor")
        rows.append(_stream_row(f"Llama {params / 1e6:.0f}M bf16 {label}", params, runs, floors, imports, largest,
                                loads))
    return rows


def _stream_row(case: str, params: int, runs: list, floors: list, imports: dict, largest: int, loads: list) -> dict:
    """One case's row: the median repeat (by time over floor), the range of the ratio, the highest peak."""
    ratios = [r["seconds"] / f["seconds"] for r, f in zip(runs, floors)]
    i = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    run, floor = runs[i], floors[i]
    peak = max(r["peak_rss_mib"] for r in runs)
    bound = imports["peak_rss_mib"] + 3 * largest / 2**20
    return {"case": case, "params_before": params, "params_after": run["params_after"],
            "seconds": round(run["seconds"], 2), "prepare_seconds": round(run["prepare_seconds"], 2),
            "cpu_seconds": round(run["cpu_seconds"], 2), "io_floor_cpu_seconds": round(floor["cpu_seconds"], 2),
            "io_floor_seconds": round(floor["seconds"], 2), "time_over_floor": round(ratios[i], 2),
            "time_over_floor_each": [round(x, 2) for x in ratios], "repeats": len(runs),
            "seconds_each": [round(r["seconds"], 1) for r in runs],
            "cpu_seconds_each": [round(r["cpu_seconds"], 1) for r in runs],
            "io_floor_seconds_each": [round(f["seconds"], 1) for f in floors],
            "io_floor_cpu_seconds_each": [round(f["cpu_seconds"], 1) for f in floors],
            "load_average_each": [round(x, 1) for x in loads],
            "prepare_cpu_seconds": round(run["prepare_cpu_seconds"], 2),
            "cpu_over_floor_cpu": round(run["cpu_seconds"] / floor["cpu_seconds"], 2),
            "peak_rss_mib": round(peak), "imports_rss_mib": round(imports["peak_rss_mib"]),
            "peak_before_write_mib": round(max(r["peak_before_write_mib"] for r in runs)),
            "largest_target_f32_mib": round(largest / 2**20), "bound_mib": round(bound),
            "within_bound": peak <= bound, "exact": run["exact"], "bytes_written": run["bytes_written"]}


def section_verify(work: Path, quick: bool) -> list:
    """``grow_checkpoint(verify=True)``'s check alone, on the streamed x2 and x2 + depth x2 folders."""
    shape = dict(LLAMA_250M, num_hidden_layers=4) if quick else LLAMA_250M
    src = work / "src"
    params = synth_checkpoint(src, shape)
    rows = []
    for label, spec in (("x2 width", dict(width=2.0)), ("x2 width + x2 depth", dict(width=2.0, depth=2.0))):
        out = work / "out"
        run_child({"kind": "stream", "src": str(src), "out": str(out), "spec": spec})
        largest = _largest_f32(out)
        run = run_child({"kind": "verify", "src": str(src), "out": str(out), "spec": spec})
        shutil.rmtree(out)
        rows.append({"case": f"Llama {params / 1e6:.0f}M bf16 {label}", "seconds": round(run["check_seconds"], 2),
                     "cpu_seconds": round(run["check_cpu_seconds"], 2),
                     "units": run["units"], "worst": run["worst"], "worst_deviation": run["worst_deviation"],
                     "preserved": run["preserved"], "rss_before_mib": round(run["rss_before_check_mib"]),
                     "peak_rss_mib": round(run["check_peak_rss_mib"]),
                     "weights_held_mib": round(run["weights_held_mib"], 1),
                     "largest_target_f32_mib": round(largest / 2**20), "deviations": run["deviations"]})
    return rows


def markdown_verify(result: dict) -> list:
    lines = ["## Verify block by block: `growir grow SRC OUT --verify` on the streamed folders", "",
             "| case | check s | CPU s | units | worst unit (deviation, float32 relative) | preserved | RSS before MiB "
             "| peak RSS during check MiB | most weights held MiB (f32) | largest target tensor f32 MiB |",
             "|" + "---|" * 10]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['seconds']:.1f} | {r.get('cpu_seconds', float('nan')):.1f} | {r['units']} "
                     f"| `{r['worst']}` ({r['worst_deviation']:.2g}) | {r['preserved']} | {r['rss_before_mib']} | {r['peak_rss_mib']} | {r['weights_held_mib']} "
                     f"| {r['largest_target_f32_mib']} |")
    return lines + ["", "Neither model is loaded: each module's tensors are read from the shards in float32 just "
                    "before its forward and dropped after it (source run first, then grown), on the plan's two "
                    "example sequences of 8 tokens. RSS before: the imports and the weight-free preparation "
                    "(plan, config proxy, maps); the peak is reset before the check.", "",
                    _LOAD_NOTE.format(result.get("load_average", 0.0)), ""]


def _largest_f32(folder: Path) -> int:
    from safetensors import safe_open

    largest = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                n = 1
                for s in h.get_slice(k).get_shape():
                    n *= s
                largest = max(largest, 4 * n)
    return largest


def section_plan(work: Path, quick: bool) -> list:
    from transformers import LlamaConfig

    rows = []
    for label, shape in (("7B-shaped Llama", LLAMA_7B), ("70B-shaped Llama", LLAMA_70B)):
        folder = work / label.split("-")[0]
        LlamaConfig(**shape, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
        run = run_child({"kind": "plan", "src": str(folder)})
        rows.append({"case": f"{label} ({shape['num_hidden_layers']} blocks), config.json only",
                     "seconds": round(run["seconds"], 2), "cpu_seconds": round(run["cpu_seconds"], 2),
                     "peak_rss_mib": round(run["peak_rss_mib"]),
                     "imports_rss_mib": round(run["rss_after_imports_mib"]), "groups": run["groups"]})
    return rows


_LOAD_NOTE = ("Measured on a shared 2-core machine (load average {:.1f} at the end of the section): wall seconds "
              "are inflated by other processes; CPU seconds (one thread) are what an idle machine would take.")


def _spread(row: dict) -> str:
    """The range of the per-repeat ratio, where there were repeats."""
    each = row.get("time_over_floor_each", [])
    return f" ({min(each):.2f}-{max(each):.2f}, {len(each)} runs)" if len(each) > 1 else ""


def markdown_stream(result: dict) -> list:
    lines = ["## Streaming: `growir grow SRC OUT` on a sharded bf16 Llama folder", "",
             "| case | params (source -> target) | seconds (plan + config + rules) | CPU s (plan + config + rules) "
             "| I/O floor s (CPU s) | time / floor | CPU / floor CPU | peak RSS MiB (before writing) | imports MiB "
             "| largest target f32 MiB | bound MiB | within bound | exact |", "|" + "---|" * 13]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['params_before'] / 1e6:.0f}M -> {r['params_after'] / 1e6:.0f}M "
                     f"| {r['seconds']:.1f} ({r['prepare_seconds']:.1f}) "
                     f"| {r['cpu_seconds']:.1f} ({r.get('prepare_cpu_seconds', float('nan')):.1f}) "
                     f"| {r['io_floor_seconds']:.1f} ({r['io_floor_cpu_seconds']:.1f}) "
                     f"| {r['time_over_floor']:.2f}{_spread(r)} "
                     f"| {r.get('cpu_over_floor_cpu', float('nan')):.2f} "
                     f"| {r['peak_rss_mib']} ({r['peak_before_write_mib']}) | {r['imports_rss_mib']} "
                     f"| {r['largest_target_f32_mib']} | {r['bound_mib']} | {r['within_bound']} "
                     f"| {r['exact']} |")
    lines += ["", "Goal: " + GOALS["stream"] + ".", "", _LOAD_NOTE.format(result.get("load_average", 0.0)),
              "The part in parentheses (one torch.export of the random-weight two-block proxy with a small "
              "vocabulary, whose plan gives the full model's rules and whose own growth picks the config, plus "
              "the first use of torch.export's and the model class's modules) does not grow with depth or "
              "vocabulary; the rest is reading, applying and writing tensor by tensor. The peak before writing "
              "is that fixed part (the proxy grown in memory). Peak RSS is each child's own VmHWM.", "",
              PROFILE, ""]
    return lines


PROFILE = (
    "Where the time goes (0.85B bf16 x2 width, 6.3 GB written, on the shared 2-core machine at load 10-15; "
    "cProfile, per-thread CPU time, getrusage). Before: the write phase took 24 CPU s, 10.5 making the tensors "
    "(2.7M minor page faults: every grown tensor, read source and float32 transient was a fresh mapping that "
    "the kernel zeroed, ~120 ms per 92 MiB; the bfloat16 exactness check 2.1 s; random draws 3.2 s) and 13 "
    "writing through the page cache, throttled with the machine's other writers (a buffered 1 GB dd took 11 s "
    "there, with O_DIRECT 1.4 s). Now: memory freed while writing is taken again (`writer.reused_heap`, 2.7M -> "
    "0.2M faults), the exactness check reads magnitudes from the bits (`tensor_rule.magnitudes`, 6x faster), "
    "and the shards go past the page cache (O_DIRECT, `writer.DirectFile`: the writing thread's CPU 8.5 -> 1.6 "
    "s), written by one thread across shards while up to the largest tensor's bytes wait. What remains is "
    "making the tensors (~5 CPU s: random draws, gathers) and preparing (one export of the proxy and its "
    "in-memory growth at full width, ~8 CPU s at 0.85B, much more wall time under load), which does not "
    "shrink with the model. The proxy's float32 growth also sets the peak RSS (two blocks at full width grown "
    "x2: ~1.8 GB at 0.85B), above the bound; the writing itself peaks lower.")


def markdown_plan(result: dict) -> list:
    lines = ["## Planning from config.json alone (meta device, two-block proxy)", "",
             "| case | seconds | CPU s | peak RSS MiB | imports MiB | groups |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_mib']} "
              f"| {r['imports_rss_mib']} | {r['groups']} |"
              for r in result["rows"]]
    return lines + ["", "Goal: " + GOALS["plan"] + ".", "", _LOAD_NOTE.format(result.get("load_average", 0.0)), ""]


def _with_work_dir(section):
    def run(args) -> dict:
        work = Path(tempfile.mkdtemp(prefix="grow_speed_"))
        try:
            rows = section(work, getattr(args, "quick", False))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"rows": rows, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_average": os.getloadavg()[0]}
    return run


# name -> (run(args) -> result, markdown(result) -> lines), as grow_speed.SECTIONS
SECTIONS = {"stream": (_with_work_dir(section_stream), markdown_stream),
            "plan": (_with_work_dir(section_plan), markdown_plan),
            "verify": (_with_work_dir(section_verify), markdown_verify)}


def main() -> None:
    """The streaming benchmark alone, at one size, with repeats: ``benchmarks/results/stream_speed.{md,json}``."""
    import argparse

    parser = argparse.ArgumentParser(description="growir grow SRC OUT against the I/O floor, back to back")
    parser.add_argument("--size", choices=sorted(SIZES), default="850M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", action="store_true", help="also x2 width + x2 depth")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measured run, in a fresh process
        print(json.dumps(_child(json.loads(args.child))))
        return
    cases = [("x2 width", dict(width=2.0))] + [("x2 width + x2 depth", dict(width=2.0, depth=2.0))] * args.depth
    start = os.getloadavg()[0]
    run = _with_work_dir(lambda work, quick: section_stream(work, quick, args.size, args.repeats, cases))
    result = {**run(args), "load_average_start": start}
    results = ROOT / "benchmarks" / "results"
    (results / "stream_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = markdown_stream(result)
    lines[0] += f" ({args.size}, {args.repeats} repeats, {result['when']}, load average {start:.1f} at the start)"
    (results / "stream_speed.md").write_text("# stream_speed\n\nWritten by `benchmarks/stream_speed.py`.\n\n"
                                             + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
