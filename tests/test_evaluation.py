"""Metrics (IoU, Dice, ECE with torchmetrics' bins), ensembles against single samples, the feed-forward
protocol, and Table 1 from metrics files."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_metrics_are_the_ensembles, tiny_config

from diffseg_jax import (
    build,
    collection,
    comparison,
    configlib,
    data,
    diffusion,
    evaluate,
    learning_curves,
    metrics,
    planning,
    plots,
    protocol,
    report,
    restore,
    result_files,
    sampling,
    train,
    validation,
)

# ---------------------------------------------------------------------------------------------------------------
# Metrics.


def test_iou_and_dice_known_values():
    pred = np.zeros((4, 4), bool)
    true = np.zeros((4, 4), bool)
    pred[:2, :2] = True  # 4 pixels
    true[:2, :3] = True  # 6 pixels, 4 shared
    assert float(metrics.iou(pred, true)) == pytest.approx(4 / 6)
    assert float(metrics.dice(pred, true)) == pytest.approx(8 / 10)
    assert float(metrics.iou(np.zeros(3), np.zeros(3))) == 1.0  # both empty: a correct empty prediction


def test_ece_perfectly_calibrated_is_zero():
    # In each bin the mean probability equals the foreground frequency.
    probs = np.array([0.3] * 10 + [0.75] * 4 + [0.0] * 5 + [1.0] * 3, np.float32)
    labels = np.array([1] * 3 + [0] * 7 + [1] * 3 + [0] + [0] * 5 + [1] * 3)
    assert float(metrics.expected_calibration_error(probs, labels)) == pytest.approx(0.0, abs=1e-7)


def test_ece_all_confident_and_wrong_is_one():
    probs = np.array([1.0, 1.0, 0.0, 0.0, 0.0], np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    assert float(metrics.expected_calibration_error(probs, labels)) == pytest.approx(1.0)
    assert float(metrics.expected_calibration_error(probs, labels, top_label=True)) == pytest.approx(1.0)


def test_ece_worked_example_with_torchmetrics_bins():
    """Worked by hand; equals torchmetrics' BinaryCalibrationError(n_bins=10) (checked outside the repo).

    bin [0, .1): {0, .05} conf .025 acc 0 -> .025 * 2/8;  bin [.1, .2): {.1, .1} conf .1 acc .5 -> .4 * 2/8;
    bin [.5, .6): {.55} -> .45 * 1/8;  bin [.9, 1): {.95} -> .05 * 1/8;  p = 1 alone: {1, 1} acc .5 -> .5 * 2/8.
    Sum 0.29375. A closed last bin [.9, 1] would merge {.95, 1, 1} and give 0.28125.
    """
    probs = np.array([0.0, 0.05, 0.1, 0.1, 0.55, 0.95, 1.0, 1.0], np.float32)
    labels = np.array([0, 0, 1, 0, 1, 1, 1, 0])
    assert float(metrics.expected_calibration_error(probs, labels)) == pytest.approx(0.29375, abs=1e-6)
    bins = metrics.calibration_bins(probs, labels)
    np.testing.assert_array_equal(bins["count"], [2, 2, 0, 0, 0, 1, 0, 0, 0, 1, 2])
    np.testing.assert_allclose(bins["accuracy"], [0, 0.5, 0, 0, 0, 1, 0, 0, 0, 1, 0.5])
    # Top-label: confidences max(p, 1-p) = 1, .95, .9, .9, .55, .95, 1, 1; correct: y, y, n, y, y, y, y, n.
    # [.5,.6): .55 acc 1 -> .45/8; [.9,1): {.95,.9,.9,.95} acc 3/4 conf .925 -> .175*4/8; 1: {1,1,1} acc 2/3.
    expected_top = 0.45 / 8 + 0.175 * 4 / 8 + (1 - 2 / 3) * 3 / 8
    assert float(metrics.expected_calibration_error(probs, labels, top_label=True)) == pytest.approx(
        expected_top, abs=1e-6
    )


def test_reliability_points_give_the_pooled_ece():
    # Known value: bins [.2, .3) (conf .25, acc .5) and [.7, .8) (conf .75, acc 1), half the pixels each.
    pts = plots.reliability_points(
        metrics.calibration_bins(np.array([0.25, 0.25, 0.75, 0.75]), np.array([0, 1, 1, 1]))
    )
    np.testing.assert_allclose(pts["confidence"], [0.25, 0.75])
    np.testing.assert_allclose(pts["accuracy"], [0.5, 1.0])
    np.testing.assert_allclose(pts["share"], [0.5, 0.5])
    assert pts["ece"] == pytest.approx(0.25)
    # An ensemble-like mean (multiples of 1/5, exact 0s and 1s on the bin edges): the diagram's points imply
    # metrics.expected_calibration_error, the empty bins are left out and the shares add up to one.
    rng = np.random.default_rng(1)
    mean = rng.integers(0, 6, (4, 16, 16, 1)) / 5.0
    truth = rng.random(mean.shape) < mean * 0.8
    pts = plots.reliability_points(metrics.calibration_bins(mean, truth))
    assert len(pts["confidence"]) == 6 and pts["share"].sum() == pytest.approx(1.0)
    assert pts["ece"] == pytest.approx(float(metrics.expected_calibration_error(mean, truth)), abs=1e-6)
    with pytest.raises(ValueError, match="every bin is empty"):
        plots.reliability_points({"count": [0, 0], "confidence": [0, 0], "accuracy": [0, 0]})


def test_run_names_say_the_training_and_the_sampler_that_made_the_members():
    e2 = {"model": "segdiff", "experiment": "e2", "sampler": "ddim", "ddim_steps": 10}
    assert plots.run_name(e2) == "segdiff diffusion, ddim-10"
    assert plots.run_name({**e2, "sampler": "ddpm"}) == "segdiff diffusion, ddpm"
    assert plots.run_name({**e2, "experiment": "e1"}) == "segdiff feed-forward"  # one forward pass a member
    assert plots.run_name({"model": "ensemdiff", "experiment": "e2"}) == "ensemdiff diffusion"  # older runs


def _auroc_by_pairs(u, error):
    """The definition: over all (error, correct) pixel pairs, 1 if the error is more uncertain, 1/2 if level."""
    u, error = np.ravel(u).astype(np.float64), np.ravel(error).astype(bool)
    a, b = u[error][:, None], u[~error][None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))


def _ueo_by_thresholds(u, error):
    """The definition: the best Dice of (u >= τ) with the errors over every τ the map takes."""
    u, error = np.ravel(u), np.ravel(error).astype(bool)
    scores = [(2 * np.sum((u >= t) & error) / (np.sum(u >= t) + error.sum()), t) for t in np.unique(u)]
    return max(scores, key=lambda s: (s[0], s[1]))  # ties: the highest τ, the fewest pixels flagged


def test_error_auroc_and_ueo_equal_their_definitions_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(4):
        u = rng.integers(0, 7, size=(3, 13, 13)).astype(np.float32) / 6  # few levels: many ties
        error = rng.random(u.shape) < 0.1 + 0.4 * u
        assert float(metrics.error_auroc(u, error)) == pytest.approx(_auroc_by_pairs(u, error), abs=1e-6)
        ueo, tau = metrics.uncertainty_error_overlap(u, error)
        best, best_tau = _ueo_by_thresholds(u, error)
        assert float(ueo) == pytest.approx(best, abs=1e-6) and float(tau) == pytest.approx(best_tau)
    # Flagging the top pixel or all four is equally good (Dice 2/3): the higher τ is reported.
    ueo, tau = metrics.uncertainty_error_overlap(np.array([4.0, 3, 2, 1]), np.array([1, 0, 0, 1]))
    assert float(ueo) == pytest.approx(2 / 3) and float(tau) == 4.0
    # Known values: a map that is the error itself, its inverse, a constant, and no errors at all.
    error = rng.random((2, 8, 8)) < 0.3
    assert float(metrics.error_auroc(error.astype(np.float32), error)) == 1.0
    assert float(metrics.error_auroc(1.0 - error, error)) == 0.0
    assert float(metrics.error_auroc(np.full(error.shape, 0.2), error)) == 0.5
    assert (
        float(metrics.uncertainty_error_overlap(error + 0.5 * rng.random(error.shape) * error, error)[0])
        == 1.0
    )
    assert np.isnan(float(metrics.error_auroc(rng.random((4, 4)), np.zeros((4, 4), bool))))
    ueo, tau = metrics.uncertainty_error_overlap(rng.random((4, 4)), np.zeros((4, 4), bool))
    assert float(ueo) == 1.0 and np.isnan(float(tau))


def test_error_auroc_stays_exact_on_a_million_pixels():
    # Block-wise float32 averaging: against the closed form of a binormal model it is exact to sampling noise,
    # and against the rank formula in float64 to 1e-6.
    rng = np.random.default_rng(1)
    error = rng.random(1_000_000) < 0.1
    u = rng.normal(0.0, 1.0, error.shape) + error  # errors shifted by 1: AUROC = Φ(1 / √2) = 0.76025
    ranks = np.argsort(np.argsort(u)) + 1.0
    n1 = error.sum()
    expected = (ranks[error].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(u) - n1))
    got = float(metrics.error_auroc(u.astype(np.float32), error))
    assert got == pytest.approx(expected, abs=1e-6) and got == pytest.approx(0.76025, abs=0.003)


def test_entropy_brier_and_correlation_known_values():
    h = np.asarray(metrics.binary_entropy(jnp.array([0.0, 0.25, 0.5, 1.0])))
    np.testing.assert_allclose(h, [0.0, 0.8112781, 1.0, 0.0], atol=1e-6)
    assert not np.signbit(h).any()
    p, y = jnp.array([0.0, 0.5, 1.0, 0.9]), jnp.array([0, 1, 0, 1])
    assert float(metrics.brier_score(p, y)) == pytest.approx((0 + 0.25 + 1 + 0.01) / 4)
    rng = np.random.default_rng(2)
    a, b = rng.random((3, 10, 10)), rng.random((3, 10, 10))
    assert float(metrics.pearson_correlation(a, 2 * a + 1)) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics.pearson_correlation(a, -a)) == pytest.approx(-1.0, abs=1e-6)
    assert float(metrics.pearson_correlation(a, b)) == pytest.approx(
        np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-5
    )
    assert np.isnan(float(metrics.pearson_correlation(a, np.ones_like(a))))
    # A constant whose float32 mean is inexact (14 x 0.1) is constant still: undefined, not ~0 from rounding
    # (a one-member ensemble's std maps, ranked over 14 test images, gave a correlation of 1e-7).
    assert np.isnan(float(metrics.pearson_correlation(np.full(14, 0.1), np.arange(14.0))))
    assert np.isnan(float(jax.jit(metrics.spearman_correlation)(np.zeros(14), np.arange(14.0))))
    r = metrics.uncertainty_report(
        jnp.asarray(a), jnp.asarray(b), jnp.asarray(a > 0.3)
    )  # errors: 0.3 < a <= 0.5
    error = (a > 0.5) != (a > 0.3)
    assert float(r["error_fraction"]) == pytest.approx(error.mean())
    assert float(r["std_error_auroc"]) == pytest.approx(_auroc_by_pairs(b, error), abs=1e-6)
    entropy = np.asarray(metrics.binary_entropy(jnp.asarray(a)))
    assert float(r["entropy_error_auroc"]) == pytest.approx(_auroc_by_pairs(entropy, error), abs=1e-6)
    per_image = [_auroc_by_pairs(b[i], error[i]) for i in range(3)]
    np.testing.assert_allclose(np.asarray(r["std_error_auroc_per_image"]), per_image, atol=1e-6)


def _spearman_by_definition(a, b):
    """Pearson correlation of ranks, a value's rank being 1 + the values below it + half the others level."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ranks = [np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x]) for x in (a, b)]
    return np.corrcoef(*ranks)[0, 1]


