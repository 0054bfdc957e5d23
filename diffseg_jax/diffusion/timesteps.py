"""Which timesteps training sees, and how much each counts: loss weights, importance sampling, loss-aware sampling.

The training objective is ``E_{t ~ U{0..T-1}} [w(t) L_t]`` (``w = 1``: the published codes). Drawing t from a
proposal ``p`` instead and multiplying each example's loss by ``w(t) / (T p(t))`` keeps that objective (the
importance-sampling correction); only the variance of the estimate changes. Three pieces:

* :func:`derivative_weights`: ``w(t) ∝ |d error / dt|`` of a mask prediction error curve, smoothed, floored
  and normalised to mean 1 over t, the weighting Öttl et al. propose in their conclusion and never test: small
  where the noisy mask gives away everything (error flat near 0) or nothing (error flat at its limit).
* :func:`sample_timesteps` and :func:`importance_factor`: t from any proposal, with the matching correction.
  Sampling from ``p = w / T`` with weights w is the weighted objective with factor 1 for every example.
* The loss-aware sampler of improved DDPM (Nichol & Dhariwal 2021; openai/improved-diffusion ``resample.py``,
  ``LossSecondMomentResampler``): ``p(t) ∝ sqrt(E[L_t²])`` over the last ``history`` losses seen at each t,
  mixed with ``uniform_prob`` of the uniform distribution, and uniform until every t has a full history. Its
  history is a pytree in the train state (:func:`init_loss_history`, :func:`update_loss_history`), so it is
  jitted, sharded and checkpointed with the rest of the run.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ("uniform", "fingerprint")
SAMPLINGS = ("uniform", "fingerprint", "loss_aware")


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` samples; near the ends the window shrinks to the samples present.

    ``window <= 1`` returns the values unchanged (as float64); a window longer than the curve is cut to its length.
    """
    values = np.asarray(values, np.float64)
    if window <= 1 or len(values) < 2:
        return values
    kernel = np.ones(min(int(window), len(values)))  # a longer kernel would lengthen the 'same' convolution
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def derivative_weights(
    ts: np.ndarray, errors: np.ndarray, num_timesteps: int, smoothing: int = 50, floor: float = 0.1
) -> np.ndarray:
    """Loss weights (T,) ∝ |d error/dt| of a curve sampled at ``ts``, floored at ``floor`` x their mean; mean 1.

    The curve is interpolated linearly onto every t = 0..T-1, smoothed over ``smoothing`` timesteps (a centred
    moving average), differentiated (central differences), and its absolute value divided by its mean; values
    below ``floor`` are raised to it (no timestep is dropped: the floor keeps every noise level trained) and
    the result is divided by its mean, so that ``sum_t w(t) = T`` and a uniform draw of t keeps the loss scale.
    """
    ts = np.asarray(ts, np.float64)
    errors = np.asarray(errors, np.float64)
    if ts.ndim != 1 or ts.shape != errors.shape or len(ts) < 2:
        raise ValueError(f"Need a curve of at least two points, got ts {ts.shape} and errors {errors.shape}.")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor={floor!r}: use a fraction of the mean weight in [0, 1).")
    order = np.argsort(ts)
    curve = np.interp(np.arange(num_timesteps), ts[order], errors[order])
    slope = np.abs(np.gradient(moving_average(curve, smoothing)))
    if not np.isfinite(slope).all() or slope.mean() <= 0:
        raise ValueError("The error curve is flat (or not finite): it gives no timestep weighting.")
    weights = np.maximum(slope / slope.mean(), floor)
    return weights / weights.mean()


def sample_timesteps(
    key: jax.Array, batch_size: int, probs: jnp.ndarray | None, num_timesteps: int
) -> jnp.ndarray:
    """``batch_size`` timesteps, uniform (``probs`` None) or drawn from the distribution ``probs`` (T,)."""
    if probs is None:
        return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
    return jax.random.categorical(key, jnp.log(probs), shape=(batch_size,)).astype(jnp.int32)


def importance_factor(t: jnp.ndarray, probs: jnp.ndarray | None) -> jnp.ndarray:
    """``1 / (T p(t))``: with it, the mean over t ~ p equals the mean over uniform t (1 where ``probs`` is None)."""
    if probs is None:
        return jnp.ones(t.shape, jnp.float32)
    return 1.0 / (probs.shape[0] * probs[t])


@flax.struct.dataclass
class LossHistory:
    """The last ``history`` losses seen at each timestep (a ring buffer) and how many were seen (capped)."""

    losses: jnp.ndarray  # (T, history) float32
    counts: jnp.ndarray  # (T,) int32: losses seen at t, at most `history`
    position: jnp.ndarray  # (T,) int32: next slot of the ring buffer at t


def init_loss_history(num_timesteps: int, history: int = 10) -> LossHistory:
    """An empty history (improved DDPM keeps ``history_per_term=10`` losses per timestep)."""
    return LossHistory(
        losses=jnp.zeros((num_timesteps, history), jnp.float32),
        counts=jnp.zeros((num_timesteps,), jnp.int32),
        position=jnp.zeros((num_timesteps,), jnp.int32),
    )


def update_loss_history(state: LossHistory, t: jnp.ndarray, losses: jnp.ndarray) -> LossHistory:
    """Records the (unweighted) per-example ``losses`` at timesteps ``t``, in batch order (repeats included).

    A ring buffer replaces improved DDPM's shift-and-append; the second moment it feeds does not depend on the
    order of the stored losses, so both give the same sampler.
    """
    history = state.losses.shape[1]

    def record(s, item):
        ti, li = item
        slot = s.position[ti]
        return (
            LossHistory(
                losses=s.losses.at[ti, slot].set(li),
                counts=s.counts.at[ti].set(jnp.minimum(s.counts[ti] + 1, history)),
                position=s.position.at[ti].set((slot + 1) % history),
            ),
            None,
        )

    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
    state, _ = jax.lax.scan(record, state, (t.astype(jnp.int32), losses))
    return state


def loss_aware_probs(state: LossHistory, uniform_prob: float = 0.001) -> jnp.ndarray:
    """p(t) ∝ sqrt(mean of the stored L_t²), mixed with ``uniform_prob`` of uniform; uniform until warmed up."""
    num_timesteps, history = state.losses.shape
    uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(state.losses), axis=1))
    total = jnp.sum(rms)
    probs = rms / jnp.where(total > 0, total, 1.0)
    probs = (1.0 - uniform_prob) * probs + uniform_prob * uniform
    warmed_up = jnp.all(state.counts >= history) & (total > 0)
    return jnp.where(warmed_up, probs, uniform)
