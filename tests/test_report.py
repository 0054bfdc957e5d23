"""diffseg_jax.report and diffseg_jax.collection: Table 1 from evaluated runs, repeats over seeds, intervals, the
command line."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import write_metrics

from diffseg_jax import (
    collection,
    comparison,
    metrics,
    report,
    result_files,
)


def test_report_builds_table1_with_blank_missing_cells(tmp_path):
    runs = tmp_path / "runs"
    bins_ff = {"confidence": [0.05, 0.95], "accuracy": [0.1, 0.9], "count": [30, 10]}
    bins_diff = {"confidence": [0.05, 0.5, 0.95], "accuracy": [0.0, 0.5, 1.0], "count": [20, 10, 10]}
    write_metrics(runs, "a", "isic2016", "segdiff", "e1", 0.8586, 0.020, reliability=bins_ff)
    scores = dict(error_auroc=0.71234, ueo=0.5, ueo_threshold=0.2, image_spearman=0.4)
    uncertainty = dict(error_fraction=0.0432, std=scores, entropy={**scores, "error_auroc": None})
    write_metrics(runs, "b", "isic2016", "segdiff", "e2", 0.8639, 0.017, brier_pooled=0.0311, mean_std=0.25,
             uncertainty=uncertainty, reliability=bins_diff)  # fmt: skip
    write_metrics(runs, "c", "isic2016", "ensemdiff", "e2", 0.8659, 0.007)  # no feed-forward run
    write_metrics(runs, "d", "monuseg2018", "segdiff", "e1", 0.6344, 0.059)
    write_metrics(runs, "e", "isic2016", "ensemdiff", "e3", 0.1, 0.1)  # not a Table 1 experiment: ignored
    rows = collection.collect([str(runs)])
    assert [(r["dataset"], r["method"]) for r in rows] == [
        ("isic2016", "ensemdiff"),
        ("isic2016", "segdiff"),
        ("monuseg2018", "segdiff"),
    ]
    seg = rows[1]
    assert seg["delta_iou"] == pytest.approx(0.0053) and seg["delta_ece"] == pytest.approx(-0.003)
    assert rows[0]["ff_iou"] is None and rows[0]["delta_iou"] is None
    md = report.markdown(rows)
    assert "| ISIC16 | EnsemDiff |  |  | 86.59 | 0.007 |  |  |" in md  # the dataset named once per group
    assert "|  | SegDiff | 85.86 | 0.020 | 86.39 | 0.017 | +0.53 | -0.003 |" in md
    assert "| MoNuSeg | SegDiff | 63.44 | 0.059 |  |  |  |  |" in md
    paths = report.main(["--runs", str(runs), "--out", str(tmp_path / "out")])
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert table[2]["diff_iou"] == "" and float(table[1]["ff_iou"]) == pytest.approx(0.8586)
    tex = open(paths["tex"]).read()
    assert r"\begin{tabular}" in tex and "SegDiff & 85.86 & 0.020 & 86.39 & 0.017 & +0.53 & -0.003" in tex
    # The uncertainty table: only the run evaluated with the block, an undefined score left blank.
    assert open(paths["uncertainty_md"]).read().splitlines()[2] == (
        "| ISIC16 | SegDiff | Diff | 86.39 | 0.031 | 4.3 % | 0.250 | 0.712 | 0.500 | 0.400 |  | 0.500 | 0.400 |"
    )
    with open(paths["uncertainty_csv"], newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["std_error_auroc"]) == 0.71234 and row["entropy_error_auroc"] == ""
    # The reliability diagrams: a panel for the one cell whose runs have bins, feed-forward first.
    found = collection.tables([str(runs)])
    assert found["rows"] == rows and found["reliability"] == [
        ("ISIC16 · SegDiff", [("FF", bins_ff), ("Diff", bins_diff)])
    ]
    assert open(paths["reliability"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("pooling", ["pooled", "per_image"])
def test_report_gives_each_difference_its_bootstrap_interval_when_the_ensembles_are_kept(tmp_path, pooling):
    rng = np.random.default_rng(6)
    ids = np.array([f"im{i}" for i in range(12)])
    masks = (rng.random((12, 8, 8, 1)) < 0.4).astype(np.uint8)
    runs = tmp_path / "runs"
    for experiment, noise in (("e1", 0.3), ("e2", 0.45)):
        mean = np.clip(masks + rng.normal(0, noise, masks.shape), 0, 1).astype(np.float32)
        truth = masks > 0
        iou, ece = metrics.iou(mean > 0.5, truth), metrics.expected_calibration_error(mean, truth)
        if pooling == "per_image":  # what evaluate writes as iou / ece then: the means of the images' own
            iou = np.mean(metrics.per_image(metrics.iou, mean > 0.5, truth))
            ece = np.mean(metrics.per_image(metrics.expected_calibration_error, mean, truth))
        folder = write_metrics(
            runs, experiment, "isic2016", "segdiff", experiment, float(iou), float(ece), pooling=pooling
        ) / "eval"  # fmt: skip
        np.savez(folder / "ensemble.npz", ids=ids, mean=mean, std=np.zeros_like(mean), mask=masks,
                 image=np.zeros((12, 8, 8, 3), np.uint8))  # fmt: skip
    (row,) = collection.collect([str(runs)])
    boot = comparison.compare([str(runs / "e1" / "eval"), str(runs / "e2" / "eval")])["runs"][1]
    boot = boot["paired_bootstrap_vs_first"]
    assert boot["pooling"] == pooling
    assert boot["iou_delta"] == pytest.approx(row["delta_iou"], abs=1e-6)  # the same difference as the table
    assert [row["delta_iou_ci_low"], row["delta_iou_ci_high"]] == boot["iou_delta_ci95"]
    assert row["delta_ece_ci_low"] < row["delta_ece"] < row["delta_ece_ci_high"]
    line = report.markdown([row]).splitlines()[2]
    low, high = (100 * row[k] for k in ("delta_iou_ci_low", "delta_iou_ci_high"))
    assert f"{100 * row['delta_iou']:+.2f} [{low:+.2f}, {high:+.2f}]" in line
    paths = report.main(["--runs", str(runs), "--out", str(tmp_path / "out")])
    with open(paths["csv"], newline="") as f:
        (saved,) = list(csv.DictReader(f))
    assert float(saved["delta_ece_ci_high"]) == pytest.approx(row["delta_ece_ci_high"])
    # Evaluated on other test images: no pairing, so no interval, and the table is still built.
    with np.load(runs / "e2" / "eval" / "ensemble.npz") as f:
        arrays = {**f, "ids": np.char.add("other", ids)}
    np.savez(runs / "e2" / "eval" / "ensemble.npz", **arrays)
    (row,) = collection.collect([str(runs)])
    assert row["delta_iou"] is not None and all(row[k] is None for k in collection.INTERVAL_COLUMNS)


def test_report_rejects_duplicate_cells_and_mixed_pooling(tmp_path):
    write_metrics(tmp_path / "r", "a", "isic2016", "segdiff", "e1", 0.8, 0.02)
    second = write_metrics(tmp_path / "r", "b", "isic2016", "segdiff", "e1", 0.7, 0.03)
    with pytest.raises(ValueError, match="Two ff runs .*isic2016.*segdiff"):
        collection.collect([str(tmp_path / "r")])
    shutil.rmtree(second)
    write_metrics(tmp_path / "r", "c", "isic2016", "segdiff", "e2", 0.8, 0.02, pooling="per_image")
    with pytest.raises(ValueError, match="mix pixel poolings"):
        collection.collect([str(tmp_path / "r")])
    shutil.rmtree(tmp_path / "r" / "c")
    write_metrics(tmp_path / "r", "c", "isic2016", "segdiff", "e2", 0.8, 0.02, member_output="hard")
    with pytest.raises(ValueError, match="eval.member_output"):
        collection.collect([str(tmp_path / "r")])


def _repeat(root, name, experiment, seed, iou, ece, lr=1e-4, **more):
    """An evaluated run with the config.json a run records, for the repeats tests."""
    workdir = write_metrics(root, name, "isic2016", "segdiff", experiment, iou, ece, ensemble_size=5, **more)
    config = {"seed": seed, "experiment": experiment, "train": {"lr": lr}, "data": {"data_dir": f"/d{seed}"}}
    (workdir / "config.json").write_text(json.dumps(config))
    return workdir


def test_report_averages_runs_that_differ_only_in_their_seed(tmp_path):
    from scipy import stats

    runs = tmp_path / "runs"
    ff_iou, ff_ece = [0.80, 0.83, 0.78], [0.020, 0.024, 0.019]
    diff_iou, diff_ece = [0.84, 0.85, 0.81, 0.86], [0.015, 0.018, 0.017, 0.012]
    bins = {"confidence": [0.05, 0.95], "accuracy": [0.1, 0.9], "count": [30, 10]}
    for seed, (iou, ece) in enumerate(zip(ff_iou, ff_ece)):
        _repeat(runs, f"ff{seed}", "e1", seed, iou, ece)
    scores = dict(error_auroc=0.7, ueo=0.5, ueo_threshold=0.2, image_spearman=0.4)
    for seed, iou, ece in zip((10, 0, 2, 1), diff_iou, diff_ece):  # listed 0, 1, 2, 10, not as folders sort
        _repeat(runs, f"diff{seed}", "e2", seed, iou, ece, reliability=bins, brier_pooled=0.03, mean_std=0.2,
                uncertainty=dict(error_fraction=0.04, std=scores, entropy=scores))  # fmt: skip
    (row,) = collection.collect([str(runs)])
    assert row["ff_n"] == 3 and row["diff_n"] == 4
    assert row["ff_iou"] == pytest.approx(np.mean(ff_iou)) and row["diff_ece"] == pytest.approx(
        np.mean(diff_ece)
    )
    assert row["ff_iou_std"] == pytest.approx(np.std(ff_iou, ddof=1))  # the sample standard deviation
    assert row["delta_iou"] == pytest.approx(np.mean(diff_iou) - np.mean(ff_iou))
    # The difference's interval over the runs: scipy's Welch test as the oracle.
    for name, ff, diff in (("iou", ff_iou, diff_iou), ("ece", ff_ece, diff_ece)):
        ci = stats.ttest_ind(diff, ff, equal_var=False).confidence_interval(0.95)
        assert (row[f"delta_{name}_ci_low"], row[f"delta_{name}_ci_high"]) == pytest.approx((ci.low, ci.high))
    md = report.markdown([row])
    ff_cell = f"{100 * np.mean(ff_iou):.2f} ± {100 * np.std(ff_iou, ddof=1):.2f} (3)"
    assert f"| ISIC16 | SegDiff | {ff_cell} |" in md and md.strip().endswith(report.REPEATS_NOTE)
    paths = report.main(["--runs", str(runs), "--out", str(tmp_path / "out")])
    with open(paths["csv"], newline="") as f:
        (saved,) = list(csv.DictReader(f))
    assert saved["diff_n"] == "4" and float(saved["diff_ece_std"]) == pytest.approx(np.std(diff_ece, ddof=1))
    assert r"$\pm$" in open(paths["tex"]).read()
    found = collection.tables([str(runs)])  # each repeat keeps its own uncertainty row and reliability curve
    assert [r["seed"] for r in found["uncertainty"]] == [0, 1, 2, 10]
    assert [label for label, _ in found["reliability"][0][1]] == [f"Diff seed {s}" for s in (0, 1, 2, 10)]
    # One side repeated, the other a single run: its spread over seeds is unknown, so no interval.
    for seed in (1, 2):
        shutil.rmtree(runs / f"ff{seed}")
    (row,) = collection.collect([str(runs)])
    assert row["ff_n"] == 1 and row["ff_iou_std"] is None and row["delta_iou_ci_low"] is None
    assert "(1)" not in report.markdown([row])


def test_report_refuses_runs_of_one_cell_that_are_not_repeats(tmp_path):
    runs = tmp_path / "runs"
    _repeat(runs, "a", "e1", 0, 0.80, 0.02)
    other = _repeat(runs, "b", "e1", 1, 0.81, 0.02, lr=5e-4)  # another learning rate: not a repeat
    with pytest.raises(ValueError, match=r"differ in more than their seed \(train.lr: 0.0001 vs 0.0005\)"):
        collection.collect([str(runs)])
    shutil.rmtree(other)
    other = _repeat(runs, "b", "e1", 1, 0.81, 0.02, sampler="ddim")  # scored another way
    with pytest.raises(ValueError, match="metrics.json sampler: None vs 'ddim'"):
        collection.collect([str(runs)])
    shutil.rmtree(other)
    _repeat(runs, "b", "e1", 0, 0.81, 0.02)  # the same seed again: a copy
    with pytest.raises(ValueError, match="repeat seed 0"):
        collection.collect([str(runs)])


def test_report_names_a_corrupt_metrics_json_and_the_fix(tmp_path):
    """A metrics.json cut short (an interrupted copy) is a ValueError naming the file and saying what to do,
    for --runs (the table) and --compare (read_evaluations), instead of a bare JSONDecodeError."""
    runs = tmp_path / "runs"
    write_metrics(runs, "a", "isic2016", "segdiff", "e1", 0.8, 0.02)
    broken = write_metrics(runs, "b", "isic2016", "segdiff", "e2", 0.8, 0.02) / "eval"
    text = (broken / "metrics.json").read_text()
    (broken / "metrics.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"not a readable metrics\.json.*--mode evaluate.*--runs") as error:
        report.main(["--runs", str(runs), "--out", str(tmp_path / "out")])
    assert str(error.value).startswith(str(broken / "metrics.json")) and not (tmp_path / "out").exists()
    np.savez(broken / "ensemble.npz", ids=np.array(["a"]), mean=np.zeros((1, 4, 4, 1)))
    with pytest.raises(
        ValueError, match=r"not a readable metrics\.json.*--mode evaluate.*--compare"
    ) as error:
        result_files.read_evaluations([str(broken)])
    assert str(error.value).startswith(str(broken / "metrics.json"))
    (broken / "metrics.json").write_text("[]")  # JSON, but not a metrics.json's object
    with pytest.raises(ValueError, match=r"holds a JSON list.*--mode evaluate"):
        collection.collect([str(runs)])


def test_report_command_prints_a_refusal_as_one_message(tmp_path):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from conftest import ROOT  # noqa: PLC0415

    command = [
        sys.executable,
        "-m",
        "diffseg_jax.report",
        "--runs",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"Error: --runs {tmp_path / 'nowhere'}: no such file or folder." in out.stderr
