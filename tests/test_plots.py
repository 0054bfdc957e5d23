"""diffseg_jax.plots: the figures' numbers (reliability points, run names)."""

from __future__ import annotations

import numpy as np
import pytest

from diffseg_jax import (
    metrics,
    plots,
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
