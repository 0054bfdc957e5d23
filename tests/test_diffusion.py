"""Schedules, the forward process and the samplers, checked against closed forms and oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffseg_jax import diffusion


def test_linear_alpha_bar_T_matches_closed_form():
    sched = diffusion.get_schedule("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    expected = np.prod(1.0 - betas)
    assert expected < 1e-4  # ᾱ_T ≈ 4e-5 for the published schedule.
    np.testing.assert_allclose(float(sched.alphas_cumprod[-1]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(sched.alphas_cumprod[0]), 1 - 1e-4, rtol=1e-7)
    # Scaling by 1000/T: T = 100 gives betas 1e-3 → 0.2 (SegDiff's schedule).
    short = diffusion.get_schedule("linear", 100)
    np.testing.assert_allclose(np.asarray(short.betas)[[0, -1]], [1e-3, 0.2], rtol=1e-6)


def test_cosine_schedule_endpoints_and_monotone():
    sched = diffusion.get_schedule("cosine", 1000)
    ac = np.asarray(sched.alphas_cumprod)
    assert np.all(np.diff(ac) < 0)
    s = 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(ac[499], f(500 / 1000) / f(0), rtol=1e-4)


def test_unknown_schedule_names_the_fix():
    with pytest.raises(ValueError, match="register_beta_schedule"):
        diffusion.get_schedule("sigmoidal")


def test_register_new_schedule():
    diffusion.register_beta_schedule("constant_test")(lambda n, beta=0.01: np.full(n, beta))
    sched = diffusion.get_schedule("constant_test", 10)
    np.testing.assert_allclose(float(sched.alphas_cumprod[-1]), 0.99**10, rtol=1e-6)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_moments(t):
    sched = diffusion.get_schedule("linear", 1000)
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    noise = jax.random.normal(jax.random.PRNGKey(t), (n, 1))
    xt = diffusion.q_sample(sched, x0, jnp.full((n,), t), noise)
    ab = float(sched.alphas_cumprod[t])
    np.testing.assert_allclose(
        float(xt.mean()), np.sqrt(ab) * 0.7, atol=5 * np.sqrt(1 - ab) / np.sqrt(n) + 1e-6
    )
    np.testing.assert_allclose(float(xt.var()), 1 - ab, rtol=0.02, atol=1e-6)


def test_eps_x0_round_trip():
    sched = diffusion.get_schedule("linear", 1000)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = jax.random.uniform(k1, (16, 8, 8, 1), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jax.random.randint(k3, (16,), 0, 1000)
    xt = diffusion.q_sample(sched, x0, t, eps)
    np.testing.assert_allclose(diffusion.predict_x0_from_eps(sched, xt, t, eps), x0, atol=2e-3)
    np.testing.assert_allclose(diffusion.predict_eps_from_x0(sched, xt, t, x0), eps, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_prediction_round_trips_to_x0_and_eps(prediction):
    """The target of each parameterisation, read back through x0_eps_from_prediction, gives the x0 and ε that
    made x_t, at every t including T-1 (where ε-prediction's x0 is ~150x amplified) and 0; v = √ᾱ ε − √(1-ᾱ) x0
    by its definition, checked in float64 closed form."""
    sched = diffusion.get_schedule("linear", 1000)
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    x0 = jax.random.uniform(k1, (5, 4, 4, 1), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.asarray([0, 1, 500, 998, 999])
    xt = diffusion.q_sample(sched, x0, t, eps)
    target = diffusion.prediction_target(prediction, sched, x0, eps, t)
    x0_hat, eps_hat = diffusion.x0_eps_from_prediction(prediction, sched, xt, t, target)
    np.testing.assert_allclose(x0_hat, x0, atol=5e-3)
    np.testing.assert_allclose(eps_hat, eps, atol=5e-3)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)][:, None, None, None]
    expected = {"eps": eps, "x0": x0, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[prediction]
    np.testing.assert_allclose(target, expected, atol=1e-5)


def test_posterior_mean_closed_form():
    sched = diffusion.get_schedule("linear", 50)
    betas = np.linspace(1e-4 * 20, 0.02 * 20, 50)
    ac = np.cumprod(1 - betas)
    t = 30
    x0, xt = 0.3, -0.5
    mean, var, _ = diffusion.q_posterior(sched, jnp.full((1, 1), x0), jnp.full((1, 1), xt), jnp.array([t]))
    expected_mean = (
        np.sqrt(ac[t - 1]) * betas[t] / (1 - ac[t]) * x0
        + np.sqrt(1 - betas[t]) * (1 - ac[t - 1]) / (1 - ac[t]) * xt
    )
    np.testing.assert_allclose(float(mean[0, 0]), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(float(var[0, 0]), (1 - ac[t - 1]) / (1 - ac[t]) * betas[t], rtol=1e-5)


def _oracle(sched, x0, prediction):
    """A model that knows x0: returns x0 itself, or the ε or v consistent with x_t."""
    if prediction == "x0":
        return lambda x, t: jnp.broadcast_to(x0, x.shape)
    if prediction == "v":
        return lambda x, t: diffusion.v_from_x0_eps(
            sched, x0, diffusion.predict_eps_from_x0(sched, x, t, x0), t
        )
    return lambda x, t: diffusion.predict_eps_from_x0(sched, x, t, x0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_oracle_recovers_x0(prediction, variance):
    sched = diffusion.get_schedule("linear", 100)
    x0 = jnp.where(jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1)) > 0.5, 1.0, -1.0)
    out = jax.jit(
        lambda k: diffusion.ddpm_sample(
            _oracle(sched, x0, prediction), sched, x0.shape, k, prediction=prediction, variance=variance
        )
    )(jax.random.PRNGKey(0))
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_samplers_refuse_an_output_of_other_channels_than_x():
    """A learn_sigma network (twice x's channels) sampled with a fixed variance is named by the shapes, not
    left to fail on the scan's carry (DDPM); DDIM drops the variance half, but takes nothing else."""
    sched = diffusion.get_schedule("cosine", 10)
    two = lambda x, t: jnp.concatenate([x, x], -1)
    with pytest.raises(
        ValueError, match=r"returns \(2, 8, 8, 2\) for x of shape \(2, 8, 8, 1\).*'learned_range'"
    ):
        diffusion.ddpm_sample(two, sched, (2, 8, 8, 1), jax.random.PRNGKey(0))
    out = diffusion.ddpm_sample(two, sched, (2, 8, 8, 1), jax.random.PRNGKey(0), variance="learned_range")
    assert out.shape == (2, 8, 8, 1)
    assert diffusion.ddim_sample(two, sched, (2, 8, 8, 1), jax.random.PRNGKey(0), num_steps=2).shape == (
        2,
        8,
        8,
        1,
    )
    three = lambda x, t: jnp.concatenate([x, x, x], -1)
    with pytest.raises(ValueError, match=r"takes \(2, 8, 8, 1\) or \(2, 8, 8, 2\)"):
        diffusion.ddim_sample(three, sched, (2, 8, 8, 1), jax.random.PRNGKey(0), num_steps=2)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_oracle_recovers_x0(eta, prediction):
    sched = diffusion.get_schedule("linear", 1000)
    x0 = jnp.where(jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 8, 1)) > 0.3, 1.0, -1.0)
    out = diffusion.ddim_sample(
        _oracle(sched, x0, prediction),
        sched,
        x0.shape,
        jax.random.PRNGKey(0),
        num_steps=20,
        eta=eta,
        prediction=prediction,
    )
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_ddim_timesteps_cover_both_ends():
    ts = diffusion.ddim_timesteps(1000, 50)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 50 and np.all(np.diff(ts) > 0)
    # One step starts where the samplers' x_T ~ N(0, I) belongs, at T - 1 (it was t = 0 on pure noise).
    np.testing.assert_array_equal(diffusion.ddim_timesteps(100, 1), [99])
    np.testing.assert_array_equal(diffusion.ddim_timesteps(100, 2), [0, 99])
    with pytest.raises(ValueError):
        diffusion.ddim_timesteps(10, 11)


