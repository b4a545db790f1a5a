"""Config search: the Hugging Face config whose rebuilt model has the grown tensors' shapes (``load.py`` loads the
grown tensors into that model: ties, buffers the model recomputes).

A config field is a promise to every user of the model: candidates change the fewest fields that the grown
shapes require (``candidate_configs``), token ids never; ``materialize/hf.py`` then runs each candidate to
pick the one that computes the grown function.
"""

from __future__ import annotations

import itertools

from ..errors import MaterializeError
from .load import config_shapes, first_mismatch, shapes_fit



# --- the Hugging Face class, rebuilt from its config --------------------------------------------------------------
# Config fields that name a token, not a size: a rebuild never changes them, whatever value they hold (an
# eos_token_id that happens to equal the hidden size is still a token). Field names are read only here.
TOKEN_FIELDS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id",
                          "mask_token_id", "unk_token_id", "decoder_start_token_id", "forced_bos_token_id",
                          "forced_eos_token_id"})


def is_token_field(name: str) -> bool:
    """Whether a config field holds token ids (never rebuilt).

    >>> is_token_field("eos_token_id"), is_token_field("image_token_index"), is_token_field("hidden_size")
    (True, True, False)
    """
    return name in TOKEN_FIELDS or name.endswith(("_token_id", "_token_ids", "_token_index"))


def candidate_configs(model, expected: dict, size_pairs: dict, head_pairs: dict, required: set,
                      layer_sources: dict, float_pairs: dict | None = None, max_tries: int = 64):
    """Configs whose rebuilt parameter shapes match the grown ones, fewest changes first.

    ``expected`` maps each state_dict name to its grown shape; an axis given as None matches any size
    (an output-only group the config decides, like a pooler). ``size_pairs`` maps an old size to the new
    sizes it may become. Candidate fields are int fields (or elements of int lists, as per-stage head counts)
    holding such an old size, never a token id.
    A field changes only where the shapes require it: the search finds changes that reproduce every grown
    shape, then keeps (reverts) each change the shapes do not need. Changes no shape requires -- those
    reverted, and fields holding a head count (``head_pairs``: a head count shapes the computation, not
    the parameters) -- are offered fewest first, for the caller's numeric check to decide. Every name in
    ``required`` (the grown parameters) must exist in the rebuilt model. A list field as long as a block
    count that changes follows the depth schedule (``layer_sources``: old count -> source block per new
    position), like per-layer attention types. Float fields equal to a key of ``float_pairs`` (a norm's
    eps under repeat-and-fill) take its value. Yields (config dict, changes, rebuilt shapes).
    """
    base = model.config.to_dict()
    floats = {k: float_pairs[v] for k, v in base.items() if isinstance(v, float) and v in (float_pairs or {})}
    base = {**base, **floats}
    built = {}  # the search asks for the same changes more than once: each config is built on meta once

    def shapes_of(changes: dict):
        key = repr(sorted((_name(k), v) for k, v in changes.items()))  # names: a str and a (name, i) do not sort
        if key not in built:
            built[key] = config_shapes(model, follow_lists(base, with_changes(base, changes), layer_sources))
        return built[key]

    fits = lambda sh: shapes_fit(sh, expected, required)
    fields = {k: v for k, v in int_fields(base).items() if v in size_pairs and not is_token_field(_field(k))}
    base_shapes = shapes_of({})
    relevant = {k: v for k, v in fields.items() if any(shapes_of({k: n}) != base_shapes
                                                       for n in size_pairs[v] if n != v)}
    needed = _shape_changes(relevant, size_pairs, shapes_of, fits, max_tries)
    if needed is None:  # too many fields for every combination: one field at a time, toward fewer misfits
        needed = descend(relevant, size_pairs, lambda ch: misfits(shapes_of(ch), expected, required))
    if not fits(shapes_of(needed)):
        diff = first_mismatch(shapes_of(needed), expected, required)  # the nearest candidate's first misfit
        names = ", ".join(map(_name, relevant)) or "none"  # a list element is a field too: "hidden_sizes[1]"
        raise MaterializeError(
            f"no change of {type(model.config).__name__}'s size fields ({names}) rebuilds "
            f"{type(model).__name__} with the grown shapes ({diff}): its config cannot express this growth"
            f"{skipped_note(base, size_pairs)}. "
            f"Nothing was loaded; grow(..., materialize='graph') returns the rewritten GraphModule instead")
    needed, optional = _required_only(needed, shapes_of, fits)
    optional += [(k, n) for k, v in fields.items() if k not in needed and v in head_pairs
                 for n in sorted(head_pairs[v]) if (k, n) not in optional]
    for count in range(len(optional) + 1):
        for extra in itertools.combinations(optional, count):
            if len({k for k, _ in extra}) < count:
                continue  # two values for one field
            changes = {**needed, **dict(extra)}
            shapes = shapes_of(changes)
            if fits(shapes):
                cfg, named = follow_lists(base, with_changes(base, changes), layer_sources), {
                    _name(k): v for k, v in {**changes, **floats}.items()}
                yield cfg, named, shapes
                for kept in lists_kept(base, cfg):  # the caller's numeric check tells which list is per block
                    kept_shapes = config_shapes(model, kept)
                    if fits(kept_shapes):
                        yield kept, named, kept_shapes


