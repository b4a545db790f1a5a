"""The grown tensors loaded into the model's own class rebuilt from a config: the rebuilt shapes checked against
the grown tensors first (``shapes_fit``, ``config_shapes``), then the class built with its parameters on the meta
device and the tensors assigned, ties and the buffers the class makes itself kept (``load_hf``). The config is
chosen by the search (``config.py``) and the candidates' run (``hf.py``).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import MaterializeError
from ..frontend.folder import parameters_on_meta
from .unread import any_size, init_own


def shapes_fit(shapes, expected, required=frozenset()) -> bool:
    """Every tensor of the rebuilt model exists among the grown ones with the same shape (None: any size),
    and every required grown tensor exists in the rebuilt model. Grown tensors it may lack are
    non-persistent buffers it recomputes itself."""
    if shapes is None or set(shapes) - set(expected) or set(required) - set(shapes):
        return False
    return all(len(s) == len(expected[k]) and all(e is None or e == x for e, x in zip(expected[k], s))
               for k, s in shapes.items())


def config_shapes(model, cfg_dict: dict):
    """name -> shape of every tensor of ``model``'s class built (on the meta device) from ``cfg_dict``, or None
    where that config does not build."""
    cfg = config_of(model, cfg_dict)
    if cfg is None:
        return None
    try:
        with torch.device("meta"), _no_init():
            m = type(model)(cfg)
    except Exception:  # noqa: BLE001 - an inconsistent config is simply not a candidate
        return None
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _no_init():
    """transformers' switch that skips weight initialisation: shapes only are read, and the search builds a
    model per candidate (half the time of building each one with its init on the meta device)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def config_of(model, cfg_dict: dict):
    """``model``'s config class built from ``cfg_dict``, or None where it does not build."""
    try:
        return type(model.config).from_dict(cfg_dict)
    except Exception:  # noqa: BLE001
        return None


def first_mismatch(shapes, expected, required=frozenset()) -> str:
    if shapes is None:
        return "the config cannot be built"
    for k in sorted(set(required) - set(shapes)):
        return f"`{k}` was grown but the rebuilt model has no such tensor"
    for k in sorted(shapes):
        if not shapes_fit({k: shapes[k]}, {k: expected[k]} if k in expected else {}):
            return f"`{k}`: rebuilt {shapes.get(k)}, grown {expected.get(k)}"
    return "all shapes match"


def load_hf(model, cfg_dict: dict, state: dict, unread: set = frozenset()):
    """Instantiate the rebuilt class and load ``state`` into it, after checking every shape exactly.

    The parameters are built on the meta device and the grown tensors assigned (no random initialisation
    to overwrite); buffers are built by the class itself, so non-persistent ones that no checkpoint holds
    (rotary frequencies) are computed as usual, then follow the dtype of the source's same buffer. Tensors
    the forward never reads (``unread``) may have any shape: where the rebuilt one differs, the class's own
    initialisation stays (``materialize/unread.py``).
    """
    cfg = config_of(model, cfg_dict)
    rebuilt = config_shapes(model, cfg_dict)
    grown = any_size({k: tuple(v.shape) for k, v in state.items() if k in (rebuilt or {})}, unread)
    if rebuilt is None or not shapes_fit(rebuilt, grown) or set(rebuilt) - set(state):
        raise MaterializeError(f"the rebuilt {type(model).__name__} does not fit the grown tensors "
                               f"({first_mismatch(rebuilt, grown)}); nothing was loaded")
    with parameters_on_meta():
        new = type(model)(cfg)
    own = new.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise MaterializeError(f"the rebuilt {type(model).__name__} has tensors growir did not produce: "
                               f"{missing[:4]}; nothing was loaded")
    ties = _tie_groups(new)
    fresh = set(init_own(new, set(unread), state))
    own = new.state_dict()
    new.load_state_dict({k: own[k] if k in fresh else state[k] for k in own}, strict=True, assign=True)
    _retie(new, ties)
    _place_other_buffers(new, model, set(own) - fresh, state, lambda: type(model)(cfg))
    new.eval() if not model.training else new.train()
    return new


def _tie_groups(model) -> list:
    """Names that share one parameter (a tied head): load_state_dict(assign=True) would untie them."""
    by_id = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(t), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _retie(model, groups: list) -> None:
    for first, *rest in groups:
        param = model.get_parameter(first)
        for name in rest:
            *path, leaf = name.split(".")
            setattr(model.get_submodule(".".join(path)) if path else model, leaf, param)


def _place_other_buffers(new, model, loaded: set, state: dict, build=None) -> None:
    """Buffers the state dict did not load (non-persistent ones): the grown tensor where the traced forward read
    one of that shape (a table the class makes at construction from a width: the class's own would compute
    something else; ``reload.py`` says what ``from_pretrained`` makes of it), else the class's own; on the grown
    tensors' device, in the dtype of the source's buffer. A buffer the class made from a parameter (``zeros_like``
    of a weight) is on the meta device like the parameters: its own value comes from the class built for real
    (``build``, called once, only then)."""
    source, device = dict(model.named_buffers()), next(iter(state.values())).device
    real = None
    for name, buf in list(new.named_buffers()):
        if name in loaded:
            continue
        if name in state and state[name].shape == buf.shape:
            buf = state[name]
        elif buf.is_meta and build is not None:
            real = dict(build().named_buffers()) if real is None else real
            buf = real[name]
        dtype = source[name].dtype if name in source and buf.is_floating_point() else buf.dtype
        *path, leaf = name.split(".")
        owner = new.get_submodule(".".join(path)) if path else new
        owner._buffers[leaf] = buf.to(device=device, dtype=dtype)
