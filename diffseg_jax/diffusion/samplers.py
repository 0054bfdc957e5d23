"""Reverse-process samplers (DDPM ancestral, DDIM) as single compiled ``lax.scan`` loops, and ensembles.

A *model function* ``model_fn(x_t, t) -> output`` closes over parameters and the conditioning image; ``t`` is
the integer training timestep, shape (B,), that produced the noise level of ``x_t`` — also under DDIM,
where the network sees the original t of each visited step (as improved-diffusion's respacing wrapper
does). ``prediction`` says what the output is: ``'eps'`` (E2, E4), ``'x0'`` (E3) or ``'v'``
(``objective.prediction``). With
``variance='learned_range'`` the output carries twice the channels, [prediction, v], as in improved DDPM.

``self_condition=True`` (beyond the paper; Chen, Zhang & Hinton 2022, "Analog Bits", arXiv 2208.04202): the
network takes x_t with the previous step's clipped x̂0 as extra channels after it (zeros at the first step), as a
network trained with ``objective.self_condition`` expects.

All samplers are pure: call them inside ``jax.jit`` (the loop over timesteps is one ``lax.scan`` and compiles
the model once, unlike the published codes' Python loops). Per-step noise comes from
``jax.random.fold_in(key, t)``, so a sample is reproducible from its key.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffseg_jax.diffusion import gaussian
from diffseg_jax.diffusion.schedule import Schedule

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
FIXED_VARIANCES = ("fixed_large", "fixed_small")  # config diffusion.variance (learned: diffusion.learn_sigma)
VARIANCES = (*FIXED_VARIANCES, "learned_range")


def model_x0_eps(
    schedule: Schedule,
    out: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    prediction: str = "eps",
    clip_range: tuple[float, float] | None = (-1.0, 1.0),
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Turns a network output into (x0, ε) estimates; x0 is clipped to ``clip_range`` when given.

    ``prediction``: what the output is, 'eps', 'x0' or 'v' (:data:`gaussian.PREDICTIONS`). When x0 is clipped,
    ε is re-derived from the clipped x0 (as improved-diffusion's DDIM does), so both stay consistent with x_t;
    unclipped, each comes from the output by :func:`gaussian.x0_eps_from_prediction`.
    """
    x0, eps = gaussian.x0_eps_from_prediction(prediction, schedule, x_t, t, out)
    if clip_range is not None:
        x0 = jnp.clip(x0, *clip_range)
        eps = gaussian.predict_eps_from_x0(schedule, x_t, t, x0)
    return x0, eps


def _with_extras(
    model_fn: ModelFn, shape: tuple[int, ...], variances: tuple[str, ...], self_condition: bool = False
):
    """Wraps ``model_fn`` to always return (output, extras) and gives zero extras of the right structure.

    A network may return ``(output, extras)`` (MedSegDiff's ``cal`` head); samplers carry the extras of the
    latest call so that those of the final step can be returned. Its output must have x's channels, or twice
    as many with a learned variance: ``variances`` says which of the two the sampler takes; any other output is
    refused here, by its shape, instead of failing (or broadcasting) inside the scan. A self-conditioned network
    takes twice x's channels (x_t and the previous x̂0).
    """

    def fn(x, t):
        out = model_fn(x, t)
        return out if isinstance(out, tuple) else (out, {})

    in_shape = (*shape[:-1], 2 * shape[-1]) if self_condition else shape
    abstract = jax.eval_shape(
        fn, jax.ShapeDtypeStruct(in_shape, jnp.float32), jax.ShapeDtypeStruct((shape[0],), jnp.int32)
    )
    c = shape[-1]
    allowed = [(*shape[:-1], 2 * c if v == "learned_range" else c) for v in variances]
    if tuple(abstract[0].shape) not in allowed:
        raise ValueError(
            f"The network returns {tuple(abstract[0].shape)} for x of shape {tuple(shape)}; the sampler takes "
            f"{' or '.join(map(str, allowed))}. A network built with learn_sigma (twice the channels: the "
            "prediction and the variance v) samples with variance='learned_range' (config: "
            "diffusion.learn_sigma=True), one without it with a fixed variance."
        )
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract[1])
    return fn, zeros


def _model_input(x: jnp.ndarray, x0_prev) -> jnp.ndarray:
    """x, or x with the previous x̂0 as extra channels when self-conditioning (``x0_prev`` is then an array)."""
    return x if isinstance(x0_prev, tuple) else jnp.concatenate([x, x0_prev], axis=-1)


