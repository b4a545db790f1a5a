"""``growir check`` (block by block, or ``--onnx``) and ``growir export`` (one checked ONNX file)."""

from __future__ import annotations

from pathlib import Path

from ..quiet import hf_quiet
from .base import CliError, Stages, load_model, model_folder, refuse_existing, reload_check


def run_check(args) -> int:
    if args.onnx:
        return _check_onnx(args)
    from ..stream.check import verify_checkpoint

    model_folder(args.src)
    model_folder(args.grown)
    if _made_experts(Path(args.src), Path(args.grown)):  # no block map describes the experts: the whole models
        with Stages("check", ["load and compare"]) as stages, stages.stage("load and compare"):
            preserved, line = reload_check(load_model(args.src), Path(args.grown))
        print(line)
        return 0 if preserved else 1
    spec = _grown_spec(args)
    with Stages("check", ["block by block"]) as stages, stages.stage("block by block"), hf_quiet():
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
    from ..verify.onnx_check import check

    with Stages("check", ["load source", "load grown", "export and run"]) as stages:
        with stages.stage("load source"):
            source = load_model(args.src)
        with stages.stage("load grown"):
            grown = load_model(args.grown)
        with stages.stage("export and run"):
            report = check(source, grown, samples=args.samples)
    print(report)
    return 0 if report.preserved else 1


def run_export(args) -> int:
    from ..verify.onnx_export import export_onnx

    out = Path(args.out)
    refuse_existing(out, args.force)
    with Stages("export", ["load", "export"]) as stages:
        with stages.stage("load"):
            model = load_model(args.src)
        with stages.stage("export"):
            path = export_onnx(model, out, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), dynamic batch and sequence axes")
    return 0
