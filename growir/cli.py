"""growir's command line: plan, grow, check and export Hugging Face model folders.

    growir plan SRC
    growir doctor SRC
    growir grow SRC OUT --width 2 --depth 2 [--width-method auto] [--depth-method auto] [--layers N] [--into CONFIG]
                        [--experts 2.0 [--keep-top-k] [--drop 0.5] | --experts 8 --top-k 2] [--dtype bfloat16]
                        [--max-shard-size 5GB]
                        [--in-memory] [--verify] [--strict] [--force] [--debug]
    growir check SRC GROWN [--width ... --depth ... as given to grow] [--onnx [--samples N]]
    growir export SRC OUT.onnx [--opset N] [--force]

SRC is a model folder (config.json plus safetensors weights, sharded or not), loaded offline. ``plan`` needs
only config.json. ``grow`` streams a safetensors folder tensor by tensor (``growir.grow_checkpoint``: the
model is never loaded whole); ``--in-memory`` loads it and uses ``growir.grow`` instead, as do growths that make
experts (``--into`` a mixture-of-experts config of another class, ``--experts``: the output says what memory they
need; their ``--verify`` and ``check`` load the written folder back and compare it with the source in float32:
no block map describes experts). ``--verify`` runs
source and grown block by block from their shards (``growir.verify.blocks``; with ``--in-memory``: both
compared in ONNX Runtime). ``check`` runs the same block check on two folders already on disk (the grow
arguments, which rebuild the index maps, come from GROWN's growir.json or the command line), in about the
memory of the largest block; ``--onnx`` loads both models whole and compares them in ONNX Runtime instead.
Outputs are written atomically: into a temporary folder or file beside OUT, moved into place at the end, so a
failure leaves no OUT. Exit status: 0 on success (``check``: the function is preserved), 1 on failure
(``check``: it is not), 2 on bad usage. Errors are one line on stderr; ``--debug`` shows the traceback instead.
Usage errors come before torch is imported (``growir`` imports its core lazily).

Only this module prints: the library returns reports and this module shows them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from pathlib import Path

from .quiet import hf_quiet


class CliError(Exception):
    """A refusal with a one-line message for the user."""


def main(argv: list[str] | None = None) -> int:
    """Run the growir command line; returns the exit status (errors go to stderr as one line).

    >>> main(["grow", "no-such-folder", "grown"])
    1
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already reported on one line
        return stop.code if isinstance(stop.code, int) else 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are read from folders, never downloaded
    try:
        return args.run(args)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM/SIGHUP during a write (growir.stream.shards.Interrupted)
        print(f"growir {args.command}: {str(stop) or 'interrupted'}; nothing was written", file=sys.stderr)
        return 128 + getattr(stop, "signum", 2)
    except Exception as error:  # the CLI boundary: every failure becomes one line, or a traceback with --debug
        if args.debug:
            raise
        print(f"growir {args.command}: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: Exception) -> str:
    from .errors import GrowthError

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (CliError, GrowthError)):
        return text
    return f"{type(error).__name__}: {text} (rerun with --debug for the traceback)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2)."""

    def error(self, message: str):
        """One line and exit status 2, as argparse, with a pointer to --help."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _growth_factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number at least 1, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a number at least 1 (growir only grows), got {text!r}")
    return value


def _width(text: str):
    """A width factor (``2``), or target sizes by role as the API's width dict (``hidden=960,heads=15``).

    >>> _width("1.5"), _width("hidden=960, heads=15,ffn=2560")
    (1.5, {'hidden': 960, 'heads': 15, 'ffn': 2560})
    """
    if "=" not in text:
        return _growth_factor(text)
    spec = {}
    for part in text.split(","):
        role, _, size = (x.strip() for x in part.partition("="))
        if not role or role in spec or not size.isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"must be a factor (2) or sizes by role (hidden=960,heads=15,ffn=2560: "
                                             f"each role once, each size a whole number), got {text!r}")
        spec[role] = int(size)
    return spec


def _experts(text: str):
    """A target expert count (``8``) or a multiplier (``2.0``, ``x2``), as the API's ``experts=``.

    >>> _experts("8"), _experts("2.0"), _experts("x2")
    (8, 2.0, 2.0)
    """
    if text.isdigit():
        return _positive_int(text)
    return _growth_factor(text.removeprefix("x"))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="growir", description="Grow a pretrained transformer into a larger one that computes "
                                                "the same function.")
    from importlib.metadata import version  # the installed package's (pyproject reads growir.__version__)

    parser.add_argument("--version", action="version", version=f"growir {version('growir')}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    plan = sub.add_parser("plan", parents=[common], help="show the width groups and blocks growir finds")
    plan.add_argument("src", help="Hugging Face model folder (config.json is enough)")
    plan.set_defaults(run=_run_plan)

    doctor = sub.add_parser("doctor", parents=[common], help="say in words what growir finds and what can grow "
                                                             "exactly")
    doctor.add_argument("src", help="Hugging Face model folder")
    doctor.set_defaults(run=_run_doctor)

    grow = sub.add_parser("grow", parents=[common], help="grow a model and save it to OUT")
    grow.add_argument("src", help="Hugging Face model folder")
    grow.add_argument("out", help="folder to write (must not exist unless --force)")
    grow.add_argument("--width", type=_width, default=1.0, help="width factor, at least 1 (default 1), or new sizes "
                      "by role: hidden=960,heads=15,kv_heads=5,head_dim=64,ffn=2560 (roles left out keep their size)")
    grow.add_argument("--depth", type=_growth_factor, default=1.0, help="depth factor, at least 1 (default 1)")
    grow.add_argument("--layers", type=_positive_int, help="target number of layers (instead of --depth)")
    grow.add_argument("--into", metavar="CONFIG", help="grow into this config (a model folder or a config.json of "
                      "the same class) instead of --width/--depth/--layers: every size derived from the two graphs")
    grow.add_argument("--experts", type=_experts, help="a mixture of experts: the target expert count (8) or a "
                      "multiplier (2.0); top-k grows with it (exact); in memory, not streamed")
    grow.add_argument("--keep-top-k", action="store_true", help="with --experts: keep top-k (not exact: warns)")
    grow.add_argument("--top-k", type=_positive_int, help="with --experts 8 on a dense model: the experts chosen per "
                      "token; the mixture-of-experts class is found by search (else use --into)")
    grow.add_argument("--drop", type=_fraction, default=0.0, help="with --experts: redraw this fraction of each new "
                      "expert copy's FFN neurons (Drop-Upcycling, not exact)")
    grow.add_argument("--width-method", default="auto", help="how new width is filled (default auto: per group, "
                      "fresh units and a residual fill where exact, else copies; fill (auto, a post-norm residual filled: not "
                      "exact), fresh, fpi, fpi_balanced, "
                      "fpi_random, aki)")
    grow.add_argument("--depth-method", default="auto", help="how new layers are made (default auto)")
    grow.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="dtype of the written weights (default: the source's)")
    grow.add_argument("--max-shard-size", help="largest output shard, e.g. 5GB (default: like the source, up to "
                                               "its largest shard)")
    grow.add_argument("--in-memory", action="store_true", help="load the whole model instead of streaming")
    grow.add_argument("--verify", action="store_true", help="also compare source and grown: block by block from the "
                      "shards when streaming (neither model is loaded; names the worst block), in onnxruntime "
                      "with --in-memory")
    grow.add_argument("--strict", action="store_true", help="refuse growths that cannot be exact")
    grow.add_argument("--optimizer", choices=("grown", "reset"), default="grown", help="for a Trainer checkpoint "
                      "(SRC holds trainer_state.json): optimizer.pt's AdamW moments grown with the model (default), "
                      "or reset (no state; see OUT/growir_recipe.json)")
    grow.add_argument("--force", action="store_true", help="replace OUT if it exists")
    grow.set_defaults(run=_run_grow)

    check = sub.add_parser("check", parents=[common], help="check that GROWN computes what SRC does, block by block "
                           "from the shards (neither model is loaded; exit 1: it does not)")
    check.add_argument("src", help="source model folder")
    check.add_argument("grown", help="grown model folder")
    check.add_argument("--width", type=_width, help="the grow arguments, which rebuild the index maps (default: "
                       "the spec in GROWN/growir.json)")
    check.add_argument("--depth", type=_growth_factor)
    check.add_argument("--layers", type=_positive_int)
    check.add_argument("--width-method")
    check.add_argument("--depth-method")
    check.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    check.add_argument("--onnx", action="store_true", help="instead load both models whole and compare them in "
                       "ONNX Runtime at several input shapes (for models that fit in memory twice over)")
    check.add_argument("--samples", type=_positive_int, default=4, help="with --onnx: input shapes to try (default 4)")
    check.set_defaults(run=_run_check)

    export = sub.add_parser("export", parents=[common], help="write an ONNX file with dynamic batch/sequence")
    export.add_argument("src", help="Hugging Face model folder")
    export.add_argument("out", help="ONNX file to write")
    export.add_argument("--opset", type=_positive_int, help="ONNX opset (default: torch's)")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(run=_run_export)
    return parser


class _Stages:
    """A tqdm bar on stderr that advances one named stage at a time: only on a terminal, and only once the
    command has run for 2 seconds (short work shows no bar)."""

    def __init__(self, command: str, stages: list[str]):
        from tqdm import tqdm

        self.bar = tqdm(total=len(stages), desc=f"growir {command}", unit="stage", file=sys.stderr,
                        disable=None, delay=2, leave=False, bar_format="{desc}: {n_fmt}/{total_fmt} {postfix}")

    @contextlib.contextmanager
    def stage(self, name: str):
        """Show ``name`` beside the bar while the block runs."""
        self.bar.set_postfix_str(name)
        yield
        self.bar.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def _model_folder(src: str, weights: bool = True) -> Path:
    """``src`` as a model folder: it exists and holds config.json (and weights, unless ``weights`` is False)."""
    folder = Path(src)
    if not folder.is_dir():
        raise CliError(f"{src}: no such folder (expected a Hugging Face model folder with config.json)")
    if not (folder / "config.json").is_file():
        raise CliError(f"{src}: no config.json here; expected a folder written by save_pretrained")
    if weights and not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise CliError(f"{src}: no weights (*.safetensors) next to config.json")
    return folder


def load_model(src: str):
    """The model in folder ``src``: ``config.architectures`` names the class, AutoModel otherwise; offline."""
    folder = _model_folder(src)
    import safetensors
    import transformers

    from .errors import first_sentence
    from .frontend.folder import non_finite

    try:
        with hf_quiet():  # no "Loading weights" bar or info logs: the stage bar says what runs
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            arch = (getattr(config, "architectures", None) or [None])[0]
            cls = getattr(transformers, arch, None) if arch else None
            if cls is None or not hasattr(cls, "from_pretrained"):
                cls = transformers.AutoModel
            model, info = cls.from_pretrained(folder, config=config, local_files_only=True,
                                              output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, safetensors.SafetensorError) as error:
        raise CliError(f"{src}: cannot load the model: {first_sentence(error)}") from error
    missing = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing:
        raise CliError(f"{src}: the weights do not match {type(model).__name__}: {len(missing)} tensors missing or "
                       f"misshapen (e.g. {missing[0]}); they would be initialised at random")
    bad = next(((name, n) for name, t in model.state_dict().items() if (n := non_finite(t))), None)
    if bad:  # as the streamed path refuses it (growir.frontend.folder.Checkpoint.read)
        raise CliError(f"{src}: `{bad[0]}` holds {bad[1]:,} NaN or Inf values; the checkpoint is corrupt (growir "
                       f"refuses to grow or check it)")
    return model.eval()


def _run_plan(args) -> int:
    with _Stages("plan", ["trace"]) as stages, stages.stage("trace"):
        plan = _folder_plan(args.src)
    print(plan)
    return 0


def _folder_plan(src: str):
    """The folder's plan, from config.json alone on the meta device (no weights are read). A model that cannot
    be traced there (its forward makes tensors of its own) is planned as ``grow`` plans it, on a small
    random-weight proxy: it gets ``grow``'s own refusal, or a plan."""
    from .errors import TraceError
    from .frontend.folder import load_config, meta_model
    from .stream.plan import plan_folder
    from .stream.sample import plan_sample

    folder = _model_folder(src, weights=False)
    try:
        return plan_folder(folder)
    except TraceError:
        config, cls = load_config(folder)
        return plan_sample(folder, config, cls, meta_model(config, cls))


