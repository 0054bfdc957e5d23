"""Per-timestep curves of a trained network (Öttl et al., Sec. 4.2-4.3, Figs. 3 and 4), jitted and vmapped.

For clean targets x0 and every t of a grid, the network sees x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and
its output gives both an estimate of x0 and of eps (E2/E4 predict eps, E3 predicts x0, or what
``objective.prediction`` says; the other follows from the forward process). Two curves come out of one network
call per (t, image, noise draw):

* **mask prediction error** (Fig. 3 left, Fig. 4): MSE between the true mask and the estimated mask, both mapped
  to [0, 1] (the estimate x0_hat clipped to the diffusion range first, as the samplers do), so 0 is perfect and
  predicting the dataset's foreground rate everywhere scores rate * (1 - rate);
* **eps loss** (Fig. 3 middle and right): the training loss ||eps - eps_hat||^2 averaged over pixels (Eq. 1/3).

For a run with Bernoulli diffusion (BerDiff, ``diffusion.process='bernoulli'``), :func:`bernoulli_timestep_curves`
gives the same mask prediction error with the masks noised as that run was trained: x_t ~ B(ᾱ_t x0 + (1 − ᾱ_t)/2),
x̂0 = P(x0 = 1) from the network's logits. It is a different curve from the Gaussian one (the noise destroys the
mask at another pace), named ``bernoulli_mask_error`` so that Fig. 4 does not average it with the paper's.

Timesteps are mapped with `lax.map` in chunks of `t_chunk` (memory bounded) and noise draws vmapped; the noise
at timestep t is drawn from `fold_in(key, t)`, so any grid or chunking gives the same value at the same t.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffseg_jax import diffusion
from diffseg_jax.diffusion import bernoulli

OutFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t) -> eps or x0 prediction


def timestep_curves(
    out_fn: OutFn,
    schedule: diffusion.Schedule,
    x0: jnp.ndarray,
    ts: jnp.ndarray,
    key: jax.Array,
    *,
    prediction: str = "eps",
    mask_range: str = "symmetric",
    num_draws: int = 1,
    t_chunk: int | None = None,
    clip: bool = True,
) -> dict[str, jnp.ndarray]:
    """``{'mask_error', 'eps_loss'}``, each (len(ts), B): per timestep and image, averaged over noise draws.

    ``x0`` (B, H, W, C) is in diffusion space (masks 2m - 1 for ``mask_range='symmetric'``); ``out_fn`` is
    the network with its conditioning bound, returning ``prediction`` ('eps', 'x0' or 'v') for (x_t, t).
    """
    if prediction not in diffusion.PREDICTIONS:
        raise ValueError(f"prediction must be one of {diffusion.PREDICTIONS}, got {prediction!r}")
    batch = x0.shape[0]
    axes = tuple(range(1, x0.ndim))
    truth = diffusion.diffusion_to_prob(x0, mask_range)

    def one_draw(t, k):
        t_vec = jnp.full((batch,), t, jnp.int32)
        noise = jax.random.normal(k, x0.shape, x0.dtype)
        x_t = diffusion.q_sample(schedule, x0, t_vec, noise)
        out = out_fn(x_t, t_vec)[..., : x0.shape[-1]]  # drop a learned-variance channel
        x0_hat, eps_hat = diffusion.x0_eps_from_prediction(prediction, schedule, x_t, t_vec, out)
        if clip:
            x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
        estimate = diffusion.diffusion_to_prob(x0_hat, mask_range)
        return jnp.mean((estimate - truth) ** 2, axes), jnp.mean((eps_hat - noise) ** 2, axes)

    def at_t(t):
        keys = jax.random.split(jax.random.fold_in(key, t), num_draws)
        err, loss = jax.vmap(lambda k: one_draw(t, k))(keys)
        return err.mean(0), loss.mean(0)

    err, loss = jax.lax.map(at_t, jnp.asarray(ts, jnp.int32), batch_size=t_chunk)
    return {"mask_error": err, "eps_loss": loss}


def bernoulli_timestep_curves(
    out_fn: OutFn,
    schedule: diffusion.Schedule,
    mask: jnp.ndarray,
    ts: jnp.ndarray,
    key: jax.Array,
    *,
    prediction: str = "x0",
    num_draws: int = 1,
    t_chunk: int | None = None,
) -> dict[str, jnp.ndarray]:
    """``{'bernoulli_mask_error'}``, (len(ts), B): per timestep and image, averaged over noise draws, the MSE
    between the {0, 1} ``mask`` (B, H, W, C) and the network's P(x0 = 1) when it sees x_t ~ q(x_t | x0) of
    Bernoulli diffusion (:func:`diffseg_jax.diffusion.bernoulli.q_sample`). ``out_fn`` takes x_t in {0, 1} (it maps
    it to the network's input itself) and returns the logits of ``prediction`` ('x0' or 'eps'). 0 is perfect;
    predicting the foreground rate everywhere scores rate * (1 - rate), as for the Gaussian curve."""
    if prediction not in bernoulli.PREDICTIONS:
        raise ValueError(f"prediction must be one of {bernoulli.PREDICTIONS}, got {prediction!r}")
    batch = mask.shape[0]
    axes = tuple(range(1, mask.ndim))

    def one_draw(t, k):
        t_vec = jnp.full((batch,), t, jnp.int32)
        x_t = bernoulli.q_sample(schedule, mask, t_vec, k)
        out = out_fn(x_t, t_vec)[..., : mask.shape[-1]]
        x0_hat, _ = bernoulli.x0_eps_from_output(prediction, x_t, out)
        return jnp.mean((x0_hat - mask) ** 2, axes)

    def at_t(t):
        keys = jax.random.split(jax.random.fold_in(key, t), num_draws)
        return jax.vmap(lambda k: one_draw(t, k))(keys).mean(0)

    err = jax.lax.map(at_t, jnp.asarray(ts, jnp.int32), batch_size=t_chunk)
    return {"bernoulli_mask_error": err}
