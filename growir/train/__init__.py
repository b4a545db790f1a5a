"""Training after growth: the pieces the savings benchmark (benchmarks/savings.py) is built from.

* :mod:`.data` — the Python stdlib as a byte-level corpus, split by file, with seeded batching.
* :mod:`.flops` — FLOPs of a training step, counted from what actually runs.
* :mod:`.loop` — a plain AdamW + warmup/cosine loop for HF causal-LM and masked-LM models.
* :mod:`.schedule` — bert2BERT's two-stage pre-training (plain loop and ``TrainerCallback``).
* :mod:`.baselines` — StackBERT, MSLT and DirectCopy.
* :mod:`.blocks` — finding, slicing and stacking a model's block ``nn.ModuleList``.
* :mod:`.resume` — a ``transformers.Trainer`` checkpoint grown so that training resumes bigger.
* :mod:`.recipe` — the learning-rate policy and optimizer treatment after growth (``growir_recipe.json``).

Modules are imported on use; importing ``growir.train`` loads nothing heavy.
"""
