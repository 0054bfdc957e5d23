"""diffseg_jax.variants: settings grouped from run folders, their names, means over seeds and intervals."""

import csv
import json
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from diffseg_jax import stats, variants


def _config(experiment="e2", seed=0, **overrides):
    c = {
        "experiment": experiment,
        "seed": seed,
        "data": {"data_dir": "/somewhere", "resize": 32},
        "diffusion": {"process": "gaussian", "num_timesteps": 100},
        "objective": {"prediction": "x0", "self_condition": False},
        "train": {"num_steps": 2000, "log_every": 50},
        "eval": {"ddim_eta": 0.0},
        "model": {"name": "ensemdiff"},
    }
    for key, value in overrides.items():
        group, name = key.split(".")
        c[group][name] = value
    return c


def _metrics(experiment="e2", iou=0.8, ece=0.02, std_auroc=0.9, sampler="ddim", ddim_steps=10, **extra):
    m = {
        "experiment": experiment,
        "model": "ensemdiff",
        "dataset": "isic",
        "ensemble_size": 5,
        "tta": "none",
        "member_output": "soft",
        "sampler": sampler,
        "ddim_steps": ddim_steps if sampler == "ddim" else None,
        "weights": "ema",
        "num_images": 76,
        "step": 2000,
        "pooling": "pooled",
        "iou": iou,
        "ece": ece,
        "mean_std": 0.01,
        "uncertainty": {"std": {"error_auroc": std_auroc}, "entropy": {"error_auroc": std_auroc - 0.05}},
    }
    m.update(extra)
    return m


