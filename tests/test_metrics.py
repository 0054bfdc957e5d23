"""diffseg_jax.metrics: IoU, Dice, ECE and its reliability bins, the uncertainty maps' scores, against known values and
their definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffseg_jax import (
    metrics,
)


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
