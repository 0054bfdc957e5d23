"""The four experiments of Öttl et al. as ONE loss over sampled timesteps.

=====  ==========================  ===================  ==================  ==========================
exp.   network input x              conditioning image   target              loss
=====  ==========================  ===================  ==================  ==========================
E1     N(0, I) noise of the mask's  the image            the mask (logits)   Dice + binary CE, equal
       shape, in place of x_t                                                weight (feed-forward)
E2     x_t of the mask              the image            ε                   ‖ε − ε_θ‖², Eq. (3)
E3     x_t of the mask              none (withheld)      x0 (the mask)       ‖x0 − x̂0_θ‖², Eq. (2)
E4     x_t of the image             none                 ε                   ‖ε − ε_θ‖², Eq. (1)
=====  ==========================  ===================  ==================  ==========================

Masks enter diffusion space through :func:`diffseg_jax.diffusion.mask_to_diffusion` (``mask_range``);
images are in [0, 1] as conditions and mapped to [-1, 1] when they are the diffused variable (E4).
Timesteps are drawn uniformly from {0, …, T-1}; ``t_weights`` (shape (T,)) reweights the per-example
losses. E1 feeds the timestep ``e1_timestep`` (default T-1: the noise it sees is distributed as x_T).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffseg_jax import diffusion

EXPERIMENTS = ("e1", "e2", "e3", "e4")
# apply_fn(params, x, t, cond_or_None, rng) -> network output; rng feeds dropout when training.
ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray | None, jax.Array], jnp.ndarray]


def prediction_type(experiment: str) -> str:
    """What the network's output means: 'logits' (E1), 'eps' (E2, E4) or 'x0' (E3)."""
    return {"e1": "logits", "e2": "eps", "e3": "x0", "e4": "eps"}[_check(experiment)]


def uses_image_condition(experiment: str) -> bool:
    """Whether the network is given the image as a condition (E1, E2) or not (E3, E4)."""
    return _check(experiment) in ("e1", "e2")


def _check(experiment: str) -> str:
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {EXPERIMENTS}, got {experiment!r}")
    return experiment


def diffused_variable(
    batch: dict[str, jnp.ndarray], experiment: str, mask_range: str = "symmetric"
) -> jnp.ndarray:
    """x0 in diffusion space: the mask (E1–E3) or the image mapped to [-1, 1] (E4)."""
    if _check(experiment) == "e4":
        return 2.0 * batch["image"] - 1.0
    return diffusion.mask_to_diffusion(batch["mask"], mask_range)


def soft_dice_loss(logits: jnp.ndarray, target: jnp.ndarray, smooth: float = 1.0) -> jnp.ndarray:
    """1 − soft Dice of sigmoid(logits) against a {0,1} target, per example (all but axis 0 pooled)."""
    probs = jax.nn.sigmoid(logits)
    axes = tuple(range(1, logits.ndim))
    inter = jnp.sum(probs * target, axis=axes)
    denom = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def per_example_mse(pred: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """Mean squared error over all non-batch axes (improved-diffusion's ``mean_flat``)."""
    return jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))


def loss_fn(
    apply_fn: ApplyFn,
    params: Any,
    batch: dict[str, jnp.ndarray],
    key: jax.Array,
    schedule: diffusion.Schedule,
    *,
    experiment: str,
    mask_range: str = "symmetric",
    t_weights: jnp.ndarray | None = None,
    e1_timestep: int | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The unified training loss for E1–E4 on one batch; returns (scalar loss, aux).

    ``batch`` holds ``image`` (B,H,W,C) in [0,1] and ``mask`` (B,H,W,1) in {0,1}. ``aux`` carries the
    sampled ``t`` and the unweighted ``per_example`` losses (the raw material of per-timestep loss curves).
    """
    _check(experiment)
    t_key, noise_key, drop_key = jax.random.split(key, 3)
    num_t = schedule.num_timesteps
    x0 = diffused_variable(batch, experiment, mask_range)
    batch_size = x0.shape[0]
    cond = batch["image"] if uses_image_condition(experiment) else None

    if experiment == "e1":
        t = jnp.full((batch_size,), num_t - 1 if e1_timestep is None else e1_timestep, jnp.int32)
        x_in = jax.random.normal(noise_key, x0.shape)
        logits = apply_fn(params, x_in, t, cond, drop_key)
        per_example = soft_dice_loss(logits, batch["mask"]) + jnp.mean(
            optax.sigmoid_binary_cross_entropy(logits, batch["mask"]), axis=tuple(range(1, logits.ndim))
        )
    else:
        t = jax.random.randint(t_key, (batch_size,), 0, num_t, dtype=jnp.int32)
        noise = jax.random.normal(noise_key, x0.shape)
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        out = apply_fn(params, x_t, t, cond, drop_key)
        target = x0 if prediction_type(experiment) == "x0" else noise
        per_example = per_example_mse(out, target)

    weights = jnp.ones_like(per_example) if t_weights is None else t_weights[t]
    loss = jnp.mean(weights * per_example)
    return loss, {"t": t, "per_example": per_example}
