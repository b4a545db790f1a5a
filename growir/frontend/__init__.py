"""Frontend: a model in, an aten-level ``torch.fx`` graph out (``torch.export``), with the example inputs
that drive it, the two-block proxy a deep model is captured on, and model folders read without loading."""

from .export import Captured, capture, is_hf
from .folder import Checkpoint, CheckpointError, load_config, meta_model
from .inputs import example_inputs_for
from .proxy import PROXY_BLOCKS, Proxy, make_model_proxy, make_proxy

__all__ = ["Captured", "capture", "is_hf", "Checkpoint", "CheckpointError", "load_config", "meta_model", "example_inputs_for", "PROXY_BLOCKS", "Proxy", "make_model_proxy", "make_proxy"]