def _run_doctor(args) -> int:
    from .doctor import diagnose

    with _Stages("doctor", ["trace"]) as stages, stages.stage("trace"):
        fp = _folder_plan(args.src)
    print(diagnose(fp.plan, f"{fp.cls.__name__} ({args.src})", fp.counts))
    return 0


def _run_grow(args) -> int:
    out = Path(args.out)
    _refuse_existing(out, args.force)  # the cheap refusal first, before torch is imported
    depth = args.depth if args.layers is None else 1.0
    experts = {k: getattr(args, k) for k in ("experts", "keep_top_k", "drop", "top_k") if getattr(args, k)}
    streamed = any(Path(args.src).glob("*.safetensors"))
    moe = bool(experts) or (args.into is not None and _upcycles(args.src, args.into))
    if streamed and not args.in_memory and not moe:
        return _stream(args, depth)  # grow_checkpoint refuses an OUT that would destroy anything
    from .stream.shards import check_output

    check_output(out, args.force, args.src)  # OUT is not SRC, not around or inside it, a model folder if it exists
    with _Stages("grow", ["load", "grow", "save"]) as stages:
        with stages.stage("load"):
            model = load_model(args.src)
        if moe:  # before the work: the user learns at once that the whole model is loaded, and what it costs
            print(_memory_note(model, args), flush=True)
        from .api import grow  # after loading: refusing a bad SRC should not wait for the core to import

        with stages.stage("grow"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            grown = grow(model, width=args.width, depth=depth, layers=args.layers,
                         width_method=args.width_method, depth_method=args.depth_method,
                         strict=args.strict, verify=args.verify and not moe, materialize="hf",  # a folder: a class
                         into=args.into, **experts)
        with stages.stage("save"):
            _write_folder(out, lambda staging: _save(grown, Path(args.src), staging, args), args)
    _print_warnings(caught)
    print(_grow_summary(args.src, out, model, grown))
    if moe:
        print(f"peak memory: {_bytes(_peak_bytes())} resident")
        if args.verify:  # the folder written, loaded back, against the source: no block map describes experts
            del grown
            print(_reload_check(model, out)[1])
    return 0


def _upcycles(src: str, into: str) -> bool:
    """Whether ``--into`` makes experts of SRC's FFNs (from the two configs): growir does that in memory."""
    from .frontend.folder import load_config, meta_model
    from .pipeline.target import upcycles

    config, cls = load_config(_model_folder(src))
    return upcycles(meta_model(config, cls), into)


def _memory_note(model, args) -> str:
    """What an in-memory mixture-of-experts growth costs: the source, a float32 copy of it where it is stored
    narrower, and the grown model built in float32 (the imports come on top)."""
    from .frontend.folder import meta_model
    from .pipeline.target import load_target, target_class

    before = sum(p.numel() for p in model.parameters())
    width = next(model.parameters()).element_size()
    after, bound = None, "about"
    if args.into is not None:
        config, cls = load_target(args.into)
        after = sum(p.numel() for p in meta_model(config, target_class(model, config, cls)).parameters())
    elif isinstance(args.experts, float):  # each parameter copied at most m times; a count says m once read
        after, bound = before * args.experts, "at most"
    narrow = width < 4  # measured and grown in float32, then cast: both copies of the grown model held at once
    need, per = before * width + (before * 4 if narrow else 0), 4 + (width if narrow else 0)
    grown = "the grown model in float32" + (" and cast back" if narrow else "")
    grown += f" ({_bytes(after * per)})" if after else ""
    total = f"{bound} {_bytes(need + after * per)}" if after else f"{_bytes(need)} plus the grown model"
    return (f"growir grow: in memory (growir streams width and depth; experts are made in memory): the source "
            f"loaded whole ({_bytes(before * width)}), a float32 copy of it where it is narrower, and {grown}: "
            f"{total} besides the imports")


def _bytes(n: float) -> str:
    """``n`` bytes for people.

    >>> _bytes(3.2e9), _bytes(4.5e7)
    ('3.20 GB', '45.0 MB')
    """
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _reload_check(source, folder: Path) -> tuple[bool, str]:
    """(preserved, a line): the model in ``folder`` loaded back and compared with ``source`` in float32 on two
    fresh input shapes (``growir.verify.compare.deviation``): for growths no block map describes (experts made
    or added)."""
    import torch
    import torch.utils._pytree as pytree

    from .frontend.inputs import hf_example_inputs
    from .verify.compare import TOLERANCE, deviation

    grown, source, worst = load_model(str(folder)).float(), source.float(), 0.0
    for batch, seq, seed in ((2, 13, 1), (1, 29, 2)):
        inputs = hf_example_inputs(source, batch, seq, seed=seed)
        with torch.no_grad():
            pairs = zip(pytree.tree_leaves(source(**inputs)), pytree.tree_leaves(grown(**inputs)))
            worst = max([worst] + [deviation(a, b) or 0.0 for a, b in pairs if a.shape == b.shape])
    verdict = "preserved" if worst <= TOLERANCE else "NOT preserved"
    return worst <= TOLERANCE, (f"reload check: {verdict}; deviation {worst:.2e} (tolerance {TOLERANCE:g}) of "
                                f"{folder} loaded back, against the source in float32 on 2 input shapes")


def _peak_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _print_warnings(caught) -> None:
    for warning in caught:
        if str(warning.message).startswith("growir"):
            message = " ".join(str(warning.message).split()).removeprefix("growir: ")
            print(f"growir grow: warning: {message}", file=sys.stderr)


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise CliError(f"{out}: already exists; pass --force to replace it")


def _save(grown, src: Path, staging: Path, args) -> None:
    from .stream.record import memory_record, write_record
    from .stream.shards import copy_side_files, source_shard_size

    shard = args.max_shard_size or source_shard_size(src) or "50GB"  # sharded like the source
    if args.dtype:  # else the source's: every growth returns the model in the dtype it was given
        import torch

        grown.to(getattr(torch, args.dtype))
    with hf_quiet():  # no "Writing model shards" bar: the stage bar says what runs
        grown.save_pretrained(staging, max_shard_size=shard)
    copy_side_files(src, staging)
    spec = {k: getattr(args, k) for k in ("width", "depth", "layers", "width_method", "depth_method", "strict",
                                          "verify", "max_shard_size", "into", "experts", "keep_top_k", "drop",
                                          "top_k")}
    write_record(staging, memory_record(src, spec, getattr(grown, "growir_record", None)))


def _write_folder(out: Path, write, args) -> None:
    from .stream.shards import write_atomically

    try:
        write_atomically(out, write, args.force, args.src)
    except FileExistsError as error:
        raise CliError(str(error)) from None


def _stream(args, depth: float) -> int:
    """``growir grow`` on a safetensors folder: disk to disk, one tensor at a time (a ``Trainer`` checkpoint: its
    optimizer, scheduler, step and RNG state too, ``growir.train.resume``)."""
    import torch

    from .stream.grow import grow_checkpoint
    from .train.resume import grow_trainer_checkpoint, is_trainer_checkpoint

    grow, extra = grow_checkpoint, {}
    if is_trainer_checkpoint(args.src):  # its optimizer, scheduler, step and RNG state too
        grow, extra = grow_trainer_checkpoint, {"optimizer": args.optimizer}
    with hf_quiet(), warnings.catch_warnings(record=True) as caught:  # growir's own bar, not HF's
        warnings.simplefilter("always", UserWarning)
        report = grow(args.src, args.out, width=args.width, depth=depth, layers=args.layers,
                      width_method=args.width_method, depth_method=args.depth_method,
                      dtype=getattr(torch, args.dtype) if args.dtype else None,
                      max_shard_size=args.max_shard_size, strict=args.strict, force=args.force,
                      verify=args.verify, into=args.into, **extra)
    _print_warnings(caught)
    print(report)
    return 0


def _grow_summary(src: str, out: Path, model, grown) -> str:
    record = getattr(grown, "growir_record", None)
    lines = [f"grew {type(model).__name__} {src} -> {out}"]
    if record is None:
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in grown.parameters())
        lines.append(f"parameters: {before:,} -> {after:,}")
        return "\n".join(lines)
    lines.append(str(record))
    report = getattr(record, "check", None)
    if report is not None:
        verdict = "preserved" if report.preserved else "NOT preserved (" + ", ".join(report.failed) + ")"
        lines.append(f"onnxruntime check: {verdict}; max abs error {report.max_abs_error:.2e} over "
                     f"{len(report.samples)} samples")
    return "\n".join(lines)


