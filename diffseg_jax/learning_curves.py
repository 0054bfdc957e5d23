"""Learning curves (issue 32): each run's evaluations at its kept checkpoints (``table.eval_steps``), collected into
``learning_curves.{md,csv,png}``: IoU, ECE and the std map's error AUROC against the training step, and for E2/E3
runs the network's mask prediction error at t = T - 1 beside the predict-the-mean limit
(``learning_curve/step<S>_mask_error.json``, written by :mod:`diffseg_jax.analysis.late_error`).

Runs trained in separate workdirs (E1, E2-eps and E2-x0 grids, say) are drawn together with
``python -m diffseg_jax.learning_curves --runs WORKDIR... --out FOLDER``."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Sequence

from diffseg_jax import collection, objectives, result_files

# Learning curves (issue 32): a run's evaluations at its kept checkpoints, ``<run>/learning_curve/step<S>_<sampler>/``
# (written by diffseg_jax.table1 with table.eval_steps), and its final ``eval/``.
CURVE_DIR = result_files.CURVE_DIR
# A step's mask prediction error at the highest t and its predict-the-mean limit (diffseg_jax.analysis.late_error):
# ``<run>/learning_curve/step<S>_mask_error.json``.
MASK_ERROR_SUFFIX = "_mask_error.json"


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
    "mask_error_T",
    "mean_limit_T",
    "run",
]


def read_mask_error(path: str) -> dict[str, Any] | None:
    """A ``step<S>_mask_error.json`` as its record plus ``mask_error_T`` and ``mean_limit_T`` (the values at its
    last timestep, T - 1), or None where it is missing; a file cut short is a ValueError naming it."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except ValueError as e:
            raise ValueError(
                f"{path} is not a readable mask-error record ({e}); delete it and rerun "
                "`python -m diffseg_jax.analysis.late_error --runs <run>` to write it again."
            ) from e
    return dict(record, mask_error_T=record["mask_error"][-1], mean_limit_T=record["mean_limit"][-1])


def sampler_label(sampler: str, ddim_steps: int | None) -> str:
    """'ddpm', or 'ddim<K>' for DDIM with K steps."""
    return "ddpm" if sampler == "ddpm" else f"ddim{ddim_steps}"


def collect_learning_curves(paths: Sequence[str]) -> list[dict[str, Any]]:
    """One row per evaluation of a run at a kept step (``learning_curve/*/metrics.json``) or at its end
    (``eval/metrics.json``), under ``paths``: its dataset, model, experiment, prediction (``objective.prediction``
    of its config.json, or the experiment's own), sampler, seed, step, IoU and ECE (``eval.pooling``'s), the
    mean std and the std map's error AUROC, and ``mask_error_T`` / ``mean_limit_T`` from the step's
    ``learning_curve/step<S>_mask_error.json`` where there is one (None elsewhere; a step with that file and no
    evaluation gets a row of its own, sampler '-'). An evaluation found twice (the end step listed in
    ``eval_steps``) counts once. Sorted by run, sampler and step."""
    files = result_files.find_run_files(
        paths,
        (os.path.join("**", CURVE_DIR, "*", "metrics.json"), os.path.join("**", "eval", "metrics.json")),
    )
    rows: dict[tuple, dict[str, Any]] = {}
    for path in files:
        in_curve = os.path.basename(os.path.dirname(os.path.dirname(path))) == CURVE_DIR
        run = result_files.run_folder(path)
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
            mask_error_T=None,
            mean_limit_T=None,
            run=run,
        )
    errors = result_files.find_run_files(paths, (os.path.join("**", CURVE_DIR, f"step*{MASK_ERROR_SUFFIX}"),))
    for path in errors:
        r = read_mask_error(path)
        run = os.path.dirname(os.path.dirname(path))
        matching = [row for (k_run, _, k_step), row in rows.items() if k_run == run and k_step == r["step"]]
        if not matching:  # a kept step with no evaluation: a row for the mask error alone
            config = collection.run_config(os.path.join(run, "eval", "metrics.json")) or {}
            row = dict.fromkeys(LEARNING_COLUMNS)
            row.update(
                dataset=collection.DATASETS.get(r.get("dataset"), r.get("dataset")),
                model=r.get("model"),
                experiment=r.get("experiment"),
                prediction=objectives.prediction_type(r["experiment"], config.get("objective.prediction")),
                sampler="-",
                seed=config.get("seed"),
                step=r["step"],
                run=run,
            )
            rows[(run, "-", r["step"])] = row
            matching = [row]
        for row in matching:
            row.update(mask_error_T=r["mask_error_T"], mean_limit_T=r["mean_limit_T"])
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], k[2] or 0))]


def learning_curves_markdown(rows: list[dict[str, Any]]) -> str:
    """The learning-curve rows as a Markdown table (IoU in %, as Table 1)."""

    def num(v, fmt):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        "| dataset | model | experiment | prediction | sampler | seed | step | IoU (%) | ECE | mean std | std→error AUROC "
        "| mask error at T-1 | predict-the-mean limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {collection.METHODS.get(r['model'], r['model'])} | {r['experiment'].upper()} | "
            f"{r['prediction']} | {r['sampler']} | {r['seed']} | {r['step']} | "
            f"{num(None if r['iou'] is None else 100 * r['iou'], '.2f')} | {num(r['ece'], '.4f')} | "
            f"{num(r['mean_std'], '.4f')} | {num(r['std_error_auroc'], '.3f')} | "
            f"{num(r.get('mask_error_T'), '.4f')} | {num(r.get('mean_limit_T'), '.4f')} |"
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


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """``learning_curves.{md,csv,png}`` of every evaluated run under ``--runs`` in ``--out``; the table printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", required=True, help="run workdirs, or folders of them (e.g. table1 grids)"
    )
    parser.add_argument("--out", default="learning_curves", help="output folder (default: ./learning_curves)")
    args = parser.parse_args(argv)
    missing = [p for p in args.runs if not os.path.isdir(p)]
    if missing:
        raise SystemExit(f"--runs: no such folder: {', '.join(missing)}")
    try:
        rows = collect_learning_curves(args.runs)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if not rows:
        raise SystemExit(
            f"No evaluated E1/E2/E3 run (eval/ or learning_curve/*/metrics.json) under {args.runs}; train with "
            "table1's --config.table.eval_steps, or evaluate the runs first."
        )
    paths = write_learning_curves(rows, args.out)
    print(learning_curves_markdown(rows), end="")
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
