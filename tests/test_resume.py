"""A ``transformers.Trainer`` checkpoint grown by ``growir grow`` resumes bigger under
``Trainer.train(resume_from_checkpoint=OUT)`` (issue 20): the loss before the first update is the source's, the
global step and the schedule continue, the optimizer holds grown moments; unsafe files are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")  # transformers.Trainer needs it
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from growir.cli import main  # noqa: E402
from growir.train.recipe import EVIDENCE  # noqa: E402
from growir.train.resume import SAVED_OPTIMIZER, RECIPE, grow_trainer_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=100)
TOKENS = torch.randint(0, 100, (32, 16), generator=torch.Generator().manual_seed(0))
BATCH = {"input_ids": TOKENS[:4], "labels": TOKENS[:4]}


def _args(folder, **change) -> TrainingArguments:
    return TrainingArguments(str(folder), **{**dict(max_steps=6, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, warmup_steps=2, weight_decay=0.01, logging_steps=1, seed=0,
                             report_to=[], use_cpu=True, disable_tqdm=True), **change})


def _data() -> list:
    return [{"input_ids": x, "labels": x} for x in TOKENS]


def _loss(model) -> float:
    with torch.no_grad():
        return model(**BATCH).loss.item()


class Probe(TrainerCallback):
    """What the resumed run holds before its first update: the loss on BATCH, the step, lr and optimizer state."""

    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.seen.update(loss=_loss(model), step=state.global_step, lr=lr_scheduler.get_last_lr(),
                         state={name: {k: v.clone() for k, v in optimizer.state[p].items()}
                                for name, p in model.named_parameters() if p in optimizer.state})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama trained 6 steps by Trainer, saved every 3: its checkpoint at step 3 (mid-run)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    Trainer(model=LlamaForCausalLM(LlamaConfig(**CONFIG)), args=_args(run), train_dataset=_data()).train()
    return run / "checkpoint-3"


@pytest.fixture(scope="module")
def grown(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grown") / "x2"
    assert main(["grow", str(checkpoint), str(out), "--width", "2", "--depth", "2"]) == 0
    return out


def test_grown_checkpoint_resumes_bigger_where_the_source_stopped(checkpoint, grown, tmp_path):
    source = LlamaForCausalLM.from_pretrained(checkpoint)
    model = LlamaForCausalLM.from_pretrained(grown)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 4
    probe = Probe()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[probe])
    trainer.train(resume_from_checkpoint=str(grown))
    seen = probe.seen
    assert abs(seen["loss"] - _loss(source)) < 1e-4, (seen["loss"], _loss(source))
    assert seen["step"] == 3 and trainer.state.global_step == 6
    assert seen["lr"] == torch.load(checkpoint / "scheduler.pt", weights_only=True)["_last_lr"]
    params = dict(model.named_parameters())
    assert set(seen["state"]) == set(params)  # every grown parameter has state, under the grown shapes
    for name, state in seen["state"].items():
        assert state["exp_avg"].shape == params[name].shape == state["exp_avg_sq"].shape, name
    # an old entry's moments are scaled like its gradient, so its Adam direction m/sqrt(v) is the source's
    old = torch.load(checkpoint / SAVED_OPTIMIZER, weights_only=True)["state"][0]  # embed_tokens, 100 x 32
    new = {k: v[:, :32] for k, v in seen["state"]["model.embed_tokens.weight"].items() if k != "step"}
    moved = old["exp_avg_sq"] > 0
    assert moved.any() and not torch.equal(new["exp_avg"], old["exp_avg"])  # the residual stream is rescaled
    torch.testing.assert_close((new["exp_avg"] / new["exp_avg_sq"].sqrt())[moved],
                               (old["exp_avg"] / old["exp_avg_sq"].sqrt())[moved])
    assert float(seen["state"]["model.layers.1.self_attn.o_proj.weight"]["step"]) == 0  # a new block's zero writer
    assert float(seen["state"]["model.layers.0.self_attn.o_proj.weight"]["step"]) == 3
    assert {p.name for p in grown.iterdir()} >= {"optimizer.pt", "scheduler.pt", "trainer_state.json",
                                                  "rng_state.pth", RECIPE, "growir.json"}
    assert not (grown / "training_args.bin").exists()  # a pickle Trainer never reads on resume
    record = json.loads((grown / "growir.json").read_text())["trainer"]  # the record says what optimizer.pt holds
    assert record["optimizer"] == "grown" and record["new_units"].startswith("reset") and record["global_step"] == 3
    assert "training_args.bin" in record["left_out"]


class Smuggled:
    """An object torch.load(weights_only=True) must refuse to build."""


def test_optimizer_that_needs_unpickling_is_refused(checkpoint, tmp_path, capsys):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint, src)
    state = torch.load(src / SAVED_OPTIMIZER, weights_only=True)
    torch.save({**state, "extra": Smuggled()}, src / SAVED_OPTIMIZER)
    assert main(["grow", str(src), str(tmp_path / "out"), "--width", "2"]) == 1
    err = capsys.readouterr().err
    assert "optimizer.pt: refused" in err and "weights_only=True" in err and "Smuggled" in err
    assert not (tmp_path / "out").exists()


def test_reset_writes_no_moments_and_the_recipe_says_so(checkpoint, tmp_path):
    assert main(["grow", str(checkpoint), str(tmp_path / "out"), "--width", "2", "--optimizer", "reset"]) == 0
    saved = torch.load(tmp_path / "out" / SAVED_OPTIMIZER, weights_only=True)
    assert saved["state"] == {} and [len(g["params"]) for g in saved["param_groups"]] == [16, 5]
    recipe = json.loads((tmp_path / "out" / RECIPE).read_text())
    assert recipe["optimizer"]["treatment"] == "reset"
    assert recipe["learning_rate"]["peak"] == 1e-3 and recipe["training_arguments"]["max_steps"] == 6
    assert recipe["evidence"]["strength"] == "thin"


def test_recipe_figures_are_the_benchmarks():
    """Every figure the recipe quotes is in the results file it names, to the quoted precision."""
    cpu = {s["name"]: s for s in json.loads((ROOT / "benchmarks/results/savings.json").read_text())["settings"]}
    runs = {m["name"]: m for m in cpu["decoder-wide"]["methods"] + cpu["decoder-wide"]["lr_sweep"]}
    for entry in ("no_rewarmup", "rewarmup_30_steps", "grown_moments"):
        cited, run = EVIDENCE[entry], runs[EVIDENCE[entry]["method"]]
        per_seed = [run["per_seed_saving"][s] for s in "012"]
        assert cited["per_seed"] == [round(x, 3) for x in per_seed], entry
        assert cited["saving"] == round(sum(per_seed) / 3, 3), entry
    gpu = {s["name"]: s for s in json.loads((ROOT / "benchmarks/results/gpu/savings.json").read_text())["settings"]}
    for method, losses in EVIDENCE["gpu_final_loss"].items():
        for setting, loss in losses.items():
            run = next(m for m in gpu[setting]["methods"] if m["name"] == method)
            assert round(run["final_val_loss"], 3) == loss, (method, setting)
    probe = json.loads((ROOT / "benchmarks/results/resume_probe.json").read_text())["seeds"]
    for variant, losses in EVIDENCE["mid_run_final_loss"].items():
        assert losses == [round(probe[s][variant], 3) for s in "012"], variant


def test_tied_head_gets_its_state_once(tmp_path):
    """GPT-2 ties its head to the token embedding: one parameter, one state entry, grown under its own name."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from growir.train.resume import trainer_groups

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    Trainer(model=model, args=_args(tmp_path / "run", max_steps=2, save_steps=2), train_dataset=_data()).train()
    grow_trainer_checkpoint(tmp_path / "run" / "checkpoint-2", tmp_path / "out", width=2.0)
    grown = GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    saved = torch.load(tmp_path / "out" / SAVED_OPTIMIZER, weights_only=True)
    params = dict(grown.named_parameters())
    order = [n for group in trainer_groups(grown) for n in group]
    assert len(saved["state"]) == len(order) == len(params)
    for i, name in enumerate(order):
        assert saved["state"][i]["exp_avg"].shape == params[name].shape, name
