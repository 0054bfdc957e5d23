"""Two or more evaluated runs side by side: Fig. 1, their uncertainty maps, reliability diagrams and paired
bootstrap intervals of their IoU and ECE differences over the test images they share (``comparison.json``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

from diffseg_jax import result_files


def json_number(value) -> float | None:
    """A score for JSON: None where it is undefined (NaN: no errors, a constant map), as strict JSON has no NaN."""
    value = float(value)
    return value if math.isfinite(value) else None


def compare(eval_dirs: Sequence[str], evaluations: tuple | None = None) -> dict[str, Any]:
    """How the uncertainty maps of evaluated runs relate, on the test images they all have (``comparison.json``).

    The paper's Fig. 1 observation in numbers: feed-forward ensembles "highlight similar areas as the
    diffusion models as uncertain", but are "less uncertain overall". Per run: its mean std on the shared
    images and, against the first run, the Pearson correlation of the std maps (similar areas) and of the
    mean maps, the ratio of the mean stds (how much less uncertain), and the reliability-diagram bins of its
    ensemble mean on the shared images (``reliability``, as ``metrics.json``'s). Also each run's
    ``uncertainty`` block from its ``metrics.json`` (whether its maps point at its errors), when it has one.
    For every run after the first, ``paired_bootstrap_vs_first``: its IoU and ECE minus the first's on the
    shared images, with 95 % intervals from resampling the images (is a Table 1 difference more than the
    choice of test images?), pooled as the runs' metrics.json say (``pooling``; pixels pooled where they
    differ). Reads ``ensemble.npz`` files only (or takes ``evaluations``, what
    :func:`diffseg_jax.result_files.read_evaluations` read of them): nothing is sampled again.
    """
    from diffseg_jax import metrics, plots  # noqa: PLC0415 — JAX only when comparing: --help stays fast.

    eval_dirs = [
        result_files.evaluation_dir(d) for d in eval_dirs
    ]  # a workdir's eval/, as read_evaluations reads it
    runs, maps = shared_maps(eval_dirs, evaluations)
    first = maps[0]
    first_std = float(first["std"].mean())
    bootstraps = paired_bootstraps(runs, maps)
    entries = []
    for j, (d, (_, meta), m) in enumerate(zip(eval_dirs, runs, maps)):
        entries.append(
            {
                "eval_dir": d,
                "name": plots.run_name(meta),
                "model": meta.get("model"),
                "experiment": meta.get("experiment"),
                "mean_std": float(m["std"].mean()),
                "std_correlation_with_first": json_number(
                    metrics.pearson_correlation(first["std"], m["std"])
                ),
                "mean_correlation_with_first": json_number(
                    metrics.pearson_correlation(first["mean"], m["mean"])
                ),
                "mean_std_over_first": float(m["std"].mean()) / first_std if first_std > 0 else None,
                "reliability": {
                    k: np.asarray(v).tolist()
                    for k, v in metrics.calibration_bins(
                        m["mean"], m["mask"] > 0.5, meta.get("ece_bins", 10)
                    ).items()
                },
                "uncertainty": meta.get("uncertainty"),
                "paired_bootstrap_vs_first": bootstraps[j],
            }
        )
    return {"num_images": len(first["mean"]), "runs": entries}


def shared_maps(
    eval_dirs: Sequence[str], evaluations: tuple | None = None
) -> tuple[list[tuple[dict, dict]], list[dict[str, np.ndarray]]]:
    """Evaluated runs (:func:`diffseg_jax.result_files.read_evaluations`, unless ``evaluations`` holds what it read)
    and, per run, its mean, std and mask arrays of the test images they all have, in the first run's order;
    ValueError if they share none."""

    runs, rows = evaluations or result_files.read_evaluations(list(eval_dirs))
    maps = [
        {k: arrays[k][[r[j] for r in rows]] for k in ("mean", "std", "mask")}
        for j, (arrays, _) in enumerate(runs)
    ]
    return runs, maps


BOOTSTRAP_SAMPLES = 1000


def paired_bootstraps(runs: list[tuple[dict, dict]], maps: list[dict[str, np.ndarray]]) -> list[dict | None]:
    """For each run after the first (None for the first), its IoU and ECE minus the first's on the shared
    images, with 95 % percentile intervals of a paired bootstrap over the images
    (:func:`diffseg_jax.metrics.paired_bootstrap`, a fixed key, the first run's ECE bins), in the runs' common
    pooling (pixels pooled if they differ), which each result names."""
    import jax  # noqa: PLC0415

    from diffseg_jax import metrics  # noqa: PLC0415 — JAX only when comparing: report --help stays fast

    num_bins = runs[0][1].get("ece_bins", 10)
    poolings = {result_files.pooling_of(meta) for _, meta in runs}
    pooling = poolings.pop() if len(poolings) == 1 else "pooled"
    stats = [metrics.image_statistics(m["mean"], m["mask"], 0.5, num_bins) for m in maps]
    results: list[dict | None] = [None]
    for other in stats[1:]:
        out = metrics.paired_bootstrap(stats[0], other, jax.random.PRNGKey(0), BOOTSTRAP_SAMPLES, pooling)
        result: dict[str, Any] = {"num_samples": BOOTSTRAP_SAMPLES, "pooling": pooling}
        for name in ("iou", "ece"):
            result[f"{name}_delta"] = float(out[f"{name}_delta"])
            result[f"{name}_delta_ci95"] = [
                float(v) for v in np.percentile(out[f"{name}_deltas"], [2.5, 97.5])
            ]
        results.append(result)
    return results


def write_comparison(eval_dirs: Sequence[str], out_dir: str, num_images: int = 4) -> dict[str, str]:
    """``figure1.png`` (Fig. 1: image, truth, then each run's mean and std; ``num_images`` rows),
    ``comparison.json`` (:func:`compare`) and ``comparison_reliability.png`` (the runs' reliability diagrams on
    their shared images, one panel) of evaluated runs, into ``out_dir``; returns their paths."""
    from diffseg_jax import plots  # noqa: PLC0415 — matplotlib only when drawing

    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "figure1": os.path.join(out_dir, "figure1.png"),
        "comparison": os.path.join(out_dir, "comparison.json"),
        # Not reliability.png: an evaluated run's own diagram (or a table's) may live in out_dir.
        "comparison_reliability": os.path.join(out_dir, "comparison_reliability.png"),
    }
    evaluations = result_files.read_evaluations(list(eval_dirs))  # each ensemble.npz read once, for both
    plots.comparison_figure(evaluations, paths["figure1"], num_images)
    comparison = compare(eval_dirs, evaluations)
    with open(paths["comparison"], "w", encoding="utf-8") as f:
        json.dump(comparison, f, indent=2)
    title = f"{comparison['num_images']} shared test images"
    series = [(r["name"], r["reliability"]) for r in comparison["runs"]]
    plots.reliability_figure([(title, series)], paths["comparison_reliability"])
    return paths