def _run(root, name, config, metrics, eval_name="eval"):
    os.makedirs(os.path.join(root, name, eval_name), exist_ok=True)
    with open(os.path.join(root, name, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(root, name, eval_name, "metrics.json"), "w") as f:
        json.dump(metrics, f)


E1 = {0: (0.84, 0.020, 0.90), 1: (0.83, 0.018, 0.91), 2: (0.85, 0.025, 0.92)}
X0 = {0: (0.85, 0.012, 0.88), 1: (0.84, 0.011, 0.87), 2: (0.86, 0.015, 0.86)}
BER = {0: (0.855, 0.010, 0.93), 1: (0.848, 0.009, 0.92)}


@pytest.fixture
def grids(tmp_path):
    """Two grids as table1 lays them out: E1 and E2-x0 in one, BerDiff (E2) in another; the BerDiff seed 1 run
    also logged at another interval (a bookkeeping key, not a setting)."""
    for seed, (iou, ece, auroc) in E1.items():
        suffix = "" if seed == 0 else f"_seed{seed}"
        _run(
            tmp_path / "g1",
            f"ensemdiff_e1{suffix}",
            _config("e1", seed),
            _metrics("e1", iou, ece, auroc, weights="raw"),
        )
    for seed, (iou, ece, auroc) in X0.items():
        suffix = "" if seed == 0 else f"_seed{seed}"
        _run(tmp_path / "g1", f"ensemdiff_e2{suffix}", _config("e2", seed), _metrics("e2", iou, ece, auroc))
    for seed, (iou, ece, auroc) in BER.items():
        config = _config(
            "e2",
            seed,
            **{
                "diffusion.process": "bernoulli",
                "objective.self_condition": True,
                "train.log_every": 10 * (seed + 1),
            },
        )
        _run(tmp_path / "g2", f"ensemdiff_e2_seed{seed}", config, _metrics("e2", iou, ece, auroc))
    return [str(tmp_path / "g1"), str(tmp_path / "g2")]


def test_settings_are_grouped_and_named_by_what_differs(grids):
    rows = {r["variant"]: r for r in variants.compare(grids)}
    assert set(rows) == {
        "diffusion.process=gaussian, experiment=e1, objective.self_condition=false, weights=raw",
        "diffusion.process=gaussian, experiment=e2, objective.self_condition=false, weights=ema",
        "diffusion.process=bernoulli, experiment=e2, objective.self_condition=true, weights=ema",
    }
    e1 = next(r for name, r in rows.items() if "e1" in name)
    ber = next(r for name, r in rows.items() if "bernoulli" in name)
    # only the keys that differ between the settings name them; the seeds, data folders and log intervals do not
    assert (
        "seed" not in ber["variant"] and "log_every" not in ber["variant"] and "resize" not in ber["variant"]
    )
    assert "diffusion.process=bernoulli" in ber["variant"]
    assert (e1["n"], e1["seeds"], ber["n"], ber["seeds"]) == (3, "0 1 2", 2, "0 1")
    assert e1["iou"] == pytest.approx(np.mean([v[0] for v in E1.values()]))
    assert e1["ece_std"] == pytest.approx(np.std([v[1] for v in E1.values()], ddof=1))
    assert (e1["calls_per_member"], ber["calls_per_member"]) == (1, 10)
    assert e1["is_reference"] and not ber["is_reference"]


def test_differences_to_the_reference_with_welch_and_paired_intervals(grids):
    rows = variants.compare(grids)
    ber = next(r for r in rows if "bernoulli" in r["variant"])
    e1_iou, ber_iou = [v[0] for v in E1.values()], [v[0] for v in BER.values()]
    assert ber["delta_iou"] == pytest.approx(np.mean(ber_iou) - np.mean(e1_iou))
    assert (ber["delta_iou_welch_low"], ber["delta_iou_welch_high"]) == pytest.approx(
        stats.welch_interval(e1_iou, ber_iou)
    )
    # paired over the seeds both ran (0 and 1), as scipy's paired t-test has it
    ci = scipy_stats.ttest_rel(ber_iou, e1_iou[:2]).confidence_interval(0.95)
    assert ber["delta_iou_paired_n"] == 2
    assert (ber["delta_iou_paired_low"], ber["delta_iou_paired_high"]) == pytest.approx((ci.low, ci.high))
    x0 = next(r for r in rows if "gaussian, experiment=e2" in r["variant"])
    assert x0["delta_std_error_auroc_paired_n"] == 3
    assert x0["delta_ece"] == pytest.approx(
        np.mean([v[1] for v in X0.values()]) - np.mean([v[1] for v in E1.values()])
    )


def test_paired_t_interval_known_value():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt(3)
    low, high = variants.paired_t_interval([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5), abs=1e-6)
    with pytest.raises(ValueError, match="two pairs"):
        variants.paired_t_interval([0.0], [1.0])


def test_recorded_eta_and_sampler_make_settings(tmp_path):
    for seed in (0, 1):
        _run(tmp_path, f"a{seed}", _config(seed=seed), _metrics(ddim_eta=0.0))
        _run(tmp_path, f"b{seed}", _config(seed=seed), _metrics(ddim_eta=1.0))
        _run(tmp_path, f"c{seed}", _config(seed=seed), _metrics(sampler="ddpm"))
    rows = variants.compare([str(tmp_path)], reference="ddim_eta=0.0")
    by_name = {r["variant"]: r for r in rows}
    assert len(rows) == 3
    ddpm = next(r for name, r in by_name.items() if "sampler=ddpm" in name)
    assert ddpm["calls_per_member"] == 100  # T of the run's config
    assert by_name[next(n for n in by_name if "ddim_eta=0.0" in n)]["is_reference"]


def test_kept_step_evaluations_compare_over_seeds(tmp_path):
    """Evaluations at a kept step (``<run>/learning_curve/step<S>_<sampler>/``, table1's eval_steps) passed as
    folders find their run's config.json one level further up: one-step vs ten-step DDIM of the same runs."""
    folders = []
    for seed, (one, ten) in enumerate([(0.86, 0.85), (0.85, 0.84), (0.87, 0.84)]):
        name = f"x0_seed{seed}"
        for steps, iou in ((1, one), (10, ten)):
            sub = f"learning_curve/step2000_ddim{steps}"
            _run(tmp_path, name, _config(seed=seed), _metrics(iou=iou, ddim_steps=steps), eval_name=sub)
            folders.append(str(tmp_path / name / sub))
    rows = variants.compare(folders, reference="ddim_steps=10")
    by_calls = {r["calls_per_member"]: r for r in rows}
    assert sorted(by_calls) == [1, 10] and by_calls[1]["n"] == 3 and by_calls[1]["seeds"] == "0 1 2"
    np.testing.assert_allclose(by_calls[1]["delta_iou"], 0.05 / 3, rtol=1e-5)  # +1, +1, +3 points
    assert by_calls[1]["runs"].split() == [str(tmp_path / f"x0_seed{s}") for s in range(3)]


def test_refusals_name_the_files(tmp_path, grids):
    # one setting, one seed, twice
    _run(tmp_path / "copy", "again", _config("e1", 0), _metrics("e1", *E1[0], weights="raw"))
    with pytest.raises(ValueError, match="same seed 0"):
        variants.compare([*grids, str(tmp_path / "copy")])
    # an evaluation without its run's config.json
    os.makedirs(tmp_path / "bare" / "eval")
    with open(tmp_path / "bare" / "eval" / "metrics.json", "w") as f:
        json.dump(_metrics(), f)
    with pytest.raises(ValueError, match="no config.json"):
        variants.compare([str(tmp_path / "bare")])
    # a reference text in two names
    with pytest.raises(ValueError, match="matches 2 settings.*experiment=e1"):
        variants.compare(grids, reference="experiment=e2")


def test_without_e1_the_default_gives_no_differences(grids):
    rows = variants.compare(grids[1:])
    assert len(rows) == 1 and rows[0]["delta_iou"] is None and rows[0]["is_reference"] is None


def test_main_writes_markdown_and_csv(grids, tmp_path, capsys):
    paths = variants.main(["--runs", *grids, "--out", str(tmp_path / "out")])
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    e1 = next(r for r in table if "experiment=e1" in r["variant"])
    assert float(e1["iou"]) == pytest.approx(np.mean([v[0] for v in E1.values()]))
    text = capsys.readouterr().out
    assert "reference" in text and "84.00 ± 1.00" in text
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="No evaluated"):
        variants.main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "out2")])
    with pytest.raises(SystemExit, match="no such file or folder"):
        variants.main(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "out2")])
