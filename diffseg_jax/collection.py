"""Table 1 collected from evaluated runs: a cell per (dataset, architecture), its feed-forward (E1) and diffusion
(E2) runs, repeats over seeds averaged, each difference with its interval (``diffseg_jax.stats``); the
uncertainty rows and reliability panels of the same cells. Formatting and the command line: ``diffseg_jax.report``."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from diffseg_jax import configlib, result_files, stats

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


def run_config(metrics_path: str) -> dict | None:
    """The flattened ``config.json`` of the run whose evaluation folder holds ``metrics_path`` (the folder's
    parent is the workdir; a kept step's ``learning_curve/<name>/`` the folder below it), or None."""
    path = os.path.join(result_files.run_folder(metrics_path), "config.json")
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


def seed_order(run: Run) -> tuple:
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
        cells.setdefault(key, {}).setdefault(kind, []).append(Run(m, path, run_config(path)))
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
                runs.sort(key=seed_order)

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
            intervals = stats.difference_intervals(kinds)
            for name in ("iou", "ece") if intervals else ():
                row[f"delta_{name}_ci_low"], row[f"delta_{name}_ci_high"] = intervals[name]
        rows.append(row)
    return rows


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


COLUMNS = ["dataset", "method", "ff_iou", "ff_ece", "diff_iou", "diff_ece", "delta_iou", "delta_ece"]


# The CSV also keeps the 95 % interval of each difference: paired bootstrap over the test images for single runs
# (blank without both ensemble.npz), Welch's over the runs for repeated cells.
INTERVAL_COLUMNS = ["delta_iou_ci_low", "delta_iou_ci_high", "delta_ece_ci_low", "delta_ece_ci_high"]


# Repeated cells: how many runs, and the standard deviation over them (blank for a single run).
REPEAT_COLUMNS = ["ff_n", "ff_iou_std", "ff_ece_std", "diff_n", "diff_iou_std", "diff_ece_std"]
