"""Table 1 (and Fig. 1) of the paper from evaluated runs: ``python -m diffseg_jax.report --runs DIR... --out DIR``.

Collects every ``eval/metrics.json`` under the given folders (a workdir, its ``eval/`` folder, or a folder of
many runs) and writes ``table1.md``, ``table1.csv`` and ``table1.tex``: one row per dataset and method, the
feed-forward (E1) IoU and ECE, the diffusion (E2) IoU and ECE, and their difference (diffusion −
feed-forward), formatted as the paper (IoU in %, ECE to three decimals); where both runs of a cell kept their
``ensemble.npz``, each difference carries its 95 % paired-bootstrap interval over the test images
(:func:`compare`). A cell without a run stays blank. Several runs for one cell that differ only in ``seed``
(their ``config.json`` beside ``eval/`` says so; :data:`REPEAT_KEYS`) are repeats, beyond the paper's single
runs: the cell is their mean ± standard deviation (n), and a difference between two repeated cells carries the
95 % Welch interval over the runs, which counts the training's randomness that the bootstrap over images does
not; runs for one cell that differ in anything else are an error naming both and the keys. The IoU and ECE are
the ``iou``/``ece`` of each metrics.json, i.e. its ``eval.pooling``; runs pooled differently, or averaging
soft and hard members (``eval.member_output``), are not mixed in one table. Beyond the paper,
``uncertainty.{md,csv}``: per run (per seed for repeats), how well its std and entropy maps point at its
errors (``metrics.json``'s ``uncertainty`` block), and ``reliability.png``: the reliability diagram behind
each ECE, a panel per cell with its feed-forward and diffusion runs. ``--compare EVAL_DIR...`` draws Fig. 1 of
evaluated runs (their ``eval/`` folders or their workdirs) and writes ``comparison.json`` and their
reliability diagrams in ``comparison_reliability.png`` (:func:`write_comparison`) from their ``ensemble.npz``,
without sampling again. Runs evaluated at several kept steps (``diffseg_jax.table1`` with ``table.eval_steps``) also
give ``learning_curves.{md,csv,png}``: IoU, ECE and the std map's error AUROC against the training step per run
and sampler (:func:`collect_learning_curves`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from diffseg_jax import comparison, configlib, result_files

# Display names and the paper's order.
METHODS = {
    "nnunet": "nnUNet",
    "segformer": "SegFormer",
    "ensemdiff": "EnsemDiff",
    "segdiff": "SegDiff",
    "medsegdiff": "MedSegDiff",
    "medsegdiff_new": "MedSegDiff (new)",
}
DATASETS = {"isic2016": "ISIC16", "monuseg2018": "MoNuSeg", "her2": "HER2"}
KINDS = {"e1": "ff", "e2": "diff"}
COLUMNS = ["dataset", "method", "ff_iou", "ff_ece", "diff_iou", "diff_ece", "delta_iou", "delta_ece"]
# The CSV also keeps the 95 % interval of each difference: paired bootstrap over the test images for single runs
# (blank without both ensemble.npz), Welch's over the runs for repeated cells.
INTERVAL_COLUMNS = ["delta_iou_ci_low", "delta_iou_ci_high", "delta_ece_ci_low", "delta_ece_ci_high"]
# Repeated cells: how many runs, and the standard deviation over them (blank for a single run).
REPEAT_COLUMNS = ["ff_n", "ff_iou_std", "ff_ece_std", "diff_n", "diff_iou_std", "diff_ece_std"]
# What may differ between repeats of one setting (config.json keys): the seed, and where the same data was built.
REPEAT_KEYS = ("seed", "data.data_dir")
# How metrics.json says a run was scored: repeats must agree on it as on their configs.
SCORING_KEYS = (
    "num_images",
    "ensemble_size",
    "tta",
    "member_output",
    "sampler",
    "ddim_steps",
    "weights",
    "step",
)


class Run(NamedTuple):
    """An evaluated run: its metrics.json (dict and path) and its workdir's config.json flattened to
    ``{'group.key': value}`` (None where the evaluation lies outside a run's workdir)."""

    metrics: dict
    path: str
    config: dict | None

    @property
    def seed(self):
        return None if self.config is None else self.config.get("seed")


def _run_config(metrics_path: str) -> dict | None:
    """The flattened ``config.json`` of the run whose evaluation folder holds ``metrics_path`` (the folder's
    parent is the workdir), or None."""
    path = os.path.join(os.path.dirname(os.path.dirname(metrics_path)), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return configlib.flatten(json.load(f))
        except ValueError as e:
            raise ValueError(
                f"{path} is not a readable config.json ({e}); leave its run out of --runs."
            ) from e


def _check_repeats(key: tuple[str, str], kind: str, runs: list[Run]) -> None:
    """Refuses runs for one cell unless they repeat one setting with other seeds: the same config apart from
    :data:`REPEAT_KEYS`, scored the same way (:data:`SCORING_KEYS`), each seed once."""
    first = runs[0]
    for other in runs[1:]:
        pair = f"Two {kind} runs for dataset {key[0]!r} and method {key[1]!r}: {first.path} and {other.path}"
        if first.config is None or other.config is None:
            alone = first if first.config is None else other
            raise ValueError(
                f"{pair}; no config.json beside {os.path.dirname(alone.path)} tells whether they repeat one "
                "setting with other seeds. Pass only one of them to --runs."
            )
        keys = sorted((set(first.config) | set(other.config)) - set(REPEAT_KEYS))
        differ = [(k, first.config.get(k), other.config.get(k)) for k in keys]
        differ += [(f"metrics.json {k}", first.metrics.get(k), other.metrics.get(k)) for k in SCORING_KEYS]
        differ = [(k, a, b) for k, a, b in differ if a != b]
        if differ:
            shown = "; ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in differ[:5])
            more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
            raise ValueError(
                f"{pair}; they differ in more than their seed ({shown}{more}). Pass only one of them to --runs; "
                "runs that differ only in `seed` are averaged into one cell."
            )
    seeds = [r.seed for r in runs]
    twice = sorted({s for s in seeds if seeds.count(s) > 1}, key=repr)
    if twice:
        paths = ", ".join(r.path for r in runs if r.seed == twice[0])
        raise ValueError(
            f"{len(runs)} {kind} runs for dataset {key[0]!r} and method {key[1]!r} repeat seed {twice[0]!r} "
            f"({paths}): copies of one run? Pass each seed once."
        )


def _seed_order(run: Run) -> tuple:
    """Repeats by seed, numerically (2 before 10); a seed that is not an integer after them."""
    numeric = isinstance(run.seed, int)
    return (not numeric, run.seed if numeric else 0, repr(run.seed))


def _cells(paths: Sequence[str]) -> dict[tuple[str, str], dict[str, list[Run]]]:
    """{(dataset, method): {'ff' / 'diff': [Run, ...]}} of the E1/E2 runs under ``paths``, in the paper's order;
    several runs for one cell must repeat one setting with other seeds (:func:`_check_repeats`), and runs of
    different poolings or member outputs are refused."""
    cells: dict[tuple[str, str], dict[str, list[Run]]] = {}
    poolings, member_outputs = set(), set()
    for path in result_files.find_metrics(paths):
        m = result_files.read_metrics(path, "--runs")
        kind = KINDS.get(m.get("experiment"))
        if kind is None or "iou" not in m:
            continue  # E3/E4 runs have no segmentation metrics
        poolings.add(result_files.pooling_of(m))
        member_outputs.add(m.get("member_output", "soft"))
        key = (m.get("dataset", "?"), m["model"])
        cells.setdefault(key, {}).setdefault(kind, []).append(Run(m, path, _run_config(path)))
    if len(poolings) > 1:
        raise ValueError(
            f"The runs mix pixel poolings {sorted(poolings)}; evaluate them with the same eval.pooling."
        )
    if len(member_outputs) > 1:
        raise ValueError(
            f"The runs mix ensemble means of soft and hard members {sorted(member_outputs)}, whose ECEs score "
            "different probabilities; evaluate them with the same eval.member_output."
        )
    for key, kinds in cells.items():
        for kind, runs in kinds.items():
            if len(runs) > 1:
                _check_repeats(key, kind, runs)
                runs.sort(key=_seed_order)

    def order(key):
        dataset, method = key
        d = list(DATASETS).index(dataset) if dataset in DATASETS else len(DATASETS)
        k = list(METHODS).index(method) if method in METHODS else len(METHODS)
        return (d, dataset, k, method)

    return {key: cells[key] for key in sorted(cells, key=order)}


def tables(paths: Sequence[str]) -> dict[str, list]:
    """Everything the report draws from the runs under ``paths``, each ``metrics.json`` read once: ``rows``
    (:func:`collect`), ``uncertainty`` (:func:`collect_uncertainty`) and ``reliability``
    (:func:`collect_reliability`), the arguments of :func:`write`."""
    cells = _cells(paths)
    return {
        "rows": _rows(cells),
        "uncertainty": _uncertainty_rows(cells),
        "reliability": _reliability_panels(cells),
    }


def collect(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The Table 1 rows (dicts keyed by ``COLUMNS``; None where no run exists) from the runs under ``paths``."""
    return _rows(_cells(paths))


def _rows(cells: dict) -> list[dict[str, Any]]:
    rows = []
    for (dataset, method), kinds in cells.items():
        row = {"dataset": dataset, "method": method}
        for kind in ("ff", "diff"):
            runs = kinds.get(kind, [])
            row[f"{kind}_n"] = len(runs) or None
            for name in ("iou", "ece"):
                values = np.array([float(r.metrics[name]) for r in runs])
                row[f"{kind}_{name}"] = float(values.mean()) if len(values) else None
                row[f"{kind}_{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        both = "ff" in kinds and "diff" in kinds
        row["delta_iou"] = row["diff_iou"] - row["ff_iou"] if both else None
        row["delta_ece"] = row["diff_ece"] - row["ff_ece"] if both else None
        row.update(dict.fromkeys(INTERVAL_COLUMNS))
        if both:
            intervals = _difference_intervals(kinds)
            for name in ("iou", "ece") if intervals else ():
                row[f"delta_{name}_ci_low"], row[f"delta_{name}_ci_high"] = intervals[name]
        rows.append(row)
    return rows


def _difference_intervals(kinds: dict[str, list[Run]]) -> dict[str, tuple[float, float]] | None:
    """The 95 % intervals of a cell's diffusion-minus-feed-forward IoU and ECE: the paired bootstrap over test
    images for one run a side (:func:`_paired_interval`), Welch's over the runs where both sides are repeated
    (:func:`welch_interval`); None otherwise (one side a single run: its spread over seeds is unknown)."""
    ff, diff = kinds["ff"], kinds["diff"]
    if len(ff) == 1 and len(diff) == 1:
        boot = _paired_interval(ff[0], diff[0])
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
    from scipy import stats  # noqa: PLC0415 — only repeated cells need it

    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    delta = float(b.mean() - a.mean())
    if va + vb == 0:  # every run scored the same: no spread to give an interval width
        return delta, delta
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof) * np.sqrt(va + vb))
    return delta - half, delta + half


def _paired_interval(ff: Run, diff: Run) -> dict[str, Any] | None:
    """The diffusion-minus-feed-forward bootstrap of a cell (as :func:`compare` has it, without the rest of the
    comparison; in the runs' pooling, which :func:`_cells` keeps one), or None where it cannot be had: an
    ``ensemble.npz`` missing, or no test images in common."""
    eval_dirs = [os.path.dirname(run.path) for run in (ff, diff)]
    if not all(os.path.exists(os.path.join(d, "ensemble.npz")) for d in eval_dirs):
        return None
    try:
        runs, maps = comparison._shared_maps(eval_dirs)
    except ValueError:  # evaluated on different test images
        return None
    return comparison._paired_bootstraps(runs, maps)[1]


# The companion table (beyond the paper): how well each ensemble's uncertainty maps point at its errors,
# metrics.json's ``uncertainty`` block (diffseg_jax.metrics.uncertainty_report).
UNCERTAINTY_COLUMNS = [
    "dataset",
    "method",
    "kind",
    "seed",  # blank unless the cell holds repeats
    "iou",
    "brier",
    "error_fraction",
    "mean_std",
    "std_error_auroc",
    "std_ueo",
    "std_image_spearman",
    "entropy_error_auroc",
    "entropy_ueo",
    "entropy_image_spearman",
]


def collect_uncertainty(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Rows keyed by ``UNCERTAINTY_COLUMNS``, one per evaluated E1/E2 run under ``paths`` whose metrics.json has
    an ``uncertainty`` block (runs evaluated before it existed are left out); None where a score is undefined."""
    return _uncertainty_rows(_cells(paths))


def _uncertainty_rows(cells: dict) -> list[dict[str, Any]]:
    rows = []
    for (dataset, method), kinds in cells.items():
        for kind in ("ff", "diff"):
            repeated = len(kinds.get(kind, [])) > 1
            for run in kinds.get(kind, []):
                m = run.metrics
                if "uncertainty" not in m:
                    continue
                row = {
                    "dataset": dataset,
                    "method": method,
                    "kind": kind,
                    "seed": run.seed if repeated else None,
                }
                rows.append(_uncertainty_row(row, m))
    return rows


def _uncertainty_row(row: dict[str, Any], m: dict) -> dict[str, Any]:
    """``row`` completed with the scores of one run's metrics.json."""
    u = m["uncertainty"]
    row["iou"] = float(m["iou"])
    row.update(brier=m["brier_pooled"], error_fraction=u["error_fraction"], mean_std=m["mean_std"])
    for name in ("std", "entropy"):
        row[f"{name}_error_auroc"] = u[name]["error_auroc"]
        row[f"{name}_ueo"] = u[name]["ueo"]
        row[f"{name}_image_spearman"] = u[name].get("image_spearman")  # None: evaluated before it existed
    return row


def collect_reliability(paths: Sequence[str]) -> list[tuple[str, list[tuple[str, dict]]]]:
    """The reliability diagrams behind Table 1's ECE columns: a panel per (dataset, method) cell, in the table's
    order, with its feed-forward ('FF') and diffusion ('Diff') runs' pooled bins from ``metrics.json``, as
    :func:`diffseg_jax.plots.reliability_figure` takes them."""
    return _reliability_panels(_cells(paths))


def _reliability_panels(cells: dict) -> list[tuple[str, list[tuple[str, dict]]]]:
    panels = []
    for (dataset, method), kinds in cells.items():
        series = [
            (label if len(runs) == 1 else f"{label} seed {run.seed}", run.metrics["reliability"])
            for kind, label in (("ff", "FF"), ("diff", "Diff"))
            for runs in [kinds.get(kind, [])]
            for run in runs
            if "reliability" in run.metrics
        ]
        if series:
            panels.append((f"{DATASETS.get(dataset, dataset)} · {METHODS.get(method, method)}", series))
    return panels


def uncertainty_markdown(rows: list[dict[str, Any]]) -> str:
    """The uncertainty table as Markdown: IoU and error pixels in %, the scores to three decimals; 'image ρ' is
    the Spearman correlation of an image's mean uncertainty with its 1 − IoU."""
    header = (
        "| Dataset | Method | Kind | IoU ↑ | Brier ↓ | error pixels | mean std | std: error AUROC ↑ | std: UEO ↑ "
        "| std: image ρ ↑ | entropy: error AUROC ↑ | entropy: UEO ↑ | entropy: image ρ ↑ |"
    )
    lines = [header, "|" + "---|" * 13]
    last = None
    for r in rows:
        dataset = DATASETS.get(r["dataset"], r["dataset"])
        cells = [dataset if dataset != last else "", METHODS.get(r["method"], r["method"])]
        kind = {"ff": "FF", "diff": "Diff"}[r["kind"]]
        cells.append(kind if r.get("seed") is None else f"{kind} (seed {r['seed']})")
        cells += [f"{100 * r['iou']:.2f}", f"{r['brier']:.3f}", f"{100 * r['error_fraction']:.1f} %"]
        cells += [
            "" if r[c] is None else f"{r[c]:.3f}"
            for c in UNCERTAINTY_COLUMNS[UNCERTAINTY_COLUMNS.index("mean_std") :]
        ]
        lines.append("| " + " | ".join(cells) + " |")
        last = dataset
    return "\n".join(lines) + "\n"


def _fmt(column: str, value: float | None) -> str:
    """The paper's formatting: IoU in % with 2 decimals, ECE with 3, differences signed."""
    if value is None:
        return ""
    if column.endswith("iou"):
        return f"{100 * value:+.2f}" if column.startswith("delta") else f"{100 * value:.2f}"
    return f"{value:+.3f}" if column.startswith("delta") else f"{value:.3f}"


def _display(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Table cells; a difference with its interval reads '+0.53 [-0.21, +1.30]', a repeated cell its mean,
    standard deviation and number of runs: '86.39 ± 0.41 (3)'."""
    out, last = [], None
    for row in rows:
        dataset = DATASETS.get(row["dataset"], row["dataset"])
        cells = [_fmt(c, row[c]) for c in COLUMNS[2:]]
        for i, column in enumerate(COLUMNS[2:6]):
            std, n = row.get(f"{column}_std"), row.get(f"{column.split('_')[0]}_n")
            if std is not None:
                cells[i] += f" ± {_fmt(column, std)} ({n})"
        for i, name in ((4, "delta_iou"), (5, "delta_ece")):
            low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
            if low is not None and high is not None:
                cells[i] += f" [{_fmt(name, low)}, {_fmt(name, high)}]"
        out.append([dataset if dataset != last else "", METHODS.get(row["method"], row["method"])] + cells)
        last = dataset
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """Table 1 as a Markdown table."""
    header = "| Dataset | Method | FF IoU ↑ | FF ECE ↓ | Diff IoU ↑ | Diff ECE ↓ | Δ IoU | Δ ECE |"
    lines = [header, "|" + "---|" * 8]
    lines += ["| " + " | ".join(r) + " |" for r in _display(rows)]
    if any(row.get(f"{kind}_n") and row[f"{kind}_n"] > 1 for row in rows for kind in ("ff", "diff")):
        lines += ["", REPEATS_NOTE]
    return "\n".join(lines) + "\n"


REPEATS_NOTE = (
    "x ± s (n): mean and standard deviation of n runs that differ only in their seed; a difference between "
    "two such cells comes with the 95 % Welch interval over the runs, one between single runs with the 95 % "
    "paired-bootstrap interval over the test images."
)


def latex(rows: list[dict[str, Any]]) -> str:
    """Table 1 as a LaTeX ``tabular`` (booktabs), grouped headers as in the paper."""
    lines = [
        r"\begin{tabular}{llrrrrrr}",
        r"\toprule",
        r" & & \multicolumn{2}{c}{Feed-forward} & \multicolumn{2}{c}{Diffusion} & \multicolumn{2}{c}{Difference} \\",
        r"\cmidrule(lr){3-4}\cmidrule(lr){5-6}\cmidrule(lr){7-8}",
        r"Dataset & Method & IoU $\uparrow$ & ECE $\downarrow$ & IoU $\uparrow$ & ECE $\downarrow$ & IoU & ECE \\",
        r"\midrule",
    ]
    for r in _display(rows):
        cells = (c.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$") for c in r)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _write_csv(rows: list[dict[str, Any]], columns: list[str], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in columns})


def write(
    rows: list[dict[str, Any]],
    out_dir: str,
    uncertainty: list[dict[str, Any]] | None = None,
    reliability: list[tuple[str, list[tuple[str, dict]]]] | None = None,
) -> dict[str, str]:
    """Writes table1.{md,csv,tex} into ``out_dir``, uncertainty.{md,csv} when ``uncertainty`` rows
    (:func:`collect_uncertainty`) are given and reliability.png when ``reliability`` panels
    (:func:`collect_reliability`) are; returns their paths. The CSVs keep full precision."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"table1.{ext}") for ext in ("md", "csv", "tex")}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(rows))
    with open(paths["tex"], "w", encoding="utf-8") as f:
        f.write(latex(rows))
    _write_csv(rows, COLUMNS + INTERVAL_COLUMNS + REPEAT_COLUMNS, paths["csv"])
    if uncertainty:
        paths["uncertainty_md"] = os.path.join(out_dir, "uncertainty.md")
        paths["uncertainty_csv"] = os.path.join(out_dir, "uncertainty.csv")
        with open(paths["uncertainty_md"], "w", encoding="utf-8") as f:
            f.write(uncertainty_markdown(uncertainty))
        _write_csv(uncertainty, UNCERTAINTY_COLUMNS, paths["uncertainty_csv"])
    if reliability:
        from diffseg_jax import plots  # noqa: PLC0415

        paths["reliability"] = os.path.join(out_dir, "reliability.png")
        plots.reliability_figure(reliability, paths["reliability"])
    return paths


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
    from diffseg_jax import objectives

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
        config = _run_config(os.path.join(run, "eval", "metrics.json")) or {}
        prediction = objectives.prediction_type(m["experiment"], config.get("objective.prediction"))
        label = sampler_label(m.get("sampler", "ddpm"), m.get("ddim_steps"))
        key = (run, label, m.get("step"))
        if key in rows and not in_curve:
            continue
        std = (m.get("uncertainty") or {}).get("std") or {}
        rows[key] = dict(
            dataset=DATASETS.get(m.get("dataset"), m.get("dataset")),
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
            f"| {r['dataset']} | {METHODS.get(r['model'], r['model'])} | {r['experiment'].upper()} | "
            f"{r['prediction']} | {r['sampler']} | {r['seed']} | {r['step']} | "
            f"{num(None if r['iou'] is None else 100 * r['iou'], '.2f')} | {num(r['ece'], '.4f')} | "
            f"{num(r['mean_std'], '.4f')} | {num(r['std_error_auroc'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def write_learning_curves(rows: list[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """``learning_curves.{md,csv,png}`` of :func:`collect_learning_curves`' rows in ``out_dir``."""
    from diffseg_jax import plots  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    paths = {
        f"learning_curves_{e}": os.path.join(out_dir, f"learning_curves.{e}") for e in ("md", "csv", "png")
    }
    with open(paths["learning_curves_md"], "w", encoding="utf-8") as f:
        f.write(learning_curves_markdown(rows))
    _write_csv(rows, LEARNING_COLUMNS, paths["learning_curves_csv"])
    plots.learning_curves_figure(rows, paths["learning_curves_png"])
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        help="workdirs, eval/ folders, or folders of runs; runs of one cell that differ only in their seed are "
        "averaged (mean ± std, Welch intervals)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="EVAL_DIR",
        help="evaluated runs' eval/ folders or workdirs (e.g. a diffusion and a feed-forward run): Fig. 1 "
        "and comparison.json into --out, from their ensemble.npz, nothing sampled again",
    )
    parser.add_argument(
        "--num_images", type=int, default=4, help="--compare: rows of figure1.png (default 4)"
    )
    parser.add_argument("--out", default="table1", help="output folder (default: ./table1)")
    args = parser.parse_args(argv)
    if not (args.runs or args.compare):
        parser.error("give --runs (Table 1) and/or --compare (Fig. 1 and comparison.json).")
    paths = {}
    if args.compare:
        paths.update(comparison.write_comparison(args.compare, args.out, args.num_images))
        with open(paths["comparison"], encoding="utf-8") as f:
            print(f.read())
    if not args.runs:
        print("wrote " + ", ".join(paths.values()))
        return paths
    found = tables(args.runs)
    if not found["rows"]:
        raise SystemExit(
            f"No E1/E2 eval/metrics.json under {args.runs}; evaluate runs first (--mode evaluate)."
        )
    paths.update(write(found["rows"], args.out, found["uncertainty"], found["reliability"]))
    curves = collect_learning_curves(args.runs)
    if any(r["step"] != curves[0]["step"] for r in curves):  # evaluations at more than one step
        paths.update(write_learning_curves(curves, args.out))
        print(learning_curves_markdown(curves))
    print(markdown(found["rows"]))
    if found["uncertainty"]:
        print(uncertainty_markdown(found["uncertainty"]))
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    from diffseg_jax import cli

    # Its refusals (duplicate cells, mixed poolings, a corrupt metrics.json, no shared images) are ValueErrors.
    cli.reporting_user_errors(main, also=(ValueError,))