def test_spearman_and_the_image_level_uncertainty_score():
    np.testing.assert_allclose(metrics.average_ranks(jnp.array([3.0, 1, 4, 1, 5])), [3, 1.5, 4, 1.5, 5])
    rng = np.random.default_rng(4)
    a = rng.random(30)
    b = np.round(a + 0.5 * rng.random(30), 1)  # related, with ties
    assert float(metrics.spearman_correlation(a, np.exp(3 * a))) == pytest.approx(1.0, abs=1e-6)  # monotone
    assert float(metrics.spearman_correlation(a, -a)) == pytest.approx(-1.0, abs=1e-6)
    assert float(metrics.spearman_correlation(a, b)) == pytest.approx(_spearman_by_definition(a, b), abs=1e-5)
    assert np.isnan(float(metrics.spearman_correlation(a, np.ones_like(a))))
    # Per image: the rank correlation of each map's image mean with the image's 1 - IoU. Images that get
    # harder (the truth drifts from the mean) with stds that follow, and an entropy map on the mean.
    n = 6
    mean = np.clip(rng.random((n, 16, 16, 1)), 0, 1).astype(np.float32)
    truth = np.stack([(mean[i] > 0.5) ^ (rng.random((16, 16, 1)) < 0.08 * i) for i in range(n)])
    std = rng.random((n, 16, 16, 1)).astype(np.float32) * np.arange(1, n + 1)[:, None, None, None] / n
    r = metrics.uncertainty_report(jnp.asarray(mean), jnp.asarray(std), jnp.asarray(truth))
    failure = [1 - float(metrics.iou(mean[i] > 0.5, truth[i])) for i in range(n)]
    assert float(r["std_image_spearman"]) == pytest.approx(
        _spearman_by_definition(std.reshape(n, -1).mean(1), failure), abs=1e-5
    )
    entropy = np.asarray(metrics.binary_entropy(jnp.asarray(mean))).reshape(n, -1).mean(1)
    assert float(r["entropy_image_spearman"]) == pytest.approx(
        _spearman_by_definition(entropy, failure), abs=1e-5
    )
    assert float(r["std_image_spearman"]) > 0.8  # stds that grow with the failure rank high


