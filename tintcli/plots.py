"""Figures written next to results.json (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from tintcli.io import atomic_write


def lambda_heatmap(lambdas: torch.Tensor, layer_names: list[str], tasks: list[str],
                   title: str, path: Path) -> None:
    """Learned merging coefficients: one row per task, one column per layer (tensor)."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not under Hydra's INFO log
    import matplotlib.pyplot as plt

    values = lambdas.detach().float().cpu().T.numpy()  # [tasks, layers]
    width = min(24.0, 3.0 + 0.12 * len(layer_names))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.35 * len(tasks)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_yticks(range(len(tasks)), tasks)
    step = max(1, len(layer_names) // 24)  # label at most ~24 layers so they stay legible
    ticks = list(range(0, len(layer_names), step))
    ax.set_xticks(ticks, [layer_names[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_xlabel("layer (parameter tensor)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="λ")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
