"""The unified loss: which inputs reach the network in E1–E4, the targets, and that it trains."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffseg_jax import diffusion, objectives

SCHED = diffusion.get_schedule("linear", 100)


def _batch(key, n=4, size=8):
    k1, k2 = jax.random.split(key)
    mask = (jax.random.uniform(k1, (n, size, size, 1)) > 0.5).astype(jnp.float32)
    image = jnp.clip(0.5 * mask + 0.3 * jax.random.uniform(k2, (n, size, size, 3)), 0, 1)
    return {"image": image, "mask": mask}


class _Recorder:
    """An apply_fn that records what it is given and returns a chosen output."""

    def __init__(self, output_fn):
        self.calls = []
        self.output_fn = output_fn

    def __call__(self, params, x, t, cond, rng):
        self.calls.append({"x": x, "t": t, "cond": cond})
        return self.output_fn(x)


@pytest.mark.parametrize("experiment", ["e2", "e3", "e4"])
def test_diffusion_experiments_feed_x_t_of_the_right_variable(experiment):
    batch = _batch(jax.random.PRNGKey(0))
    rec = _Recorder(jnp.zeros_like)
    key = jax.random.PRNGKey(1)
    loss, aux = objectives.loss_fn(rec, None, batch, key, SCHED, experiment=experiment)
    call = rec.calls[0]
    # Recompute the noise the loss drew (same key split) and check x_t is q_sample of the right x0.
    _, noise_key, _ = jax.random.split(key, 3)
    x0 = 2 * batch["image"] - 1 if experiment == "e4" else 2 * batch["mask"] - 1
    noise = jax.random.normal(noise_key, x0.shape)
    np.testing.assert_allclose(call["x"], diffusion.q_sample(SCHED, x0, call["t"], noise), atol=1e-6)
    np.testing.assert_array_equal(aux["t"], call["t"])
    if experiment == "e2":
        np.testing.assert_array_equal(call["cond"], batch["image"])
    else:
        assert call["cond"] is None  # E3 withholds the image; in E4 the image is x itself.
    # Zero output: the loss is the mean square of the target (ε for E2/E4, x0 for E3).
    target = x0 if experiment == "e3" else noise
    np.testing.assert_allclose(loss, jnp.mean(target**2), rtol=1e-5)


def test_e1_feeds_noise_not_the_mask_and_uses_dice_plus_ce():
    batch = _batch(jax.random.PRNGKey(0))
    rec = _Recorder(lambda x: jnp.zeros_like(x))
    loss, aux = objectives.loss_fn(rec, None, batch, jax.random.PRNGKey(2), SCHED, experiment="e1")
    call = rec.calls[0]
    np.testing.assert_array_equal(call["cond"], batch["image"])
    np.testing.assert_array_equal(call["t"], np.full(4, 99))  # default: t = T-1
    # The network input is independent of the mask: same key, different mask → same input.
    rec2 = _Recorder(jnp.zeros_like)
    other = dict(batch, mask=1 - batch["mask"])
    objectives.loss_fn(rec2, None, other, jax.random.PRNGKey(2), SCHED, experiment="e1")
    np.testing.assert_array_equal(call["x"], rec2.calls[0]["x"])
    assert abs(float(call["x"].std()) - 1) < 0.2
    # Zero logits: p = 0.5 everywhere → BCE = log 2, Dice = 2·0.5·Σy/(0.5·N + Σy) per example.
    y = np.asarray(batch["mask"]).reshape(4, -1)
    n = y.shape[1]
    dice = 1 - (y.sum(1) + 1) / (0.5 * n + y.sum(1) + 1)
    np.testing.assert_allclose(loss, np.mean(dice + np.log(2)), rtol=1e-5)
    # Perfect confident logits give a loss near 0.
    rec3 = _Recorder(lambda x: 30.0 * (2 * batch["mask"] - 1))
    loss3, _ = objectives.loss_fn(rec3, None, batch, jax.random.PRNGKey(2), SCHED, experiment="e1")
    assert float(loss3) < 1e-3


def test_timestep_weights_reweight_per_example_losses():
    batch = _batch(jax.random.PRNGKey(0), n=16)
    rec = _Recorder(jnp.zeros_like)
    weights = jnp.arange(100, dtype=jnp.float32) / 100
    loss, aux = objectives.loss_fn(
        rec, None, batch, jax.random.PRNGKey(3), SCHED, experiment="e2", t_weights=weights
    )
    np.testing.assert_allclose(loss, jnp.mean(weights[aux["t"]] * aux["per_example"]), rtol=1e-6)


def test_binary_mask_range_diffuses_zero_one_masks():
    """``mask_range='binary'``: x0 is the {0, 1} mask itself (not 2m - 1), in x_t and in the E3 target."""
    batch = _batch(jax.random.PRNGKey(0))
    rec = _Recorder(jnp.zeros_like)
    key = jax.random.PRNGKey(4)
    loss, aux = objectives.loss_fn(rec, None, batch, key, SCHED, experiment="e3", mask_range="binary")
    _, noise_key, _ = jax.random.split(key, 3)
    noise = jax.random.normal(noise_key, batch["mask"].shape)
    x_t = rec.calls[0]["x"]
    np.testing.assert_allclose(x_t, diffusion.q_sample(SCHED, batch["mask"], aux["t"], noise), atol=1e-6)
    symmetric = diffusion.q_sample(SCHED, 2 * batch["mask"] - 1, aux["t"], noise)
    assert np.abs(np.asarray(x_t) - np.asarray(symmetric)).max() > 0.1
    np.testing.assert_allclose(loss, jnp.mean(batch["mask"] ** 2), rtol=1e-6)  # zero x0 prediction


def test_unknown_experiment_fails_clearly():
    with pytest.raises(ValueError, match="e5"):
        objectives.loss_fn(
            _Recorder(jnp.zeros_like),
            None,
            _batch(jax.random.PRNGKey(0)),
            jax.random.PRNGKey(0),
            SCHED,
            experiment="e5",
        )


def test_an_output_of_other_channels_than_the_target_is_refused():
    """A learn_sigma network (2 channels for a 1-channel mask) trained without learn_sigma=True, or the reverse,
    would broadcast against the target into a plausible-looking loss."""
    batch = _batch(jax.random.PRNGKey(0))
    two = _Recorder(lambda x: jnp.concatenate([x, x], -1))
    with pytest.raises(
        ValueError,
        match=r"output \(4, 8, 8, 2\) is not the \(4, 8, 8, 1\) .* target of \(4, 8, 8, 1\) with learn_sigma=False",
    ):
        objectives.loss_fn(two, None, batch, jax.random.PRNGKey(0), SCHED, experiment="e2")
    loss, _ = objectives.loss_fn(
        two, None, batch, jax.random.PRNGKey(0), SCHED, experiment="e2", learn_sigma=True
    )
    assert np.isfinite(float(loss))
    with pytest.raises(
        ValueError, match=r"output \(4, 8, 8, 1\) is not the \(4, 8, 8, 2\) .*learn_sigma=True"
    ):  # one channel for the prediction and v
        objectives.loss_fn(
            _Recorder(lambda x: x),
            None,
            batch,
            jax.random.PRNGKey(0),
            SCHED,
            experiment="e2",
            learn_sigma=True,
        )


class _TinyNet(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x, t, cond):
        h = x if cond is None else jnp.concatenate([cond, x], -1)
        temb = nn.Dense(8)(jnp.stack([jnp.sin(t / 10.0), jnp.cos(t / 10.0)], -1))[:, None, None, :]
        h = nn.silu(nn.Conv(8, (3, 3))(h) + temb)
        return nn.Conv(self.out, (3, 3))(h)


@pytest.mark.parametrize("experiment", objectives.EXPERIMENTS)
def test_loss_falls_when_a_tiny_model_overfits_8_examples(experiment):
    batch = _batch(jax.random.PRNGKey(0), n=8)
    net = _TinyNet(out=3 if experiment == "e4" else 1)
    x_shape = batch["image"].shape if experiment == "e4" else batch["mask"].shape
    cond = batch["image"] if objectives.uses_image_condition(experiment) else None
    params = net.init(jax.random.PRNGKey(0), jnp.zeros(x_shape), jnp.zeros(8, jnp.int32), cond)
    apply = lambda p, x, t, c, rng: net.apply(p, x, t, c)
    opt = optax.adam(3e-2)
    loss = functools.partial(objectives.loss_fn, apply, schedule=SCHED, experiment=experiment)
    eval_keys = jax.random.split(jax.random.PRNGKey(99), 8)
    mean_loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss(p, batch, k)[0])(eval_keys)))

    @jax.jit
    def step(carry, i):
        p, s = carry
        g = jax.grad(lambda p: loss(p, batch, jax.random.PRNGKey(i))[0])(p)
        u, s = opt.update(g, s)
        return (optax.apply_updates(p, u), s), None

    before = float(mean_loss(params))
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(150))
    after = float(mean_loss(params))
    assert after < 0.8 * before, (before, after)


def test_learn_sigma_hybrid_loss_matches_closed_form_kl():
    """With v = 1 (variance β_t) and a perfect ε, the loss is the KL between the posterior and N(μ̃, β_t)."""
    from diffseg_jax.diffusion import likelihood

    batch = _batch(jax.random.PRNGKey(0), n=8)
    key = jax.random.PRNGKey(7)
    _, noise_key, _ = jax.random.split(key, 3)
    x0 = 2 * batch["mask"] - 1
    noise = jax.random.normal(noise_key, x0.shape)
    apply = lambda p, x, t, c, rng: jnp.concatenate([noise, jnp.ones_like(noise)], -1)
    loss, aux = objectives.loss_fn(apply, None, batch, key, SCHED, experiment="e2", learn_sigma=True)
    t = np.asarray(aux["t"])
    betas = np.asarray(SCHED.betas, np.float64)
    post_var = np.asarray(SCHED.posterior_variance, np.float64)
    # Means agree, so KL = 0.5 (log β − log σ̃² + σ̃²/β − 1) per pixel, in bits; t = 0 uses the decoder NLL.
    kl_bits = 0.5 * (np.log(betas[t]) - np.log(post_var[t]) + post_var[t] / betas[t] - 1) / np.log(2)
    nll0 = -np.mean(
        np.asarray(likelihood.discretized_gaussian_log_likelihood(x0, x0, 0.5 * np.log(betas[0]))),
        axis=(1, 2, 3),
    ) / np.log(2)
    expected = np.where(t == 0, nll0, kl_bits)
    np.testing.assert_allclose(aux["per_example"], expected, rtol=2e-3, atol=1e-6)
    # The ε part is exact, so the gradient w.r.t. the ε channel is zero (vb sees it detached).
    grad = jax.grad(
        lambda o: objectives.loss_fn(
            lambda *a: o, None, batch, key, SCHED, experiment="e2", learn_sigma=True
        )[0]
    )(jnp.concatenate([noise, jnp.ones_like(noise)], -1))
    np.testing.assert_allclose(grad[..., 0], 0.0, atol=1e-7)
    assert np.abs(np.asarray(grad[..., 1])).max() > 0


def test_sum_reduction_and_aux_cal_weight():
    batch = _batch(jax.random.PRNGKey(0))
    rec = _Recorder(jnp.zeros_like)
    mean_loss, _ = objectives.loss_fn(rec, None, batch, jax.random.PRNGKey(1), SCHED, experiment="e3")
    sum_loss, _ = objectives.loss_fn(
        rec, None, batch, jax.random.PRNGKey(1), SCHED, experiment="e3", reduction="sum"
    )
    np.testing.assert_allclose(sum_loss, mean_loss * 8 * 8, rtol=1e-5)
    cal = jnp.full_like(batch["mask"], 0.5)
    with_cal = lambda p, x, t, c, rng: (jnp.zeros_like(x), {"cal": cal})
    loss, _ = objectives.loss_fn(
        with_cal, None, batch, jax.random.PRNGKey(1), SCHED, experiment="e2", aux_weights={"cal": 10.0}
    )
    plain, _ = objectives.loss_fn(with_cal, None, batch, jax.random.PRNGKey(1), SCHED, experiment="e2")
    np.testing.assert_allclose(loss - plain, 10 * 0.25, rtol=1e-5)


def test_learn_sigma_hybrid_loss_at_t0_is_the_decoder_nll_of_the_normal_cdf():
    """At t = 0 the VLB term is the discretised Gaussian decoder's NLL. With a perfect ε and v = 1 the model's
    mean is the posterior mean at t = 0, x0 itself (±1 for a mask), and its variance β_0, so every pixel falls
    in an edge bin of the 256 levels: NLL = -log2 Φ(1 / (255 sqrt(β_0))), here with scipy's exact Φ (the code
    uses improved-diffusion's tanh approximation of it) and β_0 = 1e-4 * 1000 / T of the linear schedule."""
    from scipy.stats import norm

    batch = _batch(jax.random.PRNGKey(0), n=4)
    key = jax.random.PRNGKey(3)
    _, noise_key, _ = jax.random.split(key, 3)
    noise = jax.random.normal(noise_key, batch["mask"].shape)
    apply = lambda p, x, t, c, rng: jnp.concatenate([noise, jnp.ones_like(noise)], -1)
    only_t0 = jnp.zeros(SCHED.num_timesteps).at[0].set(1.0)
    loss, aux = objectives.loss_fn(
        apply, None, batch, key, SCHED, experiment="e2", learn_sigma=True, t_probs=only_t0
    )
    assert np.all(np.asarray(aux["t"]) == 0)
    sigma = np.sqrt(1e-4 * 1000 / SCHED.num_timesteps)
    expected = -np.log2(norm.cdf(1.0 / (255.0 * sigma)))
    assert 0.8 < expected < 0.9  # about 0.86 bits: Φ(0.124)
    np.testing.assert_allclose(aux["per_example"], expected, rtol=5e-4)