def test_pooled_scores_of_any_resample_follow_from_the_image_statistics():
    rng = np.random.default_rng(5)
    mean = rng.integers(0, 6, (6, 8, 8, 1)) / 5.0  # ensemble-like: values on the bin edges
    truth = rng.random(mean.shape) < mean
    stats = metrics.image_statistics(jnp.asarray(mean), jnp.asarray(truth))
    for index in (np.arange(6), np.array([0, 0, 3, 5, 5, 5])):  # all images; a resample with repeats
        scores = metrics.pooled_scores(stats, np.bincount(index, minlength=6))
        assert float(scores["iou"]) == pytest.approx(
            float(metrics.iou(mean[index] > 0.5, truth[index])), abs=1e-6
        )
        expected = float(metrics.expected_calibration_error(mean[index], truth[index]))
        assert float(scores["ece"]) == pytest.approx(expected, abs=1e-6)
        # eval.pooling=per_image: the mean of the resampled images' own scores, repeats counted.
        scores = metrics.pooled_scores(stats, np.bincount(index, minlength=6), "per_image")
        own = metrics.per_image(metrics.iou, mean[index] > 0.5, truth[index])
        assert float(scores["iou"]) == pytest.approx(float(np.mean(own)), abs=1e-6)
        own = metrics.per_image(metrics.expected_calibration_error, mean[index], truth[index])
        assert float(scores["ece"]) == pytest.approx(float(np.mean(own)), abs=1e-6)
    # The paired bootstrap: replicate r scores both runs on the r-th draw of images; a run against itself
    # differs by nothing in every replicate.
    other = np.clip(mean + rng.normal(0, 0.2, mean.shape), 0, 1)
    other_stats = metrics.image_statistics(jnp.asarray(other), jnp.asarray(truth))
    key = jax.random.PRNGKey(7)
    out = metrics.paired_bootstrap(stats, other_stats, key, 50)
    draws = np.asarray(jax.random.randint(key, (50, 6), 0, 6))
    for r in (0, 17):
        i = draws[r]
        delta = metrics.expected_calibration_error(other[i], truth[i]) - metrics.expected_calibration_error(
            mean[i], truth[i]
        )
        assert float(out["ece_deltas"][r]) == pytest.approx(float(delta), abs=1e-6)
    same = metrics.paired_bootstrap(stats, stats, key, 50)
    assert not np.any(np.asarray(same["iou_deltas"])) and not np.any(np.asarray(same["ece_deltas"]))
    # Per-image pooling: a replicate's difference is the mean over its draw of the per-image differences.
    out = metrics.paired_bootstrap(stats, other_stats, key, 50, "per_image")
    gaps = metrics.per_image(metrics.iou, other > 0.5, truth) - metrics.per_image(
        metrics.iou, mean > 0.5, truth
    )
    assert float(out["iou_delta"]) == pytest.approx(float(np.mean(gaps)), abs=1e-6)
    for r in (0, 17):
        assert float(out["iou_deltas"][r]) == pytest.approx(
            float(np.mean(np.asarray(gaps)[draws[r]])), abs=1e-6
        )
    with pytest.raises(ValueError, match="per_image"):
        metrics.pooled_scores(stats, np.ones(6), "pixels")


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


def test_segmentation_report_poolings():
    rng = np.random.default_rng(0)
    mean = rng.integers(0, 6, (3, 8, 8, 1)) / 5.0  # a 5-member ensemble mean: multiples of 1/5
    truth = rng.integers(0, 2, (3, 8, 8, 1))
    r = metrics.segmentation_report(mean, truth)
    for i in range(3):
        assert float(r["iou_per_image"][i]) == pytest.approx(float(metrics.iou(mean[i] > 0.5, truth[i])))
        assert float(r["ece_per_image"][i]) == pytest.approx(
            float(metrics.expected_calibration_error(mean[i], truth[i]))
        )
    assert float(r["ece_pooled"]) == pytest.approx(float(metrics.expected_calibration_error(mean, truth)))
    assert float(r["iou_pooled"]) == pytest.approx(float(metrics.iou(mean > 0.5, truth)))
    assert float(r["reliability"]["count"].sum()) == mean.size
    np.testing.assert_allclose(r["true_fraction_per_image"], truth.reshape(3, -1).mean(1))


# ---------------------------------------------------------------------------------------------------------------
# Ensembles: make_ensemble_fn against a loop of single members with the same keys.


class _TinyNet(nn.Module):
    """One conv on [x, cond]: enough to make members differ and depend on the image."""

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        del train
        h = x if cond is None else jnp.concatenate([x, cond], -1)
        return nn.Conv(x.shape[-1], (3, 3))(h) + 0.01 * t[:, None, None, None]


def _tiny_sampling(experiment):
    """A 4-step DDIM config of ``experiment``, its schedule, a :class:`_TinyNet`, two 8 px images, its weights."""
    config = tiny_config(f"{experiment}_synthetic")
    config.diffusion.num_timesteps = 50
    config.eval.ddim_steps = 4
    model = _TinyNet()
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
    variables = model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images[:1]
    )
    return config, build.build_schedule(config.diffusion), model, images, variables


@pytest.mark.parametrize("experiment", ["e1", "e2"])
def test_ensemble_statistics_equal_a_loop_over_members(experiment):
    config, schedule, model, images, variables = _tiny_sampling(experiment)
    member = sampling.make_member_fn(model, schedule, config)
    key = jax.random.PRNGKey(3)
    out = sampling.make_ensemble_fn(member, 3, member_chunk=2)(
        variables, images, jnp.zeros((2, 8, 8, 1)), key
    )
    singles = np.stack(
        [np.asarray(member(variables, images, (2, 8, 8, 1), k)) for k in jax.random.split(key, 3)]
    )
    np.testing.assert_allclose(out["mean"], singles.mean(0), atol=1e-5)
    np.testing.assert_allclose(out["std"], singles.std(0), atol=1e-5)
    assert singles.std(0).max() > 1e-3  # the members really differ (noise input / sampling noise)


