"""What every ``growir`` command shares: the one-line refusal, model folders, the stage bar, loading a model,
the folder's plan (``plan``, ``doctor``), and the reload check of a written folder."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ..quiet import hf_quiet


class CliError(Exception):
    """A refusal with a one-line message for the user."""


class Stages:
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


def model_folder(src: str, weights: bool = True) -> Path:
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
    folder = model_folder(src)
    import safetensors
    import transformers

    from ..errors import first_sentence
    from ..frontend.folder import non_finite

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


def run_plan(args) -> int:
    with Stages("plan", ["trace"]) as stages, stages.stage("trace"):
        plan = folder_plan(args.src)
    print(plan)
    return 0


def folder_plan(src: str):
    """The folder's plan, from config.json alone on the meta device (no weights are read). A model that cannot
    be traced there (its forward makes tensors of its own) is planned as ``grow`` plans it, on a small
    random-weight proxy: it gets ``grow``'s own refusal, or a plan."""
    from ..errors import TraceError
    from ..frontend.folder import load_config, meta_model
    from ..stream.plan import plan_folder
    from ..stream.sample import plan_sample

    folder = model_folder(src, weights=False)
    try:
        return plan_folder(folder)
    except TraceError:
        config, cls = load_config(folder)
        return plan_sample(folder, config, cls, meta_model(config, cls))


def run_doctor(args) -> int:
    from ..doctor import diagnose

    with Stages("doctor", ["trace"]) as stages, stages.stage("trace"):
        fp = folder_plan(args.src)
    print(diagnose(fp.plan, f"{fp.cls.__name__} ({args.src})", fp.counts))
    return 0


def reload_check(source, folder: Path) -> tuple[bool, str]:
    """(preserved, a line): the model in ``folder`` loaded back and compared with ``source`` in float32 on two
    fresh input shapes (``growir.verify.compare.deviation``): for growths no block map describes (experts made
    or added)."""
    import torch
    import torch.utils._pytree as pytree

    from ..frontend.inputs import hf_example_inputs
    from ..verify.compare import TOLERANCE, deviation

    grown, source, worst = load_model(str(folder)).float(), source.float(), 0.0
    for batch, seq, seed in ((2, 13, 1), (1, 29, 2)):
        inputs = hf_example_inputs(source, batch, seq, seed=seed)
        with torch.no_grad():
            pairs = zip(pytree.tree_leaves(source(**inputs)), pytree.tree_leaves(grown(**inputs)))
            worst = max([worst] + [deviation(a, b) or 0.0 for a, b in pairs if a.shape == b.shape])
    verdict = "preserved" if worst <= TOLERANCE else "NOT preserved"
    return worst <= TOLERANCE, (f"reload check: {verdict}; deviation {worst:.2e} (tolerance {TOLERANCE:g}) of "
                                f"{folder} loaded back, against the source in float32 on 2 input shapes")


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise CliError(f"{out}: already exists; pass --force to replace it")


def print_warnings(caught) -> None:
    for warning in caught:
        if str(warning.message).startswith("growir"):
            message = " ".join(str(warning.message).split()).removeprefix("growir: ")
            print(f"growir grow: warning: {message}", file=sys.stderr)


def human_bytes(n: float) -> str:
    """``n`` bytes for people.

    >>> human_bytes(3.2e9), human_bytes(4.5e7)
    ('3.20 GB', '45.0 MB')
    """
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
