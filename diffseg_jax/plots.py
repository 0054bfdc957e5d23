"""Figures, drawn from arrays already computed (never recomputing a model)."""

from __future__ import annotations

import json
import os

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


_KIND = {"e1": "feed-forward", "e2": "diffusion", "e3": "mask prediction", "e4": "generation"}


def comparison_figure(eval_dirs: list[str], path: str, num_images: int = 4) -> None:
    """Fig. 1 of the paper from evaluated runs: image, ground truth, then mean and std of each run.

    ``eval_dirs`` are ``<workdir>/eval`` folders with ``ensemble.npz`` and ``metrics.json`` (e.g. a diffusion
    and a feed-forward run on the same test set); the rows are the first ``num_images`` ids they share, and
    the std colour scale is shared across runs so the spreads compare directly.
    """
    runs = []
    for d in eval_dirs:
        npz = os.path.join(d, "ensemble.npz")
        if not os.path.exists(npz):
            raise FileNotFoundError(f"{npz} is missing; evaluate that run first (--mode evaluate).")
        with open(os.path.join(d, "metrics.json"), encoding="utf-8") as f:
            meta = json.load(f)
        runs.append((dict(np.load(npz)), meta))
    ids = [i for i in runs[0][0]["ids"] if all(i in r["ids"] for r, _ in runs[1:])][:num_images]
    if not ids:
        raise ValueError(
            f"The runs in {eval_dirs} share no test image ids; evaluate them on the same test set."
        )
    rows = [[int(np.nonzero(r["ids"] == i)[0][0]) for r, _ in runs] for i in ids]
    vmax = max(float(r["std"].max()) for r, _ in runs) or 1.0
    ncols = 2 + 2 * len(runs)
    fig, axes = plt.subplots(len(ids), ncols, figsize=(2 * ncols, 2 * len(ids) + 0.5), squeeze=False)
    first = runs[0][0]
    for row, index in enumerate(rows):
        panels = [
            (first["image"][index[0]] / 255.0, "image", None),
            (first["mask"][index[0], ..., 0], "ground truth", None),
        ]
        for (r, meta), j in zip(runs, index):
            name = f"{meta.get('model', '?')} {_KIND.get(meta.get('experiment'), meta.get('experiment', ''))}"
            panels += [
                (r["mean"][j, ..., 0], f"{name}\nmean", "gray"),
                (r["std"][j, ..., 0], f"{name}\nstd", "magma"),
            ]
        for col, (panel, title, cmap) in enumerate(panels):
            ax = axes[row, col]
            if cmap == "magma":
                im = ax.imshow(panel, cmap="magma", vmin=0, vmax=vmax)
            elif np.ndim(panel) == 2:
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.clip(panel, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=axes[:, -1].tolist(), fraction=0.046, pad=0.04)
    fig.savefig(path, dpi=100)
    plt.close(fig)