def int_fields(cfg: dict) -> dict:
    """The config's integer fields, each element of a list of integers (per-stage head counts) a field of its
    own, keyed (name, index), and the fields of a nested config (a text or vision sub-config) keyed by their
    path, (sub-config, name).

    >>> int_fields({"hidden_size": 8, "num_heads": [2, 4], "use_cache": True, "act": "gelu"})
    {'hidden_size': 8, ('num_heads', 0): 2, ('num_heads', 1): 4}
    >>> int_fields({"text_config": {"model_type": "text", "hidden_size": 8, "heads": [2]}})
    {('text_config', 'hidden_size'): 8, ('text_config', 'heads', 0): 2}
    """
    out = {}
    for k, v in cfg.items():
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            out.update({(k, i): x for i, x in enumerate(v)})
        elif isinstance(v, dict) and "model_type" in v:  # a sub-config: its fields are the model's too
            out.update({(k, *(sub if isinstance(sub, tuple) else (sub,))): x for sub, x in int_fields(v).items()})
    return out


def skipped_fields(cfg: dict, size_pairs: dict) -> dict:
    """name -> why the search does not change it: fields that hold a size the growth changes in a form
    :func:`int_fields` does not read (a nested config, a list of lists, a list mixing numbers and names).

    >>> skipped_fields({"d": 8, "sub": {"d": 8}, "stages": [[8, 2]], "names": ["a", 8], "kinds": ["a"]}, {8: {16}})
    {'sub': 'a nested dict holds 8', 'stages': 'a nested list holds 8', 'names': 'a list of mixed types holds 8'}
    """
    out = {}
    for k, v in cfg.items():
        if is_token_field(k) or not isinstance(v, (list, dict)) or int_fields({k: v}):  # read as ints
            continue
        held = sorted(n for n in _ints_in(v) if n in size_pairs)
        if held:
            kind = ("a nested dict" if isinstance(v, dict) else "a nested list"
                    if any(isinstance(x, (list, dict)) for x in v) else "a list of mixed types")
            out[k] = f"{kind} holds {', '.join(map(str, held[:3]))}"
    return out


def skipped_note(cfg: dict, size_pairs: dict) -> str:
    """'' or '; fields not searched: ...' for an error message (:func:`skipped_fields`)."""
    skipped = skipped_fields(cfg, size_pairs)
    return "; fields not searched: " + ", ".join(f"{k} ({why})" for k, why in skipped.items()) if skipped else ""


