"""diffseg_jax.learning_curves: each run's evaluations at its kept checkpoints, collected and written."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from diffseg_jax import (
    learning_curves,
)


def write_run(folder, experiment, prediction, evaluations):
    """A run folder with its config.json and a metrics.json per (subfolder, step, sampler, IoU)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"seed": 0, "experiment": experiment, "objective": {"prediction": prediction}})
    )
    for sub, step, sampler, iou in evaluations:
        (folder / sub).mkdir(parents=True)
        m = dict(experiment=experiment, model="ensemdiff", dataset="isic2016", step=step, sampler=sampler,
                 ddim_steps=10 if sampler == "ddim" else None, iou=iou, ece=0.1, mean_std=0.2,
                 uncertainty={"std": {"error_auroc": 0.8}})  # fmt: skip
        (folder / sub / "metrics.json").write_text(json.dumps(m))


def test_learning_curves_collect_each_runs_steps_and_samplers(tmp_path):
    """learning_curves.collect_learning_curves (issue 32): a row per evaluation under learning_curve/ and eval/, the
    prediction from the run's config (None: the experiment's own), the final eval/ counted once when
    eval_steps lists it too; the Markdown, CSV and figure are written."""

    def run(name, experiment, prediction, evaluations):
        write_run(tmp_path / name, experiment, prediction, evaluations)

    run("e2_eps", "e2", None, [("learning_curve/step1000_ddim10", 1000, "ddim", 0.4),
                               ("learning_curve/step2000_ddim10", 2000, "ddim", 0.5),
                               ("learning_curve/step2000_ddpm", 2000, "ddpm", 0.55),
                               ("eval", 2000, "ddim", 0.99)])  # fmt: skip
    run("e2_x0", "e2", "x0", [("eval", 1000, "ddim", 0.8)])
    # The mask error at T - 1 of step 2000 (analysis.late_error) joins both of that step's rows.
    point = dict(step=2000, model="ensemdiff", experiment="e2", dataset="isic2016", t=[900, 999],
                 mask_error=[0.3, 0.25], mean_limit=[0.15, 0.16])  # fmt: skip
    (tmp_path / "e2_eps" / "learning_curve" / "step2000_mask_error.json").write_text(json.dumps(point))
    rows = learning_curves.collect_learning_curves([str(tmp_path)])
    late = [
        (r["step"], r["sampler"], r["mask_error_T"], r["mean_limit_T"]) for r in rows if r["mask_error_T"]
    ]
    assert late == [(2000, "ddim10", 0.25, 0.16), (2000, "ddpm", 0.25, 0.16)]
    got = [(os.path.basename(r["run"]), r["prediction"], r["sampler"], r["step"], r["iou"]) for r in rows]
    assert got == [
        ("e2_eps", "eps", "ddim10", 1000, 0.4),
        ("e2_eps", "eps", "ddim10", 2000, 0.5),
        ("e2_eps", "eps", "ddpm", 2000, 0.55),
        ("e2_x0", "x0", "ddim10", 1000, 0.8),
    ]
    assert rows[0]["std_error_auroc"] == 0.8 and rows[0]["dataset"] == "ISIC16"
    paths = learning_curves.write_learning_curves(rows, str(tmp_path / "out"))
    assert (
        "| ISIC16 | EnsemDiff | E2 | eps | ddim10 | 0 | 1000 | 40.00 | 0.1000 |"
        in pathlib.Path(paths["learning_curves_md"]).read_text()
    )
    assert (
        "| 2000 | 55.00 | 0.1000 | 0.2000 | 0.800 | 0.2500 | 0.1600 |"
        in pathlib.Path(paths["learning_curves_md"]).read_text()
    )
    assert os.path.getsize(paths["learning_curves_png"]) > 1000


def test_learning_curves_command_draws_runs_of_separate_workdirs(tmp_path, capsys):
    """`python -m diffseg_jax.learning_curves --runs A B --out O` (issue 32): grids trained in separate workdirs
    (E1 and E2-x0 here) drawn into one table; a missing or empty folder is a clear exit, not an empty figure."""
    write_run(tmp_path / "grid_e1" / "isic" / "ensemdiff_e1", "e1", None,
              [("learning_curve/step1000_ddim10", 1000, "ddim", 0.83)])  # fmt: skip
    write_run(tmp_path / "grid_x0" / "isic" / "ensemdiff_e2", "e2", "x0",
              [("learning_curve/step1000_ddim10", 1000, "ddim", 0.84), ("eval", 2000, "ddim", 0.85)])  # fmt: skip
    out = tmp_path / "out"
    paths = learning_curves.main(["--runs", str(tmp_path / "grid_e1"), str(tmp_path / "grid_x0"), "--out", str(out)])
    csv_rows = pathlib.Path(paths["learning_curves_csv"]).read_text().splitlines()
    assert [line.split(",")[2:8] for line in csv_rows[1:]] == [
        ["e1", "-", "-", "0", "1000", "0.83"],
        ["e2", "x0", "ddim10", "0", "1000", "0.84"],
        ["e2", "x0", "ddim10", "0", "2000", "0.85"],
    ]
    assert "| 2000 | 85.00 |" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="No evaluated"):
        learning_curves.main(["--runs", str(tmp_path / "empty"), "--out", str(out)])
    with pytest.raises(SystemExit, match="no such folder: .*missing"):
        learning_curves.main(["--runs", str(tmp_path / "missing"), "--out", str(out)])
