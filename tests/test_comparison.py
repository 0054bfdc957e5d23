"""diffseg_jax.comparison: evaluated runs side by side on the images they share."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_metrics

from diffseg_jax import (
    metrics,
    plots,
    report,
    result_files,
)


def test_comparison_matches_images_by_id_and_measures_the_std_maps(tmp_path, monkeypatch):
    # Run B holds run A's images in another order, one of them missing and one extra, with half the spread
    # and a mean unrelated to A's: similar areas (std correlation 1), half as uncertain, other means.
    rng = np.random.default_rng(3)
    ids = np.array(["a", "b", "c", "d"])
    mean, std = rng.random((4, 8, 8, 1)), rng.random((4, 8, 8, 1)) * 0.4
    masks = (rng.random((4, 8, 8, 1)) < 0.5).astype(np.uint8)
    order = [2, 0, 3]  # B: c, a, d, then an image A has not
    second_mean = rng.random((4, 8, 8, 1))
    dirs = []
    for name, arrays in (
        ("A", dict(ids=ids, mean=mean, std=std)),
        (
            "B",
            dict(
                ids=np.append(ids[order], "z"),
                mean=second_mean,
                std=np.concatenate([0.5 * std[order], rng.random((1, 8, 8, 1))]),
            ),
        ),
    ):
        d = tmp_path / name
        d.mkdir()
        index = [list(ids).index(i) if i in ids else 0 for i in arrays["ids"]]  # the same images, same masks
        np.savez(d / "ensemble.npz", image=np.zeros((4, 8, 8, 3), np.uint8), mask=masks[index], **arrays)
        (d / "metrics.json").write_text(json.dumps({"model": name, "experiment": "e2", "pooling": "pooled"}))
        dirs.append(str(d))
    read, reads = result_files.read_evaluations, []
    monkeypatch.setattr(result_files, "read_evaluations", lambda d: reads.append(d) or read(d))
    paths = report.main(["--compare", *dirs, "--num_images", "2", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "figure1.png").stat().st_size > 1000
    assert reads == [dirs]  # the figure and the numbers from one reading of each ensemble.npz
    out = json.loads(open(paths["comparison"]).read())
    shared = [0, 2, 3]  # a, c, d in A's order
    assert out["num_images"] == 3
    first, second = out["runs"]
    assert first["std_correlation_with_first"] == pytest.approx(1.0, abs=1e-6)
    assert second["std_correlation_with_first"] == pytest.approx(1.0, abs=1e-6)
    assert second["mean_std_over_first"] == pytest.approx(0.5, rel=1e-5)
    assert first["mean_std"] == pytest.approx(std[shared].mean(), rel=1e-5)
    assert abs(second["mean_correlation_with_first"]) < 0.3
    # The reliability diagrams are of the shared images only: A's bins are those of its mean on a, c, d.
    assert sum(first["reliability"]["count"]) == 3 * 64
    ece = plots.reliability_points(first["reliability"])["ece"]
    assert ece == pytest.approx(
        float(metrics.expected_calibration_error(mean[shared], masks[shared])), abs=1e-6
    )
    assert (tmp_path / "out" / "comparison_reliability.png").stat().st_size > 1000
    # B minus A on the shared images, with a bootstrap interval around it.
    boot = second["paired_bootstrap_vs_first"]
    b_mean = second_mean[[1, 0, 2]]  # B's a, c, d (B holds c, a, d)
    iou_delta = float(
        metrics.iou(b_mean > 0.5, masks[shared]) - metrics.iou(mean[shared] > 0.5, masks[shared])
    )
    assert first["paired_bootstrap_vs_first"] is None and boot["iou_delta"] == pytest.approx(
        iou_delta, abs=1e-6
    )
    lo, hi = boot["iou_delta_ci95"]
    assert lo <= boot["iou_delta"] <= hi and lo < hi


def test_compare_takes_a_workdir_and_records_its_eval_folder(tmp_path):
    """--compare RUN (a workdir, as --runs takes) reads RUN/eval and comparison.json names RUN/eval; a folder
    with no evaluation at all keeps the message that says to evaluate it."""
    rng = np.random.default_rng(5)
    ids = np.array(["a", "b", "c"])
    masks = (rng.random((3, 8, 8, 1)) < 0.5).astype(np.uint8)
    for name, experiment in (("ff", "e1"), ("diff", "e2")):
        folder = write_metrics(tmp_path, name, "isic2016", "segdiff", experiment, 0.8, 0.02) / "eval"
        maps = dict(mean=rng.random((3, 8, 8, 1)), std=rng.random((3, 8, 8, 1)))
        np.savez(folder / "ensemble.npz", ids=ids, mask=masks, image=np.zeros((3, 8, 8, 3), np.uint8), **maps)
    workdir, eval_dir = tmp_path / "diff", tmp_path / "ff" / "eval"
    paths = report.main(["--compare", str(workdir), str(eval_dir), "--out", str(tmp_path / "out")])
    out = json.loads(open(paths["comparison"]).read())
    assert [r["eval_dir"] for r in out["runs"]] == [str(workdir / "eval"), str(eval_dir)]
    assert [r["experiment"] for r in out["runs"]] == ["e2", "e1"] and out["num_images"] == 3
    assert (tmp_path / "out" / "figure1.png").stat().st_size > 1000
    runs, rows = result_files.read_evaluations([str(workdir), str(eval_dir)])
    assert runs[0][1]["experiment"] == "e2" and rows == [[0, 0], [1, 1], [2, 2]]
    (tmp_path / "new").mkdir()  # trained, say, but never evaluated
    with pytest.raises(FileNotFoundError, match=r"new.ensemble\.npz is missing; evaluate that run first"):
        report.main(["--compare", str(tmp_path / "new"), str(eval_dir), "--out", str(tmp_path / "out2")])
