"""The forward process of an image and its mask (Öttl et al., Fig. 2): both noised at chosen timesteps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffseg_jax import diffusion


def forward_process(
    schedule: diffusion.Schedule,
    image: np.ndarray,
    mask: np.ndarray,
    ts: tuple[int, ...],
    key: jax.Array,
) -> dict[str, np.ndarray]:
    """x_t of ``image`` (H, W, C in [0, 1]) and ``mask`` (H, W, 1 in {0, 1}) at each t, mapped back to [0, 1].

    Both are diffused in [-1, 1] (2x - 1) with one noise draw per variable shared across the timesteps, so
    the rows show the same noise growing. Returns ``{'t', 'image', 'mask'}`` with (len(ts), H, W, C) arrays
    clipped to [0, 1] for display.
    """
    t = jnp.asarray(ts, jnp.int32)
    k1, k2 = jax.random.split(key)
    out = {"t": np.asarray(ts)}
    for name, x, k in (("image", image, k1), ("mask", mask, k2)):
        x0 = 2.0 * jnp.asarray(x, jnp.float32)[None] - 1.0
        noise = jax.random.normal(k, x0.shape)
        x_t = diffusion.q_sample(schedule, jnp.repeat(x0, len(ts), 0), t, jnp.repeat(noise, len(ts), 0))
        out[name] = np.asarray(jnp.clip((x_t + 1.0) / 2.0, 0.0, 1.0))
    return out
