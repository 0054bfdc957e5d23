"""Fingerprint-adaptive diffusion: timestep weights, importance sampling, the loss-aware sampler, terminal noise."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from diffseg_jax import adaptive, build, diffusion, objectives, train, validation
from diffseg_jax.diffusion import schedule as schedule_lib
from diffseg_jax.diffusion import timesteps

# ---------------------------------------------------------------------------------------------- weights


def test_derivative_weights_are_normalised_floored_and_follow_the_slope():
    t = np.arange(0, 1000, 10)
    curve = 0.25 / (1.0 + np.exp(-(t - 400) / 60.0))  # a logistic rise: steepest at t = 400
    w = timesteps.derivative_weights(t, curve, 1000, smoothing=1, floor=0.1)
    assert w.shape == (1000,)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-12)  # sum_t w(t) = T: the loss scale is kept
    assert abs(int(np.argmax(w)) - 400) <= 10  # (the grid has a point every 10 steps)
    # Above the floor, weights are proportional to |d curve / dt| (the logistic's closed-form derivative); on a
    # curve given at every t, central differences follow it closely.
    full_t = np.arange(1000.0)
    e = np.exp(-(full_t - 400) / 60.0)
    w = timesteps.derivative_weights(full_t, 0.25 / (1.0 + e), 1000, smoothing=1, floor=0.1)
    slope = 0.25 * e / (1.0 + e) ** 2 / 60.0
    floor_value = w.min()
    above = w > floor_value * 1.0001
    ratio = w[above] / slope[above]
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-3)
    # The floor: 0.1 x the mean slope, then renormalised; the flat tails sit exactly on it.
    assert np.isclose(w[0], floor_value) and np.isclose(w[-1], floor_value)
    assert floor_value == pytest.approx(0.1 / np.maximum(slope / slope.mean(), 0.1).mean(), rel=1e-3)


def test_moving_average_keeps_the_length_and_averages_what_is_there():
    v = np.array([0.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(timesteps.moving_average(v, 3), [0.5, 1.0, 2.0, 2.5])  # shrunk at the ends
    np.testing.assert_allclose(timesteps.moving_average(v, 25), [0.5, 1.0, 1.5, 2.0])  # cut to 4 samples


def test_derivative_weights_reject_a_flat_curve_and_bad_floor():
    with pytest.raises(ValueError, match="flat"):
        timesteps.derivative_weights(np.arange(10), np.ones(10), 10)
    with pytest.raises(ValueError, match="floor"):
        timesteps.derivative_weights(np.arange(10), np.arange(10.0), 10, floor=1.5)


# ----------------------------------------------------------------------------- importance sampling


def test_importance_correction_is_exactly_unbiased_in_expectation():
    rng = np.random.default_rng(0)
    num_t = 50
    losses = rng.uniform(0.1, 2.0, num_t)
    weights = rng.uniform(0.1, 3.0, num_t)
    probs = rng.dirichlet(np.ones(num_t))
    factor = np.asarray(timesteps.importance_factor(jnp.arange(num_t), jnp.asarray(probs, jnp.float32)))
    expectation = np.sum(probs * weights * factor * losses)  # E_{t~p}[w(t) L_t / (T p(t))]
    np.testing.assert_allclose(expectation, np.mean(weights * losses), rtol=1e-5)


def test_loss_fn_with_a_proposal_estimates_the_uniform_weighted_loss():
    """A toy E3 problem whose loss at t is known exactly: (f(t) - 1)^2 for all-foreground masks and a network that
    outputs the constant f(t). Averaged over many draws of t from a skewed proposal, the corrected loss matches
    mean_t w(t) (f(t) - 1)^2; without the correction it would estimate the proposal-weighted mean instead."""
    num_t = 100
    sched = diffusion.get_schedule("linear", num_t)
    f = jnp.linspace(-1.0, 2.0, num_t)
    apply_fn = lambda params, x, t, cond, rng: jnp.zeros_like(x) + f[t][:, None, None, None]
    batch = {"image": jnp.zeros((1024, 2, 2, 3)), "mask": jnp.ones((1024, 2, 2, 1))}
    weights = jnp.linspace(0.5, 1.5, num_t)
    probs = 1.0 + 9.0 * jnp.arange(num_t) / num_t  # favours late t tenfold
    probs = probs / probs.sum()

    def estimate(key):
        loss, _ = objectives.loss_fn(
            apply_fn, None, batch, key, sched, experiment="e3", t_weights=weights, t_probs=probs
        )
        return loss

    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    mc = float(jnp.mean(jax.jit(jax.vmap(estimate))(keys)))
    per_t = np.asarray((f - 1.0) ** 2)
    target = float(np.mean(np.asarray(weights) * per_t))
    biased = float(np.sum(np.asarray(probs) * np.asarray(weights) * per_t))  # what no correction estimates
    assert abs(mc - target) < 0.02 * target  # the estimate's sd is 0.4 % of the target here
    assert abs(biased - target) > 0.2 * target  # the check above can fail: the correction matters here


def test_sampling_from_the_weights_gives_factor_one():
    w = jnp.asarray(timesteps.derivative_weights(np.arange(10), np.arange(10.0) ** 2, 10, smoothing=1))
    t = jnp.arange(10)
    np.testing.assert_allclose(w[t] * timesteps.importance_factor(t, w / w.sum()), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------ loss-aware sampler


def _oracle_probs(seen, num_t, history, uniform_prob):
    """improved-diffusion's LossSecondMomentResampler, written out with deques (shift and append)."""
    if any(len(seen[t]) < history for t in range(num_t)):
        return np.full(num_t, 1.0 / num_t)
    w = np.sqrt(np.mean(np.square([list(seen[t]) for t in range(num_t)]), axis=-1))
    w = w / w.sum() * (1 - uniform_prob) + uniform_prob / num_t
    return w


