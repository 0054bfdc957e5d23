"""Variants of one cell compared over seeds (issue 33): E1, E2-ε, E2-x0, BerDiff, self-conditioning, samplers, ...

Table 1 (:mod:`diffseg_jax.collection`) holds one feed-forward and one diffusion setting per (dataset,
architecture) and refuses runs of a cell that differ in more than their seed. A study of variants needs the
opposite: runs of several settings side by side, each averaged over its seeds, each against one reference setting
(usually E1). This module groups the evaluated runs under the given folders by setting, the run's ``config.json``
without its seed, data folder, evaluation and bookkeeping keys (:data:`IGNORED`) together with how the evaluation
scored it (metrics.json's :data:`diffseg_jax.collection.SCORING_KEYS` and its DDIM η), and names each setting by
the keys in which it differs from the others. For every setting it gives the mean ± standard deviation over seeds
of IoU, ECE, the std and entropy maps' error AUROC and the members' mean std, the network calls per member, and
the difference to the reference with two 95 % intervals: Welch's over the two sets of seeds, and the paired t
interval over the seeds both ran (the same seed gives both the same data order and test images).

    python -m diffseg_jax.variants --runs runs/grid_x0 runs/grid_berdiff --reference experiment=e1 --out variants

writes ``variants.{md,csv}`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from diffseg_jax import collection, result_files, stats

# config.json keys that do not make a setting: what collection.REPEAT_KEYS lets repeats differ in, how the run was
# evaluated and analysed (metrics.json records how it was scored, and a re-evaluation may override eval.*), and
# how often it logged and kept checkpoints.
IGNORED = (
    *collection.REPEAT_KEYS,
    "eval.*",
    "analysis.*",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_every",
    "train.keep_checkpoints",
    "train.keep_at",
)

# What every setting reports, each from a run's metrics.json (see metric_values).
METRICS = ("iou", "ece", "std_error_auroc", "entropy_error_auroc", "mean_std")

COLUMNS = [
    "dataset",
    "model",
    "variant",
    "n",
    "seeds",
    "calls_per_member",
    *(f"{name}{suffix}" for name in METRICS for suffix in ("", "_std")),
    *(
        f"delta_{name}{suffix}"
        for name in METRICS
        for suffix in ("", "_welch_low", "_welch_high", "_paired_n", "_paired_low", "_paired_high")
    ),
    "is_reference",
    "runs",
]


class Setting(NamedTuple):
    """One setting's runs (:class:`diffseg_jax.collection.Run`, by seed) and what tells it apart."""

    dataset: str
    model: str
    key: tuple  # the (name, value) items that make the setting
    runs: list


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in IGNORED)


def metric_values(metrics: dict) -> dict[str, float | None]:
    """:data:`METRICS` of one metrics.json (None where it lacks one, e.g. an evaluation without the uncertainty
    block)."""
    uncertainty = metrics.get("uncertainty") or {}

    def auroc(kind):
        value = (uncertainty.get(kind) or {}).get("error_auroc")
        return None if value is None else float(value)

    return {
        "iou": float(metrics["iou"]),
        "ece": float(metrics["ece"]),
        "std_error_auroc": auroc("std"),
        "entropy_error_auroc": auroc("entropy"),
        "mean_std": None if metrics.get("mean_std") is None else float(metrics["mean_std"]),
    }


def network_calls(metrics: dict, config: dict) -> int | None:
    """Network calls per ensemble member: 1 for E1's single pass, DDIM's step count, or T for DDPM (the run's
    ``diffusion.num_timesteps``); self-conditioning adds none (each step's pass takes the previous x̂0)."""
    if metrics.get("experiment") == "e1":
        return 1
    if metrics.get("sampler") == "ddim":
        return metrics.get("ddim_steps")
    if metrics.get("sampler") == "ddpm":
        return config.get("diffusion.num_timesteps")
    return None


def _setting_key(run: collection.Run) -> tuple:
    items = {k: v for k, v in run.config.items() if not _ignored(k)}
    items.update({k: run.metrics.get(k) for k in collection.SCORING_KEYS})  # no config key is named so
    if run.metrics.get("sampler") == "ddim" and "ddim_eta" in run.metrics:
        items["ddim_eta"] = run.metrics["ddim_eta"]
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in items.items()))


