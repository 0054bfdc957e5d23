"""A dataset's fingerprint without a trained network: the best local-average posterior denoiser per timestep.

Beyond the paper (which needs three trained architectures per dataset for Fig. 4): a cheap curve with the same
meaning, computable in seconds before any training. For a binary mask x0 = 2m - 1 and a window of k x k pixels
that is assumed to be all foreground or all background, the sum s of x_t over the window is Gaussian with mean
n sqrt(abar) x0 and variance n (1 - abar) (n = pixels in the window), so the exact posterior foreground
probability under the prior "foreground with the dataset's rate pi" is

    p = sigmoid(logit(pi) + 2 sqrt(abar_t) s / (1 - abar_t)).

k = 1 is the exact posterior mean of an independent-pixel prior; larger k trades resolution for noise
suppression, which pays off for large smooth objects (lesions) and fails for small ones (nuclei). For each t the
window with the lowest error over the masks given is kept (an oracle choice within the family, as the trained
fingerprints also measure a fitted denoiser). The error is the mask prediction error of
`diffseg_jax.analysis.curves` (MSE in [0, 1], averaged over pixels, images and noise draws): at large t it tends
to pi (1 - pi), where every denoiser predicts the rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffseg_jax import diffusion

WINDOWS = (1, 3, 5, 9, 17, 33)
# Floats one chunk of timesteps may hold in window sums (masks x draws x windows x timesteps): 16 masks of
# 256 px with 2 draws and 6 windows held 13.2 GB on the CPU 50 timesteps at once and 1.8 GB 5 at once; this
# budget takes them one at a time.
CHUNK_FLOATS = 2e7


def box_sum(x: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum over the k x k window centred on each pixel, number of pixels in it), zero padding at borders."""
    r = k // 2
    pad = jnp.pad(x, [(0, 0), (r + 1, r), (r + 1, r), (0, 0)])
    c = jnp.cumsum(jnp.cumsum(pad, axis=1), axis=2)
    h, w = x.shape[1], x.shape[2]
    s = c[:, k:, k:] - c[:, :h, k:] - c[:, k:, :w] + c[:, :h, :w]
    ones = jnp.ones((1, h, w, 1), x.dtype)
    pad1 = jnp.pad(ones, [(0, 0), (r + 1, r), (r + 1, r), (0, 0)])
    c1 = jnp.cumsum(jnp.cumsum(pad1, axis=1), axis=2)
    n = c1[:, k:, k:] - c1[:, :h, k:] - c1[:, k:, :w] + c1[:, :h, :w]
    return s, n


def windows_for(size: int) -> tuple[int, ...]:
    """:data:`WINDOWS` and further odd windows 65, 129, ... that still fit in ``size`` px images."""
    windows, k = list(WINDOWS), 65
    while k <= size:
        windows.append(k)
        k = 2 * k - 1
    return tuple(windows)


