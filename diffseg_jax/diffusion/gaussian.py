"""Gaussian forward process: q(x_t | x_0), ε ↔ x0 conversions, the posterior q(x_{t-1} | x_t, x_0).

Follows the equations of Ho et al. (2020) as written in openai/improved-diffusion ``gaussian_diffusion.py``
(the code base of EnsemDiff, SegDiff and MedSegDiff). Every function is pure and works under jit/vmap;
``t`` is an integer array of shape (B,) indexing the schedule, broadcast over the remaining axes of x.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffseg_jax.diffusion.schedule import Schedule

# Diffusion space of masks. 'symmetric': a {0,1} mask m is diffused as 2m-1 ∈ {-1,1}, which matches the
# [-1,1] range every published sampler clips x0 to (SegDiff's code). 'binary': m ∈ {0,1} is diffused as it is,
# as the EnsemDiff and MedSegDiff codes do (their loaders give {0,1} masks and they never rescale), while their
# samplers still clip x0 to [-1,1]. The published schemes (diffseg_jax/defaults.py) set each architecture's own; the
# binary range has a quarter of the symmetric one's signal power, so every t is noisier for the mask.
MASK_RANGES = ("symmetric", "binary")


def extract(a: jnp.ndarray, t: jnp.ndarray, x_shape: tuple[int, ...]) -> jnp.ndarray:
    """Gathers ``a[t]`` and reshapes it to broadcast against an array of ``x_shape``."""
    out = a[t]
    return out.reshape(out.shape + (1,) * (len(x_shape) - out.ndim))


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """Samples x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def predict_x0_from_eps(
    schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
    """x0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def predict_eps_from_x0(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray) -> jnp.ndarray:
    """ε = (x_t - √ᾱ_t x0) / √(1-ᾱ_t)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


# What a network's output means (Salimans & Ho 2022, "Progressive Distillation", Sec. 4 and App. D): the noise
# ε, the clean x0, or the velocity v = √ᾱ_t ε − √(1-ᾱ_t) x0. Each gives x0 and ε from x_t exactly.
PREDICTIONS = ("eps", "x0", "v")


def _alpha_sigma(schedule: Schedule, t: jnp.ndarray, shape: tuple[int, ...]):
    return (
        extract(schedule.sqrt_alphas_cumprod, t, shape),
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape),
    )


def v_from_x0_eps(schedule: Schedule, x0: jnp.ndarray, eps: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """v = √ᾱ_t ε − √(1-ᾱ_t) x0."""
    alpha, sigma = _alpha_sigma(schedule, t, x0.shape)
    return alpha * eps - sigma * x0


def prediction_target(
    prediction: str, schedule: Schedule, x0: jnp.ndarray, eps: jnp.ndarray, t: jnp.ndarray
) -> jnp.ndarray:
    """What a network of ``prediction`` ('eps', 'x0' or 'v') is trained to output for (x0, ε, t)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(schedule, x0, eps, t)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def x0_eps_from_prediction(
    prediction: str, schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, out: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x̂0, ε̂) from a network output of ``prediction``, unclipped, both consistent with x_t.

    ε: x̂0 = (x_t − σ ε̂)/α; x0: ε̂ = (x_t − α x̂0)/σ; v: x̂0 = α x_t − σ v̂, ε̂ = σ x_t + α v̂ (α² + σ² = 1).
    """
    if prediction == "eps":
        return predict_x0_from_eps(schedule, x_t, t, out), out
    if prediction == "x0":
        return out, predict_eps_from_x0(schedule, x_t, t, out)
    if prediction == "v":
        alpha, sigma = _alpha_sigma(schedule, t, x_t.shape)
        return alpha * x_t - sigma * out, sigma * x_t + alpha * out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def q_posterior(
    schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    var = extract(schedule.posterior_variance, t, x_t.shape)
    logvar = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, var, logvar


def mask_to_diffusion(mask: jnp.ndarray, mask_range: str = "symmetric") -> jnp.ndarray:
    """Maps a {0,1} mask (or [0,1] probability) into diffusion space."""
    if mask_range == "symmetric":
        return 2.0 * mask - 1.0
    if mask_range == "binary":
        return mask
    raise ValueError(f"mask_range must be one of {MASK_RANGES}, got {mask_range!r}")


def diffusion_to_mask_scale(x: jnp.ndarray, mask_range: str = "symmetric") -> jnp.ndarray:
    """A sample from diffusion space to the mask's {0,1} scale, unclipped: (x + 1)/2 or x itself.

    What MedSegDiff's ``cal`` blend takes: its code diffuses {0,1} masks and blends the sampler's raw output.
    """
    if mask_range == "symmetric":
        return (x + 1.0) / 2.0
    if mask_range == "binary":
        return x
    raise ValueError(f"mask_range must be one of {MASK_RANGES}, got {mask_range!r}")


def diffusion_to_prob(x: jnp.ndarray, mask_range: str = "symmetric") -> jnp.ndarray:
    """Maps a sampled mask from diffusion space back to a foreground value in [0, 1] (clipped)."""
    if mask_range == "symmetric":
        return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
    if mask_range == "binary":
        return jnp.clip(x, 0.0, 1.0)
    raise ValueError(f"mask_range must be one of {MASK_RANGES}, got {mask_range!r}")