def settings(paths: Sequence[str]) -> list[Setting]:
    """The evaluated E1/E2 runs under ``paths`` grouped by setting, in the order they are found; a ValueError names
    a run without its config.json (its setting is unknown), two runs of one setting with the same seed, and runs
    that mix pixel poolings (their IoUs and ECEs are different quantities)."""
    groups: dict[tuple, Setting] = {}
    poolings = set()
    for path in result_files.find_metrics(paths):
        m = result_files.read_metrics(path, "--runs")
        if "iou" not in m:
            continue  # E3/E4 runs have no segmentation metrics
        config = collection.run_config(path)
        if config is None:
            raise ValueError(
                f"{path}: no config.json in {result_files.run_folder(path)}, so its setting is unknown. "
                "Pass run workdirs (or folders of them) to --runs, or leave this evaluation out."
            )
        poolings.add(result_files.pooling_of(m))
        run = collection.Run(m, path, config)
        key = _setting_key(run)
        dataset, model = m.get("dataset", "?"), m.get("model", "?")
        group = groups.setdefault((dataset, model, key), Setting(dataset, model, key, []))
        twin = next((r for r in group.runs if r.seed == run.seed), None)
        if twin is not None:
            raise ValueError(
                f"{twin.path} and {path} are one setting with the same seed {run.seed!r}: copies of one run, or "
                "two evaluations of it? Pass each once (a re-evaluation with other eval.* options scores the same "
                "way only if metrics.json records the difference)."
            )
        group.runs.append(run)
    if len(poolings) > 1:
        raise ValueError(
            f"The runs mix pixel poolings {sorted(poolings)}; evaluate them with the same eval.pooling."
        )
    for group in groups.values():
        group.runs.sort(key=collection.seed_order)
    return list(groups.values())


def labels(found: Sequence[Setting]) -> list[str]:
    """Each setting named by the items in which the settings of its (dataset, model) differ, e.g.
    ``experiment=e2, objective.prediction=x0`` (config.json's keys, and metrics.json's for how it was scored:
    ``sampler``, ``ddim_steps``, ``ddim_eta``, ``weights``, ...)."""
    out = []
    for s in found:
        peers = [p for p in found if (p.dataset, p.model) == (s.dataset, s.model)]
        names = sorted({k for p in peers for k, _ in p.key})
        values = [dict(p.key) for p in peers]
        differ = [k for k in names if len({v.get(k) for v in values}) > 1]
        own = dict(s.key)
        out.append(", ".join(f"{k}={_shown(own[k])}" for k in differ if k in own) or "(one setting)")
    return out


def _shown(encoded: str) -> str:
    value = json.loads(encoded)
    return value if isinstance(value, str) else encoded