@pytest.mark.parametrize("experiment", ["e2", "e3"])
@pytest.mark.parametrize("prediction", [None, "eps", "x0", "v"])
def test_objective_prediction_sets_the_target_and_an_oracle_scores_zero(experiment, prediction):
    """objective.prediction (issue 32): the loss is the MSE to ε, x0 or v = √ᾱ ε − √(1-ᾱ) x0 of the noise the loss
    drew; None keeps the experiment's own (E2 ε, E3 x0) exactly. An oracle of that parameterisation scores 0,
    and the hybrid loss's VLB gets the x̂0 each implies (that of a perfect ε when the oracle is perfect)."""
    batch = _batch(jax.random.PRNGKey(0), n=8)
    key = jax.random.PRNGKey(4)
    _, noise_key, _ = jax.random.split(key, 3)
    x0 = 2 * batch["mask"] - 1
    noise = jax.random.normal(noise_key, x0.shape)
    pred = prediction or {"e2": "eps", "e3": "x0"}[experiment]
    zero, aux = objectives.loss_fn(
        _Recorder(jnp.zeros_like), None, batch, key, SCHED, experiment=experiment, prediction=prediction
    )
    ab = np.asarray(SCHED.alphas_cumprod)[np.asarray(aux["t"])][:, None, None, None]
    target = {"eps": noise, "x0": x0, "v": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0}[pred]
    np.testing.assert_allclose(zero, np.mean(np.asarray(target) ** 2), rtol=1e-5)
    oracle = lambda p, x, t, c, rng: diffusion.prediction_target(pred, SCHED, x0, noise, t)
    perfect, _ = objectives.loss_fn(
        oracle, None, batch, key, SCHED, experiment=experiment, prediction=prediction
    )
    np.testing.assert_allclose(perfect, 0.0, atol=1e-9)
    # The hybrid loss: the VLB term of a perfect prediction is the same whatever the parameterisation.
    hybrid = lambda p, x, t, c, rng: jnp.concatenate([oracle(p, x, t, c, rng), jnp.ones_like(x)], -1)
    _, with_vb = objectives.loss_fn(
        hybrid, None, batch, key, SCHED, experiment=experiment, prediction=prediction, learn_sigma=True
    )
    eps_oracle = lambda p, x, t, c, rng: jnp.concatenate([noise, jnp.ones_like(x)], -1)
    _, reference = objectives.loss_fn(
        eps_oracle, None, batch, key, SCHED, experiment=experiment, prediction="eps", learn_sigma=True
    )
    np.testing.assert_allclose(with_vb["per_example"], reference["per_example"], rtol=2e-3, atol=1e-5)