def _run_check(args) -> int:
    if args.onnx:
        return _check_onnx(args)
    from .stream.check import verify_checkpoint

    _model_folder(args.src)
    _model_folder(args.grown)
    if _made_experts(Path(args.src), Path(args.grown)):  # no block map describes the experts: the whole models
        with _Stages("check", ["load and compare"]) as stages, stages.stage("load and compare"):
            preserved, line = _reload_check(load_model(args.src), Path(args.grown))
        print(line)
        return 0 if preserved else 1
    spec = _grown_spec(args)
    with _Stages("check", ["block by block"]) as stages, stages.stage("block by block"), hf_quiet():
        report = verify_checkpoint(args.src, args.grown, **spec)
    print(report)
    return 0 if report.preserved else 1


def _made_experts(src: Path, grown: Path) -> bool:
    """Whether GROWN's growir.json says it was grown with experts made (``--into`` a config of another class)
    or added (``--experts``)."""
    import json

    try:
        spec = json.loads((grown / "growir.json").read_text()).get("spec") or {}
        arch = [json.loads((f / "config.json").read_text()).get("architectures") for f in (src, grown)]
    except (OSError, ValueError, AttributeError):
        return False  # no record (or a bad one): _grown_spec says so
    return spec.get("experts") is not None or (spec.get("into") is not None and arch[0] != arch[1])