def test_hard_members_average_the_votes_of_the_soft_ones():
    # The same keys give the same members; 'hard' thresholds each at 0.5, so the mean is a vote fraction.
    config, schedule, model, images, variables = _tiny_sampling("e2")
    key, template = jax.random.PRNGKey(3), jnp.zeros((2, 8, 8, 1))
    soft = sampling.make_member_fn(model, schedule, config)
    singles = np.stack(
        [np.asarray(soft(variables, images, (2, 8, 8, 1), k)) for k in jax.random.split(key, 4)]
    )
    config.eval.member_output = "hard"
    validation.validate(config)
    out = sampling.make_ensemble_fn(sampling.make_member_fn(model, schedule, config), 4, 2)(
        variables, images, template, key
    )
    votes = (singles > 0.5).astype(np.float32)
    np.testing.assert_allclose(out["mean"], votes.mean(0), atol=1e-6)
    np.testing.assert_allclose(out["std"], votes.std(0), atol=1e-6)
    assert set(np.unique(np.round(4 * np.asarray(out["mean"])))) <= {0, 1, 2, 3, 4}
    assert not np.allclose(singles, votes)  # the soft members were not already binary
    config.eval.member_output = "majority"
    with pytest.raises(ValueError, match="eval.member_output"):
        validation.validate(config)


class _CalNet(nn.Module):
    """A network with an auxiliary head and a postprocess that returns it (as MedSegDiff v1 blends ``cal``)."""

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        out = nn.Conv(1, (3, 3))(jnp.concatenate([x, cond], -1))
        return out, {"cal": jnp.full_like(out, 0.25)}

    def postprocess_member(self, sample01, extras):
        return extras["cal"]


