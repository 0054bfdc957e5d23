"""SegDiff's MoNuSeg augmentation (tomeramit/SegDiff's loader): torchvision's RandomAffine(22°, scale 0.75-1.25)
with the mask resampled nearest, and ColorJitter(0.4, 0.4, 0.4, 0.1) in a random order, in JAX so that it runs
jitted inside the train step (``data.augment='segdiff'``; registry in ``diffseg_jax.data.augment``)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffseg_jax.data import image_ops


@dataclasses.dataclass(frozen=True)
class SegDiffParams:
    degrees: float = 22.0
    scale: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1


SEGDIFF_MONUSEG = SegDiffParams()


GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def affine_nearest_mask(
    image: jax.Array, mask: jax.Array, angle: jax.Array, zoom: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """torchvision's ``affine`` with rotation ``angle`` (radians) and ``scale=zoom`` about the centre (zoom > 1
    enlarges the content): output pixel p samples the input at R(-angle)(p - c)/zoom + c, the image bilinearly
    and the mask by its nearest pixel, 0 outside."""
    h, w = image.shape[:2]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij"
    )
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rows = (cos * yy - sin * xx) / zoom + cy
    cols = (sin * yy + cos * xx) / zoom + cx
    new_image = jax.vmap(lambda c: image_ops.bilinear(c, rows, cols), in_axes=-1, out_axes=-1)(image)
    nearest = jax.scipy.ndimage.map_coordinates(
        mask[..., 0], [jnp.round(rows), jnp.round(cols)], order=0, mode="constant", cval=0.0
    )
    return new_image, nearest[..., None].astype(mask.dtype)


def grayscale(image: jax.Array) -> jax.Array:
    """(H, W, 1) luminance of an RGB image (torchvision's weights); a one-channel image as it is."""
    if image.shape[-1] != 3:
        return image[..., :1]
    return jnp.sum(image * jnp.asarray(GRAY_WEIGHTS, image.dtype), axis=-1, keepdims=True)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with the mean grey level of the whole image (torchvision)."""
    return jnp.clip(factor * image + (1.0 - factor) * jnp.mean(grayscale(image)), 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with the image's grey version; a no-op on other than 3 channels, as torchvision."""
    if image.shape[-1] != 3:
        return image
    return jnp.clip(factor * image + (1.0 - factor) * grayscale(image), 0.0, 1.0)


def rgb_to_hsv(image: jax.Array) -> jax.Array:
    """torchvision's ``_rgb2hsv`` on (..., 3) values in [0, 1]: hue in [0, 1)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc, minc = jnp.max(image, -1), jnp.min(image, -1)
    equal = maxc == minc
    span = maxc - minc
    s = span / jnp.where(equal, 1.0, maxc)
    div = jnp.where(equal, 1.0, span)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = jnp.where(maxc == r, bc - gc, 0.0)
    hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc], -1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """torchvision's ``_hsv2rgb``."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = jnp.mod(i, 6).astype(jnp.int32)
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    table = jnp.stack(
        [
            jnp.stack([v, t, p], -1),
            jnp.stack([q, v, p], -1),
            jnp.stack([p, v, t], -1),
            jnp.stack([p, q, v], -1),
            jnp.stack([t, p, v], -1),
            jnp.stack([v, p, q], -1),
        ]
    )
    return jnp.take_along_axis(table, i[None, ..., None], axis=0)[0]


def adjust_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotate the hue by ``shift`` (a fraction of the circle); a no-op on other than 3 channels."""
    if image.shape[-1] != 3:
        return image
    hsv = rgb_to_hsv(jnp.clip(image, 0.0, 1.0))
    return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0)))


def color_jitter(key: jax.Array, image: jax.Array, params: SegDiffParams = SEGDIFF_MONUSEG) -> jax.Array:
    """torchvision's ColorJitter: brightness, contrast, saturation factors ~ U(max(0, 1 - x), 1 + x), hue shift
    ~ U(-hue, hue), the four applied in a random order."""
    k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)

    def factor(k, x):
        return image_ops.uniform(k, (max(0.0, 1.0 - x), 1.0 + x))

    b, c, sat = factor(k_b, params.brightness), factor(k_c, params.contrast), factor(k_s, params.saturation)
    hue = image_ops.uniform(k_h, (-params.hue, params.hue))
    ops = [
        lambda x: adjust_brightness(x, b),
        lambda x: adjust_contrast(x, c),
        lambda x: adjust_saturation(x, sat),
        lambda x: adjust_hue(x, hue),
    ]
    order = jax.random.permutation(k_order, 4)
    for i in range(4):
        image = jax.lax.switch(order[i], ops, image)
    return image


def segdiff_example(
    key: jax.Array, image: jax.Array, mask: jax.Array, params: SegDiffParams = SEGDIFF_MONUSEG
) -> tuple[jax.Array, jax.Array]:
    """SegDiff's RandomAffine then ColorJitter for an (H, W, C) image in [0, 1] and its (H, W, 1) mask."""
    k_angle, k_zoom, k_jitter = jax.random.split(key, 3)
    angle = image_ops.uniform(k_angle, (-math.radians(params.degrees), math.radians(params.degrees)))
    image, mask = affine_nearest_mask(image, mask, angle, image_ops.uniform(k_zoom, params.scale))
    return color_jitter(k_jitter, image, params), mask


def segdiff_batch(
    key: jax.Array, batch: dict[str, jax.Array], params: SegDiffParams = SEGDIFF_MONUSEG
) -> dict[str, jax.Array]:
    """:func:`segdiff_example` on every example of ``batch``, own key each."""
    keys = jax.random.split(key, batch["image"].shape[0])
    image, mask = jax.vmap(lambda k, x, m: segdiff_example(k, x, m, params))(
        keys, batch["image"], batch["mask"]
    )
    return {**batch, "image": image, "mask": mask}
