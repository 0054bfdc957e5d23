"""Result files read back: ``metrics.json`` and evaluation folders, and the analyses' curve tables.

What the report, the comparison of runs, the timestep policy and the figures read from disk, in one place, with
errors that name the file and the fix."""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Any, Sequence

import numpy as np  # noqa: E402

from diffseg_jax.data import files

CSV_COLUMNS = ("t", "value", "curve", "model", "experiment", "dataset", "step")
# A run's evaluations at its kept checkpoints, ``<run>/learning_curve/step<S>_<sampler>/`` (issue 32's learning
# curves; written by diffseg_jax.table1 with table.eval_steps).
CURVE_DIR = "learning_curve"


def run_folder(metrics_path: str) -> str:
    """The run workdir of an evaluation's ``metrics.json``: the evaluation folder's parent (``<run>/eval/``,
    ``<run>/eval_members25/``), or the run above ``learning_curve/`` for a kept step's evaluation."""
    folder = os.path.dirname(os.path.dirname(metrics_path))
    if os.path.basename(folder) == CURVE_DIR and not os.path.isfile(os.path.join(folder, "config.json")):
        return os.path.dirname(folder)
    return folder


def write_rows(path: str, rows: list[dict]) -> None:
    """The long-format curve table (``CSV_COLUMNS``) as CSV and as NPZ columns."""
    with open(path + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    np.savez(path + ".npz", **{c: np.asarray([r[c] for r in rows]) for c in CSV_COLUMNS})


def read_rows(path: str) -> list[dict]:
    """Rows of a curve CSV written by :func:`write_rows` (t and step as int, value as float).

    Raises ``DatasetFileError`` naming ``path`` for a file that is not such a table (another file given in its
    place, e.g. a run's ``config.json``, or one cut short), not a bare ``KeyError`` of a column.
    """
    expected = f"a curve table written by --mode analyse (columns {', '.join(CSV_COLUMNS)})"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise files.DatasetFileError(
                    f"{path} is not {expected}: it has no column {missing}. Pass the curves.csv or "
                    "model_free.csv in a run's analysis/ folder, or the run folder itself."
                )
            rows = list(reader)
        for i, r in enumerate(rows):
            try:
                r["t"], r["value"], r["step"] = int(r["t"]), float(r["value"]), int(r["step"])
            except (TypeError, ValueError) as e:
                raise files.DatasetFileError(
                    f"{path}, row {i + 2}: {e}; this is not {expected} (cut short or edited?). Run --mode "
                    "analyse again to rewrite it."
                ) from None
    except UnicodeDecodeError:
        raise files.DatasetFileError(f"{path} is not text, so not {expected}.") from None
    return rows


def find_run_files(paths: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Files given directly in ``paths``, and those matching the glob ``patterns`` (``**`` recursive) below each
    folder in ``paths``; sorted, without duplicates."""
    found = set()
    for path in paths:
        if os.path.isfile(path):
            found.add(os.path.abspath(path))
        elif os.path.isdir(path):
            for pattern in patterns:
                found.update(
                    os.path.abspath(p) for p in glob.glob(os.path.join(path, pattern), recursive=True)
                )
        else:
            raise FileNotFoundError(f"--runs {path}: no such file or folder.")
    return sorted(found)


def find_metrics(paths: Sequence[str]) -> list[str]:
    """Every ``eval/metrics.json`` at or under ``paths`` (an eval folder's own ``metrics.json`` too)."""
    return find_run_files(paths, ("metrics.json", os.path.join("**", "eval", "metrics.json")))


def read_metrics(path: str, option: str = "--runs") -> dict:
    """A run's ``metrics.json`` as a dict; a file cut short or corrupted (a copy or an evaluation interrupted
    while writing it) is a ValueError naming it and the fix, not a bare JSON error without the file.
    ``option`` is the command-line option that brought the file in (``--runs``, ``--compare``)."""
    with open(path, encoding="utf-8") as f:
        try:
            m = json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(
                f"{path} is not a readable metrics.json ({e}): it was cut short or corrupted. Evaluate that "
                f"run again (--mode evaluate) or leave it out of {option}."
            ) from e
    if not isinstance(m, dict):
        raise ValueError(
            f"{path} holds a JSON {type(m).__name__}, not a metrics.json's object. Evaluate that run again "
            f"(--mode evaluate) or leave it out of {option}."
        )
    return m


def evaluation_dir(path: str) -> str:
    """The folder with an evaluated run's ``ensemble.npz``: ``path`` itself, or its ``eval/`` where ``path``
    is the run's workdir (``--compare`` takes either, as ``--runs`` does); ``path`` unchanged when neither has
    one, so the caller's message names the file a run must write."""
    inner = os.path.join(path, "eval")
    if not os.path.exists(os.path.join(path, "ensemble.npz")) and os.path.exists(
        os.path.join(inner, "ensemble.npz")
    ):
        return inner
    return path


def pooling_of(metrics_json: dict) -> str:
    """The pooling of a metrics.json's ``iou``/``ece`` (``eval.pooling``; files from before the option held the
    per-image means)."""
    return metrics_json.get("pooling", "per_image")


def read_evaluations(eval_dirs: list[str]) -> tuple[list[tuple[dict, dict]], list[list[int]]]:
    """The ``ensemble.npz`` arrays and ``metrics.json`` of evaluated runs, and where their shared images are.

    ``eval_dirs`` are the runs' ``eval/`` folders or their workdirs, whose ``eval/`` is read
    (:func:`diffseg_jax.result_files.evaluation_dir`). Returns ``runs`` ((arrays, metrics) per folder) and ``rows``:
    for each test image id that every run has (in the first run's order), its index in each run's arrays.
    """

    runs = []
    for d in map(evaluation_dir, eval_dirs):
        npz = os.path.join(d, "ensemble.npz")
        if not os.path.exists(npz):
            raise FileNotFoundError(f"{npz} is missing; evaluate that run first (--mode evaluate).")
        meta = read_metrics(os.path.join(d, "metrics.json"), "--compare")
        runs.append((dict(np.load(npz)), meta))
    ids = [i for i in runs[0][0]["ids"] if all(i in r["ids"] for r, _ in runs[1:])]
    if not ids:
        raise ValueError(
            f"The runs in {eval_dirs} share no test image ids; evaluate them on the same test set."
        )
    return runs, [[int(np.nonzero(r["ids"] == i)[0][0]) for r, _ in runs] for i in ids]


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