def test_loss_aware_sampler_matches_improved_ddpm_oracle():
    num_t, history, uniform_prob = 6, 3, 0.01
    state = timesteps.init_loss_history(num_t, history)
    seen = {t: collections.deque(maxlen=history) for t in range(num_t)}
    rng = np.random.default_rng(1)
    update = jax.jit(timesteps.update_loss_history)
    for step in range(12):
        t = rng.integers(0, num_t, 5)  # repeats within a batch included
        losses = rng.uniform(0.0, 1.0 + t, 5)
        for ti, li in zip(t, losses):
            seen[int(ti)].append(float(li))
        state = update(state, jnp.asarray(t), jnp.asarray(losses, jnp.float32))
        probs = np.asarray(timesteps.loss_aware_probs(state, uniform_prob))
        np.testing.assert_allclose(probs, _oracle_probs(seen, num_t, history, uniform_prob), rtol=1e-5)
    assert all(len(seen[t]) == history for t in range(num_t))  # the warmed-up branch was exercised
    np.testing.assert_array_equal(state.counts, history)


def test_loss_aware_train_step_records_every_example(tfds_dir):
    config = tiny_config(data_dir=tfds_dir)
    config.timesteps.sampling = "loss_aware"
    config.model.update(
        channel_mult=(1,), attention_resolutions=()
    )  # one level: the wiring is what is tested
    ds, model, schedule, optimizer, state = build.setup(config)
    step = jax.jit(train.make_train_step(model, optimizer, schedule, config))
    batch = {k: v for k, v in ds[0].items() if k != "id"}
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    assert int(state.sampler_state.counts.sum()) == 2 * config.train.batch_size
    assert state.sampler_state.losses.shape == (schedule.num_timesteps, config.timesteps.history)


# ---------------------------------------------------------------------------------- terminal noise


@pytest.mark.parametrize("method", ["rescale", "snr_shift"])
@pytest.mark.parametrize("target", [1e-6, 3e-5])
def test_adapted_schedule_ends_at_the_requested_alpha_bar(method, target):
    betas = schedule_lib.linear_betas(1000)
    sched = diffusion.schedule_from_betas(diffusion.adapt_terminal(betas, target, method))
    ac = schedule_lib.alphas_cumprod_of(diffusion.adapt_terminal(betas, target, method))
    assert ac[-1] == pytest.approx(target, rel=1e-9)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(target, rel=1e-5)
    assert np.all(np.diff(ac) < 0)  # still a noising process
    base = schedule_lib.alphas_cumprod_of(betas)
    if method == "rescale":  # Lin et al.: the first step is kept, √ᾱ is affine in the original √ᾱ
        assert ac[0] == pytest.approx(base[0], rel=1e-12)
        root, base_root = np.sqrt(ac), np.sqrt(base)
        slope = np.diff(root) / np.diff(base_root)
        np.testing.assert_allclose(slope, slope[0], rtol=1e-9)
    else:  # a constant SNR factor
        ratio = (ac / (1 - ac)) / (base / (1 - base))
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def test_terminal_must_be_positive():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        diffusion.adapt_terminal(schedule_lib.linear_betas(100), 0.0, "rescale")