def test_objective_prediction_default_is_todays_loss_and_e1_e4_ignore_it():
    """prediction=None (the config's default) is the loss before the option existed: E2 against ε, E3 against
    x0; E1 (logits) and E4 (ε) keep theirs whatever it says."""
    assert [objectives.prediction_type(e) for e in objectives.EXPERIMENTS] == ["logits", "eps", "x0", "eps"]
    assert objectives.prediction_type("e2", "x0") == "x0" and objectives.prediction_type("e3", "v") == "v"
    assert (
        objectives.prediction_type("e1", "x0") == "logits" and objectives.prediction_type("e4", "v") == "eps"
    )
    with pytest.raises(ValueError, match="prediction must be one of"):
        objectives.prediction_type("e2", "noise")
    batch = _batch(jax.random.PRNGKey(0))
    out = lambda p, x, t, c, rng: 0.7 * x + 0.1
    for experiment in ("e2", "e3"):
        default, _ = objectives.loss_fn(out, None, batch, jax.random.PRNGKey(2), SCHED, experiment=experiment)
        own = objectives.DEFAULT_PREDICTION[experiment]
        named, _ = objectives.loss_fn(
            out, None, batch, jax.random.PRNGKey(2), SCHED, experiment=experiment, prediction=own
        )
        assert float(default) == float(named)