@pytest.mark.parametrize("experiment", ["e1", "e2"])
@pytest.mark.parametrize("cal_weight", [0.0, 10.0])
def test_untrained_auxiliary_heads_stay_out_of_the_members(cal_weight, experiment):
    """A trained cal head is blended into E2's members (MedSegDiff v1's sampler); E1 is classical segmentation
    (issue 32): its member is the sigmoid alone, whatever the cal weight."""
    config = tiny_config(f"{experiment}_synthetic")
    config.objective.cal_weight = cal_weight
    schedule = build.build_schedule(config.diffusion)
    model = _CalNet()
    images = jnp.ones((1, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images)
    member = sampling.make_member_fn(model, schedule, config)(
        variables, images, (1, 8, 8, 1), jax.random.PRNGKey(1)
    )
    if cal_weight > 0 and experiment == "e2":  # the trained cal head is the member, as the postprocess says
        np.testing.assert_allclose(member, 0.25)
    else:  # untrained, or E1: the network's own output
        assert not np.allclose(member, 0.25)
    if experiment == "e1":
        assert float(member.min()) > 0 and float(member.max()) < 1  # a sigmoid


def test_the_cal_blend_gets_the_sample_on_the_mask_scale_unclipped():
    """MedSegDiff's code diffuses {0,1} masks and blends its sampler's raw output (x̂0 clipped to [-1, 1]):
    clip(cal + 0.25 s, 0, 1) with s = -0.8 lowers cal by 0.2. Clipping s to [0, 1] first (before issue 32) would
    leave cal at 0.5; under the symmetric range the sample goes in as (x + 1)/2."""
    from diffseg_jax.models.medsegdiff import blend_cal

    x = jnp.asarray([-0.8, 0.3, 1.0, -1.0])
    seen = sampling.diffusion_member(x, {"cal": None}, "binary", lambda s, e: s)
    np.testing.assert_allclose(seen, x)
    np.testing.assert_allclose(
        sampling.diffusion_member(x, {"cal": None}, "symmetric", lambda s, e: s), (x + 1) / 2
    )
    cal = jnp.full(4, 0.5)  # the sample (> 0 at 2 of 4) and cal disagree: Dice 0.5 < 0.65, so cal + 0.25 s
    blended = sampling.diffusion_member(x, {"cal": cal}, "binary", lambda s, e: blend_cal(s, e["cal"]))
    np.testing.assert_allclose(blended, [0.3, 0.575, 0.75, 0.25], atol=1e-6)
    # Without extras (no trained head), the member is the sample mapped to [0, 1], as before.
    np.testing.assert_allclose(sampling.diffusion_member(x, {}, "binary", lambda s, e: s), [0, 0.3, 1, 0])


# ---------------------------------------------------------------------------------------------------------------
# The feed-forward protocol.


def test_choose_epochs_takes_the_lowest_and_earliest():
    assert protocol.choose_epochs({1: 0.5, 2: 0.3, 3: 0.3, 4: 0.4}) == 2
    with pytest.raises(ValueError, match="No validation losses"):
        protocol.choose_epochs({})


@pytest.mark.slow
def test_e1_protocol_selects_on_validation_then_retrains_on_all(tmp_path, tfds_dir):
    config = tiny_config("e1_synthetic", data_dir=tfds_dir)
    config.data.num_train = 16
    config.data.validation_fraction = 0.25  # fit 12 = 3 steps of 4, validation 4
    config.train.batch_size = 4
    config.train.lr = 1e-3
    config.protocol.max_epochs = 2
    config.eval.num_images = 2
    summary = protocol.run(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "select" / "validation.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [3, 6]
    losses = {r["epoch"]: r["validation_loss"] for r in records}
    assert summary["chosen_epochs"] == min(losses, key=losses.get)
    assert summary["final_steps"] == summary["chosen_epochs"] * 4  # epochs of the whole 16-example split
    saved = json.loads((tmp_path / "e1_protocol.json").read_text())
    assert saved["chosen_epochs"] == summary["chosen_epochs"]
    assert (tmp_path / "checkpoints" / str(summary["final_steps"])).is_dir()
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["experiment"] == "e1" and m["step"] == summary["final_steps"] and 0 <= m["ece"] <= 1
    assert m == assert_metrics_are_the_ensembles(tmp_path / "eval")
    # Rerunning finds both phases done: nothing is trained (or validated) again.
    config.eval.enabled = False
    again = protocol.run(config, str(tmp_path))
    assert again["chosen_epochs"] == summary["chosen_epochs"]
    assert len(open(tmp_path / "select" / "validation.jsonl").readlines()) == 2


# ---------------------------------------------------------------------------------------------------------------
# Table 1.


def _metrics(root, name, dataset, model, experiment, iou, ece, pooling="pooled", **more):
    folder = root / name / "eval"
    folder.mkdir(parents=True)
    m = dict(dataset=dataset, model=model, experiment=experiment, iou=iou, ece=ece, pooling=pooling, **more)
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder.parent


def test_report_builds_table1_with_blank_missing_cells(tmp_path):
    runs = tmp_path / "runs"
    bins_ff = {"confidence": [0.05, 0.95], "accuracy": [0.1, 0.9], "count": [30, 10]}
    bins_diff = {"confidence": [0.05, 0.5, 0.95], "accuracy": [0.0, 0.5, 1.0], "count": [20, 10, 10]}
    _metrics(runs, "a", "isic2016", "segdiff", "e1", 0.8586, 0.020, reliability=bins_ff)
    scores = dict(error_auroc=0.71234, ueo=0.5, ueo_threshold=0.2, image_spearman=0.4)
    uncertainty = dict(error_fraction=0.0432, std=scores, entropy={**scores, "error_auroc": None})
    _metrics(runs, "b", "isic2016", "segdiff", "e2", 0.8639, 0.017, brier_pooled=0.0311, mean_std=0.25,
             uncertainty=uncertainty, reliability=bins_diff)  # fmt: skip
    _metrics(runs, "c", "isic2016", "ensemdiff", "e2", 0.8659, 0.007)  # no feed-forward run
    _metrics(runs, "d", "monuseg2018", "segdiff", "e1", 0.6344, 0.059)
    _metrics(runs, "e", "isic2016", "ensemdiff", "e3", 0.1, 0.1)  # not a Table 1 experiment: ignored
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
        folder = _metrics(
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
    _metrics(tmp_path / "r", "a", "isic2016", "segdiff", "e1", 0.8, 0.02)
    second = _metrics(tmp_path / "r", "b", "isic2016", "segdiff", "e1", 0.7, 0.03)
    with pytest.raises(ValueError, match="Two ff runs .*isic2016.*segdiff"):
        collection.collect([str(tmp_path / "r")])
    shutil.rmtree(second)
    _metrics(tmp_path / "r", "c", "isic2016", "segdiff", "e2", 0.8, 0.02, pooling="per_image")
    with pytest.raises(ValueError, match="mix pixel poolings"):
        collection.collect([str(tmp_path / "r")])
    shutil.rmtree(tmp_path / "r" / "c")
    _metrics(tmp_path / "r", "c", "isic2016", "segdiff", "e2", 0.8, 0.02, member_output="hard")
    with pytest.raises(ValueError, match="eval.member_output"):
        collection.collect([str(tmp_path / "r")])


def _repeat(root, name, experiment, seed, iou, ece, lr=1e-4, **more):
    """An evaluated run with the config.json a run records, for the repeats tests."""
    workdir = _metrics(root, name, "isic2016", "segdiff", experiment, iou, ece, ensemble_size=5, **more)
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
    _metrics(runs, "a", "isic2016", "segdiff", "e1", 0.8, 0.02)
    broken = _metrics(runs, "b", "isic2016", "segdiff", "e2", 0.8, 0.02) / "eval"
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


def test_compare_takes_a_workdir_and_records_its_eval_folder(tmp_path):
    """--compare RUN (a workdir, as --runs takes) reads RUN/eval and comparison.json names RUN/eval; a folder
    with no evaluation at all keeps the message that says to evaluate it."""
    rng = np.random.default_rng(5)
    ids = np.array(["a", "b", "c"])
    masks = (rng.random((3, 8, 8, 1)) < 0.5).astype(np.uint8)
    for name, experiment in (("ff", "e1"), ("diff", "e2")):
        folder = _metrics(tmp_path, name, "isic2016", "segdiff", experiment, 0.8, 0.02) / "eval"
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


_SHARDED_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from conftest import assert_metrics_are_the_ensembles, tiny_config
from diffseg_jax import build, evaluate, sampling, train

class Net(nn.Module):
    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        return nn.Conv(1, (3, 3))(jnp.concatenate([x, cond], -1)) + 0.01 * t[:, None, None, None]

config = tiny_config("e2_synthetic")
config.diffusion.num_timesteps = 50
config.eval.ddim_steps = 3
schedule = build.build_schedule(config.diffusion)
model = Net()
images = np.random.default_rng(0).uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images[:1])
ensemble = sampling.make_ensemble_fn(sampling.make_member_fn(model, schedule, config), 3, 2)
mean, std = sampling.sample_statistics(ensemble, variables, images, (8, 8, 1), 4, jax.random.PRNGKey(5))
print(json.dumps({{"devices": jax.device_count(), "mean": mean.ravel().tolist(), "std": std.ravel().tolist()}}))
"""


class _ToyNet(nn.Module):
    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        return nn.Conv(1, (3, 3))(jnp.concatenate([x, cond], -1)) + 0.01 * t[:, None, None, None]


def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_result(tmp_path):
    import os

    config = tiny_config("e2_synthetic")
    config.diffusion.num_timesteps = 50
    config.eval.ddim_steps = 3
    model = _ToyNet()
    images = np.random.default_rng(0).uniform(0, 1, (7, 8, 8, 3)).astype(np.float32)
    variables = model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images[:1]
    )
    member = sampling.make_member_fn(model, build.build_schedule(config.diffusion), config)
    ensemble = sampling.make_ensemble_fn(member, 3, 2)
    key, calls = jax.random.PRNGKey(5), []

    def counting(*args):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("killed")
        return ensemble(*args)

    def run(params, run_id, resume=str(tmp_path / "partial")):
        calls.clear()
        return sampling.sample_statistics(counting, params, images, (8, 8, 1), 2, key, resume, run_id)

    crash_at = None
    full_mean, full_std = run(variables, None, resume=None)  # 7 images in 4 batches, no files
    crash_at = 3  # killed while sampling the third batch
    with pytest.raises(RuntimeError, match="killed"):
        run(variables, {"step": 4})
    assert sorted(os.listdir(tmp_path / "partial")) == ["batch_00000.npz", "batch_00001.npz", "meta.json"]
    crash_at = None
    mean, std = run(variables, {"step": 4})
    assert len(calls) == 2  # only batches 2 and 3 were sampled again
    np.testing.assert_array_equal(mean, full_mean)  # batch i depends on fold_in(key, i) alone
    np.testing.assert_array_equal(std, full_std)
    # Another evaluation (another step, or other weights at the same step) samples everything again.
    run(variables, {"step": 5})
    assert len(calls) == 4
    run(jax.tree.map(lambda w: 1.5 * w, variables), {"step": 5})
    assert len(calls) == 4
    run(jax.tree.map(lambda w: 1.5 * w, variables), {"step": 5})
    assert len(calls) == 0  # finished before: read back whole


def test_sharded_evaluation_does_not_depend_on_the_device_count():
    """6 images in batches of 4 (the last padded), split over 1 or 2 CPU devices: the same statistics."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    results = {}
    for n in (1, 2):
        env = dict(os.environ)
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        script = _SHARDED_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
        assert results[n]["devices"] == n
    np.testing.assert_allclose(results[2]["mean"], results[1]["mean"], atol=1e-5)
    np.testing.assert_allclose(results[2]["std"], results[1]["std"], atol=1e-5)
    assert len(results[1]["mean"]) == 6 * 64 and np.std(results[1]["mean"]) > 0


def test_sampling_reads_the_weights_whatever_optimizer_or_sampler_trained_them(tmp_path):
    """Evaluation restores only the weights: a run trained with Adam and uniform timesteps evaluates under a
    config with nnU-Net's SGD and the loss-aware sampler (whose states do not fit), while a whole-state
    restore of that checkpoint fails naming it and the fix."""
    from diffseg_jax import checkpoints  # noqa: PLC0415

    config = tiny_config("e2_synthetic")
    _, _, _, state = build.model_and_state(config, (32, 32, 3))
    state = state.replace(
        step=state.step + 7, ema_params=jax.tree.map(lambda p: p + 1.0, state.params)
    )  # weights a fresh state does not have
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(7, state, {})
    ckpt.close()
    other = tiny_config("e2_synthetic")
    other.train.optimizer = "sgd_nesterov"
    other.timesteps.sampling = "loss_aware"
    for use_ema, expected in ((False, state.params), (True, state.ema_params)):
        other.eval.use_ema = use_ema
        _, _, step, variables = restore.trained_network(other, str(tmp_path), 3)
        assert step == 7
        jax.tree.map(np.testing.assert_array_equal, variables["params"], expected)
    _, _, _, fresh = build.model_and_state(other, (32, 32, 3), abstract=True)
    with pytest.raises(
        checkpoints.CheckpointMismatchError, match=r"checkpoints/7 does not fit .*new --workdir"
    ):
        checkpoints.Checkpointer(str(tmp_path / "checkpoints")).restore(7, fresh)


def test_evaluations_go_where_they_replace_no_other_result(tmp_path, monkeypatch):
    """eval/ is the latest model's (Table 1 reads it), eval_step{S}/ an earlier one's (predict/ and
    predict_step{S}/ alike); --eval_dir (--predict_dir) may not be the
    run's own folder or lie in another run's; a --compare_workdir without an evaluation is named before any
    test image is read."""
    run, other = tmp_path / "run", tmp_path / "other"
    for folder in (run, other):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    assert evaluate.output_dir(str(run), None) == str(run / "eval")
    assert evaluate.output_dir(str(run), None, 45000) == str(run / "eval_step45000")
    # --mode predict's outputs the same way: an earlier checkpoint's never replace the latest one's.
    assert evaluate.output_dir(str(run), None, -1, "predict") == str(run / "predict")
    assert evaluate.output_dir(str(run), None, 7, "predict") == str(run / "predict_step7")
    with pytest.raises(configlib.ConfigError, match=f"--predict_dir {other}/p lies in .*another run"):
        evaluate.output_dir(str(run), str(other / "p"), -1, "predict", "--predict_dir")
    for ok in (run / "eval_ext", tmp_path / "elsewhere" / "eval", run / "eval"):
        assert evaluate.output_dir(str(run), str(ok), 7) == str(ok)
    with pytest.raises(configlib.ConfigError, match="is the run's own folder"):
        evaluate.output_dir(str(run), str(run))
    with pytest.raises(configlib.ConfigError, match=f"another run \\({other}\\)"):
        evaluate.output_dir(str(run), str(other / "eval"))
    (run / "select").mkdir()  # a run inside this one (the protocol's selection run): its own folder
    (run / "select" / "config.json").write_text("{}")
    assert evaluate.output_dir(str(run / "select"), str(run / "select" / "eval_x")) == str(
        run / "select" / "eval_x"
    )

    def no_data(*args, **kwargs):
        raise AssertionError("test images read before the comparison run was checked")

    monkeypatch.setattr(data, "eval_arrays", no_data)
    monkeypatch.setattr(planning, "resolve_as_trained", lambda config, workdir: config)
    with pytest.raises(FileNotFoundError, match="--compare_workdir .*other has no eval/ensemble.npz"):
        evaluate.evaluate(tiny_config(), str(run), compare_workdir=str(other))
    # Another dataset than the run trained on is not scored into its own eval/ (a retyped config file without
    # the training's --config.data.kind, or an external test set without --eval_dir).
    trained = tiny_config()
    trained.data.kind = "nuclei"
    configlib.save(trained, str(run / "config.json"))
    for kind, folder in (("lesion", None), ("lesion", str(run / "eval_step2"))):
        config = tiny_config()
        config.data.kind, config.eval.step = kind, -1 if folder is None else 2
        with pytest.raises(
            configlib.ConfigError,
            match=r"trained on synthetic-nuclei .*this config's data is synthetic-lesion.*--eval_dir .*"
            r"eval_synthetic-lesion.*configs/from_run.py:",
        ):
            evaluate.evaluate(config, str(run))
    config = tiny_config()
    config.data.kind = "lesion"
    with pytest.raises(AssertionError, match="test images read"):  # past the check: a folder of its own
        evaluate.evaluate(config, str(run), out_dir=str(run / "eval_lesion"))
    with pytest.raises(AssertionError, match="test images read"):  # the data it trained on
        evaluate.evaluate(trained, str(run))


def test_an_earlier_checkpoint_kept_by_keep_every_is_the_one_eval_step_reads(tmp_path):
    """``train.keep_every`` keeps checkpoints at its multiples beside the last ``keep_checkpoints``; evaluation,
    prediction and the analyses read ``eval.step`` (the paper's Fig. 3 uses the models after 75 % of training),
    and a step that was not kept is refused with the steps there are."""
    from diffseg_jax import checkpoints  # noqa: PLC0415

    config = tiny_config("e2_synthetic")
    _, _, _, state = build.model_and_state(config, (32, 32, 3))
    states = {}
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1, keep_every=4)
    for step in (2, 4, 6, 8):
        states[step] = state.replace(step=step, params=jax.tree.map(lambda p, s=step: p + s, state.params))
        ckpt.save(step, states[step], {})
        ckpt.wait()
    ckpt.close()
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [4, 8] and ckpt.latest_step() == 8
    ckpt.close()
    for step, state_given, expected in ((-1, None, 8), (4, None, 4), (-1, states[8], 8), (4, states[8], 4)):
        config.eval.step = step
        _, _, got, variables = restore.trained_network(config, str(tmp_path), 3, state_given)
        assert got == expected
        jax.tree.map(np.testing.assert_array_equal, variables["params"], states[expected].params)
    config.eval.step = 6
    with pytest.raises(
        FileNotFoundError, match=r"No checkpoint of step 6 .*holds steps \[4, 8\].*train\.keep_every"
    ):
        restore.trained_network(config, str(tmp_path), 3)
    assert checkpoints.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [
        4,
        8,
    ]  # reading deletes none


@pytest.mark.slow
def test_e2_protocol_selects_on_validation_iou_then_retrains_on_all(tmp_path, tfds_dir, monkeypatch):
    """Beyond the paper: the diffusion model's step count chosen by the validation IoU of small ensembles."""
    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    config.data.num_train = 16
    config.data.validation_fraction = 0.25  # fit 12 = 3 steps of 4, validation 4 images
    config.train.batch_size = 4
    config.train.num_steps = 4
    config.train.lr = 1e-3
    config.protocol.validate_every = 2
    config.protocol.ensemble_size = 2
    config.protocol.ddim_steps = 2
    config.eval.enabled = False  # the E1 test checks the evaluation after retraining; here the selection
    maps = {}  # the validation ensembles' mean maps, by step, as the protocol samples them
    sample = sampling.ensemble_maps
    monkeypatch.setattr(
        sampling,
        "ensemble_maps",
        lambda c, m, s, v, images, step, **k: maps.setdefault(step, sample(c, m, s, v, images, step, **k)),
    )
    summary = protocol.run(config, str(tmp_path))
    monkeypatch.undo()
    records = [json.loads(line) for line in open(tmp_path / "select" / "validation.jsonl")]
    assert [r["step"] for r in records] == [2, 4] and [r["epochs"] for r in records] == [0.667, 1.333]
    ious = {r["step"]: r["validation_iou"] for r in records}
    # Each recorded IoU is the pooled IoU of that step's ensemble mean at 0.5 against the 4 validation masks,
    # counted here by hand; and the two steps' ensembles differ (the weights changed).
    truth = data.eval_arrays(config.data, "validation")["mask"][..., 0] > 0.5
    assert truth.shape[0] == 4 and sorted(maps) == [2, 4]
    for step, (mean, _) in maps.items():
        pred = np.asarray(mean)[..., 0] > 0.5
        assert ious[step] == pytest.approx((pred & truth).sum() / (pred | truth).sum(), abs=1e-6)
    assert np.abs(np.asarray(maps[2][0]) - np.asarray(maps[4][0])).max() > 1e-3
    assert all(0.0 <= r["validation_ece"] <= 1.0 for r in records)
    assert summary["chosen_step"] == max(sorted(ious), key=ious.get)  # the highest IoU, the earliest on ties
    assert summary["final_steps"] == round(
        summary["chosen_step"] * 4 / 3
    )  # as many epochs of all 16 examples
    saved = json.loads((tmp_path / "e2_protocol.json").read_text())
    assert saved["validation_iou"] == {str(k): v for k, v in ious.items()}
    assert (tmp_path / "checkpoints" / str(summary["final_steps"])).is_dir()  # retrained on all 16 examples
    # The recorded IoU is that of the step's weights, and the same noise every time: recomputed from the
    # selection run's last checkpoint, it is the same number.
    select = ml_collections.ConfigDict(config.to_dict())
    select.train.num_steps = 4
    _, model, schedule, _, fresh = build.setup(select, abstract=True, split="fit")
    state = restore.load_state(str(tmp_path / "select"), fresh)
    validate = protocol.make_validation_iou_fn(select, model, schedule)
    assert int(state.step) == 4 and validate(state)["validation_iou"] == pytest.approx(ious[4], abs=1e-6)
    # protocol.sampler=ddpm: the validation ensemble is built as an evaluation's with eval.sampler=ddpm.
    built = []
    monkeypatch.setattr(sampling, "ensemble_fn", lambda c, *args: built.append(c.eval.to_dict()))
    select.protocol.sampler = "ddpm"
    protocol.make_validation_iou_fn(select, model, schedule)
    assert built[0]["sampler"] == "ddpm" and built[0]["ensemble_size"] == 2
    monkeypatch.undo()
    # Rerunning finds both phases done: nothing is trained or validated again.
    assert protocol.run(config, str(tmp_path))["chosen_step"] == summary["chosen_step"]
    assert len(open(tmp_path / "select" / "validation.jsonl").readlines()) == 2
    # Each score records how it was sampled; a rerun sampling otherwise is refused, not mixed in.
    assert (records[0]["sampler"], records[0]["ensemble_size"], records[0]["ddim_steps"]) == ("ddim", 2, 2)
    config.protocol.ensemble_size = 3
    with pytest.raises(ValueError, match="protocol.ensemble_size: recorded 2, now 3"):
        protocol.run(config, str(tmp_path))


def test_a_protocol_refuses_a_workdir_it_would_misuse(tmp_path, monkeypatch):
    """Its retraining phase would continue a run the protocol did not start (evaluating that run as the
    protocol's result); a validation fraction of 0 leaves nothing to select on. Both before any training."""
    from diffseg_jax import checkpoints  # noqa: PLC0415

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(train, "train", no_training)
    config = tiny_config("e1_synthetic")
    config.data.validation_fraction = 0.0
    with pytest.raises(configlib.ConfigError, match="data.validation_fraction=0.0.*fraction in \\(0, 1\\)"):
        protocol.run(config, str(tmp_path))
    _, _, _, state = build.model_and_state(tiny_config("e1_synthetic"), (32, 32, 3))
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(3, state.replace(step=state.step + 3), {})
    ckpt.close()
    with pytest.raises(
        configlib.ConfigError, match="holds a trained run .*step 3.*did not start.*new --workdir"
    ):
        protocol.run(tiny_config("e1_synthetic"), str(tmp_path))


class _RampNet(nn.Module):
    """Logits that rise from left to right whatever the input: what test-time augmentation does to a network
    that is not flip-invariant has a closed form."""

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        del t, cond, train
        scale = self.param("scale", nn.initializers.constant(4.0), ())
        ramp = jnp.linspace(-1.0, 1.0, x.shape[2])[None, None, :, None]
        return scale * ramp + 0.0 * x


def test_test_time_augmentation_averages_the_outputs_turned_back():
    config = tiny_config("e1_synthetic")
    schedule = build.build_schedule(config.diffusion)
    model = _RampNet()
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    member = sampling.make_member_fn(model, schedule, config)
    key, template = jax.random.PRNGKey(1), jnp.zeros((2, 8, 8, 1))
    p = jax.nn.sigmoid(4.0 * jnp.linspace(-1.0, 1.0, 8))[None, None, :, None] * jnp.ones((2, 8, 8, 1))
    plain = sampling.make_ensemble_fn(member, 3, None)(variables, images, template, key)
    np.testing.assert_allclose(plain["mean"], p, atol=1e-6)
    # Flips: identity and the height flip give p back, the width flip and the 180° turn its mirror image.
    flips = sampling.make_ensemble_fn(member, 3, 2, tta="flips")(variables, images, template, key)
    mirror = p[:, :, ::-1]
    np.testing.assert_allclose(flips["mean"], (p + mirror) / 2, atol=1e-6)
    np.testing.assert_allclose(flips["std"], jnp.abs(p - mirror) / 2, atol=1e-6)
    # All eight: the mean of an orbit is unchanged by every rotation and flip.
    d4 = sampling.make_ensemble_fn(member, 2, None, tta="d4")(variables, images, template, key)
    for r, f in diffusion.TTA_TRANSFORMS["d4"]:
        np.testing.assert_allclose(diffusion.dihedral(d4["mean"], r, f), d4["mean"], atol=1e-6)
        x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
        np.testing.assert_array_equal(diffusion.dihedral(diffusion.dihedral(x, r, f), r, f, inverse=True), x)
    assert float(d4["std"].max()) > 0.1
    # On an image-dependent network: a loop over the transforms, each with its members' keys (the identity's
    # are the plain ensemble's), outputs turned back.
    tiny = _TinyNet()
    tv = tiny.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images[:1])
    m = sampling.make_member_fn(tiny, schedule, config)
    loop = []
    for i, (r, f) in enumerate(diffusion.TTA_TRANSFORMS["flips"]):
        seen = diffusion.dihedral(images, r, f)
        for k in jax.random.split(key if i == 0 else jax.random.fold_in(key, i), 3):
            loop.append(np.asarray(diffusion.dihedral(m(tv, seen, (2, 8, 8, 1), k), r, f, inverse=True)))
    both = sampling.make_ensemble_fn(m, 3, None, tta="flips")(tv, images, template, key)
    np.testing.assert_allclose(both["mean"], np.mean(loop, 0), atol=1e-5)
    np.testing.assert_allclose(both["std"], np.std(loop, 0), atol=1e-5)
    plain = sampling.make_ensemble_fn(m, 3, None)(tv, images, template, key)
    np.testing.assert_allclose(plain["mean"], np.mean(loop[:3], 0), atol=1e-5)