def _split_output(out: jnp.ndarray, variance: str) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    if variance == "learned_range":
        mean_out, v = jnp.split(out, 2, axis=-1)
        return mean_out, v
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    return out, None


def step_log_variance(
    schedule: Schedule, t: jnp.ndarray, shape, variance: str, v: jnp.ndarray | None
) -> jnp.ndarray:
    """log σ_t² of p(x_{t-1} | x_t) for the fixed or learned-range variance of improved DDPM.

    With ``learned_range`` the network's extra channel v ∈ [-1, 1] interpolates in log space between the
    clipped posterior variance (v = -1) and β_t (v = 1).
    """
    if variance == "fixed_small":
        return gaussian.extract(schedule.posterior_log_variance_clipped, t, shape)
    if variance == "fixed_large":
        # improved-diffusion's FIXED_LARGE: β_t, with the posterior variance at t = 1 in place of β_0.
        large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
        return gaussian.extract(jnp.log(large), t, shape)
    frac = (v + 1.0) / 2.0
    min_log = gaussian.extract(schedule.posterior_log_variance_clipped, t, shape)
    max_log = gaussian.extract(jnp.log(schedule.betas), t, shape)
    return frac * max_log + (1.0 - frac) * min_log


def ddpm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_large",
    clip_range: tuple[float, float] | None = (-1.0, 1.0),
    return_trajectory: bool = False,
    return_extras: bool = False,
    self_condition: bool = False,
):
    """Ancestral DDPM sampling over all T steps, t = T-1 … 0, from x_T ~ N(0, I).

    Returns the final x (the clipped x0 estimate at t = 0, where no noise is added) or, with
    ``return_trajectory``, ``(x, {'x': (T, *shape), 'x0': (T, *shape), 't': (T,)})`` in visiting order.
    With ``return_extras`` the extras the network returned at the last step (t = 0) are appended.
    ``self_condition``: feed the previous step's x̂0 (see the module docstring).
    """
    num_t = schedule.num_timesteps
    init_key, step_key = jax.random.split(key)
    x_init = jax.random.normal(init_key, shape)
    fn, zero_extras = _with_extras(model_fn, shape, (variance,), self_condition)
    x0_init = jnp.zeros(shape, jnp.float32) if self_condition else ()

    def step(carry, t):
        x, _, x0_prev = carry
        tb = jnp.full((shape[0],), t, dtype=jnp.int32)
        raw, extras = fn(_model_input(x, x0_prev), tb)
        out, v = _split_output(raw, variance)
        x0, _ = model_x0_eps(schedule, out, x, tb, prediction=prediction, clip_range=clip_range)
        mean, _, _ = gaussian.q_posterior(schedule, x0, x, tb)
        log_var = step_log_variance(schedule, tb, shape, variance, v)
        noise = jax.random.normal(jax.random.fold_in(step_key, t), shape)
        x_prev = mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * noise
        carry = (x_prev, extras, x0 if self_condition else x0_prev)
        return carry, ((x_prev, x0, t) if return_trajectory else None)

    ts = jnp.arange(num_t - 1, -1, -1, dtype=jnp.int32)
    (x, extras, _), traj = jax.lax.scan(step, (x_init, zero_extras, x0_init), ts)
    return _result(x, traj, extras, return_trajectory, return_extras)


