"""Small image operations the augmentations share: uniform draws in a range and bilinear sampling of a channel."""

from __future__ import annotations

import jax


def uniform(key: jax.Array, bounds: tuple[float, float], shape: tuple[int, ...] = ()) -> jax.Array:
    return jax.random.uniform(key, shape, minval=bounds[0], maxval=bounds[1])


def bilinear(channel: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Samples a (H, W) array at float pixel coordinates, zeros outside (grid_sample 'zeros', bilinear)."""
    return jax.scipy.ndimage.map_coordinates(channel, [rows, cols], order=1, mode="constant", cval=0.0)
