"""Grow a Hugging Face ``Trainer`` checkpoint into one that ``Trainer.train(resume_from_checkpoint=OUT)`` resumes at
the larger size: ``grow_trainer_checkpoint`` (``growir grow CKPT OUT`` when CKPT holds ``trainer_state.json``).

A folder ``Trainer`` writes every ``save_steps`` holds the model (``config.json``, ``model.safetensors``), the
optimizer's ``state_dict`` (``optimizer.pt``), the scheduler's (``scheduler.pt``), the loop's position
(``trainer_state.json``: global step, epoch, log), the random generators (``rng_state*.pth``) and the pickled
``TrainingArguments`` (``training_args.bin``). The grown folder holds:

* the model, grown as ``growir.grow_checkpoint`` grows a model folder (streamed; ``growir.json``);
* ``optimizer.pt``: each parameter's state grown by that parameter's rule (``growir.optim.grow_param_state``:
  every copy's Adam update equals its source entry's; new units reset, as ``growir.optim.moment_rule`` says),
  under the param groups ``Trainer`` builds for the grown model, in its order;
* ``scheduler.pt``, ``trainer_state.json``, ``rng_state*.pth`` and ``scaler.pt``, copied byte for byte: the
  global step, the schedule and the data order continue;
* ``growir_recipe.json``: the learning-rate policy and optimizer treatment growir's measurements favour
  (``growir.train.recipe``).

``training_args.bin`` is not copied: it is a pickle (loading it runs code), and ``Trainer`` only writes it; on
resume the new run's ``TrainingArguments`` decide and its next save writes a new one. Every ``.pt``/``.pth`` file
is read with ``torch.load(weights_only=True)`` only (numpy's array types allowed for the RNG state, as
``Trainer`` does); one that needs more is refused, naming it, before anything is written.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError, first_sentence
from ..frontend.folder import CheckpointError, load_config, meta_model, tied_names
from ..optim import STATE_RULES, grow_param_state

TRAINER_STATE, SAVED_OPTIMIZER, SCHEDULER, SCALER = "trainer_state.json", "optimizer.pt", "scheduler.pt", "scaler.pt"
TRAINING_ARGS, RECIPE = "training_args.bin", "growir_recipe.json"
RNG_STATE = re.compile(r"rng_state(_\d+)?\.pth")
TREATMENTS = ("grown", "reset")
NEW_UNITS = ("reset: fresh units have no history (first moment 0, second the mean of the old entries); the "
             "zeroed writers of new identity blocks restart at step 0; copies take their source's state, "
             "scaled like their gradient (growir.optim.moment_rule)")


def is_trainer_checkpoint(folder) -> bool:
    """Whether ``folder`` is a ``Trainer`` checkpoint (a model folder beside ``trainer_state.json``)."""
    return (Path(folder) / TRAINER_STATE).is_file()


@dataclass
class ResumeReport:
    """What ``grow_trainer_checkpoint`` wrote: the model's ``StreamReport``, the optimizer treatment, the files
    carried over and those left out (with why), and the recipe; ``print(report)`` shows it."""
    model: object  # growir.stream.grow.StreamReport
    treatment: str  # what optimizer.pt holds: "grown", "reset", or "absent" (the source had none)
    global_step: int
    copied: list = field(default_factory=list)
    left_out: dict = field(default_factory=dict)  # file name -> why it was not carried over
    recipe: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [str(self.model), f"trainer checkpoint at global step {self.global_step}: optimizer.pt "
                 f"{self.treatment}; copied {', '.join(self.copied)}; {RECIPE} written"]
        lines += [f"not copied: {name} ({why})" for name, why in self.left_out.items()]
        return "\n".join(lines)


def grow_trainer_checkpoint(src, out, width=1.0, depth=1.0, *, optimizer: str = "grown", force: bool = False,
                            **spec) -> ResumeReport:
    """Grow the ``Trainer`` checkpoint ``src`` into ``out``, which ``Trainer.train(resume_from_checkpoint=out)``
    resumes with the grown model. ``width``, ``depth`` and ``spec``: as ``growir.grow_checkpoint``;
    ``optimizer``: "grown" (AdamW's moments grown with the model) or "reset" (no state: AdamW restarts).
    Everything is checked and read before anything is written; ``out`` appears whole or not at all.

    >>> import growir.train.resume as r
    >>> r.is_trainer_checkpoint("no-such-folder")
    False
    """
    from ..stream.grow import grow_checkpoint
    from ..stream.shards import write_atomically
    from .recipe import recipe

    if optimizer not in TREATMENTS:
        raise SpecError(f"optimizer={optimizer!r}: use one of {', '.join(TREATMENTS)}")
    src, out = Path(src), Path(out)
    files = read_trainer_files(src)
    treatment = optimizer if files.optimizer is not None else "absent"
    if treatment == "grown":  # refuse an optimizer growir cannot map before anything is written
        match_groups(files.optimizer, _meta(src))
        state_table(files.optimizer)
    done = {}

    def write(staging: Path) -> None:
        model = grow_checkpoint(src, staging / "model", width, depth, **spec)
        for path in (staging / "model").iterdir():
            os.replace(path, staging / path.name)
        (staging / "model").rmdir()
        if files.optimizer is not None:
            grown = grow_optimizer(files.optimizer, _meta(src), _meta(staging), model.rules, optimizer)
            torch.save(grown, staging / SAVED_OPTIMIZER)
        for name in files.copied:
            shutil.copy2(src / name, staging / name)
        done["recipe"] = recipe(files.state, files.scheduler, treatment, model.exact)
        (staging / RECIPE).write_text(json.dumps(done["recipe"], indent=2) + "\n")
        _record_trainer(staging, files, treatment)
        model.out = str(out)
        done["model"] = model
    write_atomically(out, write, force, src)
    return ResumeReport(done["model"], treatment, files.state.get("global_step"), files.copied, files.left_out,
                        done["recipe"])


def _record_trainer(folder: Path, files, treatment: str) -> None:
    """The Trainer part of ``growir.json``: the step, what ``optimizer.pt`` holds, what was carried and left."""
    from ..stream.record import RECORD, write_record

    record = json.loads((folder / RECORD).read_text())
    record["trainer"] = {"global_step": files.state.get("global_step"), "optimizer": treatment,
                         "new_units": NEW_UNITS if treatment == "grown" else None,
                         "copied": files.copied, "left_out": files.left_out, "recipe": RECIPE}
    write_record(folder, record)


@dataclass
class TrainerFiles:
    """A ``Trainer`` checkpoint's files beside the model, read safely: the state, the optimizer's and
    scheduler's state dicts, the files to copy as they are and the files left out (with why)."""
    state: dict
    optimizer: dict | None
    scheduler: dict | None
    copied: list
    left_out: dict


def read_trainer_files(folder) -> TrainerFiles:
    """Read and check every file of the checkpoint ``folder`` that is not the model's; refuse what cannot be
    read safely, naming the file."""
    folder = Path(folder)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder / TRAINER_STATE}: not a Trainer state ({first_sentence(error)})") from None
    opt = safe_load(folder / SAVED_OPTIMIZER) if (folder / SAVED_OPTIMIZER).is_file() else None
    if opt is not None and not (isinstance(opt, dict) and {"state", "param_groups"} <= set(opt)):
        raise CheckpointError(f"{folder / SAVED_OPTIMIZER}: not an optimizer state_dict (it lacks 'state' and "
                              f"'param_groups')")
    copied, left_out, scheduler = [TRAINER_STATE], {}, None
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in (SCHEDULER, SCALER) or RNG_STATE.fullmatch(name):
            loaded = safe_load(path)
            scheduler = loaded if name == SCHEDULER else scheduler
            copied.append(name)
        elif name == TRAINING_ARGS:
            left_out[name] = ("a pickle, never loaded: Trainer does not read it on resume, the resumed run's "
                              "TrainingArguments decide")
        elif name.endswith((".pt", ".pth", ".bin")) and name != SAVED_OPTIMIZER or path.is_dir():
            left_out[name] = "growir does not know how to grow or carry it"
    return TrainerFiles(state, opt, scheduler, copied, left_out)


