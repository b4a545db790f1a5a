"""Materialize: the grown tensors as a rewritten GraphModule (``graph``), or as the model's own class rebuilt
from a changed config (``config`` searches the config, ``hf`` runs the candidates and keeps the faithful one),
checked after save_pretrained / from_pretrained (``reload``)."""

from .graph import build_graph_module, release_weights
from .hf import MATERIALIZE, materialize_hf
from .reload import Reload, reload_check

__all__ = ["build_graph_module", "release_weights", "MATERIALIZE", "materialize_hf", "Reload", "reload_check"]
