"""growir's command line: plan, grow, check and export Hugging Face model folders.

    growir plan SRC
    growir doctor SRC
    growir grow SRC OUT --width 2 --depth 2 [--width-method auto] [--depth-method auto] [--layers N]
                        [--dtype bfloat16] [--max-shard-size 5GB] [--in-memory]
                        [--verify] [--strict] [--force] [--debug]
    growir check SRC GROWN
    growir export SRC OUT.onnx [--opset N] [--force]

SRC is a model folder (config.json plus safetensors weights, sharded or not), loaded offline. ``plan`` needs
only config.json. ``grow`` streams a safetensors folder tensor by tensor (``growir.grow_checkpoint``: the
model is never loaded whole); ``--in-memory`` loads it and uses ``growir.grow`` instead. ``--verify`` runs
source and grown block by block from their shards (``growir.verify.blocks``; with ``--in-memory``: both
compared in ONNX Runtime). Outputs are written atomically: into a temporary folder or file beside OUT, moved
into place at the end, so a failure leaves no OUT. Exit status: 0 on success (``check``: the function is preserved), 1 on failure (``check``: it
is not), 2 on bad usage. Errors are one line on stderr; ``--debug`` shows the traceback instead.

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
    except KeyboardInterrupt:
        print(f"growir {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
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
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _growth_factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number at least 1, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a number at least 1 (growir only grows), got {text!r}")
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
    grow.add_argument("--width", type=_growth_factor, default=1.0, help="width factor, at least 1 (default 1)")
    grow.add_argument("--depth", type=_growth_factor, default=1.0, help="depth factor, at least 1 (default 1)")
    grow.add_argument("--layers", type=_positive_int, help="target number of layers (instead of --depth)")
    grow.add_argument("--width-method", default="auto", help="how new width is filled (default auto: per group, "
                      "fresh units and a residual fill where exact, else copies; fresh, fpi, fpi_balanced, "
                      "fpi_random, aki)")
    grow.add_argument("--depth-method", default="auto", help="how new layers are made (default auto)")
    grow.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="dtype of the written weights (default: the source's)")
    grow.add_argument("--max-shard-size", default="50GB", help="largest output shard (default 50GB, as "
                                                               "save_pretrained)")
    grow.add_argument("--in-memory", action="store_true", help="load the whole model instead of streaming")
    grow.add_argument("--verify", action="store_true", help="also compare source and grown: block by block from the "
                      "shards when streaming (neither model is loaded; names the worst block), in onnxruntime "
                      "with --in-memory")
    grow.add_argument("--strict", action="store_true", help="refuse growths that cannot be exact")
    grow.add_argument("--force", action="store_true", help="replace OUT if it exists")
    grow.set_defaults(run=_run_grow)

    check = sub.add_parser("check", parents=[common], help="compare two models in onnxruntime (exit 1: differ)")
    check.add_argument("src", help="source model folder")
    check.add_argument("grown", help="grown model folder")
    check.add_argument("--samples", type=_positive_int, default=4, help="input shapes to try (default 4)")
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
        self.bar.set_postfix_str(name)
        yield
        self.bar.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def load_model(src: str):
    """The model in folder ``src``: ``config.architectures`` names the class, AutoModel otherwise; offline."""
    folder = Path(src)
    if not folder.is_dir():
        raise CliError(f"{src}: no such folder (expected a Hugging Face model folder with config.json)")
    if not (folder / "config.json").is_file():
        raise CliError(f"{src}: no config.json here; expected a folder written by save_pretrained")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise CliError(f"{src}: no weights (*.safetensors) next to config.json")
    import safetensors
    import transformers

    from .frontend.folder import first_sentence

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
    return model.eval()


def _run_plan(args) -> int:
    from .stream.plan import plan_folder

    folder = Path(args.src)
    if not (folder / "config.json").is_file():
        raise CliError(f"{args.src}: no config.json here; expected a Hugging Face model folder")
    with _Stages("plan", ["trace"]) as stages, stages.stage("trace"):
        plan = plan_folder(folder)
    print(plan)
    return 0


def _run_doctor(args) -> int:
    from .stream.plan import plan_folder
    from .doctor import diagnose

    folder = Path(args.src)
    if not (folder / "config.json").is_file():
        raise CliError(f"{args.src}: no config.json here; expected a Hugging Face model folder")
    with _Stages("doctor", ["trace"]) as stages, stages.stage("trace"):
        fp = plan_folder(folder)  # config.json alone, on the meta device: no weights are read
    print(diagnose(fp.plan, f"{fp.cls.__name__} ({args.src})", fp.counts))
    return 0


def _run_grow(args) -> int:
    out = Path(args.out)
    _refuse_existing(out, args.force)
    if out.resolve() == Path(args.src).resolve():
        raise CliError(f"{args.out}: OUT is the source folder; write the grown model somewhere else")
    depth = args.depth if args.layers is None else 1.0
    if not args.in_memory and any(Path(args.src).glob("*.safetensors")):
        return _stream(args, depth)
    with _Stages("grow", ["load", "grow", "save"]) as stages:
        with stages.stage("load"):
            model = load_model(args.src)
        from .api import grow  # after loading: refusing a bad SRC should not wait for the core to import

        with stages.stage("grow"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            grown = grow(model, width=args.width, depth=depth, layers=args.layers,
                         width_method=args.width_method, depth_method=args.depth_method,
                         strict=args.strict, verify=args.verify, materialize="hf")  # a folder holds the class
        with stages.stage("save"):
            _write_folder(out, lambda staging: _save(grown, Path(args.src), staging), args.force)
    _print_warnings(caught)
    print(_grow_summary(args.src, out, model, grown))
    return 0


def _print_warnings(caught) -> None:
    for warning in caught:
        if str(warning.message).startswith("growir"):
            message = " ".join(str(warning.message).split()).removeprefix("growir: ")
            print(f"growir grow: warning: {message}", file=sys.stderr)


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise CliError(f"{out}: already exists; pass --force to replace it")


def _save(grown, src: Path, staging: Path) -> None:
    from .stream.shards import copy_side_files

    with hf_quiet():  # no "Writing model shards" bar: the stage bar says what runs
        grown.save_pretrained(staging)
    copy_side_files(src, staging)


def _write_folder(out: Path, write, force: bool) -> None:
    from .stream.shards import write_atomically

    try:
        write_atomically(out, write, force)
    except FileExistsError as error:
        raise CliError(str(error)) from None


def _stream(args, depth: float) -> int:
    """``growir grow`` on a safetensors folder: disk to disk, one tensor at a time."""
    import torch

    from .stream.grow import grow_checkpoint

    with hf_quiet(), warnings.catch_warnings(record=True) as caught:  # growir's own bar, not HF's
        warnings.simplefilter("always", UserWarning)
        report = grow_checkpoint(args.src, args.out, width=args.width, depth=depth, layers=args.layers,
                                 width_method=args.width_method, depth_method=args.depth_method,
                                 dtype=getattr(torch, args.dtype) if args.dtype else None,
                                 max_shard_size=args.max_shard_size, strict=args.strict, force=args.force,
                                 verify=args.verify)
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
