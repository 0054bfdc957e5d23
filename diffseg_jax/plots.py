"""Figures, drawn from arrays already computed (never recomputing a model)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def ensemble_figure(
    images: np.ndarray,
    masks: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    path: str,
    generated: bool = False,
) -> None:
    """Rows of image / ground truth / ensemble mean / ensemble std (Fig. 1 of the paper) saved to ``path``.

    With ``generated`` (E4) the mean/std columns are of generated images rather than masks.
    """
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n + 0.4), squeeze=False)
    titles = ["image", "ground truth", "ensemble mean", "ensemble std"]
    for row in range(n):
        panels = [images[row], masks[row, ..., 0], mean[row], std[row]]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            panel = np.asarray(panel)
            if panel.ndim == 3 and panel.shape[-1] == 1:
                panel = panel[..., 0]
            if col == 3:
                im = ax.imshow(panel if panel.ndim == 2 else panel.mean(-1), cmap="magma", vmin=0)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            elif panel.ndim == 2:
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.clip(panel, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(("generated " if generated and col >= 2 else "") + titles[col], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