def safe_load(path: Path):
    """``torch.load(path, weights_only=True)`` with numpy's array types allowed (``Trainer``'s RNG state holds
    numpy's generator); a file that needs anything else is refused, naming it and what it asked for."""
    try:
        with torch.serialization.safe_globals(_numpy_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError, ImportError) as error:
        asked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        why = f"it asks for `{asked.group(1)}`" if asked else first_sentence(error)
        raise CheckpointError(f"{path}: refused: growir reads it with torch.load(weights_only=True) only and {why}; "
                              f"save it as a plain state_dict of tensors, or remove it from the folder") from None


def _numpy_types() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _meta(folder: Path):
    config, cls = load_config(folder)
    return meta_model(config, cls)


def grow_optimizer(saved: dict, source, grown, rules: dict, treatment: str = "grown") -> dict:
    """The grown model's optimizer ``state_dict`` from the source's ``saved`` one. ``source``/``grown``: the two
    models (meta device is enough); ``rules``: target name -> TensorRule. Entries are numbered as ``Trainer``
    numbers its param groups (``trainer_groups``), each group's hyperparameters kept."""
    split, names = match_groups(saved, source)
    by_name = {names[int(i)]: s for i, s in saved["state"].items()}
    shapes = {n: tuple(p.shape) for n, p in source.named_parameters()}
    source_ties = tied_names(source)
    alias = {n: next((a for a in source_ties.get(n, [n]) if a in shapes), n) for n in source_ties}  # tied: one name
    table = state_table(saved)
    groups = split(grown)
    state, index, params = {}, 0, dict(grown.named_parameters())
    ties = tied_names(grown)
    for group in groups:
        for name in group:
            rule = next((rules[n] for n in ties.get(name, [name]) if n in rules), None)
            if rule is None:
                raise SpecError(f"grown parameter `{name}` has no growth rule; its optimizer state cannot be grown")
            old = alias.get(rule.source, rule.source)
            if treatment == "grown" and by_name.get(old):
                donor = by_name.get(alias.get(rule.donor, rule.donor)) if rule.donor else None
                state[index] = grow_param_state(rule, by_name[old], table, shapes[old], name, torch.device("cpu"),
                                                donor)
                _check_shapes(state[index], params[name], name)
            index += 1
    param_groups, start = [], 0
    for old_group, group in zip(saved["param_groups"], groups):
        param_groups.append({**{k: v for k, v in old_group.items() if k != "params"},
                             "params": list(range(start, start + len(group)))})
        start += len(group)
    return {"state": state, "param_groups": param_groups}