def _result(x, traj, extras, return_trajectory: bool, return_extras: bool):
    out = (x,)
    if return_trajectory:
        out += ({"x": traj[0], "x0": traj[1], "t": traj[2]},)
    if return_extras:
        out += (extras,)
    return out[0] if len(out) == 1 else out


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """K integer timesteps spread evenly over [0, T-1], both ends included, increasing; K = 1 is T-1 alone.

    The samplers start from pure noise, x_T ~ N(0, I), which is what the network sees in training at t = T-1
    only, so a single step must be taken there: it returns the network's x0 estimate from noise and the image.
    (Until 2026-12-07, K = 1 gave t = 0, a call on pure noise as if it were an almost clean mask.)"""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"DDIM num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.asarray([num_timesteps - 1], np.int32)
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32))


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_large",
    clip_range: tuple[float, float] | None = (-1.0, 1.0),
    return_trajectory: bool = False,
    return_extras: bool = False,
    self_condition: bool = False,
):
    """DDIM (Song et al. 2021) over K of the T timesteps; ``eta`` = 0 is deterministic, 1 ≈ DDPM.

    The visited timesteps are :func:`ddim_timesteps` (T-1 and 0 included), the network is called with each
    one's integer training t, and the last step returns the clipped x0 estimate at t = 0. A learned variance
    channel, if present, is ignored (DDIM defines its own σ).

    σ_k = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev) (Song et al., Eq. 16): with η = 1 over all T steps this is
    DDPM's posterior standard deviation (``fixed_small``), and with η = 0 a sample is a function of x_T alone.
    Stochastic few-step sampling (η > 0, K ≤ 10) keeps an x0 network's members diverse (issue 33).
    ``self_condition``: feed the previous step's x̂0 (see the module docstring).
    """
    del variance  # DDIM's σ comes from eta; a learned-variance channel is dropped below.
    ts = ddim_timesteps(schedule.num_timesteps, num_steps)
    ts_prev = np.concatenate([[-1], ts[:-1]]).astype(np.int32)
    init_key, step_key = jax.random.split(key)
    x_init = jax.random.normal(init_key, shape)
    ac_ext = jnp.concatenate([schedule.alphas_cumprod, jnp.ones((1,), jnp.float32)])  # index -1 → ᾱ = 1
    fn, zero_extras = _with_extras(model_fn, shape, ("fixed_large", "learned_range"), self_condition)
    x0_init = jnp.zeros(shape, jnp.float32) if self_condition else ()

    def step(carry, ts_pair):
        x, _, x0_prev = carry
        t, t_prev = ts_pair
        tb = jnp.full((shape[0],), t, dtype=jnp.int32)
        out, extras = fn(_model_input(x, x0_prev), tb)
        if out.shape[-1] == 2 * shape[-1]:
            out = out[..., : shape[-1]]
        x0, eps = model_x0_eps(schedule, out, x, tb, prediction=prediction, clip_range=clip_range)
        ab, ab_prev = ac_ext[t], ac_ext[t_prev]
        sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        noise = jax.random.normal(jax.random.fold_in(step_key, t), shape)
        x_prev = (
            jnp.sqrt(ab_prev) * x0
            + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * eps
            + jnp.where(t_prev >= 0, sigma, 0.0) * noise
        )
        carry = (x_prev, extras, x0 if self_condition else x0_prev)
        return carry, ((x_prev, x0, t) if return_trajectory else None)

    (x, extras, _), traj = jax.lax.scan(
        step, (x_init, zero_extras, x0_init), (jnp.asarray(ts[::-1]), jnp.asarray(ts_prev[::-1]))
    )
    return _result(x, traj, extras, return_trajectory, return_extras)


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample}


def ensemble_sample(
    sample_fn: Callable[[jax.Array], jnp.ndarray],
    key: jax.Array,
    num_members: int,
    member_chunk: int | None = None,
) -> jnp.ndarray:
    """Draws ``num_members`` independent samples, ``sample_fn(key_i)``, stacked on a new leading axis.

    Members are vmapped; with ``member_chunk`` only that many run at once (``lax.map`` over chunks), which
    bounds memory for large ensembles (e.g. 25 members of a 256-px model).
    """
    keys = jax.random.split(key, num_members)
    if member_chunk is None or member_chunk >= num_members:
        return jax.vmap(sample_fn)(keys)
    return jax.lax.map(sample_fn, keys, batch_size=member_chunk)


def ensemble_statistics(probs: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Per-pixel mean and standard deviation over the leading member axis of foreground values in [0,1]."""
    return {"mean": probs.mean(axis=0), "std": probs.std(axis=0)}


# Test-time augmentation: the dihedral transforms of a square image, as (rot90 count, flip); 'flips' is the
# subgroup of flips (identity, both axes = rotation by 180°, width, height), 'd4' all eight.
TTA_TRANSFORMS = {
    "none": ((0, False),),
    "flips": ((0, False), (2, False), (0, True), (2, True)),
    "d4": tuple((r, f) for f in (False, True) for r in range(4)),
}


def dihedral(x: jnp.ndarray, rotations: int, flip: bool, inverse: bool = False) -> jnp.ndarray:
    """``x`` (..., H, W, C) flipped along W (if ``flip``) and then turned ``rotations`` x 90°; or back."""
    if not inverse:
        x = jnp.flip(x, -2) if flip else x
        return jnp.rot90(x, rotations, axes=(-3, -2))
    x = jnp.rot90(x, -rotations, axes=(-3, -2))
    return jnp.flip(x, -2) if flip else x
