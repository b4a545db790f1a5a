"""Materialize: the grown tensors as a rewritten GraphModule (``graph``), or as the model's own class rebuilt
from a changed config (``config`` searches the config, ``hf`` runs the candidates and keeps the faithful one)."""

from .graph import build_graph_module, release_weights
from .hf import MATERIALIZE, materialize_hf

__all__ = ["build_graph_module", "release_weights", "MATERIALIZE", "materialize_hf"]
