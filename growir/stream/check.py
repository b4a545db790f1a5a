"""Check a grown folder already on disk against its source, block by block: ``verify_checkpoint``."""

from __future__ import annotations

from ..verify.blocks import BlockCheck, check_blocks


def verify_checkpoint(src_dir, grown_dir, width=1.0, depth=1.0, *, layers=None, width_method="auto",
                      depth_method="auto", method=None, dtype=None) -> BlockCheck:
    """Check block by block that the folder ``grown_dir`` is ``src_dir`` grown with these arguments (those of
    the ``grow_checkpoint`` that wrote it, ``dtype`` included: it decides which groups ``width_method="auto"``
    copies; the plan and index maps are made again, without weights). Returns
    the ``BlockCheck``; ``check.preserved`` is False and ``check.first_failing`` names the block where the
    grown folder departs (a tensor changed since, a different growth). Neither model is loaded.

    >>> import tempfile, torch, growir
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/grown"
    >>> GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)).save_pretrained(src)
    >>> _ = growir.grow_checkpoint(src, out, width=2.0)
    >>> growir.verify_checkpoint(src, out, width=2.0).preserved
    True
    """
    from pathlib import Path

    from .grow import prepare, methods

    width_method, depth_method = methods(method, width_method, depth_method)
    job = prepare(Path(src_dir), width, depth, layers, width_method, depth_method, dtype, False)
    return check_blocks(src_dir, grown_dir, job.fp, job.choice.config, (job.maps, job.scales), job.schedules,
                        not job.reasons, job.rules)
