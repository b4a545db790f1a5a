"""Grow a safetensors model folder disk to disk, one tensor at a time: ``grow_checkpoint``.

plan (``config.json`` on the meta device, deep models on a two-block proxy) -> rules -> for each target
tensor: read its source (and AKI donor) lazily, apply the rule in float32, cast to the source dtype (or
``dtype``), write it into its shard. Shard headers are known before any weight is read (the rules give
every target shape), so each tensor goes to disk as soon as it is made (by a second thread, past the page
cache: ``writer``): peak memory is about the imports plus three times the largest target tensor in float32.
The output, with ``growir.json`` (``record``), appears atomically at the end, replacing only a model folder
(``shards.write_atomically``).

>>> import tempfile, torch, growir
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/grown"
>>> LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).to(torch.bfloat16).save_pretrained(src)
>>> report = growir.grow_checkpoint(src, out, width=2.0)
>>> LlamaForCausalLM.from_pretrained(out).config.hidden_size
64
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..frontend.folder import Checkpoint, CheckpointError, check_shapes, load_config, meta_model
from ..errors import MaterializeError, NotExactError, SpecError, warn
from ..ir.tensor_rule import rounding_reason, rounds
from ..quiet import hf_quiet
from .record import shard_summary, stream_record, write_record
from .shards import check_output, clean_stale, copy_side_files, parse_size, shard_layout, source_shard_size
from .shards import write_atomically
from .writer import release_heap, reused_heap, write_shards
from ..frontend.folder import named_tensors, state_names, tied_names


@dataclass
class StreamReport:
    """What ``grow_checkpoint`` wrote; ``print(report)`` shows it like a growth record."""
    src: str
    out: str
    params_before: int
    params_after: int
    bytes_written: int
    shards: int
    seconds: float
    config_changes: dict
    layers: dict  # block prefix -> (old count, new count, method)
    reasons: list = field(default_factory=list)  # why the growth is not exact (empty: exact)
    deviation: float | None = None  # measured on the random-weight proxy (same widths, two blocks)
    check: object = None  # with verify: a BlockCheck (block by block) or, with verify="onnx", a CheckReport
    prepare_seconds: float = 0.0  # planning, config choice and rules, before any weight is read
    plan: object = field(default=None, repr=False)
    sizes: dict = field(default_factory=dict, repr=False)  # group id -> new size
    notes: list = field(default_factory=list)  # what the caller should know beyond exactness (into's kept fields)
    rules: dict = field(default_factory=dict, repr=False)  # target name -> TensorRule (grows optimizer state)

    @property
    def exact(self) -> bool:
        """Whether the streamed growth preserves the function (no reason says otherwise)."""
        return not self.reasons

    def __str__(self) -> str:
        from ..report import record_table

        lines = [f"grew {self.src} -> {self.out}: {self.bytes_written / 2**20:,.1f} MiB in {self.shards} "
                 f"shard(s), {self.seconds:.1f} s", record_table(self) + " (on a two-block proxy)"]
        if hasattr(self.check, "deviations"):  # block by block: the table of units
            lines.append(str(self.check))
        elif self.check is not None:
            lines.append(f"onnxruntime check: {'preserved' if self.check.preserved else 'NOT preserved'}; "
                         f"max abs error {self.check.max_abs_error:.2e} over {len(self.check.samples)} samples")
        return "\n".join(lines)


def grow_checkpoint(src_dir, out_dir, width=1.0, depth=1.0, *, layers=None, width_method="auto",
                    depth_method="auto", method=None, dtype=None, max_shard_size=None, strict=False,
                    force=False, verify=False, progress=None, into=None) -> StreamReport:
    """Grow the safetensors folder ``src_dir`` into ``out_dir`` without loading the model.

    Arguments as ``growir.grow`` (``into`` too: a target config, refused before a tensor is written);
    ``dtype`` (e.g. ``torch.float32``) overrides the source's floating dtype,
    ``max_shard_size`` (bytes or "5GB") splits the output like ``save_pretrained`` (default: like the source,
    shards up to its largest; one file for a one-file source). ``out_dir`` may not be, hold or lie inside
    ``src_dir``; an existing one is replaced (``force``) only if it is a model folder, once the new one is
    complete. The output holds ``growir.json``: version, source and its digest, spec, per-group methods,
    exactness, deviations, timings. ``progress``: a bar over
    the bytes written on stderr (None: only on a terminal, after two seconds). ``verify``: run source and grown
    block by block in float32, each module's tensors read from the shards (neither model is loaded; the
    report's ``check`` names the worst block and raises ``PreservationError`` naming the first block that
    departs, for a growth that claims to be exact); ``verify="onnx"``: both models loaded and compared in ONNX
    Runtime instead (for models that fit in memory). Returns a ``StreamReport``.

    >>> import tempfile, growir
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> src = tempfile.mkdtemp()
    >>> GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)).save_pretrained(src)
    >>> growir.grow_checkpoint(src, tempfile.mkdtemp() + "/big", width=2.0, depth=2.0).params_after > 0
    True
    """
    start = time.perf_counter()
    src, out = Path(src_dir), Path(out_dir)
    clean_stale(out)  # a killed run's leftovers, before the work: a refusal should not wait for the growth
    check_output(out, force, src)
    if verify not in (False, None, True, "blocks", "onnx"):
        raise SpecError(f"verify={verify!r}: use True (block by block), 'blocks' or 'onnx'")
    width_method, depth_method = methods(method, width_method, depth_method)
    if into is not None:  # every size derived from the two configs' graphs (pipeline/target.py)
        from ..pipeline.target import derive_folder
        into = derive_folder(src, into, width, depth, layers)
        width, layers = into.width, into.layers
    job = prepare(src, width, depth, layers, width_method, depth_method, dtype, strict)
    notes = into.settle_config(job.choice.config) if into is not None else []
    release_heap()
    prepared = time.perf_counter() - start
    max_bytes = parse_size(max_shard_size) if max_shard_size is not None else source_shard_size(src) or 50 * 10**9
    layout = shard_layout(job.items, max_bytes)
    spec = dict(width=width, depth=depth, layers=layers, width_method=width_method, depth_method=depth_method,
                method=method, dtype=dtype, max_shard_size=max_bytes, strict=strict, verify=verify)
    checked, timings = [], {"prepare": prepared}
    job.metadata = shard_summary(stream_record(job, src, spec, timings, None))

    def write(staging: Path) -> None:
        began = time.perf_counter()
        write_folder(job, layout, staging, dtype, progress)
        timings["write"] = time.perf_counter() - began
        if verify:  # before the rename: a failed check leaves no OUT
            checked.append(_verify(src, staging, job, verify))
            timings["verify"] = time.perf_counter() - began - timings["write"]
        timings["total"] = time.perf_counter() - start
        write_record(staging, stream_record(job, src, spec, timings, checked[0] if checked else None))
    write_atomically(out, write, force, src)
    if job.reasons:
        warn(f"growir: the grown model is not function-preserving (measured deviation "
             f"{job.choice.deviation:.3g} on a float32 two-block proxy): " + "; ".join(job.reasons))
    return StreamReport(str(src), str(out), _params(job.fp.model), _params(job.target),
                        sum(it.nbytes for it in job.items.values()), len(layout.files), time.perf_counter() - start,
                        job.choice.changes, job.layer_info, job.reasons, job.choice.deviation,
                        checked[0] if checked else None, prepared, plan=job.fp.plan, sizes=job.sizes,
                        notes=notes, rules=job.rules)


def methods(method, width_method: str, depth_method: str) -> tuple:
    """(width method, depth method) of a streamed growth: a preset's, else the ones given ("auto" decides per
    group from the plan and the stored dtype, as in memory); an unknown name is a SpecError, as in ``grow``."""
    from ..pipeline.spec import options

    opts = options(method, width_method, depth_method, 0.0, 0)[1]
    return opts.width_method, opts.depth_method


@dataclass
class Job:
    """A streamed growth, prepared before any weight is read: the folder plan, the chosen config, the meta-device
    target, the rules and one Item per target tensor."""
    fp: object
    choice: object
    target: torch.nn.Module  # the grown model, on the meta device
    sizes: dict
    rules: dict
    items: dict  # target name -> Item
    ck: Checkpoint
    layer_info: dict
    reasons: list
    maps: dict = field(default_factory=dict)  # group -> GroupMap (the width index maps)
    schedules: list = field(default_factory=list)  # the depth schedules
    scales: dict = field(default_factory=dict)  # group root -> c, for residual streams grown rescaled
    filled: dict = field(default_factory=dict)  # group label -> fill kind, where repeat-and-fill was used
    metadata: dict = field(default_factory=dict)  # str -> str, into each shard's header (``record``)


def prepare(src: Path, width, depth, layers, width_method, depth_method, dtype, strict) -> Job:
    """Plan, config, rules and every target tensor's shape, without a weight: the proxy is exported once
    (``proxy.plan_sample``), the SPEC and RULES passes run on its plan for the full model (block rules
    replicated by index), and its own growth picks the config (``proxy.choose_config``)."""
    from ..pipeline.rules import RULES
    from ..pipeline.context import Context, Options
    from ..pipeline.manager import run_passes
    from .sample import choose_config, plan_sample, with_layouts
    from ..pipeline.stages import SPEC

    config, cls = load_config(src)
    full = meta_model(config, cls)
    ck = Checkpoint(src, state_names(full), full)  # full: the keys transformers' loader converts
    opts = Options(width_method, depth_method, low_precision=_stores_low_precision(ck, dtype))
    # a random draw per group depends on how many groups there are: fpi_random plans the full model
    fp = plan_sample(src, config, cls, full, exact_blocks=width_method != "fpi_random")
    ctx = run_passes(SPEC, Context(opts, width=width, depth=depth, layers=layers, plan=fp.plan, counts=fp.counts,
                                   strict=strict))  # strict keeps a post-norm residual's exact copies
    choice = choose_config(fp, ctx.sizes, ctx.depth_plan, width, opts, strict)
    target = meta_model(choice.config, cls)
    ctx.sizes.update(choice.sizes if fp.planned_sample else _config_sizes(fp.plan, target))
    ctx.opts = dataclasses.replace(opts, keep_eps=choice.keep_eps)
    ctx.depth_plan = with_layouts(ctx.depth_plan, choice.layouts)  # the layout the proxy's config states
    run_passes(RULES, ctx)
    if choice.reload:  # the folder is all the caller gets: what its class computes once loaded is the growth
        ctx.reasons.append(f"the written folder is loaded by {cls.__name__}, and on the proxy {choice.reload}")
    if strict and ctx.reasons:
        raise NotExactError("strict=True and this growth cannot be exact: " + "; ".join(ctx.reasons))
    items = _targets(fp, ctx.rules, ck, dtype)
    _check_target(target, items)
    return Job(fp, choice, target, ctx.sizes, ctx.rules, items, ck, ctx.layer_info, ctx.reasons, ctx.maps,
                ctx.schedules, ctx.stream_scales, ctx.filled or {})


def write_folder(job: Job, layout, staging: Path, dtype, progress) -> None:
    """Write the grown shards, index, config and the source's side files (tokenizer) into ``staging``; a
    rounding that the stored dtype makes joins ``job.reasons``."""
    bar = _bar(sum(it.nbytes for it in job.items.values()), progress)
    rounded = []
    try:
        with reused_heap():
            write_shards(staging, {f: [job.items[n] for n in names] for f, names in layout.files.items()},
                         lambda it: make_tensor(it, job.rules, job.ck, rounded), bar.update, job.metadata)
    finally:
        bar.close()
    if rounded:
        job.reasons.append(rounding_reason(rounded, job.items) + " (streamed: that rounding is not "
                           "measured here; --verify measures it, --dtype float32 avoids it)")
    layout.write_index(staging)
    cfg = job.choice.config
    cfg.dtype = dtype or _main_dtype(job.items)
    cfg.save_pretrained(staging)
    copy_side_files(job.ck.folder, staging)


@dataclass
class Item:
    """One target tensor: its name, shape and dtype, and where its values come from."""
    name: str
    rule_name: str
    source: str
    donor: str | None
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """The tensor's size once written, in bytes."""
        return _numel(self.shape) * self.dtype.itemsize


