"""The savings benchmark's plot: validation loss against training FLOPs, one curve per method and setting.

Used by ``benchmarks/savings.py``, which writes ``savings.png`` beside ``savings.json``.

    >>> log = [{"flops": 0.0, "val_loss": 3.0}, {"flops": 10.0, "val_loss": 1.0}]
    >>> _interp(torch.tensor([0.0, 5.0, 10.0]), log).tolist()
    [3.0, 2.0, 1.0]
"""

from __future__ import annotations

import torch


def plot(result: dict, jobs: list[dict], path: str, methods: list[str]) -> None:
    """Validation loss against FLOPs, one curve per method (mean over seeds, band = min–max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = result["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, s in zip(axes[0], settings):
        for i, method in enumerate(methods):
            runs = [j for j in jobs if j["setting"] == s["name"] and j["method"] == method and j["available"]]
            if not runs:
                continue
            end = min(r["log"][-1]["flops"] for r in runs)
            grid = torch.linspace(0, end, 60)
            curves = torch.stack([_interp(grid, r["log"]) for r in runs])
            color, style = f"C{i % 10}", "-" if i < 10 else "--"
            ax.plot(grid, curves.mean(0), color=color, ls=style, label=method, lw=2.2 if method == "growir" else 1.2)
            ax.fill_between(grid, curves.min(0).values, curves.max(0).values, color=color, alpha=0.15)
        ax.axhline(s["target"]["scratch_final_val_loss"], color="k", ls="--", lw=0.8, label="scratch final")
        ax.axhline(s["source"]["final_val_loss"], color="gray", ls=":", lw=0.8, label="source final")
        low = s["target"]["scratch_final_val_loss"]
        ax.set_ylim(low - 0.3, low + 1.2)
        ax.set(title=s["name"], xlabel="training FLOPs (source not counted)", ylabel="validation loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interp(grid: torch.Tensor, log: list[dict]) -> torch.Tensor:
    xs = torch.tensor([r["flops"] for r in log], dtype=torch.float64)
    ys = torch.tensor([r["val_loss"] for r in log], dtype=torch.float64)
    idx = torch.searchsorted(xs, grid.double()).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    return (y0 + (grid - x0) / (x1 - x0).clamp_min(1e-9) * (y1 - y0)).float()
