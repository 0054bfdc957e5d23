"""Training augmentations as pure, jittable JAX functions per example: nnU-Net's default 2D one, and SegDiff's
MoNuSeg one (:func:`segdiff_example`, ``data.augment='segdiff'``, at the end of this module).

Follows ``nnUNetTrainer.get_training_transforms`` and ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``
of nnU-Net **v2.8.1** and the batchgeneratorsv2 transforms they compose, in their order and with their
probabilities (``NNUNET_2D``):

=========================================  =====  ===============================================================
transform                                  p      parameters
=========================================  =====  ===============================================================
rotation (SpatialTransform)                0.2    angle ~ U(-180°, 180°) (U(-15°, 15°) if the patch's aspect > 1.5)
scaling (same transform, one matrix)       0.2    s ~ U(0.7, 1.4), both axes (>1 shrinks objects); elastic off
Gaussian noise                             0.1    σ ~ U(0, 0.1), one σ for all channels
Gaussian blur                              0.2    each channel with p 0.5, σ ~ U(0.5, 1) per channel and axis
multiplicative brightness                  0.15   per channel x ~ BGContrast(0.75, 1.25)
contrast (range preserved)                 0.15   per channel (x - mean)·c + mean, clipped to its [min, max]
simulate low resolution                    0.25   each channel with p 0.5: nearest down to ×U(0.5, 1), bilinear up
gamma of the inverted image                0.1    per channel γ ~ BGContrast(0.7, 1.5), mean and std retained
gamma                                      0.3    the same, not inverted
mirroring                                  0.5    per axis
=========================================  =====  ===============================================================

BGContrast(lo, hi) draws from U(lo, 1) or U(1, hi) with probability 1/2 each. Geometry: output pixel p samples
the input at A (p - c) + c, A = R(θ) S(s), c the image centre, bilinearly with zeros outside (torch
``grid_sample``, ``align_corners=False``); the mask is the label with the larger interpolated one-hot value
(ties to background), and 0 where the sample point falls outside the image (nnU-Net pads the segmentation with -1
and then maps -1 to 0). Masks therefore stay binary.

nnU-Net augments the z-score-normalised image (its preprocessing precedes the data loader), so the train step
normalises first when the model would normalise itself (``diffseg_jax.models.nnunet``).

Not reproduced: nnU-Net's data loader, which crops from a larger region so that rotations see real context (here
the image is the patch: corners fill with zeros, as nnU-Net's loader pads an image no larger than the patch)
and oversamples foreground in a third of each batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffseg_jax.data import image_ops, segdiff_augment


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of every transform (hashable: a static argument under ``jax.jit``)."""

    p_rotation: float = 0.2
    rotation: tuple[float, float] | None = None  # radians; None: nnU-Net's rule from the patch's aspect ratio
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_sigma: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_p_per_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.25
    low_resolution_p_per_channel: float = 0.5
    low_resolution_scale: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5  # per axis


NNUNET_2D = AugmentParams()
NONE = AugmentParams(**{f.name: 0.0 for f in dataclasses.fields(AugmentParams) if f.name.startswith("p_")})
BLUR_TRUNCATE = 6.0  # blur_dimension's truncate: kernel size = nearest odd of 6σ + 0.5
GAMMA_EPS = 1e-7
SEG_SCORE_SCALE = 1000.0  # batchgeneratorsv2 scales the label scores before casting them to float16


def rotation_range(height: int, width: int) -> tuple[float, float]:
    """nnU-Net's 2D rotation range: ±15° for patches with aspect ratio > 1.5, else ±180°."""
    degrees = 15.0 if max(height, width) / min(height, width) > 1.5 else 180.0
    return (-math.radians(degrees), math.radians(degrees))


def bg_contrast(key: jax.Array, bounds: tuple[float, float], shape: tuple[int, ...] = ()) -> jax.Array:
    """batchgeneratorsv2's BGContrast: U(lo, 1) or U(max(lo, 1), hi), each with probability 1/2 (if lo < 1)."""
    k_side, k_low, k_high = jax.random.split(key, 3)
    low = image_ops.uniform(k_low, (bounds[0], min(1.0, bounds[1])), shape)
    high = image_ops.uniform(k_high, (max(bounds[0], 1.0), bounds[1]), shape)
    use_low = (jax.random.uniform(k_side, shape) < 0.5) & (bounds[0] < 1.0)
    return jnp.where(use_low, low, high)