def _config_sizes(p, target) -> dict:
    """Output-only groups (a pooler) take the size the rebuilt config gives them, as in ``grow``."""
    from ..materialize.hf import output_only_groups, sizes_given
    return sizes_given(output_only_groups(p), dict(_shapes(target)))


def _targets(fp, rules: dict, ck: Checkpoint, dtype) -> dict:
    """The tensors to write: each rule's output under the names the checkpoint stores it by (a tied head
    absent from the checkpoint is not written; a non-persistent buffer the model recomputes is skipped)."""
    ties, buffers, items = tied_names(fp.model), {n for n, _ in fp.model.named_buffers()}, {}
    known = set(ties)
    for name, rule in rules.items():
        stored = lambda n: next((m for m in ties.get(n, [n]) if ck.has(m)), None)
        source = stored(rule.source)
        if source is None:
            if rule.source in buffers:
                continue  # not saved: the model makes it from its config
            raise CheckpointError(f"{ck.folder}: `{rule.source}` is not in the checkpoint (nor under a tied or "
                                  f"prefixed name); the weights do not match {fp.cls.__name__}")
        donor = rule.donor and stored(rule.donor)
        old = ck.meta(source)
        shape = rule.new_shape(old.shape)
        out_dtype = dtype if dtype is not None and old.is_floating_point() else old.dtype
        names = [name] if name not in known else [m for m in ties[name] if ck.has(m)]
        for n in names:
            items[n] = Item(n, name, source, donor, shape, out_dtype)
    return items


