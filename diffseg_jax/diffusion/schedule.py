"""Noise schedules: betas computed in float64 NumPy, stored as a pytree of float32 arrays.

The three published codes (EnsemDiff, SegDiff, MedSegDiff) all derive from openai's improved/guided
diffusion, whose ``get_named_beta_schedule`` computes betas with ``np.linspace`` in float64 and every derived
quantity (ᾱ_t, posterior coefficients) in float64 before any cast. We do the same and cast once to float32:
``jnp.float64`` would silently become float32 without x64 and ᾱ_t near t = T would lose digits.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {}


def register_beta_schedule(name: str):
    """Decorator adding ``fn(num_timesteps, **kwargs) -> float64 betas`` to :data:`BETA_SCHEDULES`."""

    def wrap(fn):
        BETA_SCHEDULES[name] = fn
        return fn

    return wrap


@register_beta_schedule("linear")
def linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, scale_to_1000: bool = True
) -> np.ndarray:
    """Linear betas as in improved-diffusion: ``linspace(start·s, end·s, T)`` with s = 1000/T.

    The published codes pass beta_start=1e-4, beta_end=0.02 and scale by 1000/T so that other T keep the
    same overall noise (SegDiff uses T=100, 1e-3 → 0.2 after scaling: there pass the scaled values and
    ``scale_to_1000=False``, or 1e-4/0.02 with the default scaling — both give the same betas).
    """
    scale = 1000.0 / num_timesteps if scale_to_1000 else 1.0
    return np.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas that discretise a continuous ᾱ(s), s ∈ [0, 1] (improved-diffusion's helper)."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


@register_beta_schedule("cosine")
def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal (2021): ᾱ(u) = cos²((u + s)/(1 + s)·π/2)."""
    return betas_for_alpha_bar(
        num_timesteps, lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2, max_beta
    )


# Ways to raise the terminal noise of a schedule to a chosen ᾱ_{T-1} (see adapt_terminal).
TERMINAL_METHODS = ("none", "rescale", "snr_shift")


def alphas_cumprod_of(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 - β_s) in float64."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """The betas of a decreasing ᾱ_t (the inverse of :func:`alphas_cumprod_of`)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return 1.0 - ac / np.append(1.0, ac[:-1])


def rescale_terminal(betas: np.ndarray, alpha_bar_T: float) -> np.ndarray:
    """Betas whose √ᾱ_t is shifted and scaled so that ᾱ_0 is kept and ᾱ_{T-1} = ``alpha_bar_T``.

    Lin et al. (2024), "Common diffusion noise schedules and sample steps are flawed", Algorithm 1, rescales √ᾱ_t
    linearly to end at 0 (zero terminal SNR); this is the same map with the end point √alpha_bar_T. The end
    point must stay positive here: an ε-predicting network cannot give x0 where ᾱ = 0 (Lin et al. switch to
    v-prediction for that).
    """
    ac = alphas_cumprod_of(betas)
    a0, a_end = np.sqrt(ac[0]), np.sqrt(ac[-1])
    target = np.sqrt(_check_terminal(alpha_bar_T, ac[0]))
    root = (np.sqrt(ac) - a_end) * (a0 - target) / (a0 - a_end) + target
    return betas_from_alphas_cumprod(root**2)


def shift_snr(betas: np.ndarray, alpha_bar_T: float) -> np.ndarray:
    """Betas whose SNR ᾱ/(1-ᾱ) is multiplied at every t by one factor, chosen so that ᾱ_{T-1} = ``alpha_bar_T``.

    A constant SNR shift (Hoogeboom et al. 2023, "simple diffusion"; Chen 2023, "On the importance of noise
    scheduling for diffusion models") equals scaling the mask by √factor before noising and renormalising the
    variance; unlike :func:`rescale_terminal` it also makes the first steps noisier when the factor is < 1.
    """
    ac = alphas_cumprod_of(betas)
    target = _check_terminal(alpha_bar_T, 1.0)
    snr = ac / (1.0 - ac)
    factor = (target / (1.0 - target)) / snr[-1]
    shifted = factor * snr
    return betas_from_alphas_cumprod(shifted / (1.0 + shifted))


def _check_terminal(alpha_bar_T: float, upper: float) -> float:
    if not 0.0 < alpha_bar_T < upper:
        raise ValueError(
            f"alpha_bar_T={alpha_bar_T!r} must lie in (0, {upper:.6g}): a positive terminal ᾱ below the first "
            "step's. ᾱ_T = 0 (zero terminal SNR) leaves an ε-predicting network no way to give x0; use e.g. 1e-6."
        )
    return float(alpha_bar_T)


def adapt_terminal(betas: np.ndarray, alpha_bar_T: float, method: str = "rescale") -> np.ndarray:
    """``betas`` with ᾱ_{T-1} moved to ``alpha_bar_T`` by ``method`` ('rescale', 'snr_shift'; 'none': as given)."""
    if method == "none":
        return np.asarray(betas, dtype=np.float64)
    if method == "rescale":
        return rescale_terminal(betas, alpha_bar_T)
    if method == "snr_shift":
        return shift_snr(betas, alpha_bar_T)
    raise ValueError(f"Unknown terminal method {method!r}; choose one of {TERMINAL_METHODS}.")


@flax.struct.dataclass
class Schedule:
    """All per-timestep quantities of a discrete Gaussian diffusion, index t = 0..T-1 (float32 arrays).

    ``alphas_cumprod[t]`` is ᾱ_t of the noise level the network sees when trained with integer timestep t
    (improved-diffusion convention: x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε with ᾱ_0 = 1 - β_0).
    """

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (static: taken from an array shape)."""
        return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray) -> Schedule:
    """Derives every quantity in float64 from ``betas`` and casts once to float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError(
            f"betas must be a 1-D array in (0, 1], got shape {betas.shape}, "
            f"range [{betas.min()}, {betas.max()}]"
        )
    alphas = 1.0 - betas
    ac = alphas_cumprod_of(betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at t = 0; improved-diffusion clips its log with the value at t = 1.
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
    arrays = dict(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_logvar,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def get_schedule(name: str = "linear", num_timesteps: int = 1000, **kwargs) -> Schedule:
    """Builds a :class:`Schedule` from a registered beta schedule name (``linear``, ``cosine``, ...)."""
    if name not in BETA_SCHEDULES:
        raise ValueError(
            f"Unknown beta schedule {name!r}; known: {sorted(BETA_SCHEDULES)}. "
            "Add one with diffseg_jax.diffusion.register_beta_schedule."
        )
    return schedule_from_betas(BETA_SCHEDULES[name](num_timesteps, **kwargs))
