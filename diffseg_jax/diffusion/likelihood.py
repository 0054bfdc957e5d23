"""The variational-bound term of improved DDPM (Nichol & Dhariwal 2021), for learned variances.

Follows ``_vb_terms_bpd`` of openai/improved-diffusion as used by EnsemDiff and MedSegDiff with
``learn_sigma=True``: KL(q(x_{t-1}|x_t,x0) ‖ p_θ(x_{t-1}|x_t)) in bits per dimension for t > 0 and the
discretised-Gaussian decoder NLL (bins of width 2/255 on [-1, 1]) at t = 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from diffseg_jax.diffusion import gaussian
from diffseg_jax.diffusion.schedule import Schedule


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    """The tanh approximation of Φ(x) used by improved-diffusion (kept for numerical parity)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> jnp.ndarray:
    """log p(x) of data in [-1, 1] quantised to 256 levels under N(means, e^{2 log_scales}), elementwise."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms_bpd(
    schedule: Schedule,
    x0: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    model_x0: jnp.ndarray,
    model_log_variance: jnp.ndarray,
) -> jnp.ndarray:
    """Per-example VLB term in bits/dim: KL for t > 0, decoder NLL at t = 0.

    ``model_x0`` is the network's x0 estimate (unclipped, as in training) from which p_θ's mean is the
    posterior mean; pass it through ``stop_gradient`` to train only the variance, as improved DDPM does.
    """
    true_mean, _, true_logvar = gaussian.q_posterior(schedule, x0, x_t, t)
    model_mean, _, _ = gaussian.q_posterior(schedule, model_x0, x_t, t)
    axes = tuple(range(1, x0.ndim))
    kl = jnp.mean(normal_kl(true_mean, true_logvar, model_mean, model_log_variance), axis=axes) / math.log(
        2.0
    )
    nll = -jnp.mean(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance), axis=axes
    ) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)
