"""Streaming: grow a safetensors model folder into another, one tensor at a time, planned from
``config.json`` alone (``plan``), the config chosen on a small proxy (``sample``), written in shards
(``shards``) and checked block by block (``check``)."""

from .check import verify_checkpoint
from .grow import StreamReport, grow_checkpoint
from .plan import FolderPlan, plan_folder

__all__ = ["verify_checkpoint", "StreamReport", "grow_checkpoint", "FolderPlan", "plan_folder"]