def test_a_run_is_sampled_only_with_the_settings_that_give_its_network_meaning(tmp_path):
    """evaluate / predict / analyse refuse a config that would run the network as something it was not trained
    as (an E1 network as an E2 denoiser, another schedule); another test set and other sampling settings pass."""
    from diffseg_jax import configlib, planning  # noqa: PLC0415

    trained = tiny_config("e1_synthetic")
    configlib.save(trained, str(tmp_path / "config.json"))
    same = tiny_config("e1_synthetic")
    same.data.name, same.data.manual_dir, same.data.resize = "segmentation_folder", "/external", 64
    same.eval.sampler, same.diffusion.variance = "ddim", "fixed_small"
    assert planning.resolve_as_trained(same, str(tmp_path)).experiment == "e1"
    wrong = tiny_config("e2_synthetic")
    wrong.diffusion.num_timesteps = 1000
    with pytest.raises(
        ValueError, match=r"experiment: trained with 'e1', this config has 'e2'; diffusion\.num_timesteps"
    ):
        planning.resolve_as_trained(wrong, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["e1", "e2"])
def test_protocol_patience_stops_the_selection_and_a_crashed_selection_resumes(
    tmp_path, tfds_dir, monkeypatch, experiment
):
    """Scripted validation scores by step (3 steps an epoch of the fit split, a validation each):
    best at step 6, then two without a better one, so ``protocol.patience=2`` stops the selection at step 12
    (the better step 15 is never reached). A crash in the validation at step 9 (before that step's checkpoint)
    and a rerun: training resumes from step 6's checkpoint (steps 3 and 6 are not validated again), validates 9
    and 12, and retrains for the chosen 2 epochs (8 steps of the whole 16-image set)."""
    from diffseg_jax import checkpoints

    config = tiny_config(f"{experiment}_synthetic", data_dir=tfds_dir)
    config.data.num_train = 16
    config.data.validation_fraction = 0.25  # fit 12 = 3 steps of 4, validation 4
    config.train.batch_size = 4
    config.protocol.patience = 2
    config.protocol.max_epochs = 6  # E1: 6 validations, steps 3 ... 18
    config.train.num_steps = 18  # E2: its budget, validated every 3 steps
    config.protocol.validate_every = 3
    config.eval.enabled = False
    losses = {3: 0.5, 6: 0.4, 9: 0.45, 12: 0.47, 15: 0.1, 18: 0.1}
    validated, crash = [], [9]

    def score(state):
        step = int(state.step)
        validated.append(step)
        if step in crash:
            crash.remove(step)
            raise RuntimeError("simulated crash in the validation")
        return losses[step]

    if experiment == "e1":
        monkeypatch.setattr(protocol, "make_validation_fn", lambda *a: score)
    else:  # higher is better
        iou = lambda state: {"validation_iou": 1 - score(state), "validation_ece": 0.0}
        monkeypatch.setattr(protocol, "make_validation_iou_fn", lambda *a: iou)
    with pytest.raises(RuntimeError, match="simulated crash"):
        protocol.run(config, str(tmp_path))
    assert validated == [3, 6, 9]
    summary = protocol.run(config, str(tmp_path))
    assert validated == [3, 6, 9, 9, 12]  # resumed at 6, stopped by patience at 12
    records = [json.loads(line) for line in open(tmp_path / "select" / "validation.jsonl")]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert summary["final_steps"] == 8 and summary["patience"] == 2
    assert summary["chosen_epochs" if experiment == "e1" else "chosen_step"] == (
        2 if experiment == "e1" else 6
    )
    assert sorted(os.listdir(tmp_path / "select" / "checkpoints")) == ["12"]  # the selection stopped at 12
    assert checkpoints.latest_step(str(tmp_path / "checkpoints")) == 8
    # Done: a rerun neither trains nor validates.
    assert protocol.run(config, str(tmp_path))["final_steps"] == 8 and validated == [3, 6, 9, 9, 12]