_SPEC = ("width", "depth", "layers", "width_method", "depth_method", "method", "dtype")  # verify_checkpoint's


def _grown_spec(args) -> dict:
    """The grow arguments of GROWN: its growir.json's spec, overridden by those given on the command line."""
    import json

    import torch

    record = Path(args.grown) / "growir.json"
    spec = {}
    if record.is_file():
        try:
            saved = json.loads(record.read_text()).get("spec") or {}
        except (ValueError, AttributeError) as error:
            raise CliError(f"{record}: not a growir record ({error}); pass the grow arguments "
                           f"(--width, --depth, --layers)") from None
        spec = {k: v for k, v in saved.items() if k in _SPEC and v is not None}
    given = {k: getattr(args, k) for k in _SPEC if getattr(args, k, None) is not None}
    if not spec and not given:
        raise CliError(f"{args.grown}: no growir.json says how it was grown; pass the grow arguments (--width, "
                       f"--depth or --layers), or --onnx to compare the two models whole")
    spec.update(given)
    if isinstance(spec.get("dtype"), str):
        spec["dtype"] = getattr(torch, spec["dtype"])
    return spec


def _check_onnx(args) -> int:
    from .verify.onnx_check import check

    with _Stages("check", ["load source", "load grown", "export and run"]) as stages:
        with stages.stage("load source"):
            source = load_model(args.src)
        with stages.stage("load grown"):
            grown = load_model(args.grown)
        with stages.stage("export and run"):
            report = check(source, grown, samples=args.samples)
    print(report)
    return 0 if report.preserved else 1


def _run_export(args) -> int:
    from .verify.onnx_export import export_onnx

    out = Path(args.out)
    _refuse_existing(out, args.force)
    with _Stages("export", ["load", "export"]) as stages:
        with stages.stage("load"):
            model = load_model(args.src)
        with stages.stage("export"):
            path = export_onnx(model, out, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), dynamic batch and sequence axes")
    return 0
