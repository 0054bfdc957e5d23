"""Bernoulli diffusion (BerDiff): closed forms against brute force over {0,1}, the loss at the oracle, the samplers'
marginals under an oracle network, and that the loss trains."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffseg_jax import diffusion
from diffseg_jax.diffusion import bernoulli

T = 50
SCHED = diffusion.get_schedule("linear", T)


def _step_matrix(beta: float) -> np.ndarray:
    """q(x_t = j | x_{t-1} = i) of one forward step, B((1 − β) x_{t−1} + β/2), as a 2 x 2 matrix."""
    p1 = np.array([beta / 2, 1 - beta / 2])  # P(x_t = 1 | x_{t−1} = 0, 1)
    return np.stack([1 - p1, p1], axis=1)


def _marginals(betas) -> list[np.ndarray]:
    """q(x_t | x0) for t = 0..T−1 by multiplying the one-step matrices (x0 = row index)."""
    out, m = [], np.eye(2)
    for beta in betas:
        m = m @ _step_matrix(beta)
        out.append(m)
    return out


def test_marginal_is_the_product_of_the_forward_steps_from_x0_to_a_fair_coin():
    betas = np.asarray(SCHED.betas, np.float64)
    marg = _marginals(betas)
    x0 = jnp.array([0.0, 1.0])
    for t in range(T):
        got = np.asarray(bernoulli.q_probs(SCHED, x0, jnp.full((2,), t)))
        np.testing.assert_allclose(got, marg[t][:, 1], atol=1e-6)
    # t = 0: x0 itself up to β_0/2; t = T−1 of the standard linear schedule: a fair coin.
    np.testing.assert_allclose(
        bernoulli.q_probs(SCHED, x0, jnp.zeros(2, jnp.int32)), x0, atol=betas[0] / 2 + 1e-7
    )
    full = diffusion.get_schedule("linear", 1000)
    far = bernoulli.q_probs(full, x0, jnp.full((2,), 999))
    np.testing.assert_allclose(far, 0.5, atol=3e-5)
    draws = bernoulli.q_sample(full, jnp.ones((20000,)), jnp.full((20000,), 999), jax.random.PRNGKey(0))
    assert set(np.unique(np.asarray(draws))) <= {0.0, 1.0} and abs(float(draws.mean()) - 0.5) < 0.015


def test_posterior_is_bayes_rule_over_0_1_for_binary_and_soft_x0():
    betas = np.asarray(SCHED.betas, np.float64)
    marg = _marginals(betas)
    cases = list(itertools.product(range(T), [0.0, 1.0, 0.3, 0.85], [0.0, 1.0]))
    want = []
    for t, x0_p, x_t in cases:
        prev = np.eye(2) if t == 0 else marg[t - 1]  # q(x_{t−1} | x0), x_{−1} = x0
        step = _step_matrix(betas[t])
        # brute force: sum over x0 ~ B(x0_p) and x_{t−1} ∈ {0,1} of the joint with x_t, then normalise.
        joint = [
            sum(w * prev[a, k] * step[k, int(x_t)] for a, w in ((0, 1 - x0_p), (1, x0_p))) for k in (0, 1)
        ]
        want.append(joint[1] / sum(joint))
    t, x0_p, x_t = (jnp.asarray(c) for c in zip(*cases))
    got = bernoulli.q_posterior(SCHED, x0_p.astype(jnp.float32), x_t.astype(jnp.float32), t)
    np.testing.assert_allclose(
        got, want, atol=2e-5
    )  # P(1); P(0) = 1 − P(1) is its complement by construction
    # t = 0: the true posterior is the mask itself.
    np.testing.assert_allclose(
        bernoulli.q_posterior(SCHED, jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]), jnp.zeros(2, jnp.int32)),
        [0.0, 1.0],
        atol=1e-7,
    )


def _oracle_logits(x0, prediction, scale=30.0):
    """An oracle network's logits: the true x0, or the true flips ε = x_t XOR x0."""

    def model_fn(x, t):
        target = x0 if prediction == "x0" else jnp.abs(x - x0)  # ε = x_t XOR x0
        return scale * (2.0 * target - 1.0)

    return model_fn


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_loss_vanishes_at_the_oracle_and_grows_with_a_wrong_x0(prediction):
    key = jax.random.PRNGKey(0)
    x0 = (jax.random.uniform(key, (6, 8, 8, 1)) > 0.5).astype(jnp.float32)
    t = jnp.array([0, 1, 5, 10, 15, 20])
    x_t = bernoulli.q_sample(SCHED, x0, t, jax.random.PRNGKey(1))
    out = _oracle_logits(x0, prediction)(x_t, t)
    vb, bce = bernoulli.loss_terms(SCHED, out, x0, x_t, t, prediction)
    assert float(jnp.max(vb)) < 1e-6 and float(jnp.max(bce)) < 1e-6
    # An uninformed x̂0 = 1/2 (logits 0) pays in both terms at every t (the KL is positive wherever x_t leaves
    # x_{t−1} uncertain).
    vb0, bce0 = bernoulli.loss_terms(SCHED, jnp.zeros_like(out), x0, x_t, t, prediction)
    assert float(jnp.min(vb0)) > 1e-3 and np.allclose(bce0, 1.0, atol=1e-6)  # 1 bit per pixel
    # KL(B(p) || B(q)) against its definition.
    p, q = jnp.array([0.2, 0.0, 1.0]), jnp.array([0.6, 0.3, 0.9])
    want = [0.2 * np.log(0.2 / 0.6) + 0.8 * np.log(0.8 / 0.4), -np.log(0.7), -np.log(0.9)]
    np.testing.assert_allclose(bernoulli.bernoulli_kl(p, q), want, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_oracle_sampler_recovers_x0_through_the_forward_marginals(sampler, prediction):
    """With the true x0 as the network's answer, every drawn x_t agrees with x0 on (1 + ᾱ_t)/2 of the pixels
    (the forward marginal; x_T ~ B(1/2) stands in for q(x_T | x0)), and the member is x0."""
    schedule = diffusion.get_schedule("linear", 1000)
    x0 = (jax.random.uniform(jax.random.PRNGKey(3), (2, 64, 64, 1)) > 0.6).astype(jnp.float32)
    kwargs = dict(num_steps=10) if sampler == "ddim" else {}
    probs, traj = diffusion.BERNOULLI_SAMPLERS[sampler](
        _oracle_logits(x0, prediction), schedule, x0.shape, jax.random.PRNGKey(4),
        prediction=prediction, return_trajectory=True, **kwargs,
    )  # fmt: skip
    np.testing.assert_allclose(probs, x0, atol=1e-6)
    ts = np.asarray(traj["t"])
    abar = np.concatenate([np.asarray(schedule.alphas_cumprod, np.float64), [1.0]])
    n = x0.size
    for i in range(len(ts) - 1):  # x drawn at step i has the noise level of the next visited t
        t_next = ts[i + 1]
        agree = float(jnp.mean(traj["x"][i] == x0))
        expected = (1 + abar[t_next]) / 2
        assert abs(agree - expected) < 5 * np.sqrt(expected * (1 - expected) / n) + 2e-3, (
            t_next,
            agree,
            expected,
        )


def test_one_step_sampler_calls_the_network_at_the_noisiest_step():
    """K = 1 visits t = T - 1, where x_T ~ B(1/2) belongs (it visited t = 0 before the fix), and returns x̂0."""
    x0 = (jax.random.uniform(jax.random.PRNGKey(3), (1, 8, 8, 1)) > 0.5).astype(jnp.float32)
    probs, traj = bernoulli.bernoulli_ddim_sample(
        _oracle_logits(x0, "x0"), SCHED, x0.shape, jax.random.PRNGKey(0), num_steps=1, prediction="x0",
        return_trajectory=True,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(traj["t"]), [SCHED.num_timesteps - 1])
    np.testing.assert_allclose(probs, x0, atol=1e-6)


def test_self_conditioned_sampler_feeds_the_previous_x0_in_the_mask_range():
    seen = []
    x0 = jnp.ones((1, 4, 4, 1))

    def model_fn(x, t):
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), x[..., 1:])
        return jnp.full(x[..., :1].shape, 2.0)  # x̂0 = sigmoid(2) under 'x0'

    bernoulli.bernoulli_ddim_sample(
        model_fn, SCHED, x0.shape, jax.random.PRNGKey(0), num_steps=3, prediction="x0",
        mask_range="symmetric", self_condition=True,
    )  # fmt: skip
    jax.effects_barrier()
    assert len(seen) == 3 and np.all(seen[0] == 0)
    np.testing.assert_allclose(seen[1], 2 * jax.nn.sigmoid(2.0) - 1, rtol=1e-6)