def _ints_in(value) -> list:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _ints_in(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _ints_in(v)]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def with_changes(cfg: dict, changes: dict) -> dict:
    """``cfg`` with ``changes`` (keys as :func:`int_fields` gives them) applied; lists and sub-configs copied,
    never shared.

    >>> with_changes({"d": 8, "heads": [2, 2]}, {"d": 16, ("heads", 1): 4})
    {'d': 16, 'heads': [2, 4]}
    >>> with_changes({"text": {"d": 8, "h": [2]}}, {("text", "d"): 16, ("text", "h", 0): 4})
    {'text': {'d': 16, 'h': [4]}}
    """
    out = dict(cfg)
    for key, value in changes.items():
        if not isinstance(key, tuple):
            out[key] = value
        elif isinstance(key[1], int):  # (name, index): an element of a list
            name, i = key
            out[name] = [*out[name][:i], value, *out[name][i + 1:]]
        else:  # (sub-config, ...): a field of a nested config
            out[key[0]] = with_changes(out[key[0]], {key[1:] if len(key) > 2 else key[1]: value})
    return out


def _field(key) -> str:
    """The field's own name (a list's, or a nested config's field's)."""
    return next(k for k in reversed(key) if isinstance(k, str)) if isinstance(key, tuple) else key


def _name(key) -> str:
    """How a field is named to a person: ``hidden_sizes[1]``, ``text_config.hidden_size``.

    >>> _name(("heads", 1)), _name(("text_config", "hidden_size")), _name(("vision", "heads", 0))
    ('heads[1]', 'text_config.hidden_size', 'vision.heads[0]')
    """
    if not isinstance(key, tuple):
        return key
    return ".".join(k for k in key if isinstance(k, str)) + "".join(f"[{k}]" for k in key if isinstance(k, int))


def _required_only(changes: dict, shapes_of, fits) -> tuple[dict, list]:
    """Split ``changes`` into those the shapes need and those they do not (reverted one at a time)."""
    needed, reverted = dict(changes), []
    for key in list(changes):
        without = {k: v for k, v in needed.items() if k != key}
        if fits(shapes_of(without)):
            reverted.append((key, needed[key]))
            needed = without
    return needed, reverted


def _shape_changes(relevant: dict, size_pairs: dict, shapes_of, fits, max_tries: int) -> dict | None:
    """Changes of the shape-relevant fields that rebuild every grown shape (None: none found)."""
    options = [[(k, n) for n in sorted(size_pairs[v]) if n != v] for k, v in relevant.items()]
    tried = 0
    for keep in range(len(options) + 1):
        for reverted in itertools.combinations(range(len(options)), keep):
            choices = [[None] if i in reverted else opts for i, opts in enumerate(options)]
            for combo in itertools.product(*choices):
                changes = dict(c for c in combo if c is not None)
                if fits(shapes_of(changes)):
                    return changes
                tried += 1
                if tried >= max_tries:
                    return None
    return None


def descend(relevant: dict, size_pairs: dict, score) -> dict:
    """The changes of ``relevant`` fields that ``score`` (a count of misfits) rates best, found one field at a
    time: each round, every field takes whichever of its values (the old one included) lowers the score, until
    no field lowers it. Linear in the fields where the exhaustive search is exponential; a field that must
    change with another to build (a product of two sizes) is found where either change alone fits more.

    >>> pairs = {2: {4}, 8: {16}}
    >>> descend({"heads": 2, "hidden": 8, "layers": 2}, pairs,
    ...         lambda ch: (ch.get("heads") != 4) + (ch.get("hidden") != 16) + 5 * ("layers" in ch))
    {'heads': 4, 'hidden': 16}
    """
    changes, best = {}, score({})
    improved = best > 0
    while improved:
        improved = False
        for key, old in relevant.items():
            for value in [old, *sorted(size_pairs[old])]:
                trial = _moved(changes, relevant, key, value)
                trial_score = score(trial)
                if trial_score < best:
                    changes, best, improved = trial, trial_score, True
        if not improved and best > 0:  # no single field helps: two that only build together may
            trial = min(_joint_moves(relevant, size_pairs, changes, score), key=score, default=changes)
            if score(trial) < best:
                changes, best, improved = trial, score(trial), True
    return changes


def _moved(changes: dict, relevant: dict, key, value) -> dict:
    """``changes`` with ``key`` set to ``value`` (dropped where that is its old value)."""
    return {**changes, key: value} if value != relevant[key] else {k: v for k, v in changes.items() if k != key}


