"""ONNX export of source and grown models, and the example inputs that drive it.

Export goes through ``torch.onnx.export(..., dynamo=True)``: torch.export traces the forward once and the
traced graph is translated op by op, so the file computes what the traced forward computed. Hugging Face
models (anything with a ``.config``) get example inputs built from their config; other models must be given
``example_inputs`` (a tuple of positional arguments or a dict of keyword arguments).

>>> import growir, torch, tempfile, os
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
>>> with tempfile.TemporaryDirectory() as d:
...     path = growir.export_onnx(net, os.path.join(d, "net.onnx"), (torch.randn(2, 4),))
...     path.name
'net.onnx'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from ..errors import TraceError, first_line
from ..frontend.export import fake_cache_off
from ..quiet import library_noise_off

from ..frontend.inputs import EXAMPLE_BATCH, EXAMPLE_SEQ, Inputs, example_inputs_for, is_hf_model

# Shapes tried by check(): (batch, sequence); the first one is the traced example.
SAMPLE_SHAPES = ((EXAMPLE_BATCH, EXAMPLE_SEQ), (1, 5), (3, 13), (4, 16))


def dynamic_shapes_for(inputs: Inputs, static_axes: dict[str, tuple[int, ...]] | None = None):
    """Every tensor axis ``Dim.AUTO`` (torch.export keeps it symbolic when it can), except ``static_axes``."""
    static_axes = static_axes or {}

    def spec(name, value):
        if not isinstance(value, torch.Tensor):
            return None
        return {axis: torch.export.Dim.AUTO for axis in range(value.dim()) if axis not in static_axes.get(name, ())}

    args, kwargs = inputs
    arg_specs = tuple(pytree.tree_map(lambda v: spec(None, v), arg) if not isinstance(arg, torch.Tensor)
                      else spec(None, arg) for arg in args)
    kwarg_specs = {name: spec(name, value) for name, value in kwargs.items()}
    if not kwargs:
        return arg_specs
    if not args:
        return kwarg_specs
    return arg_specs + tuple(kwarg_specs.values())


# Images keep their spatial size: position embeddings are sized for it.
HF_STATIC_AXES = {"pixel_values": (1, 2, 3)}


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while tracing; the caller's train/eval flags are restored afterwards."""
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
    except NotImplementedError:  # torch.export'ed GraphModules refuse eval(): their mode is baked into the graph
        flags = {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            yield model
    finally:
        for module, training in flags.items():
            module.training = training


def to_onnx_program(model: torch.nn.Module, inputs: Inputs, *, dynamic: bool = True, opset: int | None = None,
                    optimize: bool = True):
    """``torch.onnx.export(..., dynamo=True)`` of ``model`` at ``inputs``; failures become a TraceError."""
    args, kwargs = inputs
    dynamic_shapes = dynamic_shapes_for(inputs, HF_STATIC_AXES if is_hf_model(model) else None) if dynamic else None
    options = {"opset_version": opset} if opset is not None else {}
    try:
        with eval_mode(model), torch.no_grad(), library_noise_off(), fake_cache_off():  # see fake_cache_off
            return torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     verbose=False, optimize=optimize, **options)
    except Exception as error:  # torch.export and the ONNX translator raise many types; keep the cause chained
        raise TraceError(f"ONNX export of {type(model).__name__} failed ({type(error).__name__}: {first_line(error)}); "
                         "run with the model's own inputs or check that torch.export.export(model, ...) works"
                         ) from error


def ort_session(onnx_path: str | os.PathLike):
    """A CPU onnxruntime session for the file at ``onnx_path``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's concern here
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_session(session, inputs: Inputs) -> list[torch.Tensor]:
    """Run ``session`` on ``inputs``; tensors are fed by name where the names match, else in order."""
    args, kwargs = inputs
    tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise TraceError(f"the exported graph takes {len(names)} inputs ({', '.join(names)}) but {len(tensors)} "
                         "tensors were given; export and run with the same example_inputs structure")
    by_name = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    if set(names) <= set(by_name):
        feed = {name: by_name[name] for name in names}
    else:
        feed = dict(zip(names, tensors))
    outputs = session.run(None, {name: value.detach().cpu().numpy() for name, value in feed.items()})
    return [torch.from_numpy(out) for out in outputs]


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, example_inputs=None, *,
                opset: int | None = None) -> Path:
    """Write ``model`` as an ONNX file with dynamic batch and sequence axes; return the path written.

    Hugging Face text models take ``input_ids`` and ``attention_mask`` (both dynamic on batch and sequence);
    other models take ``example_inputs`` and every axis torch.export can keep symbolic stays dynamic.
    The file passes ``onnx.checker.check_model`` and is written atomically: into a temporary folder beside
    ``path``, then moved into place, so a failure leaves nothing at ``path``. Weights stay inside the file
    unless it would pass ONNX's 2 GB protobuf limit; then they go to ``<name>.data`` beside it.

    >>> import growir, torch, tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = growir.export_onnx(torch.nn.Linear(3, 2), os.path.join(d, "lin.onnx"), (torch.randn(4, 3),))
    ...     os.listdir(d)
    ['lin.onnx']
    """
    import onnx

    path = Path(path)
    program = to_onnx_program(model, example_inputs_for(model, example_inputs), opset=opset)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
        staged = Path(staging) / path.name
        program.save(staged)
        onnx.checker.check_model(str(staged))  # by path: works for files with external data too
        # the weights file (if any) first, so the model file never points at a missing one
        for extra in sorted(Path(staging).iterdir()):
            if extra != staged:
                os.replace(extra, path.parent / extra.name)
        os.replace(staged, path)
    return path

