"""growir side by side with HyperCloning (apple/ml-hypercloning), the in-memory width cloning of Hugging Face
decoders it is compared with: the same 43-66M models grown x2 in width (hidden, FFN, heads), each in its own
process. Registered in ``grow_speed.py`` as the ``hypercloning`` section.

HyperCloning is not a dependency: point ``HYPERCLONING`` at a folder holding its ``hypercloning/`` package (a
throwaway copy of the repository); without it the section records that it was skipped. What it does, read from
its source: ``cloneModel(model, embedding_dim_multiplier, up_project_multiplier)`` picks a function by the
config's class name (Llama, Gemma, Gemma2, OPT, OLMo, Pythia; whole multipliers only), builds the target with
``_from_config`` (random init), then overwrites each layer's ``.data`` with the source tiled by ``repeat`` and
divided by the repeat count on the input axis, in the source's dtype. It does not check the result.
Its attention cloning reads ``attn.num_heads`` and ``attn.num_key_value_heads``, which transformers 5's attention
modules no longer hold: the child sets them from the module's config (a compatibility shim, nothing else).
Its package ``__init__`` imports OLMo's optional package; the child imports the family modules directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = {  # ~50M parameters each, vocabulary 32000
    "llama": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
    "gemma": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, head_dim=64, vocab_size=32000),
}


def _source(family: str, dtype: str):
    import torch
    import transformers as T
    cfg = (T.LlamaConfig if family == "llama" else T.GemmaConfig)(**FAMILIES[family])
    torch.manual_seed(0)
    model = (T.LlamaForCausalLM if family == "llama" else T.GemmaForCausalLM)(cfg)
    return model.to(getattr(torch, dtype)).eval()


def _hypercloning():
    """The family cloning functions, imported from $HYPERCLONING without the package's __init__."""
    import types
    root = os.environ.get("HYPERCLONING")
    if not root or not (Path(root) / "hypercloning" / "llama_cloning.py").is_file():
        return None
    pkg = types.ModuleType("hypercloning")
    pkg.__path__ = [str(Path(root) / "hypercloning")]
    sys.modules.setdefault("hypercloning", pkg)
    from hypercloning.gemma_cloning import clone_gemma
    from hypercloning.llama_cloning import clone_llama
    import transformers as T
    for attn in (T.models.llama.modeling_llama.LlamaAttention, T.models.gemma.modeling_gemma.GemmaAttention):
        if not hasattr(attn, "num_heads"):  # transformers 5 keeps these counts in the config only
            attn.num_heads = property(lambda self: self.config.num_attention_heads)
            attn.num_key_value_heads = property(lambda self: self.config.num_key_value_heads)
    return {"llama": clone_llama, "gemma": clone_gemma}


def _grow(tool: str, source, **growir_options):
    if tool == "growir":
        import growir
        return growir.grow(source, width=2.0, **growir_options)
    return _hypercloning()[type(source).__name__.replace("ForCausalLM", "").lower()](
        source, embedding_dim_multiplier=2, up_project_multiplier=2)


