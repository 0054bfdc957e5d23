"""The fingerprint-adaptive study's results summarised: per dataset and variant, the mean and spread over seeds and the
paired differences with the uniform baseline, as ``analysis/adaptive_study.{csv,npz,md,png,json}``
(``python -m diffseg_jax.analysis.adaptive_study`` runs the study and calls :func:`summarise`)."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from diffseg_jax import (
    plots,
)

# Variant name -> config overrides (dotted keys). 'uniform' is the published setting.
VARIANTS: dict[str, dict[str, object]] = {
    "uniform": {},
    "weights": {"timesteps.weighting": "fingerprint"},
    "importance": {"timesteps.weighting": "fingerprint", "timesteps.sampling": "fingerprint"},
    "loss_aware": {"timesteps.sampling": "loss_aware"},
    "adapted": {"diffusion.terminal": "rescale"},
    "terminal_1e-6": {"diffusion.terminal": "rescale", "diffusion.alpha_bar_T": 1e-6},
}


def load_results(out: str, datasets, seeds) -> dict[tuple[str, str], list[dict]]:
    """(dataset, variant) -> the per-seed result dicts found (the baseline's for an 'adapted' left untrained)."""
    results = {}
    for d in datasets:
        for v in VARIANTS:
            runs = []
            for s in seeds:
                path = os.path.join(out, "runs", f"{d}_{v}_s{s}.npz")
                if os.path.exists(path):
                    runs.append(dict(np.load(path), seed=s))
            if runs:
                results[(d, v)] = runs
    return results


def summarise(
    out: str, datasets, seeds, reports: dict[str, dict], variants: Sequence[str] = tuple(VARIANTS)
) -> dict[str, str]:
    """Writes ``analysis/adaptive_study.{csv,npz,md,png}`` from the result files; returns their paths."""
    results = load_results(out, datasets, seeds)
    adir = os.path.join(out, "analysis")
    os.makedirs(adir, exist_ok=True)
    paths = {k: os.path.join(adir, f"adaptive_study.{k}") for k in ("csv", "npz", "md", "png", "json")}
    lines = ["dataset,variant,seed,step,iou,ece,iou_per_image,ece_per_image"]
    cols: dict[str, list] = {c: [] for c in ("dataset", "variant", "seed", "step", "iou", "ece")}
    for (d, v), runs in sorted(results.items()):
        for r in runs:
            s = r["seed"]
            for i, step in enumerate(r["steps"]):
                vals = (r["iou"][i], r["ece"][i], r["iou_per_image"][i], r["ece_per_image"][i])
                lines.append(f"{d},{v},{s},{step}," + ",".join(f"{x:.6f}" for x in vals))
                for c, x in zip(cols, (d, v, s, step, r["iou"][i], r["ece"][i])):
                    cols[c].append(x)
    with open(paths["csv"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    np.savez(paths["npz"], **{c: np.asarray(x) for c, x in cols.items()})
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(reports, f, indent=2)
    md = [
        "Final IoU and ECE (pooled) as mean ± sd over seeds; Δ: paired differences with the same seed's uniform run; "
        "IoU over steps: the mean of all evaluations (the area under the convergence curve).",
        "",
        "| dataset | variant | seeds | IoU | ECE | Δ IoU | Δ ECE | IoU over steps | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(x):
        x = np.asarray(x, np.float64)
        return f"{x.mean():.4f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.4f}"

    for (d, v), runs in sorted(results.items(), key=lambda kv: (kv[0][0], list(VARIANTS).index(kv[0][1]))):
        iou = np.array([r["iou"][-1] for r in runs])
        ece = np.array([r["ece"][-1] for r in runs])
        base = {r["seed"]: r for r in results.get((d, "uniform"), [])}
        pairs = [(r, base[r["seed"]]) for r in runs if r["seed"] in base] if v != "uniform" else []
        d_iou = spread([r["iou"][-1] - b["iou"][-1] for r, b in pairs]) if pairs else "–"
        d_ece = spread([r["ece"][-1] - b["ece"][-1] for r, b in pairs]) if pairs else "–"
        auc = spread([r["iou"].mean() for r in runs])
        secs = np.mean([float(r["seconds"]) for r in runs])
        md.append(
            f"| {d} | {v} | {len(runs)} | {spread(iou)} | {spread(ece)} | {d_iou} | {d_ece} | {auc} | {secs:.0f} |"
        )
    for d in datasets:
        if (d, "adapted") not in results and (d, "uniform") in results and "adapted" in variants:
            md.append(
                f"| {d} | adapted | – | = uniform | = uniform | – | – | – | (the linear schedule already converges) |"
            )
    md += ["", "| dataset | foreground | ᾱ_T (linear) | information left at T | converged | adapted ᾱ_T |"]
    md += ["|---|---|---|---|---|---|"]
    for d, r in reports.items():
        md.append(
            f"| {d} | {r['foreground_rate']:.3f} | {r['base_alpha_bar_T']:.3g} | {r['information_base']:.2e} | "
            f"{'yes' if r['converged_base'] else 'no'} | {r['alpha_bar_T']:.3g} |"
        )
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    curves = {
        key: (runs[0]["steps"], np.stack([r["iou"] for r in runs]), np.stack([r["ece"] for r in runs]))
        for key, runs in results.items()
    }
    plots.convergence_figure(curves, paths["png"])
    print("\n".join(md), flush=True)
    return paths
