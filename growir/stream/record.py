"""``growir.json``: the record every grown folder holds beside its weights, and its short form that each
safetensors file's metadata carries (so a shard copied away still says where it came from).

>>> import tempfile; from pathlib import Path
>>> folder = Path(tempfile.mkdtemp()); _ = (folder / "config.json").write_text("{}")
>>> len(source_digest(folder))
64
>>> sorted(shard_summary({"growir": "0.1", "source": "src", "spec": {"width": 2.0}, "exact": True}))
['growir', 'growir_exact', 'growir_source', 'growir_spec']
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECORD = "growir.json"


def source_digest(folder) -> str:
    """sha256 over the source's ``config.json``, its index and each safetensors file's header (names, dtypes,
    shapes, offsets; not the weights' bytes, which would mean reading the whole checkpoint)."""
    folder, digest = Path(folder), hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb") as f:
            head = f.read(8)
            digest.update(shard.name.encode() + head + f.read(min(int.from_bytes(head, "little"), 100_000_000)))
    return digest.hexdigest()


def growth_record(src, spec: dict, *, plan, sizes: dict, filled: dict, layers: dict, reasons: list,
                  deviation: dict, timings: dict) -> dict:
    """The record: growir's version, the source (path, digest), the spec as asked, each grown width group's
    method and each block list's depth growth, exactness (and why not), the measured deviations, timings."""
    from importlib.metadata import version  # the installed package's, as ``growir --version`` says

    from ..pipeline.record import GrowthRecord

    methods = GrowthRecord(plan, sizes, filled=dict(filled or {})).group_methods
    return {"growir": version("growir"), "source": str(Path(src).resolve()), "source_digest": source_digest(src),
            "spec": {k: _plain(v) for k, v in spec.items()}, "groups": methods,
            "blocks": {k: {"from": old, "to": new, "method": how} for k, (old, new, how) in layers.items()},
            "exact": not reasons, "reasons": list(reasons), "deviation": deviation,
            "seconds": {k: round(v, 3) for k, v in timings.items()}}


def stream_record(job, src, spec: dict, timings: dict, check) -> dict:
    """The record of a streamed growth (a ``grow.Job``): the deviation measured on the proxy, and with
    ``verify`` the block check's worst unit (or ONNX Runtime's max abs error)."""
    deviation = {"proxy": job.choice.deviation}
    if hasattr(check, "worst"):
        deviation.update(blocks=check.worst[1], worst_unit=check.worst[0])
    elif check is not None:
        deviation["onnx_max_abs_error"] = check.max_abs_error
    return growth_record(src, spec, plan=job.fp.plan, sizes=job.sizes, filled=job.filled, layers=job.layer_info,
                         reasons=job.reasons, deviation=deviation, timings=timings)


def shard_summary(record: dict) -> dict:
    """The short form for a safetensors header's ``__metadata__`` (strings only): version, source, spec and
    whether the growth is exact."""
    return {"growir": record["growir"], "growir_source": record["source"],
            "growir_spec": json.dumps(record["spec"], sort_keys=True), "growir_exact": str(record["exact"]).lower()}


def write_record(folder: Path, record: dict) -> None:
    """``growir.json`` in ``folder``."""
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")


def _plain(value):
    """A spec value as JSON holds it: dtypes and other objects by name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value).removeprefix("torch.")


def memory_record(src, spec: dict, rec) -> dict:
    """The record of an in-memory growth (``growir grow --in-memory``), from the grown model's
    ``growir_record`` (a GrowthRecord; None: only the source and the spec)."""
    if rec is None:
        return growth_record(src, spec, plan=None, sizes={}, filled={}, layers={}, reasons=[], deviation={},
                             timings={}) | {"exact": None}
    return growth_record(src, spec, plan=rec.plan, sizes=rec.sizes, filled=rec.filled, layers=rec.layers,
                         reasons=rec.reasons, deviation={"measured": rec.deviation},
                         timings={"grow": rec.seconds})