def make_tensor(it: Item, rules: dict, ck: Checkpoint, rounded: list) -> torch.Tensor:
    """The target tensor. The rule runs on the stored tensor: a rule that only gathers in its dtype (copies are
    exact), one that computes in float32, cast once (a large bf16 tensor a slice at a time, see
    ``TensorRule.apply_checked``); a cast that changes a value (a bf16 weight divided by 3) is recorded in
    ``rounded``. With ``dtype`` given, a wider one is computed from the upcast source (nothing rounds), a
    narrower one is the float32 result cast once."""
    rule = rules[it.rule_name]
    old = ck.read(it.source)  # the stored tensor: read once, dropped as soon as the rule has run
    if not rule.arithmetic and not it.donor:
        return rule.apply(old).to(it.dtype)
    donor = ck.read(it.donor) if it.donor else None
    if old.dtype != it.dtype and old.is_floating_point() and it.dtype.itemsize > old.dtype.itemsize:
        old, donor = old.to(it.dtype), donor if donor is None else donor.to(it.dtype)
    if old.dtype == it.dtype or not old.is_floating_point():
        new, lossy = rule.apply_checked(old, donor)
        new = new.to(it.dtype)
    else:  # a narrower dtype asked: the float32 result, rounded once into it
        wide = rule.apply(old.float(), donor if donor is None else donor.float(), it.dtype)
        del old, donor
        new = wide.to(it.dtype)
        lossy = rounds(new, wide)
    if lossy:
        rounded.append(it.name)
    return new