def test_samplers_pass_integer_training_t():
    sched = diffusion.get_schedule("linear", 30)
    seen = []

    def model_fn(x, t):
        assert t.dtype == jnp.int32 and t.shape == (x.shape[0],)
        jax.debug.callback(lambda tt: seen.append(np.asarray(tt).copy()), t, ordered=True)
        return jnp.zeros_like(x)

    shape = (3, 4, 4, 1)
    _, traj = diffusion.ddpm_sample(model_fn, sched, shape, jax.random.PRNGKey(0), return_trajectory=True)
    jax.effects_barrier()
    seen_ddpm = np.stack(seen)
    np.testing.assert_array_equal(seen_ddpm, np.repeat(np.arange(29, -1, -1)[:, None], 3, axis=1))
    np.testing.assert_array_equal(traj["t"], np.arange(29, -1, -1))
    seen.clear()
    diffusion.ddim_sample(model_fn, sched, shape, jax.random.PRNGKey(0), num_steps=7)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.stack(seen)[:, 0], diffusion.ddim_timesteps(30, 7)[::-1])
    seen.clear()
    diffusion.ddim_sample(model_fn, sched, shape, jax.random.PRNGKey(0), num_steps=1)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.stack(seen)[:, 0], [29])  # one call, at the noisiest step