def paired_t_interval(
    first: Sequence[float], second: Sequence[float], level: float = 0.95
) -> tuple[float, float]:
    """The ``level`` interval of mean(second − first) over pairs by Student's t with n − 1 degrees of freedom, as
    ``scipy.stats.ttest_rel(second, first).confidence_interval(level)``; needs two pairs or more."""
    from scipy import stats as scipy_stats

    d = np.asarray(second, np.float64) - np.asarray(first, np.float64)
    if len(d) < 2:
        raise ValueError(f"A paired interval needs two pairs or more, got {len(d)}.")
    half = float(scipy_stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return float(d.mean()) - half, float(d.mean()) + half


def compare(paths: Sequence[str], reference: str | None = "experiment=e1") -> list[dict[str, Any]]:
    """One row (:data:`COLUMNS`) per setting under ``paths``: mean and std over its seeds, and its difference to
    the reference setting of its (dataset, model), the one whose label contains ``reference`` (None: no
    differences). A reference text that matches no setting is an error, except the default's when no setting of a
    (dataset, model) is E1."""
    found = settings(paths)
    names = labels(found)
    rows = []
    for i, s in enumerate(found):
        values = [metric_values(r.metrics) for r in s.runs]
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        calls = {network_calls(r.metrics, r.config) for r in s.runs}
        row.update(
            dataset=s.dataset,
            model=s.model,
            variant=names[i],
            n=len(s.runs),
            seeds=" ".join(str(r.seed) for r in s.runs),
            calls_per_member=calls.pop() if len(calls) == 1 else None,
            runs=" ".join(result_files.run_folder(r.path) for r in s.runs),
        )
        for name in METRICS:
            column = [v[name] for v in values if v[name] is not None]
            row[name] = float(np.mean(column)) if column else None
            row[f"{name}_std"] = float(np.std(column, ddof=1)) if len(column) > 1 else None
        rows.append(row)
    if reference is None:
        return rows
    for cell in dict.fromkeys((s.dataset, s.model) for s in found):
        mine = [i for i, s in enumerate(found) if (s.dataset, s.model) == cell]
        hits = [i for i in mine if reference in names[i]]
        if not hits and reference == "experiment=e1":
            continue  # the default reference where a cell has no E1 run: no differences
        if len(hits) != 1:
            listed = "; ".join(names[i] for i in mine)
            raise ValueError(
                f"--reference {reference!r} matches {len(hits)} settings of {cell[0]} {cell[1]} (its settings: "
                f"{listed}). Give text that is in exactly one of these names."
            )
        for i in mine:
            rows[i]["is_reference"] = i == hits[0]
            if i != hits[0]:
                _differences(rows[i], found[hits[0]].runs, found[i].runs)
    return rows


def _differences(row: dict[str, Any], reference_runs: list, runs: list) -> None:
    """Fills ``row``'s delta columns: this setting minus the reference, Welch's and the paired interval."""
    ref_by_seed = {r.seed: metric_values(r.metrics) for r in reference_runs}
    own_by_seed = {r.seed: metric_values(r.metrics) for r in runs}
    for name in METRICS:
        ref = [v[name] for v in ref_by_seed.values() if v[name] is not None]
        own = [v[name] for v in own_by_seed.values() if v[name] is not None]
        if not (ref and own):
            continue
        row[f"delta_{name}"] = float(np.mean(own) - np.mean(ref))
        if len(ref) > 1 and len(own) > 1:
            row[f"delta_{name}_welch_low"], row[f"delta_{name}_welch_high"] = stats.welch_interval(ref, own)
        pairs = [
            (ref_by_seed[seed][name], own_by_seed[seed][name])
            for seed in own_by_seed
            if seed in ref_by_seed and None not in (ref_by_seed[seed][name], own_by_seed[seed][name])
        ]
        row[f"delta_{name}_paired_n"] = len(pairs) or None
        if len(pairs) > 1:
            low, high = paired_t_interval([a for a, _ in pairs], [b for _, b in pairs])
            row[f"delta_{name}_paired_low"], row[f"delta_{name}_paired_high"] = low, high


def _cell(row: dict[str, Any], name: str) -> str:
    mean, std = row[name], row[f"{name}_std"]
    digits = 2 if name == "iou" else 4
    scale = 100 if name == "iou" else 1
    if mean is None:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def _delta(row: dict[str, Any], name: str) -> str:
    if row["is_reference"]:
        return "reference"
    delta = row[f"delta_{name}"]
    if delta is None:
        return "-"
    scale, digits = (100, 2) if name == "iou" else (1, 4)
    text = f"{delta * scale:+.{digits}f}"
    for kind in ("welch", "paired"):
        low, high = row[f"delta_{name}_{kind}_low"], row[f"delta_{name}_{kind}_high"]
        if low is not None:
            text += f" [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"
    return text


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a markdown table: IoU in %, mean ± std over seeds, and each difference to the reference
    with its Welch and (where the seeds pair) paired 95 % intervals."""
    head = [
        "dataset",
        "model",
        "variant",
        "seeds",
        "calls/member",
        "IoU (%)",
        "ECE",
        "std→error AUROC",
        "entropy→error AUROC",
        "mean std",
        "Δ IoU [Welch] [paired]",
        "Δ ECE [Welch] [paired]",
        "Δ std AUROC [Welch] [paired]",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["dataset"],
            r["model"],
            r["variant"],
            r["seeds"],
            "-" if r["calls_per_member"] is None else str(r["calls_per_member"]),
            *(_cell(r, name) for name in METRICS),
            *(_delta(r, name) for name in ("iou", "ece", "std_error_auroc")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(rows: Sequence[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """``variants.md`` and ``variants.csv`` (every column of :data:`COLUMNS`, blank where None) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "variants.md"), "csv": os.path.join(out_dir, "variants.csv")}
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(rows))
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", required=True, help="run workdirs, or folders of them (e.g. grids)"
    )
    parser.add_argument(
        "--reference",
        default="experiment=e1",
        help="text in the name of the setting the others are compared with, per dataset and model (default: "
        "experiment=e1, the feed-forward twin); '' for no differences",
    )
    parser.add_argument("--out", default="variants", help="output folder (default: ./variants)")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.runs, args.reference or None)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from e
    if not rows:
        raise SystemExit(
            f"No evaluated E1/E2 run (eval/metrics.json) under {args.runs}; evaluate runs first."
        )
    paths = write(rows, args.out)
    print(markdown(rows))
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