def test_learning_curves_collect_each_runs_steps_and_samplers(tmp_path):
    """learning_curves.collect_learning_curves (issue 32): a row per evaluation under learning_curve/ and eval/, the
    prediction from the run's config (None: the experiment's own), the final eval/ counted once when
    eval_steps lists it too; the Markdown, CSV and figure are written."""

    def run(name, experiment, prediction, evaluations):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(
            json.dumps({"seed": 0, "experiment": experiment, "objective": {"prediction": prediction}})
        )
        for sub, step, sampler, iou in evaluations:
            (folder / sub).mkdir(parents=True)
            m = dict(experiment=experiment, model="ensemdiff", dataset="isic2016", step=step, sampler=sampler,
                     ddim_steps=10 if sampler == "ddim" else None, iou=iou, ece=0.1, mean_std=0.2,
                     uncertainty={"std": {"error_auroc": 0.8}})  # fmt: skip
            (folder / sub / "metrics.json").write_text(json.dumps(m))

    run("e2_eps", "e2", None, [("learning_curve/step1000_ddim10", 1000, "ddim", 0.4),
                               ("learning_curve/step2000_ddim10", 2000, "ddim", 0.5),
                               ("learning_curve/step2000_ddpm", 2000, "ddpm", 0.55),
                               ("eval", 2000, "ddim", 0.99)])  # fmt: skip
    run("e2_x0", "e2", "x0", [("eval", 1000, "ddim", 0.8)])
    rows = learning_curves.collect_learning_curves([str(tmp_path)])
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
    assert os.path.getsize(paths["learning_curves_png"]) > 1000