def spatial(
    image: jax.Array, mask: jax.Array, angle: jax.Array, scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Rotation by ``angle`` and scaling by ``scale`` about the centre; image bilinear, mask by label vote.

    The vote is batchgeneratorsv2's (0.3.6) for a segmentation padded with the label -1: each label scores the
    bilinear interpolation of its indicator (×1000, in float16), the padding label 1 - (weight inside the image);
    the highest score wins, ties go to the lower label unless the nearest neighbour's label is among the tied.
    The padding label then becomes background, as nnU-Net's ``RemoveLabelTansform(-1, 0)`` does.
    """
    h, w = image.shape[:2]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij"
    )
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # A = R S acting on (row, col) column vectors, as batchgeneratorsv2's create_affine_matrix_2d.
    rows = scale * (cos * yy - sin * xx) + cy
    cols = scale * (sin * yy + cos * xx) + cx
    sample = jax.vmap(lambda c: image_ops.bilinear(c, rows, cols), in_axes=-1, out_axes=-1)
    new_image = sample(image)

    m = mask[..., 0]
    fg = image_ops.bilinear(m, rows, cols)
    bg = image_ops.bilinear(1.0 - m, rows, cols)
    pad = 1.0 - image_ops.bilinear(jnp.ones_like(m), rows, cols)
    scores = (jnp.stack([pad, bg, fg]) * SEG_SCORE_SCALE).astype(jnp.float16)  # labels -1, 0, 1
    top = jnp.max(scores, axis=0)
    winner = jnp.argmax(scores, axis=0)  # the first maximum: the lower label
    # Nearest neighbour (grid_sample 'nearest': round half to even), -1 outside the image.
    r, c = jnp.round(rows), jnp.round(cols)
    outside = (r < 0) | (r > h - 1) | (c < 0) | (c > w - 1)
    nearest = jnp.where(
        outside,
        0,
        1
        + m[jnp.clip(r, 0, h - 1).astype(jnp.int32), jnp.clip(c, 0, w - 1).astype(jnp.int32)].astype(
            jnp.int32
        ),
    )
    nearest_score = jnp.take_along_axis(scores, nearest[None], axis=0)[0]
    label = jnp.where(nearest_score == top, nearest, winner)
    return new_image, (label == 2).astype(mask.dtype)[..., None]


def blur_taps(max_sigma: float) -> int:
    """An odd number of taps that holds the kernel of every σ ≤ ``max_sigma`` (7 for nnU-Net's σ ≤ 1)."""
    return 2 * math.floor(math.ceil(max_sigma * BLUR_TRUNCATE + 0.5) / 2) + 1


def _blur_kernel(sigma: jax.Array, taps: int) -> jax.Array:
    """batchgeneratorsv2's normalised Gaussian (``_build_kernel``) on ``taps`` taps, zero beyond its own size."""
    n = sigma * BLUR_TRUNCATE + 0.5
    rounded = jnp.round(n)  # half to even, as Python's round
    is_odd = jnp.mod(rounded, 2) == 1
    size = jnp.where(is_odd, rounded, jnp.where(n - rounded >= 0, rounded + 1, rounded - 1))
    half = (size - 1) / 2
    x = jnp.arange(taps, dtype=jnp.float32) - (taps - 1) / 2
    pdf = jnp.where(jnp.abs(x) <= half, jnp.exp(-0.5 * jnp.square(x / sigma)), 0.0)
    return pdf / jnp.sum(pdf)


def _blur_axis(channel: jax.Array, sigma: jax.Array, axis: int, taps: int) -> jax.Array:
    """1-D Gaussian along ``axis`` of a (H, W) array with reflect padding (``blur_dimension``)."""
    kernel = _blur_kernel(sigma, taps)
    pad = taps // 2
    moved = jnp.moveaxis(channel, axis, 0)
    padded = jnp.pad(moved, ((pad, pad), (0, 0)), mode="reflect")
    n = moved.shape[0]
    out = sum(kernel[i] * padded[i : i + n] for i in range(taps))
    return jnp.moveaxis(out, 0, axis)


def gaussian_blur(channel: jax.Array, sigmas: jax.Array, taps: int = 7) -> jax.Array:
    """Separable Gaussian blur of one (H, W) channel, σ per axis (sigmas: (2,)), σ ≤ the ``taps``' limit."""
    return _blur_axis(_blur_axis(channel, sigmas[0], 0, taps), sigmas[1], 1, taps)


def _nearest_exact_then_linear(size: int, low: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For one axis of length ``size`` downsampled to ``low`` pixels (nearest-exact) and upsampled back
    (linear, align_corners=False): the two source indices of every output pixel and the weight of the second."""
    scale_up = low / size  # low-res coordinate per output pixel
    src = jnp.maximum((jnp.arange(size, dtype=jnp.float32) + 0.5) * scale_up - 0.5, 0.0)
    i0 = jnp.floor(src).astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, low.astype(jnp.int32) - 1)
    lam = src - i0

    def original_index(
        k,
    ):  # nearest-exact: low-res pixel k holds original pixel floor((k + 0.5) * size / low)
        return jnp.minimum(jnp.floor((k + 0.5) * (size / low)).astype(jnp.int32), size - 1)

    return original_index(i0), original_index(i1), lam


def simulate_low_resolution(channel: jax.Array, scale: jax.Array) -> jax.Array:
    """Nearest-exact downsampling of a (H, W) channel to round(scale·size) and bilinear upsampling back."""
    out = channel
    for axis in (0, 1):
        size = channel.shape[axis]
        low = jnp.maximum(jnp.round(size * scale), 1.0)
        i0, i1, lam = _nearest_exact_then_linear(size, low)
        a, b = jnp.take(out, i0, axis=axis), jnp.take(out, i1, axis=axis)
        lam = lam[:, None] if axis == 0 else lam[None, :]
        out = a * (1 - lam) + b * lam
    return out


def gamma_transform(channel: jax.Array, gamma: jax.Array, invert: bool) -> jax.Array:
    """batchgeneratorsv2's GammaTransform on one channel with ``p_retain_stats`` 1 (torch's unbiased std)."""
    x = -channel if invert else channel
    mean, std = jnp.mean(x), jnp.std(x, ddof=1)
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    x = jnp.power((x - lo) / jnp.maximum(span, GAMMA_EPS), gamma) * span + lo
    x = (x - jnp.mean(x)) * (std / jnp.maximum(jnp.std(x, ddof=1), GAMMA_EPS)) + mean
    return -x if invert else x


def augment_example(
    key: jax.Array, image: jax.Array, mask: jax.Array, params: AugmentParams = NNUNET_2D
) -> tuple[jax.Array, jax.Array]:
    """One random draw of the augmentation for an (H, W, C) image and its (H, W, 1) binary mask."""
    h, w, c = image.shape
    keys = iter(jax.random.split(key, 32))

    def happens(p: float) -> jax.Array:
        return jax.random.uniform(next(keys)) < p

    def per_channel(p: float) -> jax.Array:
        return jax.random.uniform(next(keys), (c,)) < p

    def channels(fn, x, *args):  # fn on each (H, W) channel of x, with per-channel arguments
        return jax.vmap(fn, in_axes=(-1,) + (0,) * len(args), out_axes=-1)(x, *args)

    # Rotation and scaling: one affine resampling when either is drawn (none at all otherwise).
    do_rot, do_scale = happens(params.p_rotation), happens(params.p_scaling)
    angle = jnp.where(do_rot, image_ops.uniform(next(keys), params.rotation or rotation_range(h, w)), 0.0)
    scale = jnp.where(do_scale, image_ops.uniform(next(keys), params.scaling), 1.0)
    moved_image, moved_mask = spatial(image, mask, angle, scale)
    moved = do_rot | do_scale
    image = jnp.where(moved, moved_image, image)
    mask = jnp.where(moved, moved_mask, mask)

    # Gaussian noise: one σ for all channels, independent noise per channel.
    sigma = image_ops.uniform(next(keys), params.noise_sigma)
    noisy = image + sigma * jax.random.normal(next(keys), image.shape)
    image = jnp.where(happens(params.p_noise), noisy, image)

    # Gaussian blur: each channel with p_per_channel, σ per channel and axis.
    do_blur = happens(params.p_blur)
    chosen = per_channel(params.blur_p_per_channel)
    taps = blur_taps(params.blur_sigma[1])
    sigmas = image_ops.uniform(next(keys), params.blur_sigma, (c, 2))
    blurred = channels(lambda x, s: gaussian_blur(x, s, taps), image, sigmas)
    image = jnp.where(do_blur & chosen, blurred, image)

    # Multiplicative brightness, per channel.
    factor = bg_contrast(next(keys), params.brightness, (c,))
    image = jnp.where(happens(params.p_brightness), image * factor, image)

    # Contrast around each channel's mean, clipped to the channel's range.
    factor = bg_contrast(next(keys), params.contrast, (c,))
    mean = jnp.mean(image, axis=(0, 1))
    contrasted = jnp.clip(
        (image - mean) * factor + mean, jnp.min(image, axis=(0, 1)), jnp.max(image, axis=(0, 1))
    )
    image = jnp.where(happens(params.p_contrast), contrasted, image)

    # Simulated low resolution: each channel with p_per_channel, its own scale for both axes.
    do_low = happens(params.p_low_resolution)
    chosen = per_channel(params.low_resolution_p_per_channel)
    low = channels(
        simulate_low_resolution, image, image_ops.uniform(next(keys), params.low_resolution_scale, (c,))
    )
    image = jnp.where(do_low & chosen, low, image)

    # Gamma of the inverted image, then gamma: every channel, its own γ, mean and std retained.
    for p, invert in ((params.p_gamma_inverted, True), (params.p_gamma, False)):
        gammas = bg_contrast(next(keys), params.gamma, (c,))
        changed = channels(lambda x, g, inv=invert: gamma_transform(x, g, inv), image, gammas)
        image = jnp.where(happens(p), changed, image)

    # Mirroring, each axis with probability p_mirror; the mask follows.
    for axis in (0, 1):
        flip = happens(params.p_mirror)
        image = jnp.where(flip, jnp.flip(image, axis), image)
        mask = jnp.where(flip, jnp.flip(mask, axis), mask)
    return image, mask


def augment_batch(
    key: jax.Array, batch: dict[str, jax.Array], params: AugmentParams = NNUNET_2D
) -> dict[str, jax.Array]:
    """``augment_example`` on every example of ``batch`` ('image' (B,H,W,C), 'mask' (B,H,W,1)), own key each."""
    keys = jax.random.split(key, batch["image"].shape[0])
    image, mask = jax.vmap(lambda k, x, m: augment_example(k, x, m, params))(
        keys, batch["image"], batch["mask"]
    )
    return {**batch, "image": image, "mask": mask}


# --------------------------------------------------------------------------------------------------------------
# SegDiff's MoNuSeg training transform (tomeramit/SegDiff datasets/monu.py, torchvision 0.10): after the resize,
# crop and flips (here the data pipeline's, data.augment_flips), RandomAffine(degrees=22, scale=(0.75, 1.25)) on
# image and mask jointly (no translation or shear, fill 0; bilinear image, nearest mask), then ColorJitter(0.4,
# 0.4, 0.4, 0.1) on the image, its four adjustments in a random order, each with its own factor. Not reproduced:
# PIL's 8-bit rounding between the steps (float images here).


AUGMENTATIONS = {"none": None, "nnunet": NNUNET_2D, "segdiff": segdiff_augment.SEGDIFF_MONUSEG}


def for_training(name: str, model):
    """``(augment(key, batch) -> batch or None, the model to train)`` for ``data.augment=name``.

    A model that normalises its input itself (``normalize``, with a static ``normalize_images``: nnU-Net's
    z-score) is trained on images normalised here, before the augmentation, as nnU-Net augments normalised
    images; the model then runs with its own normalisation off. Evaluation keeps the model's normalisation.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"data.augment must be one of {sorted(AUGMENTATIONS)}, got {name!r}")
    params = AUGMENTATIONS[name]
    if params is None:
        return None, model
    if isinstance(
        params, segdiff_augment.SegDiffParams
    ):  # on the [0, 1] image; SegDiff's model normalises it afterwards
        return (lambda key, batch: segdiff_augment.segdiff_batch(key, batch, params)), model
    normalize = bool(getattr(model, "normalize", False))

    def augment(key: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        if normalize:
            batch = {**batch, "image": type(model).normalize_images(batch["image"])}
        return augment_batch(key, batch, params)

    return augment, (model.clone(normalize=False) if normalize else model)
