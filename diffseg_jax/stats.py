"""The statistics of Table 1's differences: Welch intervals over repeated runs (seeds), paired bootstrap intervals over
the test images of single runs."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from diffseg_jax import comparison


def difference_intervals(kinds: dict[str, list]) -> dict[str, tuple[float, float]] | None:
    """The 95 % intervals of a cell's diffusion-minus-feed-forward IoU and ECE: the paired bootstrap over test
    images for one run a side (:func:`paired_interval`), Welch's over the runs where both sides are repeated
    (:func:`welch_interval`); None otherwise (one side a single run: its spread over seeds is unknown)."""
    ff, diff = kinds["ff"], kinds["diff"]
    if len(ff) == 1 and len(diff) == 1:
        boot = paired_interval(ff[0], diff[0])
        return None if boot is None else {name: tuple(boot[f"{name}_delta_ci95"]) for name in ("iou", "ece")}
    if len(ff) > 1 and len(diff) > 1:
        return {
            name: welch_interval([r.metrics[name] for r in ff], [r.metrics[name] for r in diff])
            for name in ("iou", "ece")
        }
    return None


def welch_interval(
    first: Sequence[float], second: Sequence[float], level: float = 0.95
) -> tuple[float, float]:
    """The ``level`` confidence interval of mean(second) − mean(first) by Welch's t (unequal variances,
    Welch–Satterthwaite degrees of freedom), as ``scipy.stats.ttest_ind(second, first, equal_var=False)
    .confidence_interval(level)``; each side needs two values or more."""
    from scipy import stats as scipy_stats  # noqa: PLC0415 — only repeated cells need scipy

    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    delta = float(b.mean() - a.mean())
    if va + vb == 0:  # every run scored the same: no spread to give an interval width
        return delta, delta
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, dof) * np.sqrt(va + vb))
    return delta - half, delta + half


def paired_interval(ff, diff) -> dict[str, Any] | None:
    """The diffusion-minus-feed-forward bootstrap of a cell (as :func:`diffseg_jax.comparison.compare` has it, without the rest of the
    comparison; in the runs' pooling, which ``diffseg_jax.collection`` keeps one), or None where it cannot be had: an
    ``ensemble.npz`` missing, or no test images in common."""
    eval_dirs = [os.path.dirname(run.path) for run in (ff, diff)]
    if not all(os.path.exists(os.path.join(d, "ensemble.npz")) for d in eval_dirs):
        return None
    try:
        runs, maps = comparison.shared_maps(eval_dirs)
    except ValueError:  # evaluated on different test images
        return None
    return comparison.paired_bootstraps(runs, maps)[1]