def _deviation(source, grown) -> float:
    """max|logits difference| / max(1, max|logits|), both models in float32 on two short sequences."""
    import torch
    x = torch.randint(0, FAMILIES["llama"]["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = source.float()(x).logits, grown.float()(x).logits
    return float((a - b).abs().max()) / max(1.0, float(a.abs().max()))


def child(job: dict) -> dict:
    import torch
    sys.path.insert(0, str(HERE))
    from memory import peak, reset_peak, rss_now
    source = _source(job["family"], job["dtype"])
    if job["kind"] == "time":
        base = rss_now()
        reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        grown = _grow(job["tool"], source)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        extra = peak() - base
        target = sum(t.numel() * t.element_size() for t in grown.state_dict().values())
        how = getattr(grown, "growir_record", None)
        return {"seconds": wall, "cpu_seconds": cpu, "extra_peak_bytes": extra, "target_bytes": target,
                "capture": how.capture if how else "", "type": type(grown).__name__,
                "source_params": sum(p.numel() for p in source.parameters()),
                "target_params": sum(p.numel() for p in grown.parameters())}
    a, b = _grow("growir", source, width_method="fpi"), _grow("hypercloning", source)  # copies, as HyperCloning
    if type(a) is not type(source):  # growir kept the rewritten graph: no config computes the grown function
        return {"tensors": 0, "bitwise_equal": 0, "differ": [], "growir_deviation": a.growir_record.deviation,
                "hypercloning_deviation": _deviation(source, b), "growir_exact": a.growir_record.exact,
                "growir_note": "; ".join(a.growir_record.notes)[:300]}
    sa, sb = a.state_dict(), b.state_dict()
    common = [k for k in sa if k in sb and sa[k].shape == sb[k].shape]
    same = [k for k in common if torch.equal(sa[k], sb[k])]
    differ = sorted(set(sa) - set(same))
    with torch.no_grad():
        dev_g, dev_h = _deviation(source, a), _deviation(source, b)
    return {"tensors": len(sa), "bitwise_equal": len(same), "differ": differ[:6], "growir_deviation": dev_g,
            "hypercloning_deviation": dev_h, "growir_exact": a.growir_record.exact}


def run_child(job: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def section_hypercloning(args) -> dict:
    if _hypercloning() is None:
        return {"skipped": "HyperCloning not found: set HYPERCLONING to a folder holding its hypercloning/ package",
                "rows": []}
    rows = []
    for family in FAMILIES:
        for dtype in args.dtype.split(","):
            job = {"family": family, "dtype": dtype}
            g = run_child({**job, "kind": "time", "tool": "growir"})
            h = run_child({**job, "kind": "time", "tool": "hypercloning"})
            match = run_child({**job, "kind": "match"})
            rows.append({**job, "growir": g, "hypercloning": h, **match,
                         "time growir / hypercloning": g["seconds"] / h["seconds"],
                         "cpu growir / hypercloning": g["cpu_seconds"] / h["cpu_seconds"],
                         "peak growir / hypercloning": g["extra_peak_bytes"] / max(1, h["extra_peak_bytes"])})
            print(f"hypercloning {family} {dtype}: time x{rows[-1]['time growir / hypercloning']:.2f}, "
                  f"peak x{rows[-1]['peak growir / hypercloning']:.2f}", file=sys.stderr)
    return {"rows": rows, "load_average": os.getloadavg()[0]}


def markdown_hypercloning(result: dict) -> list[str]:
    lines = ["## Side by side with HyperCloning (x2 width: hidden, FFN and heads)", ""]
    if result.get("skipped"):
        return lines + [f"Skipped: {result['skipped']}.", ""]
    lines += ["| model | dtype | params (source -> target) | growir s (CPU s) | HyperCloning s (CPU s) | growir / "
              "HyperCloning time (CPU) | extra peak MiB growir / HyperCloning | tensors bitwise equal | deviation "
              "growir / HyperCloning |", "|" + "---|" * 9]
    for r in result["rows"]:
        g, h = r["growir"], r["hypercloning"]
        lines.append(
            f"| {r['family']} | {r['dtype']} | {g['source_params'] / 1e6:.0f}M -> {g['target_params'] / 1e6:.0f}M "
            f"| {g['seconds']:.2f} ({g['cpu_seconds']:.2f}) | {h['seconds']:.2f} ({h['cpu_seconds']:.2f}) "
            f"| {r['time growir / hypercloning']:.2f} ({r['cpu growir / hypercloning']:.2f}) "
            f"| {g['extra_peak_bytes'] / 2**20:.0f} / {h['extra_peak_bytes'] / 2**20:.0f} "
            f"| {r['bitwise_equal']} of {r['tensors']} | {r['growir_deviation']:.1e} / "
            f"{r['hypercloning_deviation']:.1e} |")
    lines += ["", NOTES.format(result.get("load_average", 0.0)), ""]
    return lines


NOTES = ("growir is timed with its default width_method='auto' (fresh units: random rows drawn for the new "
         "units); the bitwise comparison grows with width_method='fpi' (copies, as HyperCloning does). growir does "
         "more in that time: it finds the groups from the graph (no per-family code), rebuilds the config, and "
         "measures the real source and grown models (the deviation it reports); HyperCloning builds the target "
         "with random init, then overwrites it, and checks nothing. Deviations: max|logits difference| "
         "/ max(1, max|logits|) in float32 on 2x16 tokens, measured here for both. Tensors that differ: where "
         "the two pick different copies or compensations (e.g. Gemma's embedding scale). Machine shared "
         "(load average {:.1f} at the end of the section): CPU seconds in parentheses.")

SECTIONS = {"hypercloning": (section_hypercloning, markdown_hypercloning)}

if __name__ == "__main__" and "--child" in sys.argv:
    print(json.dumps(child(json.loads(sys.argv[sys.argv.index("--child") + 1]))))
