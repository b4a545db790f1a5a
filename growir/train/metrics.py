"""bert2BERT's measure of a growth method: the FLOPs to reach the from-scratch model's final loss.

    saving = 1 − flops_to_target / F_scratch
    saving_with_source = 1 − (flops_to_target + F_source) / F_scratch

Each seed is paired with the scratch run of the same seed; means and sample standard deviations are over the
seeds that reached the target.

>>> scratch = [{"flops": 0, "val_loss": 5.0}, {"flops": 100, "val_loss": 2.0}]
>>> grown = [{"flops": 0, "val_loss": 3.0}, {"flops": 50, "val_loss": 1.5}]
>>> round(saving(grown, scratch), 3)
0.667
"""

from __future__ import annotations

import math


def flops_to_reach(log: list[dict], target: float) -> float | None:
    """First FLOP count at which the validation loss reaches ``target`` (linear between evaluations);
    None if it never does.

    >>> flops_to_reach([{"flops": 0, "val_loss": 5.0}, {"flops": 10, "val_loss": 3.0}], 4.0)
    5.0
    """
    for prev, row in zip([None] + log[:-1], log):
        if row["val_loss"] <= target:
            if prev is None:
                return float(row["flops"])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - row["val_loss"])
            return float(prev["flops"] + frac * (row["flops"] - prev["flops"]))
    return None


def saving(log: list[dict], scratch_log: list[dict], extra_flops: float = 0.0) -> float | None:
    """``1 − (flops_to_reach(log, scratch final loss) + extra_flops) / scratch total FLOPs``, or None.

    >>> saving([{"flops": 0, "val_loss": 5.0}], [{"flops": 10, "val_loss": 4.0}]) is None
    True
    """
    reached = flops_to_reach(log, scratch_log[-1]["val_loss"])
    return None if reached is None else 1 - (reached + extra_flops) / scratch_log[-1]["flops"]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value, None for none).

    >>> mean_std([1.0, 3.0])
    (2.0, 1.4142135623730951)
    """
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std