# Beyond the paper (issue 33): Min-SNR-γ weights, self-conditioning, recycling.


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights_the_x0_error_by_min_snr_gamma_in_every_parameterisation(prediction):
    # A network whose x̂0 is off by δ = 0.1 everywhere, written in each parameterisation: the Min-SNR-γ loss must
    # be min(SNR(t), γ)·δ² per example whatever the target (Hang et al. 2023), i.e. the same x0 weighting.
    batch = _batch(jax.random.PRNGKey(0), n=64)
    gamma, delta = 5.0, 0.1
    x0 = 2 * batch["mask"] - 1

    def apply_fn(params, x, t, cond, rng):
        x0_hat = x0 + delta
        eps_hat = diffusion.predict_eps_from_x0(SCHED, x, t, x0_hat)
        return {"x0": x0_hat, "eps": eps_hat, "v": diffusion.v_from_x0_eps(SCHED, x0_hat, eps_hat, t)}[
            prediction
        ]

    loss, aux = objectives.loss_fn(
        apply_fn, None, batch, jax.random.PRNGKey(1), SCHED, experiment="e2", prediction=prediction,
        snr_gamma=gamma,
    )  # fmt: skip
    abar = np.asarray(SCHED.alphas_cumprod, np.float64)[np.asarray(aux["t"])]
    expected = np.mean(np.minimum(abar / (1 - abar), gamma) * delta**2)
    np.testing.assert_allclose(loss, expected, rtol=2e-3)
    # Closed form of the table itself, and γ ≤ 0 refused.
    snr = np.asarray(SCHED.alphas_cumprod, np.float64) / (1 - np.asarray(SCHED.alphas_cumprod, np.float64))
    table = {"x0": 1.0, "eps": 1.0 / snr, "v": 1.0 / (snr + 1)}[prediction] * np.minimum(snr, gamma)
    np.testing.assert_allclose(objectives.min_snr_weights(SCHED, prediction, gamma), table, rtol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        objectives.min_snr_weights(SCHED, prediction, 0.0)


def test_self_conditioning_feeds_the_first_pass_stop_gradient_x0_as_extra_channels():
    batch = _batch(jax.random.PRNGKey(0))
    # An x0 network whose output depends on both halves of its input, so that the first pass is visible.
    rec = _Recorder(lambda x: jnp.tanh(3 * x[..., :1]) + 0.5 * x[..., 1:])
    key = jax.random.PRNGKey(1)
    objectives.loss_fn(
        rec, None, batch, key, SCHED, experiment="e2", prediction="x0", self_condition_prob=1.0
    )
    main = rec.calls[-1]  # the first pass runs inside lax.cond (traced); the trained pass is the last call
    assert main["x"].shape[-1] == 2
    x_t, x0_prev = main["x"][..., :1], main["x"][..., 1:]
    _, noise_key, _ = jax.random.split(key, 3)
    noise = jax.random.normal(noise_key, x_t.shape)
    # x_t is today's (the option draws its keys apart), and the extra channels are the first pass's clipped x̂0.
    np.testing.assert_allclose(
        x_t, diffusion.q_sample(SCHED, 2 * batch["mask"] - 1, main["t"], noise), atol=1e-6
    )
    np.testing.assert_allclose(x0_prev, jnp.clip(jnp.tanh(3 * x_t), -1, 1), atol=1e-6)
    assert float(jnp.abs(x0_prev).max()) > 0.1
    # With a probability that never fires, the extra channels are zeros.
    rec0 = _Recorder(lambda x: jnp.tanh(3 * x[..., :1]) + 0.5 * x[..., 1:])
    objectives.loss_fn(
        rec0, None, batch, key, SCHED, experiment="e2", prediction="x0", self_condition_prob=1e-9
    )
    np.testing.assert_array_equal(rec0.calls[-1]["x"][..., 1:], 0.0)


def test_self_conditioning_stops_the_gradient_of_the_first_pass():
    # f(x) = w·x_t + w·x0_prev. With x0_prev = stop_gradient(clip(w·x_t)), dL/dw must ignore x0_prev's dependence
    # on w: compare with the same loss where x0_prev is a constant.
    batch = _batch(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(5)

    def apply_fn(w, x, t, cond, rng):
        return w * x[..., :1] + (w * x[..., 1:] if x.shape[-1] == 2 else 0.0)

    def loss(w):
        return objectives.loss_fn(
            apply_fn, w, batch, key, SCHED, experiment="e2", prediction="x0", self_condition_prob=1.0
        )[0]

    w = jnp.float32(0.3)
    _, aux = objectives.loss_fn(apply_fn, w, batch, key, SCHED, experiment="e2", prediction="x0")
    _, noise_key, _ = jax.random.split(key, 3)
    x0 = 2 * batch["mask"] - 1
    x_t = diffusion.q_sample(SCHED, x0, aux["t"], jax.random.normal(noise_key, x0.shape))
    const = jnp.clip(w * x_t, -1, 1)
    expected = jax.grad(lambda v: jnp.mean((v * x_t + v * const - x0) ** 2))(w)
    np.testing.assert_allclose(jax.grad(loss)(w), expected, rtol=1e-5)


def test_recycling_builds_x_t_from_the_models_own_x0_and_keeps_the_ground_truth_target():
    batch = _batch(jax.random.PRNGKey(0))
    rec = _Recorder(lambda x: jnp.full_like(x, 0.5))  # x̂0 = 0.5 whatever the input
    key = jax.random.PRNGKey(2)
    loss, aux = objectives.loss_fn(
        rec, None, batch, key, SCHED, experiment="e2", prediction="x0", recycle_prob=1.0
    )
    first, main = rec.calls
    x0 = 2 * batch["mask"] - 1
    np.testing.assert_array_equal(first["t"], np.full(4, 99))  # the recycling pass at T-1 (Fu et al.'s 'max')
    np.testing.assert_array_equal(first["cond"], batch["image"])
    _, noise_key, _ = jax.random.split(key, 3)
    noise = jax.random.normal(noise_key, x0.shape)
    np.testing.assert_allclose(
        main["x"], diffusion.q_sample(SCHED, jnp.full_like(x0, 0.5), main["t"], noise), atol=1e-6
    )
    # The target is still the ground truth: the loss is the mean of (0.5 − x0)².
    np.testing.assert_allclose(loss, jnp.mean((0.5 - x0) ** 2), rtol=1e-6)
    # recycle_prob = 0 leaves x_t on the ground truth (and runs no recycling pass).
    rec0 = _Recorder(lambda x: jnp.full_like(x, 0.5))
    objectives.loss_fn(rec0, None, batch, key, SCHED, experiment="e2", prediction="x0")
    assert len(rec0.calls) == 1
    np.testing.assert_allclose(rec0.calls[0]["x"], diffusion.q_sample(SCHED, x0, main["t"], noise), atol=1e-6)


def test_bernoulli_loss_trains_a_per_pixel_model_to_the_mask():
    """BerDiff's loss through loss_fn (timesteps, x_t, KL + BCE) gives gradients that fit x0: a per-pixel logit
    model (x̂0 ignores x_t) overfits one batch, and its x̂0 thresholds to the mask."""
    batch = _batch(jax.random.PRNGKey(0), size=8)

    def apply_fn(params, x, t, cond, rng):
        return jnp.broadcast_to(params, x.shape)

    def loss(params, key):
        return objectives.loss_fn(
            apply_fn, params, batch, key, SCHED, experiment="e2", prediction="x0", process="bernoulli"
        )[0]

    params = jnp.zeros(batch["mask"].shape)
    opt = optax.adam(0.1)
    state = opt.init(params)
    grad = jax.jit(jax.value_and_grad(loss))
    first = float(grad(params, jax.random.PRNGKey(0))[0])
    for i in range(150):
        _, g = grad(params, jax.random.PRNGKey(i))
        updates, state = opt.update(g, state)
        params = optax.apply_updates(params, updates)
    final = float(np.mean([grad(params, jax.random.PRNGKey(1000 + i))[0] for i in range(10)]))
    assert final < 0.1 * first, (first, final)
    assert bool(jnp.all((params > 0) == (batch["mask"] > 0.5)))


@pytest.mark.parametrize("mask_range", ["binary", "symmetric"])
def test_bernoulli_loss_feeds_x_t_in_the_mask_range_and_the_first_pass_x0_when_self_conditioned(mask_range):
    batch = _batch(jax.random.PRNGKey(0))
    rec = _Recorder(lambda x: 2.0 * x[..., :1] - 0.5 * x[..., 1:])
    key = jax.random.PRNGKey(1)
    _, aux = objectives.loss_fn(
        rec, None, batch, key, SCHED, experiment="e2", prediction="eps", process="bernoulli",
        mask_range=mask_range, self_condition_prob=1.0,
    )  # fmt: skip
    main = rec.calls[-1]
    x_in, prev = main["x"][..., :1], main["x"][..., 1:]
    x_t = diffusion.bernoulli.q_sample(
        SCHED, batch["mask"], aux["t"], jax.random.split(jax.random.split(key, 3)[1], 4)[0]
    )
    np.testing.assert_array_equal(x_in, diffusion.mask_to_diffusion(x_t, mask_range))
    # The first pass saw zeros as its extra channels; its x̂0 = |x_t − sigmoid(2 x_in)| comes in the mask range.
    x0_hat = jnp.abs(x_t - jax.nn.sigmoid(2.0 * x_in))
    np.testing.assert_allclose(prev, diffusion.mask_to_diffusion(x0_hat, mask_range), atol=1e-6)
    with pytest.raises(ValueError, match="Bernoulli diffusion"):
        objectives.loss_fn(
            rec, None, batch, key, SCHED, experiment="e2", process="bernoulli", recycle_prob=1.0
        )