def test_ddpm_trajectory_and_per_step_noise_reproducible():
    sched = diffusion.get_schedule("linear", 40)
    fn = lambda x, t: jnp.zeros_like(x)
    a = diffusion.ddpm_sample(fn, sched, (2, 4, 4, 1), jax.random.PRNGKey(3))
    b, traj = diffusion.ddpm_sample(fn, sched, (2, 4, 4, 1), jax.random.PRNGKey(3), return_trajectory=True)
    np.testing.assert_array_equal(a, b)
    assert traj["x"].shape == (40, 2, 4, 4, 1)
    np.testing.assert_array_equal(traj["x"][-1], b)
    c = diffusion.ddpm_sample(fn, sched, (2, 4, 4, 1), jax.random.PRNGKey(4))
    assert not np.allclose(a, c)


def test_learned_range_variance_interpolates():
    """v = 1 gives log β_t, v = -1 the clipped posterior log-variance (improved DDPM)."""
    from diffseg_jax.diffusion.samplers import step_log_variance

    sched = diffusion.get_schedule("linear", 100)
    t = jnp.array([50])
    hi = step_log_variance(sched, t, (1, 1), "learned_range", jnp.ones((1, 1)))
    lo = step_log_variance(sched, t, (1, 1), "learned_range", -jnp.ones((1, 1)))
    np.testing.assert_allclose(hi, np.log(sched.betas[50]), rtol=1e-6)
    np.testing.assert_allclose(lo, sched.posterior_log_variance_clipped[50], rtol=1e-6)


def test_ensemble_sample_matches_loop_and_chunking():
    fn = lambda k: jax.random.normal(k, (2, 3))
    key = jax.random.PRNGKey(5)
    full = diffusion.ensemble_sample(fn, key, 5)
    chunked = diffusion.ensemble_sample(fn, key, 5, member_chunk=2)
    loop = jnp.stack([fn(k) for k in jax.random.split(key, 5)])
    np.testing.assert_allclose(full, loop, rtol=1e-6)
    np.testing.assert_allclose(chunked, loop, rtol=1e-6)
    stats = diffusion.ensemble_statistics(loop)
    np.testing.assert_allclose(stats["mean"], np.mean(np.asarray(loop), 0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], np.std(np.asarray(loop), 0), rtol=1e-5)


def test_mask_ranges_round_trip():
    m = jnp.array([0.0, 1.0, 1.0, 0.0])
    for r in diffusion.MASK_RANGES:
        np.testing.assert_array_equal(diffusion.diffusion_to_prob(diffusion.mask_to_diffusion(m, r), r), m)
    np.testing.assert_array_equal(diffusion.mask_to_diffusion(m, "symmetric"), [-1, 1, 1, -1])
    with pytest.raises(ValueError):
        diffusion.mask_to_diffusion(m, "ternary")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_return_extras_of_the_last_step(sampler):
    sched = diffusion.get_schedule("linear", 30)

    def model_fn(x, t):  # An auxiliary head that reports the timestep it saw.
        return jnp.zeros_like(x), {
            "cal": jnp.broadcast_to(t[:, None, None, None].astype(jnp.float32), x.shape)
        }

    kwargs = {"num_steps": 5} if sampler == "ddim" else {}
    x, extras = diffusion.SAMPLERS[sampler](
        model_fn, sched, (2, 4, 4, 1), jax.random.PRNGKey(0), return_extras=True, **kwargs
    )
    np.testing.assert_array_equal(extras["cal"], 0.0)  # the final call is at t = 0
    x2, extras2 = diffusion.SAMPLERS[sampler](
        lambda x, t: model_fn(x, t + 1),
        sched,
        (2, 4, 4, 1),
        jax.random.PRNGKey(0),
        return_extras=True,
        **kwargs,
    )
    np.testing.assert_array_equal(extras2["cal"], 1.0)


