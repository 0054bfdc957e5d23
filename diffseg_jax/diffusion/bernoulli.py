"""Bernoulli diffusion of binary masks (BerDiff: Chen, Wang & Shan, MICCAI 2023, arXiv 2304.04429).

Beyond the paper (issue 33). A {0,1} mask is diffused by flipping pixels to fair coins instead of adding Gaussian
noise, on the project's :class:`~diffseg_jax.diffusion.schedule.Schedule` (β_t, ᾱ_t = ∏ (1 − β_s)):

* forward step q(x_t | x_{t−1}) = B(x_t; (1 − β_t) x_{t−1} + β_t / 2), hence q(x_t | x0) = B(x_t; ᾱ_t x0 + (1 − ᾱ_t)/2)
  (:func:`q_probs`, :func:`q_sample`); x_T ≈ B(1/2) when ᾱ_T ≈ 0;
* posterior q(x_{t−1} | x_t, x0) = B(θ₁ / (θ₀ + θ₁)) with θ₁ = [α_t x_t + β_t/2][ᾱ_{t−1} x0 + (1 − ᾱ_{t−1})/2] and
  θ₀ = [α_t (1 − x_t) + β_t/2][ᾱ_{t−1} (1 − x0) + (1 − ᾱ_{t−1})/2] (:func:`q_posterior`, Bayes' rule over {0,1}); it
  stays the exact posterior for x0 ∈ [0, 1] read as P(x0 = 1), which is how the network's x̂0 enters;
* the network predicts, through a sigmoid, the noise ε = x_t XOR x0 (``prediction='eps'``, BerDiff's released
  model, x̂0 = |x_t − ε̂|) or x0 itself (``'x0'``) as a probability (:func:`x0_eps_from_output`);
* loss (:func:`loss_terms`): KL(q(x_{t−1} | x_t, x0) ‖ p_θ(x_{t−1} | x_t)) with p_θ the posterior at x̂0, and at t = 0
  the decoder's −log B(x0; x̂0); plus λ · BCE of the network's own target (ε or x0), both in bits per pixel as
  BerDiff's ``LossType.MIX`` (which adds them, λ = 1);
* samplers: ancestral (:func:`bernoulli_sample`, x_T ~ B(1/2) then x_{t−1} ~ p_θ) and BerDiff's DDIM-like
  few-step sampler (:func:`bernoulli_ddim_sample`); both return the last step's probability map x̂0, as BerDiff's
  ``p_sample``/``ddim_sample`` return ``out["mean"]`` (= ``pred_xstart``) at t = 0 instead of a Bernoulli draw.

Follows takimailto/BerDiff's ``diffusion/binomial_diffusion.py`` and ``loss/losses.py``, with three differences:
its ``q_mean`` writes the ``+ (1 − ᾱ_t)/2`` term on a line of its own, a no-op statement in Python, so its training
draws x_t ~ B(ᾱ_t x0) while its posterior and sampler assume the paper's q(x_t | x0); we implement the paper's.
Its posterior at t = 0 indexes ᾱ_{−1} (NumPy wraps to ᾱ_{T−1}, unused since t = 0 takes the decoder term); we use
ᾱ_{−1} = 1, which makes the true posterior at t = 0 the mask itself. Its network ends in a sigmoid; ours output
logits and the sigmoid is applied here (the same function, with a stable log-sigmoid for the BCE).

The network sees x_t (and, self-conditioned, the previous x̂0) mapped by
:func:`~diffseg_jax.diffusion.gaussian.mask_to_diffusion` with the config's ``mask_range``: {0, 1} as BerDiff's code
feeds it under ``'binary'``, ±1 under ``'symmetric'``. Every function is pure and works under jit/vmap; ``t`` is an
integer array of shape (B,) broadcast over the other axes, as in :mod:`~diffseg_jax.diffusion.gaussian`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffseg_jax.diffusion import gaussian, samplers
from diffseg_jax.diffusion.schedule import Schedule

PREDICTIONS = (
    "eps",
    "x0",
)  # what a Bernoulli network predicts, as a probability (BerDiff: 'epsilon', 'xstart')
EPS = 1e-7  # probabilities are clipped to [EPS, 1 − EPS] inside logs, as BerDiff's losses clamp them


def q_probs(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """P(x_t = 1 | x0) = ᾱ_t x0 + (1 − ᾱ_t)/2."""
    abar = gaussian.extract(schedule.alphas_cumprod, t, x0.shape)
    return abar * x0 + (1.0 - abar) / 2.0


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """x_t ~ B(ᾱ_t x0 + (1 − ᾱ_t)/2), as float32 in {0, 1}."""
    return jax.random.bernoulli(key, q_probs(schedule, x0, t)).astype(jnp.float32)


def posterior_probs(
    x0: jnp.ndarray, x_t: jnp.ndarray, alpha: jnp.ndarray, abar_prev: jnp.ndarray
) -> jnp.ndarray:
    """P(x_s = 1 | x_t, x0) for a step s → t that keeps a fraction ``alpha`` (= ᾱ_t / ᾱ_s) and has ᾱ_s = ``abar_prev``.

    Bayes' rule over x_s ∈ {0, 1}: q(x_t | x_s) q(x_s | x0), normalised. x0 may be a probability P(x0 = 1).
    """
    flip = (1.0 - alpha) / 2.0
    prior1 = abar_prev * x0 + (1.0 - abar_prev) / 2.0
    theta1 = (alpha * x_t + flip) * prior1
    theta0 = (alpha * (1.0 - x_t) + flip) * (1.0 - prior1)
    return theta1 / (theta0 + theta1)


def q_posterior(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """P(x_{t−1} = 1 | x_t, x0) of one step (α_t = 1 − β_t, ᾱ_{t−1} with ᾱ_{−1} = 1: the mask itself at t = 0)."""
    alpha = 1.0 - gaussian.extract(schedule.betas, t, x_t.shape)
    abar_prev = gaussian.extract(schedule.alphas_cumprod_prev, t, x_t.shape)
    return posterior_probs(x0, x_t, alpha, abar_prev)


def x0_from_eps(x_t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """P(x0 = 1) from x_t and P(ε = 1), ε = x_t XOR x0: |x_t − ε̂| (BerDiff's ``_predict_xstart_from_eps``)."""
    return x_t + eps - 2.0 * x_t * eps


def x0_eps_from_output(
    prediction: str, x_t: jnp.ndarray, out: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(P(x0 = 1), P(ε = 1)) from the network's logits ``out`` predicting ``prediction`` ('eps' or 'x0')."""
    p = jax.nn.sigmoid(out)
    if prediction == "eps":
        return x0_from_eps(x_t, p), p
    if prediction == "x0":
        return p, x0_from_eps(x_t, p)
    raise ValueError(f"A Bernoulli network predicts one of {PREDICTIONS}, got {prediction!r}")


def model_posterior(schedule: Schedule, x0_hat: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """P_θ(x_{t−1} = 1 | x_t): the posterior at the network's x̂0, and x̂0 itself at t = 0 (BerDiff's ``p_mean``)."""
    t_b = t.reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
    return jnp.where(t_b == 0, x0_hat, q_posterior(schedule, x0_hat, x_t, t))


def bernoulli_kl(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
    """KL(B(p) ‖ B(q)) in nats, elementwise; q clipped to [EPS, 1 − EPS], 0 log 0 = 0."""
    q = jnp.clip(q, EPS, 1.0 - EPS)
    return (
        jax.scipy.special.xlogy(p, p)
        - p * jnp.log(q)
        + jax.scipy.special.xlogy(1.0 - p, 1.0 - p)
        - (1.0 - p) * jnp.log1p(-q)
    )


def bce_with_logits(logits: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """−log B(target; sigmoid(logits)) in nats, elementwise and stable for large logits."""
    return jax.nn.softplus(logits) - target * logits


def loss_terms(
    schedule: Schedule, out: jnp.ndarray, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray, prediction: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per example (vb, bce) in bits per pixel (means over all but axis 0), BerDiff's ``LossType.MIX`` terms.

    vb: KL(q(x_{t−1} | x_t, x0) ‖ p_θ(x_{t−1} | x_t)) for t > 0 and −log B(x0; x̂0) at t = 0 (which the KL equals
    there, the true posterior being x0); bce: −log of the network's own target (ε = x_t XOR x0, or x0) under its
    sigmoid output. ``x0`` and ``x_t`` in {0, 1}, ``out`` the network's logits.
    """
    axes = tuple(range(1, x0.ndim))
    x0_hat, _ = x0_eps_from_output(prediction, x_t, out)
    kl = bernoulli_kl(q_posterior(schedule, x0, x_t, t), model_posterior(schedule, x0_hat, x_t, t))
    target = x0 if prediction == "x0" else x0_from_eps(x_t, x0)  # ε = x_t XOR x0
    bce = bce_with_logits(out, target)
    return jnp.mean(kl, axis=axes) / math.log(2.0), jnp.mean(bce, axis=axes) / math.log(2.0)


def network_input(x_t: jnp.ndarray, prev, mask_range: str) -> jnp.ndarray:
    """What the network sees: x_t ∈ {0, 1} in the config's mask range, followed when self-conditioning by ``prev``,
    the previous x̂0 already in that range (:func:`self_condition_channels`; zeros when there is none, as the
    Gaussian path's). ``prev = ()``: no self-conditioning."""
    x = gaussian.mask_to_diffusion(x_t, mask_range)
    return x if isinstance(prev, tuple) else jnp.concatenate([x, prev], axis=-1)


def self_condition_channels(x0_hat: jnp.ndarray, mask_range: str) -> jnp.ndarray:
    """A previous estimate P(x0 = 1) as the self-conditioning channels: in the mask range, as x_t is fed."""
    return gaussian.mask_to_diffusion(x0_hat, mask_range)


def _start(model_fn, shape, key, self_condition):
    init_key, step_key = jax.random.split(key)
    x_init = jax.random.bernoulli(init_key, 0.5, shape).astype(jnp.float32)  # x_T ~ B(1/2)
    fn, zero_extras = samplers._with_extras(model_fn, shape, ("fixed_large",), self_condition)
    prev_init = jnp.zeros(shape, jnp.float32) if self_condition else ()  # zeros at the first step
    return step_key, fn, (x_init, zero_extras, prev_init)


def bernoulli_sample(
    model_fn: Callable,
    schedule: Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    prediction: str = "eps",
    mask_range: str = "binary",
    self_condition: bool = False,
    return_trajectory: bool = False,
    return_extras: bool = False,
):
    """Ancestral Bernoulli sampling over all T steps (BerDiff's ``p_sample_loop``), one ``lax.scan``.

    x_T ~ B(1/2); at t > 0, x_{t−1} ~ B(p_θ(x_{t−1} | x_t)); at t = 0 the probability map x̂0 is returned, not a
    draw (BerDiff returns ``out["mean"]`` there). With ``return_trajectory`` also ``{'x': (T, *shape), 'x0': ...,
    't': (T,)}``: the drawn x_{t−1} (the returned map at the last step) and x̂0 in visiting order. ``model_fn(x, t)``
    returns logits; ``self_condition`` feeds the previous step's x̂0 (zeros at the first).
    """
    step_key, fn, carry0 = _start(model_fn, shape, key, self_condition)

    def step(carry, t):
        x, _, x0_prev = carry
        tb = jnp.full((shape[0],), t, dtype=jnp.int32)
        out, extras = fn(network_input(x, x0_prev, mask_range), tb)
        x0_hat, _ = x0_eps_from_output(prediction, x, out)
        probs = model_posterior(schedule, x0_hat, x, tb)
        draw = jax.random.bernoulli(jax.random.fold_in(step_key, t), probs).astype(jnp.float32)
        x_prev = jnp.where(t > 0, draw, probs)
        carry = (x_prev, extras, self_condition_channels(x0_hat, mask_range) if self_condition else x0_prev)
        return carry, ((x_prev, x0_hat, t) if return_trajectory else None)

    ts = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    (x, extras, _), traj = jax.lax.scan(step, carry0, ts)
    return samplers._result(x, traj, extras, return_trajectory, return_extras)


def bernoulli_ddim_sample(
    model_fn: Callable,
    schedule: Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    num_steps: int = 10,
    prediction: str = "eps",
    mask_range: str = "binary",
    self_condition: bool = False,
    return_trajectory: bool = False,
    return_extras: bool = False,
):
    """BerDiff's DDIM-like sampler (its ``ddim_sample`` on ``ddimuni`` respacing) over K of the T timesteps.

    From x_t at a visited t to the previous visited s (ᾱ_{−1} = 1 after t = 0): x_s ~ B(σ x_t + (ᾱ_s − σ ᾱ_t) x̂0)
    with σ = (1 − ᾱ_s)/(1 − ᾱ_t), a non-Markovian step that keeps q(x_s | x0) = B(ᾱ_s x0 + (1 − ᾱ_s)/2) for x_t ~
    q(x_t | x0) (the constant term vanishes for this σ). It has no η: every step draws Bernoulli samples. The visited
    timesteps are :func:`~diffseg_jax.diffusion.samplers.ddim_timesteps` (T−1 and 0 included); the last step returns
    x̂0 at t = 0, as BerDiff's. Arguments and returns as :func:`bernoulli_sample`.
    """
    ts = samplers.ddim_timesteps(schedule.num_timesteps, num_steps)
    ts_prev = jnp.asarray([-1, *ts[:-1]], jnp.int32)
    ac_ext = jnp.concatenate([schedule.alphas_cumprod, jnp.ones((1,), jnp.float32)])  # index −1 → ᾱ = 1
    step_key, fn, carry0 = _start(model_fn, shape, key, self_condition)

    def step(carry, pair):
        x, _, x0_prev = carry
        t, t_prev = pair
        tb = jnp.full((shape[0],), t, dtype=jnp.int32)
        out, extras = fn(network_input(x, x0_prev, mask_range), tb)
        x0_hat, _ = x0_eps_from_output(prediction, x, out)
        ab, ab_prev = ac_ext[t], ac_ext[t_prev]
        sigma = (1.0 - ab_prev) / (1.0 - ab)
        probs = jnp.clip(sigma * x + (ab_prev - sigma * ab) * x0_hat, 0.0, 1.0)
        draw = jax.random.bernoulli(jax.random.fold_in(step_key, t), probs).astype(jnp.float32)
        x_prev = jnp.where(t_prev >= 0, draw, probs)
        carry = (x_prev, extras, self_condition_channels(x0_hat, mask_range) if self_condition else x0_prev)
        return carry, ((x_prev, x0_hat, t) if return_trajectory else None)

    (x, extras, _), traj = jax.lax.scan(step, carry0, (jnp.asarray(ts[::-1], jnp.int32), ts_prev[::-1]))
    return samplers._result(x, traj, extras, return_trajectory, return_extras)


# eval.sampler under diffusion.process='bernoulli': 'ddpm' is the ancestral sampler over all T, 'ddim' BerDiff's
# DDIM-like one over eval.ddim_steps.
BERNOULLI_SAMPLERS = {"ddpm": bernoulli_sample, "ddim": bernoulli_ddim_sample}