def _joint_moves(relevant: dict, size_pairs: dict, changes: dict, score) -> list:
    """Changes of two fields at once, each of which alone gives a config that does not build: fields a config
    validates together (SSM heads x head size = expand x hidden) change only as a pair.

    >>> builds = lambda ch: float("inf") if ch.get("heads", 2) * 4 != ch.get("hidden", 8) else 0
    >>> _joint_moves({"heads": 2, "hidden": 8}, {2: {4}, 8: {16}}, {}, builds)
    [{'heads': 4, 'hidden': 16}]
    """
    alone = [(key, value) for key, old in relevant.items() for value in [old, *sorted(size_pairs[old])]
             if value != changes.get(key, old) and score(_moved(changes, relevant, key, value)) == float("inf")]
    return [_moved(_moved(changes, relevant, k1, v1), relevant, k2, v2)
            for (k1, v1), (k2, v2) in itertools.combinations(alone, 2) if k1 != k2]


def misfits(shapes, expected, required=frozenset()) -> float:
    """How far rebuilt ``shapes`` are from the grown ones: tensors missing on either side or of another shape
    (infinite where the config does not build).

    >>> misfits({"w": (4, 8), "b": (4,)}, {"w": (4, 16), "b": (None,)})
    1
    """
    if shapes is None:
        return float("inf")
    extra, missing = set(shapes) - set(expected), set(required) - set(shapes)
    return len(extra) + len(missing) + sum(not shapes_fit({k: s}, {k: expected[k]}) for k, s in shapes.items()
                                           if k in expected)


def follow_lists(base: dict, cfg: dict, layer_sources: dict) -> dict:
    """``cfg`` with every per-layer list of ``base`` (a value per block) reordered to the grown blocks' sources,
    where a block count changed; ``layer_sources`` maps an old count to the source block of each new one. Token
    fields are no per-layer lists, whatever their length (two eos ids for two layers).

    >>> follow_lists({"n": 2, "kinds": ["a", "b"], "eos_token_id": [1, 2]}, {"n": 4, "kinds": ["a", "b"]},
    ...              {2: [0, 0, 1, 1]})
    {'n': 4, 'kinds': ['a', 'a', 'b', 'b']}
    >>> follow_lists({"text": {"model_type": "t", "n": 2, "kinds": ["a", "b"]}},
    ...              {"text": {"model_type": "t", "n": 4, "kinds": ["a", "b"]}}, {2: [0, 1, 0, 1]})
    {'text': {'model_type': 't', 'n': 4, 'kinds': ['a', 'b', 'a', 'b']}}
    """
    out = dict(cfg)
    for key, old in base.items():
        if isinstance(old, int) and not isinstance(old, bool) and cfg.get(key) != old and old in layer_sources:
            sources = layer_sources[old]
            if len(sources) != cfg[key]:
                continue
            for name, value in base.items():
                if isinstance(value, list) and len(value) == old and not is_token_field(name):
                    out[name] = [value[i] for i in sources]
    for name, sub in cfg.items():  # a sub-config's lists follow its own block count (text_config.layer_types)
        if isinstance(sub, dict) and "model_type" in sub and isinstance(base.get(name), dict):
            out[name] = follow_lists(base[name], sub, layer_sources)
    return out


def lists_kept(base: dict, followed: dict) -> list:
    """``followed`` with one list that ``follow_lists`` reordered put back as it was, for each such list: a list
    as long as the block count by chance (a (min, max) limit pair for two layers) holds no value per block, and
    only the rebuilt model's outputs can tell.

    >>> lists_kept({"n": 2, "limit": [0.0, 9.0]}, {"n": 4, "limit": [0.0, 0.0, 9.0, 9.0]})
    [{'n': 4, 'limit': [0.0, 9.0]}]
    """
    return [{**followed, k: base[k]} for k, v in followed.items()
            if isinstance(v, list) and isinstance(base.get(k), list) and len(base[k]) != len(v)]