def foreground_prior(
    masks: jnp.ndarray, foreground_rate: float | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(rate, its logit): the masks' foreground rate (or ``foreground_rate``), clipped away from 0 and 1."""
    rate = jnp.mean(masks) if foreground_rate is None else jnp.asarray(foreground_rate, jnp.float32)
    rate = jnp.clip(rate, 1e-6, 1 - 1e-6)
    return rate, jnp.log(rate) - jnp.log1p(-rate)


def window_errors(
    alpha_bar: jnp.ndarray,
    masks: jnp.ndarray,
    key: jax.Array,
    *,
    windows: tuple[int, ...] = WINDOWS,
    num_draws: int = 1,
    foreground_rate: float | None = None,
) -> jnp.ndarray:
    """Mask prediction error (len(windows),) of each window's posterior denoiser at noise level ᾱ = ``alpha_bar``.

    ``masks`` (B, H, W, 1) in {0, 1}; averaged over ``num_draws`` noise draws from ``key``. Jittable in
    ``alpha_bar``, so it can be evaluated at any noise level, not only a schedule's.
    """
    masks = masks.astype(jnp.float32)
    x0 = 2.0 * masks - 1.0
    _, prior = foreground_prior(masks, foreground_rate)
    a = jnp.asarray(alpha_bar, jnp.float32)

    def draw(k):
        noise = jax.random.normal(k, x0.shape)
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
        errs = []
        for w in windows:
            s, _ = box_sum(x_t, w)
            p = jax.nn.sigmoid(prior + 2.0 * jnp.sqrt(a) * s / (1.0 - a))
            errs.append(jnp.mean((p - masks) ** 2))
        return jnp.stack(errs)

    return jax.vmap(draw)(jax.random.split(key, num_draws)).mean(0)


def chunk_size(mask_floats: int, num_windows: int, num_draws: int, cap: int | None = None) -> int:
    """Timesteps per chunk that keep its window sums near :data:`CHUNK_FLOATS` floats: at least 1, at most ``cap``."""
    sized = int(CHUNK_FLOATS // max(1, mask_floats * num_windows * num_draws))
    return max(1, min(cap, sized) if cap else sized)


def equivalent_alpha_bar(alpha_bar: jnp.ndarray, mask_range: str = "symmetric") -> jnp.ndarray:
    """The ᾱ' at which symmetric masks (2m - 1) are as noisy as masks of ``mask_range`` at ᾱ.

    A binary mask m diffused as x_t = √ᾱ m + √(1-ᾱ) ε gives (2 x_t - √ᾱ)/D = √ᾱ' (2m - 1) + √(1-ᾱ') ε with
    D² = ᾱ + 4 (1 - ᾱ) and ᾱ' = ᾱ / D²: an invertible map of x_t, so every posterior denoiser's error is that of
    the symmetric case at ᾱ', whose SNR ᾱ'/(1 - ᾱ') is a quarter of ᾱ/(1 - ᾱ).
    """
    if mask_range == "symmetric":
        return alpha_bar
    if mask_range == "binary":
        return alpha_bar / (alpha_bar + 4.0 * (1.0 - alpha_bar))
    raise ValueError(f"mask_range must be one of {diffusion.MASK_RANGES}, got {mask_range!r}")


def model_free_curve(
    schedule: diffusion.Schedule,
    masks: jnp.ndarray,
    ts: jnp.ndarray,
    key: jax.Array,
    *,
    windows: tuple[int, ...] = WINDOWS,
    num_draws: int = 1,
    t_chunk: int | None = None,
    foreground_rate: float | None = None,
    mask_range: str = "symmetric",
) -> dict[str, jnp.ndarray]:
    """``{'mask_error': (len(ts),), 'window': (len(ts),), 'errors': (len(ts), len(windows))}`` for {0,1} masks.

    ``mask_range`` ('symmetric': 2m - 1, or 'binary': m, as ``diffusion.mask_range``) is the diffused mask's
    range: the binary one is the symmetric one at a quarter of the SNR (:func:`equivalent_alpha_bar`).

    ``masks`` (B, H, W, 1); ``foreground_rate`` defaults to the masks' own rate. Noise at t comes from
    ``fold_in(key, t)`` as in :func:`diffseg_jax.analysis.curves.timestep_curves`. Timesteps are evaluated
    :func:`chunk_size` at a time (``t_chunk`` caps it); the chunking does not change the values.
    """
    abar = equivalent_alpha_bar(jnp.asarray(schedule.alphas_cumprod, jnp.float32), mask_range)

    def at_t(t):
        return window_errors(
            abar[t],
            masks,
            jax.random.fold_in(key, t),
            windows=windows,
            num_draws=num_draws,
            foreground_rate=foreground_rate,
        )

    ts = jnp.asarray(ts, jnp.int32)
    chunk = min(len(ts), chunk_size(masks.size, len(windows), num_draws, t_chunk))
    errors = jax.lax.map(at_t, ts, batch_size=chunk)
    best = jnp.argmin(errors, axis=1)
    return {
        "mask_error": jnp.min(errors, axis=1),
        "window": jnp.asarray(windows)[best],
        "errors": errors,
    }
