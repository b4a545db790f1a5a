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

Only this package prints: the library returns reports and the command line shows them. ``main`` and the parser
live here; ``base.py`` holds what every command shares (folders, the stage bar, loading), ``grow.py`` the
``grow`` command, ``check.py`` ``check`` and ``export``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from .base import CliError, run_doctor, run_plan
from .check import run_check, run_export
from .grow import run_grow

__all__ = ["CliError", "main"]


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
    from ..errors import GrowthError

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
    plan.set_defaults(run=run_plan)

    doctor = sub.add_parser("doctor", parents=[common], help="say in words what growir finds and what can grow "
                                                             "exactly")
    doctor.add_argument("src", help="Hugging Face model folder")
    doctor.set_defaults(run=run_doctor)

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
    grow.set_defaults(run=run_grow)

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
    check.set_defaults(run=run_check)

    export = sub.add_parser("export", parents=[common], help="write an ONNX file with dynamic batch/sequence")
    export.add_argument("src", help="Hugging Face model folder")
    export.add_argument("out", help="ONNX file to write")
    export.add_argument("--opset", type=_positive_int, help="ONNX opset (default: torch's)")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(run=run_export)
    return parser