def _blobs(size=32, n=8):
    """Half-image foreground blocks: large smooth objects that keep their information under heavy noise."""
    masks = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        masks[i, :, : size // 2 + i % 3] = 1.0
    return masks


def test_convergence_and_the_chosen_terminal_alpha_bar():
    masks, key = _blobs(), jax.random.PRNGKey(0)
    # Barely noised, the masks are fully recovered; at ᾱ = 1e-9 nothing is left.
    assert adaptive.information_at(0.5, masks, key)["information"] > 0.9
    assert abs(adaptive.information_at(1e-9, masks, key)["information"]) < 0.01
    upper, tol = 1e-2, 0.05
    chosen = adaptive.terminal_alpha_bar(masks, key, upper, tol)
    assert chosen < upper
    assert adaptive.information_at(chosen, masks, key)["information"] <= tol
    assert adaptive.information_at(chosen * 1.5, masks, key)["information"] > tol  # the largest such ᾱ
    sched, report = adaptive.adapted_schedule(
        masks, key, num_timesteps=100, tol=tol, beta_start=1e-4, beta_end=0.002, scale_to_1000=False
    )
    assert not report["converged_base"] and report["converged"]
    assert report["alpha_bar_T"] == pytest.approx(chosen, rel=1e-4)
    assert adaptive.convergence(sched, masks, key, tol)["converged"]


def test_a_converged_schedule_is_kept():
    masks = np.zeros((4, 16, 16, 1), np.float32)
    masks[:, ::4, ::4] = 1.0  # isolated pixels: nothing survives the linear schedule's end
    _, report = adaptive.adapted_schedule(masks, jax.random.PRNGKey(0), num_timesteps=100)
    assert report["converged_base"] and report["alpha_bar_T"] == pytest.approx(report["base_alpha_bar_T"])


def test_config_resolves_and_records_the_terminal(tfds_dir):
    from diffseg_jax import planning

    config = tiny_config(data_dir=tfds_dir)
    config.diffusion.terminal = "snr_shift"
    with pytest.raises(ValueError, match="resolved by diffseg_jax.planning.resolve"):
        build.build_schedule(config.diffusion)
    resolved = planning.resolve(config)
    assert resolved.diffusion.alpha_bar_T > 0 and config.diffusion.alpha_bar_T == -1
    sched = build.build_schedule(resolved.diffusion)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(resolved.diffusion.alpha_bar_T, rel=1e-5)
    assert planning.resolve(resolved) is resolved  # a resolved config resolves to itself


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("timesteps.weighting", "derivative", "timesteps.weighting"),
        ("timesteps.sampling", "importance", "timesteps.sampling"),
        ("diffusion.terminal", "zero", "diffusion.terminal"),
        ("timesteps.curve", "/no/such/curves.csv", "timesteps.curve"),
    ],
)
def test_bad_timestep_settings_fail_with_the_key(key, value, match):
    config = tiny_config()
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=match):
        validation.validate(config, check_data=False)


def test_e1_rejects_timestep_sampling():
    config = tiny_config("e1_synthetic")
    config.timesteps.sampling = "loss_aware"
    with pytest.raises(ValueError, match="E1 sees one fixed timestep"):
        validation.validate(config, check_data=False)


def test_weights_from_a_curves_csv(tmp_path):
    from diffseg_jax.result_files import write_rows

    rows = [
        dict(t=t, value=v, curve="mask_error", model=m, experiment="e2", dataset="d", step=1)
        for m, scale in (("a", 1.0), ("b", 3.0))
        for t, v in zip(range(0, 100, 10), scale * np.linspace(0, 0.2, 10))
    ] + [dict(t=0, value=9.0, curve="eps_loss", model="a", experiment="e2", dataset="d", step=1)]
    write_rows(str(tmp_path / "curves"), rows)
    ts, curve = adaptive.curve_from_csv(str(tmp_path / "curves.csv"))
    np.testing.assert_array_equal(ts, np.arange(0, 100, 10))
    np.testing.assert_allclose(curve, 2.0 * np.linspace(0, 0.2, 10), rtol=1e-6)  # the models' average


def test_tail_rise_tells_a_converged_curve_from_a_climbing_one():
    t = np.arange(0, 1000, 10)
    saturating = 0.25 / (1.0 + np.exp(-(t - 400) / 40.0))
    assert adaptive.tail_rise(t, saturating) < 1e-3
    assert adaptive.tail_rise(t, t / 1000.0) == pytest.approx(
        0.1, rel=0.02
    )  # a straight line: 10 % of its range


def test_fingerprint_report_flags_a_schedule_that_leaves_the_mask_visible(monkeypatch):
    config = tiny_config()
    config.diffusion.beta_end = 0.002  # far too little noise: large blocks stay visible at T
    monkeypatch.setattr(adaptive, "training_masks", lambda data_config, num: _blobs())
    report = adaptive.fingerprint_report(config)
    assert not report["converged"] and report["information_T"] > config.diffusion.terminal_tol
    assert report["adapted_alpha_bar_T"] < report["alpha_bar_T"]
    assert 0 <= report["weight_peak_t"] < 100 and report["mask_size"] == 32
    assert "has NOT converged" in adaptive.report_text(report)
