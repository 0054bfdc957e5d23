"""Segmentation metrics, pure jnp functions (jit/vmap friendly).

Each function pools **all pixels it is given**: call it on one image for a per-image value, on a stack for a
pooled value, or vmap it over images (:func:`per_image`) and average for the mean of per-image values.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def iou(pred_mask: jnp.ndarray, true_mask: jnp.ndarray, empty_value: float = 1.0) -> jnp.ndarray:
    """Intersection over union of two binary masks (any shape, truthy = foreground).

    When both masks are empty the IoU is undefined; ``empty_value`` (default 1: a correct empty
    prediction) is returned.
    """
    p, y = pred_mask.astype(bool), true_mask.astype(bool)
    inter = jnp.sum(p & y)
    union = jnp.sum(p | y)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), empty_value)


def dice(pred_mask: jnp.ndarray, true_mask: jnp.ndarray, empty_value: float = 1.0) -> jnp.ndarray:
    """Dice coefficient 2|P∩Y| / (|P| + |Y|) of two binary masks; ``empty_value`` when both are empty."""
    p, y = pred_mask.astype(bool), true_mask.astype(bool)
    denom = jnp.sum(p) + jnp.sum(y)
    return jnp.where(denom > 0, 2.0 * jnp.sum(p & y) / jnp.maximum(denom, 1), empty_value)


def per_image(metric: Callable[..., jnp.ndarray], *arrays: jnp.ndarray) -> jnp.ndarray:
    """Applies a pooled metric to each image of stacked arrays (leading axis = image)."""
    return jax.vmap(metric)(*arrays)