def trainer_groups(model) -> list:
    """Parameter names in ``Trainer``'s two param groups (weight decay, then none), in its order."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n in named if n in decay], [n for n in named if n not in decay]]


def one_group(model) -> list:
    """Every trainable parameter name in one group (an optimizer built over ``model.parameters()``)."""
    return [[n for n, p in model.named_parameters() if p.requires_grad]]


def match_groups(saved: dict, model) -> tuple:
    """(the split of parameters into groups that ``saved`` was made with, names by saved index): ``Trainer``'s,
    or one group; the one whose group sizes and state shapes match, else a refusal."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    for split in (trainer_groups, one_group):
        groups = split(model)
        if [len(g) for g in groups] != sizes:
            continue
        names = {i: n for g_saved, g in zip(saved["param_groups"], groups) for i, n in zip(g_saved["params"], g)}
        if all(tuple(v.shape) in ((), shapes[names[int(i)]]) for i, s in saved["state"].items()
               for v in s.values() if isinstance(v, torch.Tensor)):
            return split, names
    raise CheckpointError(f"optimizer.pt's param groups hold {sizes} tensors, which match neither Trainer's "
                          f"weight-decay split of {type(model).__name__} ({[len(g) for g in trainer_groups(model)]}) "
                          f"nor one group of all its parameters; growir cannot tell which parameter each entry is")


def state_table(saved: dict) -> dict:
    """The ``growir.optim.STATE_RULES`` entry whose keys cover every state key in ``saved``; refuse others."""
    keys = {k for s in saved["state"].values() for k in s}
    for table in STATE_RULES.values():
        if keys <= set(table):
            return table
    raise SpecError(f"optimizer.pt holds state {sorted(keys)}, which no optimizer growir knows keeps (it grows "
                    f"Adam, AdamW and SGD state); grow with optimizer='reset' to restart the optimizer")


def _check_shapes(state: dict, param: torch.Tensor, name: str) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != tuple(param.shape):
            raise SpecError(f"grown optimizer state {key!r} of `{name}` is {tuple(value.shape)}, its parameter "
                            f"{tuple(param.shape)}: this is a growir bug, please report it")
