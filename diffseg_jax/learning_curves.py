"""Learning curves (issue 32): each run's evaluations at its kept checkpoints (``table.eval_steps``), collected into
``learning_curves.{md,csv,png}``: IoU, ECE and the std map's error AUROC against the training step."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from diffseg_jax import collection, objectives, result_files

# Learning curves (issue 32): a run's evaluations at its kept checkpoints, ``<run>/learning_curve/step<S>_<sampler>/``
# (written by diffseg_jax.table1 with table.eval_steps), and its final ``eval/``.
CURVE_DIR = "learning_curve"


LEARNING_COLUMNS = [
    "dataset",
    "model",
    "experiment",
    "prediction",
    "sampler",
    "seed",
    "step",
    "iou",
    "ece",
    "mean_std",
    "std_error_auroc",
    "run",
]


def sampler_label(sampler: str, ddim_steps: int | None) -> str:
    """'ddpm', or 'ddim<K>' for DDIM with K steps."""
    return "ddpm" if sampler == "ddpm" else f"ddim{ddim_steps}"


def collect_learning_curves(paths: Sequence[str]) -> list[dict[str, Any]]:
    """One row per evaluation of a run at a kept step (``learning_curve/*/metrics.json``) or at its end
    (``eval/metrics.json``), under ``paths``: its dataset, model, experiment, prediction (``objective.prediction``
    of its config.json, or the experiment's own), sampler, seed, step, IoU and ECE (``eval.pooling``'s), the
    mean std and the std map's error AUROC. An evaluation found twice (the end step listed in ``eval_steps``)
    counts once. Sorted by run, sampler and step."""
    files = result_files.find_run_files(
        paths,
        (os.path.join("**", CURVE_DIR, "*", "metrics.json"), os.path.join("**", "eval", "metrics.json")),
    )
    rows: dict[tuple, dict[str, Any]] = {}
    for path in files:
        in_curve = os.path.basename(os.path.dirname(os.path.dirname(path))) == CURVE_DIR
        run = os.path.dirname(os.path.dirname(os.path.dirname(path)) if in_curve else os.path.dirname(path))
        m = result_files.read_metrics(path)
        if m.get("experiment") not in ("e1", "e2", "e3"):
            continue
        config = collection.run_config(os.path.join(run, "eval", "metrics.json")) or {}
        prediction = objectives.prediction_type(m["experiment"], config.get("objective.prediction"))
        label = sampler_label(m.get("sampler", "ddpm"), m.get("ddim_steps"))
        key = (run, label, m.get("step"))
        if key in rows and not in_curve:
            continue
        std = (m.get("uncertainty") or {}).get("std") or {}
        rows[key] = dict(
            dataset=collection.DATASETS.get(m.get("dataset"), m.get("dataset")),
            model=m.get("model"),
            experiment=m["experiment"],
            prediction="-" if m["experiment"] == "e1" else prediction,
            sampler="-" if m["experiment"] == "e1" else label,
            seed=config.get("seed"),
            step=m.get("step"),
            iou=m.get("iou"),
            ece=m.get("ece"),
            mean_std=m.get("mean_std"),
            std_error_auroc=std.get("error_auroc"),
            run=run,
        )
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], k[2] or 0))]


def learning_curves_markdown(rows: list[dict[str, Any]]) -> str:
    """The learning-curve rows as a Markdown table (IoU in %, as Table 1)."""

    def num(v, fmt):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        "| dataset | model | experiment | prediction | sampler | seed | step | IoU (%) | ECE | mean std | std→error AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {collection.METHODS.get(r['model'], r['model'])} | {r['experiment'].upper()} | "
            f"{r['prediction']} | {r['sampler']} | {r['seed']} | {r['step']} | "
            f"{num(None if r['iou'] is None else 100 * r['iou'], '.2f')} | {num(r['ece'], '.4f')} | "
            f"{num(r['mean_std'], '.4f')} | {num(r['std_error_auroc'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def write_learning_curves(rows: list[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """``learning_curves.{md,csv,png}`` of :func:`collect_learning_curves`' rows in ``out_dir``."""
    from diffseg_jax import plots  # noqa: PLC0415 — matplotlib only when drawing

    os.makedirs(out_dir, exist_ok=True)
    paths = {
        f"learning_curves_{e}": os.path.join(out_dir, f"learning_curves.{e}") for e in ("md", "csv", "png")
    }
    with open(paths["learning_curves_md"], "w", encoding="utf-8") as f:
        f.write(learning_curves_markdown(rows))
    result_files.write_csv(rows, LEARNING_COLUMNS, paths["learning_curves_csv"])
    plots.learning_curves_figure(rows, paths["learning_curves_png"])
    return paths