def _check_target(target, items: dict) -> None:
    """The rebuilt class, on meta, holds exactly the tensors written with their shapes (tied and
    non-persistent ones aside)."""
    shapes = dict(_shapes(target))
    check_shapes({n: it.shape for n, it in items.items()}, shapes, "the rebuilt config")
    extra = sorted(set(items) - set(shapes))
    if extra:
        raise MaterializeError(f"the rebuilt {type(target).__name__} has no tensor `{extra[0]}` that growir grew; "
                               f"nothing was written")
    ties = tied_names(target)
    persistent = set(target.state_dict())
    missing = sorted(n for n in persistent if not any(m in items for m in ties.get(n, [n])))
    if missing:
        raise MaterializeError(f"the rebuilt {type(target).__name__} needs `{missing[0]}`, which growir did not "
                               f"produce; nothing was written")


def _shapes(model):
    return [(n, tuple(t.shape)) for n, t in named_tensors(model)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _params(model) -> int:
    return sum(t.numel() for t in model.parameters())


def _stores_low_precision(ck: Checkpoint, dtype) -> bool:
    """Whether the grown weights are written below float32 precision: ``dtype``, else the checkpoint's own."""
    dtypes = [dtype] if dtype is not None else ck.dtypes()
    return any(d.is_floating_point and torch.finfo(d).eps > torch.finfo(torch.float32).eps for d in dtypes)


def _main_dtype(items: dict) -> torch.dtype:
    sizes = {}
    for it in items.values():
        if it.dtype.is_floating_point:
            sizes[it.dtype] = sizes.get(it.dtype, 0) + it.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _bar(total: int, progress):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="growir grow", file=sys.stderr,
                disable=None if progress is None else not progress, delay=0 if progress else 2, leave=False)


def _verify(src: Path, grown_dir: Path, job: Job, how):
    """``how`` True or "blocks": block by block, each module's tensors read from the shards (neither model is
    loaded, see ``growir.verify.blocks``); "onnx": both models loaded in float32 and compared in ONNX Runtime
    (for models that fit in memory; refused when they would not)."""
    from ..errors import PreservationError
    from ..verify.blocks import check_blocks
    from ..verify.compare import TOLERANCE

    if how == "onnx":
        return _verify_onnx(src, grown_dir, job)
    result = check_blocks(src, grown_dir, job.fp, job.choice.config, (job.maps, job.scales), job.schedules,
                          not job.reasons, job.rules)
    if (result.exact or not result.finite) and not result.preserved:  # a NaN is never rounding
        raise PreservationError(f"the streamed model does not preserve the function; it departs from the source at "
                                f"`{result.first_failing}` (deviation {result.deviations[result.first_failing]:.3g}, "
                                f"float32, relative; tolerance {TOLERANCE:g}); nothing was written:\n{result}")
    return result


def _verify_onnx(src: Path, grown_dir: Path, job: Job):
    """Both models loaded in float32 and compared in ONNX Runtime; refused when they would not fit in memory."""
    from ..errors import GrowthError, PreservationError
    from ..verify.onnx_check import check

    need = 4 * (_params(job.fp.model) + _params(job.target)) * 3  # float32 twins, plus the export's copies
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > have:
        raise GrowthError(f"verify='onnx' loads both models in float32 (about {need / 2**30:.1f} GiB with the "
                          f"export) but {have / 2**30:.1f} GiB are free; use verify=True (block by block)")
    with hf_quiet():
        source = job.fp.cls.from_pretrained(src, dtype=torch.float32).eval()
        grown = job.fp.cls.from_pretrained(grown_dir, dtype=torch.float32).eval()
    result = check(source, grown)
    if not job.reasons and not result.preserved:
        raise PreservationError(f"ONNX Runtime says the streamed model does not preserve the function:\n{result}")
    return result
