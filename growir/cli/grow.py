"""``growir grow``: streamed disk to disk (``growir.grow_checkpoint``), or in memory (``--in-memory``, and the
growths that make experts), always written atomically beside OUT."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ..quiet import hf_quiet
from .base import CliError, Stages, human_bytes, load_model, model_folder, print_warnings, refuse_existing, \
    reload_check


def run_grow(args) -> int:
    out = Path(args.out)
    refuse_existing(out, args.force)  # the cheap refusal first, before torch is imported
    depth = args.depth if args.layers is None else 1.0
    experts = {k: getattr(args, k) for k in ("experts", "keep_top_k", "drop", "top_k") if getattr(args, k)}
    streamed = any(Path(args.src).glob("*.safetensors"))
    moe = bool(experts) or (args.into is not None and _upcycles(args.src, args.into))
    if streamed and not args.in_memory and not moe:
        return _stream(args, depth)  # grow_checkpoint refuses an OUT that would destroy anything
    from ..stream.shards import check_output

    check_output(out, args.force, args.src)  # OUT is not SRC, not around or inside it, a model folder if it exists
    with Stages("grow", ["load", "grow", "save"]) as stages:
        with stages.stage("load"):
            model = load_model(args.src)
        if moe:  # before the work: the user learns at once that the whole model is loaded, and what it costs
            print(_memory_note(model, args), flush=True)
        from ..api import grow  # after loading: refusing a bad SRC should not wait for the core to import

        with stages.stage("grow"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            grown = grow(model, width=args.width, depth=depth, layers=args.layers,
                         width_method=args.width_method, depth_method=args.depth_method,
                         strict=args.strict, verify=args.verify and not moe, materialize="hf",  # a folder: a class
                         into=args.into, **experts)
        with stages.stage("save"):
            _write_folder(out, lambda staging: _save(grown, Path(args.src), staging, args), args)
    print_warnings(caught)
    print(_grow_summary(args.src, out, model, grown))
    if moe:
        print(f"peak memory: {human_bytes(_peak_bytes())} resident")
        if args.verify:  # the folder written, loaded back, against the source: no block map describes experts
            del grown
            print(reload_check(model, out)[1])
    return 0


def _upcycles(src: str, into: str) -> bool:
    """Whether ``--into`` makes experts of SRC's FFNs (from the two configs): growir does that in memory."""
    from ..frontend.folder import load_config, meta_model
    from ..pipeline.target import upcycles

    config, cls = load_config(model_folder(src))
    return upcycles(meta_model(config, cls), into)


def _memory_note(model, args) -> str:
    """What an in-memory mixture-of-experts growth costs: the source, a float32 copy of it where it is stored
    narrower, and the grown model built in float32 (the imports come on top)."""
    from ..frontend.folder import meta_model
    from ..pipeline.target import load_target, target_class

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
    grown += f" ({human_bytes(after * per)})" if after else ""
    total = f"{bound} {human_bytes(need + after * per)}" if after else f"{human_bytes(need)} plus the grown model"
    return (f"growir grow: in memory (growir streams width and depth; experts are made in memory): the source "
            f"loaded whole ({human_bytes(before * width)}), a float32 copy of it where it is narrower, and {grown}: "
            f"{total} besides the imports")


def _peak_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _save(grown, src: Path, staging: Path, args) -> None:
    from ..stream.record import memory_record, write_record
    from ..stream.shards import copy_side_files, source_shard_size

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
    from ..stream.shards import write_atomically

    try:
        write_atomically(out, write, args.force, args.src)
    except FileExistsError as error:
        raise CliError(str(error)) from None


def _stream(args, depth: float) -> int:
    """``growir grow`` on a safetensors folder: disk to disk, one tensor at a time (a ``Trainer`` checkpoint: its
    optimizer, scheduler, step and RNG state too, ``growir.train.resume``)."""
    import torch

    from ..stream.grow import grow_checkpoint
    from ..train.resume import grow_trainer_checkpoint, is_trainer_checkpoint

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
    print_warnings(caught)
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
