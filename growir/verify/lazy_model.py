"""A model that runs from its safetensors folder without being loaded: each module's own tensors are read from
the shards (lazily, ``safe_open``) in float32 just before its forward and dropped right after it.

The model is built from its config with its parameters on the meta device (no memory, no random init); its
buffers are made by the class as usual, so non-persistent ones that no checkpoint holds (rotary frequencies)
exist. While it runs, the tensors held are those of the module running and its callers (a block's norm, its
attention's projections: one block at most), whatever the model's size or stored dtype.

>>> import tempfile, torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> d = tempfile.mkdtemp()
>>> src = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).to(torch.bfloat16).eval()
>>> src.save_pretrained(d)
>>> ids = torch.tensor([[1, 2, 3]])
>>> with LazyModel(d, src.config, type(src)) as lazy, torch.no_grad():
...     out = lazy.model(ids).logits
>>> bool(torch.allclose(out, src.float()(ids).logits, atol=1e-5)), out.dtype, lazy.peak_bytes > 0
(True, torch.float32, True)
"""

from __future__ import annotations

import torch

from ..frontend.folder import Checkpoint, CheckpointError


class LazyModel:
    """``cls(config)`` whose parameters (and stored buffers) are read from ``folder`` module by module, in
    float32, while its forward runs (see the module docstring). Use as a context manager: the hooks go
    away on exit. ``loaded``: module paths in the order their tensors were read; ``peak_bytes``: the
    most float32 bytes held at once."""

    def __init__(self, folder, config, cls):
        from ..frontend.folder import parameters_on_meta
        from ..frontend.folder import state_names, tied_names

        with parameters_on_meta():
            self.model = cls(config).eval()
        self.ck = Checkpoint(folder, state_names(self.model), self.model)
        self._ties = tied_names(self.model)
        self.loaded, self.held, self.peak_bytes = [], 0, 0
        self._saved, self._depth, self._handles = {}, {}, []

    def __enter__(self):
        for path, module in self.model.named_modules():
            names = [n for n, t in module._parameters.items() if t is not None]
            names += [n for n in module._buffers if self._stored(f"{path}.{n}".lstrip(".")) is not None]
            if names:
                self._handles += [module.register_forward_pre_hook(self._loader(path, names)),
                                  module.register_forward_hook(self._dropper())]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        for module in list(self._saved):
            self._restore(module)

    def _stored(self, name: str) -> str | None:
        """The checkpoint's name for ``name``, or for a tensor tied to it (a tied head is stored once)."""
        return next((m for m in self._ties.get(name, [name]) if self.ck.has(m)), None)

    def _loader(self, path: str, names: list):
        def load(module, *_):
            self._depth[module] = self._depth.get(module, 0) + 1
            if self._depth[module] > 1:
                return
            originals = {}
            for n in names:
                full = f"{path}.{n}".lstrip(".")
                key = self._stored(full)
                if key is None:
                    raise CheckpointError(f"{self.ck.folder}: `{full}` is not in the checkpoint (nor under a tied "
                                          f"name); the weights do not match {type(self.model).__name__}")
                t = self.ck.read(key)
                t = t.float() if t.is_floating_point() else t
                table = module._parameters if n in module._parameters else module._buffers
                originals[n] = table[n]
                table[n] = torch.nn.Parameter(t, requires_grad=False) if table is module._parameters else t
                self.held += t.numel() * t.element_size()
            self._saved[module] = originals
            self.peak_bytes = max(self.peak_bytes, self.held)
            self.loaded.append(path)
        return load

    def _dropper(self):
        def drop(module, *_):
            self._depth[module] -= 1
            if self._depth[module] == 0:
                self._restore(module)
        return drop

    def _restore(self, module) -> None:
        for n, t in self._saved.pop(module, {}).items():
            table = module._parameters if n in module._parameters else module._buffers
            self.held -= table[n].numel() * table[n].element_size()
            table[n] = t
        self._depth[module] = 0