def _gaussian_chain(
    ab: np.ndarray, betas: np.ndarray, mu: float, s: float, steps, noise_var
) -> tuple[float, float]:
    """Mean and std of a sampler's output when the data are N(mu, s²) and the denoiser is exact, in float64.

    The exact x0 estimate E[x0 | x_t] = c_t x_t + d_t is affine in x_t, so each sampler step is affine plus
    Gaussian noise and the chain maps the N(0, 1) start through m' = a m + b, v' = a² v + noise. ``steps``
    gives, per step, (a, b) as functions of (c, d); ``noise_var`` the variance it adds.
    """
    m, v = 0.0, 1.0
    for i, (t, affine) in enumerate(steps):
        c = np.sqrt(ab[t]) * s**2 / (ab[t] * s**2 + 1 - ab[t])
        d = mu * (1 - c * np.sqrt(ab[t]))
        a, b = affine(c, d)
        m, v = a * m + b, a**2 * v + noise_var[i]
    return m, np.sqrt(v)


@pytest.mark.parametrize(
    "sampler, kwargs",
    [
        ("ddpm", dict(variance="fixed_small")),
        ("ddpm", dict(variance="fixed_large", prediction="x0")),
        ("ddim", dict(num_steps=10, eta=0.0)),
        ("ddim", dict(num_steps=50, eta=1.0, prediction="x0")),
    ],
)
def test_samplers_draw_what_an_exact_denoiser_implies_for_gaussian_data(sampler, kwargs):
    # Data N(0.3, 0.5²) per pixel and the Bayes-optimal denoiser: the samples' mean and std must follow the
    # exact float64 recursion of each sampler's update. Few-step DDIM under-disperses (std 0.36 after 10
    # steps; by Cauchy-Schwarz every deterministic step shrinks the variance), which a delta-distribution
    # oracle cannot show and a wrong coefficient would break.
    mu, s, T = 0.3, 0.5, 1000
    sched = diffusion.get_schedule("linear", T)
    betas = np.asarray(sched.betas, np.float64)
    ab = np.cumprod(1 - betas)
    prediction = kwargs.get("prediction", "eps")

    def model_fn(x, t):
        a = sched.alphas_cumprod[t][:, None]
        x0 = mu + jnp.sqrt(a) * s**2 / (a * s**2 + 1 - a) * (x - jnp.sqrt(a) * mu)
        return x0 if prediction == "x0" else (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    if sampler == "ddpm":
        ab_prev = np.append(1.0, ab[:-1])
        post = (1 - ab_prev) / (1 - ab) * betas
        var = post if kwargs["variance"] == "fixed_small" else np.append(post[1], betas[1:])
        k1 = np.sqrt(ab_prev) * betas / (1 - ab)
        k2 = np.sqrt(1 - betas) * (1 - ab_prev) / (1 - ab)
        ts = np.arange(T - 1, -1, -1)
        steps = [(t, lambda c, d, t=t: (k1[t] * c + k2[t], k1[t] * d)) for t in ts]
        expected = _gaussian_chain(ab, betas, mu, s, steps, [var[t] if t > 0 else 0.0 for t in ts])
    else:
        ts = diffusion.ddim_timesteps(T, kwargs["num_steps"])[::-1]
        steps, noise = [], []
        for t, t_prev in zip(ts, np.append(ts[1:], -1)):
            ap = 1.0 if t_prev < 0 else ab[t_prev]
            sigma2 = kwargs["eta"] ** 2 * (1 - ap) / (1 - ab[t]) * (1 - ab[t] / ap)
            k = np.sqrt(max(1 - ap - sigma2, 0.0)) / np.sqrt(1 - ab[t])  # ε̂ = (x - √ᾱ x̂0) / √(1 - ᾱ)
            steps.append((t, lambda c, d, ap=ap, k=k, a=ab[t]: (np.sqrt(ap) * c + k * (1 - np.sqrt(a) * c),
                                                               (np.sqrt(ap) - k * np.sqrt(a)) * d)))  # fmt: skip
            noise.append(sigma2 if t_prev >= 0 else 0.0)
        expected = _gaussian_chain(ab, betas, mu, s, steps, noise)
    x = jax.jit(
        lambda key: diffusion.SAMPLERS[sampler](model_fn, sched, (16384, 1), key, clip_range=None, **kwargs)
    )(jax.random.PRNGKey(0))
    # 16,384 draws: standard errors 0.004 on the mean, 0.003 on the std.
    assert float(x.mean()) == pytest.approx(expected[0], abs=0.015)
    assert float(x.std()) == pytest.approx(expected[1], abs=0.01)


def _nonlinear_x0_model(x, t):
    """A stand-in x0 network, nonlinear in x and dependent on t."""
    return jnp.tanh(3.0 * x[..., :1] + 0.01 * t[:, None, None, None].astype(jnp.float32))


def test_ddim_eta_one_over_all_steps_is_ddpm_with_the_posterior_variance():
    # Song et al. (2021): η = 1 and K = T make σ_t² DDPM's posterior variance and the DDIM mean the posterior mean;
    # both samplers draw x_T and each step's noise from the same keys, so the samples coincide.
    sched = diffusion.get_schedule("linear", 50)
    shape, key = (2, 6, 6, 1), jax.random.PRNGKey(4)
    ddim = diffusion.ddim_sample(
        _nonlinear_x0_model, sched, shape, key, num_steps=50, eta=1.0, prediction="x0"
    )
    ddpm = diffusion.ddpm_sample(
        _nonlinear_x0_model, sched, shape, key, prediction="x0", variance="fixed_small"
    )
    np.testing.assert_allclose(ddim, ddpm, atol=1e-4)
    # η = 0.5 is neither: its noise is smaller.
    half = diffusion.ddim_sample(
        _nonlinear_x0_model, sched, shape, key, num_steps=50, eta=0.5, prediction="x0"
    )
    assert float(jnp.abs(half - ddpm).max()) > 1e-2


def test_ddim_eta_zero_is_the_deterministic_recursion_from_x_T():
    sched = diffusion.get_schedule("linear", 1000)
    shape, key = (2, 6, 6, 1), jax.random.PRNGKey(7)
    out = diffusion.ddim_sample(_nonlinear_x0_model, sched, shape, key, num_steps=5, eta=0.0, prediction="x0")
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    x = np.asarray(jax.random.normal(jax.random.split(key)[0], shape), np.float64)
    ts = diffusion.ddim_timesteps(1000, 5)[::-1]
    for t, t_prev in zip(ts, np.append(ts[1:], -1)):
        x0 = np.clip(np.asarray(_nonlinear_x0_model(jnp.asarray(x, jnp.float32), jnp.full((2,), t))), -1, 1)
        eps = (x - np.sqrt(ab[t]) * x0) / np.sqrt(1 - ab[t])
        ap = 1.0 if t_prev < 0 else ab[t_prev]
        x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps
    np.testing.assert_allclose(out, x, atol=1e-4)


@pytest.mark.parametrize("sampler, kwargs", [("ddpm", {}), ("ddim", dict(num_steps=5, eta=0.5))])
def test_self_conditioned_samplers_feed_the_previous_steps_x0(sampler, kwargs):
    sched = diffusion.get_schedule("linear", 20)
    seen = []

    def model_fn(x, t):
        assert x.shape[-1] == 2  # x_t and the previous x̂0
        jax.debug.callback(lambda a: seen.append(np.asarray(a).copy()), x[..., 1:], ordered=True)
        return _nonlinear_x0_model(x, t) + 0.3 * x[..., 1:]

    shape = (2, 4, 4, 1)
    _, traj = diffusion.SAMPLERS[sampler](
        model_fn, sched, shape, jax.random.PRNGKey(0), prediction="x0", return_trajectory=True,
        self_condition=True, **kwargs,
    )  # fmt: skip
    jax.effects_barrier()
    np.testing.assert_array_equal(seen[0], 0.0)  # no estimate before the first step
    np.testing.assert_allclose(np.stack(seen[1:]), traj["x0"][:-1], atol=1e-6)  # then the previous step's x̂0
    # A network that ignores the extra channels samples exactly as without self-conditioning.
    plain = diffusion.SAMPLERS[sampler](
        _nonlinear_x0_model, sched, shape, jax.random.PRNGKey(0), prediction="x0", **kwargs
    )
    blind = diffusion.SAMPLERS[sampler](
        _nonlinear_x0_model,
        sched,
        shape,
        jax.random.PRNGKey(0),
        prediction="x0",
        self_condition=True,
        **kwargs,
    )
    np.testing.assert_array_equal(plain, blind)
