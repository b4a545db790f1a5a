"""One data-parallel rank of tests/test_distributed.py: trains a grown model with ``transformers.Trainer`` on
the CPU (gloo), bert2BERT's two-stage callback on, and writes what the test checks to ``OUT/rank<r>.json``.

Launched as ``torchrun --nproc_per_node 2 tests/ddp_worker.py SRC GROWN OUT`` (or ``accelerate launch
--multi_gpu --num_processes 2 ...``, which runs torchrun; see docs/savings.md, "Two processes on the CPU").
SRC and GROWN are model folders; the grown one was made by ``growir.grow`` from the source.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from growir.train.schedule import TwoStage, hf_callback

STEPS, STAGE1_STEPS = 4, 2


class FirstLoss(Trainer):
    """Keeps the first batch this rank trained on and its loss, to compare with the source's."""
    first: tuple | None = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.first is None:
            self.first = ({k: v.detach().clone() for k, v in inputs.items()}, float(loss.detach()))
        return loss


def dataset(count: int = 32, seq: int = 16, vocab: int = 256) -> list[dict]:
    ids = torch.randint(0, vocab, (count, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x} for x in ids]


def main(src_dir: str, grown_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    source = AutoModelForCausalLM.from_pretrained(src_dir).eval()
    grown = AutoModelForCausalLM.from_pretrained(grown_dir)
    before = {n: p.detach().clone() for n, p in grown.named_parameters()}
    two_stage = TwoStage(block_size=1, stage1_steps=STAGE1_STEPS, seed=0)
    kept = []
    recording = hf_callback(two_stage)
    step_begin = recording.on_step_begin
    recording.on_step_begin = lambda *a, **k: (step_begin(*a, **k), kept.append(list(two_stage.kept)))[0]
    # stage 1 freezes blocks, so DDP must look for parameters without a gradient: Trainer's default for a model
    # without activation checkpointing (ddp_find_unused_parameters left unset)
    args = TrainingArguments(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-3, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = FirstLoss(model=grown, args=args, train_dataset=dataset(), callbacks=[recording])
    trainer.train()
    inputs, grown_loss = trainer.first
    with torch.no_grad():
        source_loss = float(source(**inputs).loss)
        checksum = torch.stack([p.double().sum() for p in grown.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, checksum)
    result = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "grown_loss0": grown_loss,
              "source_loss0": source_loss, "first_ids": inputs["input_ids"].tolist(), "kept": kept,
              "identity_blocks": two_stage.order[two_stage.needed:], "steps": trainer.state.global_step,
              "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
              "checksums": [float(s) for s in sums],
              "changed": sorted(n for n, p in grown.named_parameters() if not torch.equal(p, before[n]))}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # no rank leaves while another still gathers
    # leave without tearing gloo down: destroy_process_group (or gloo's own teardown at exit) hung one rank for
    # minutes under load after the other had left, with every result already written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
