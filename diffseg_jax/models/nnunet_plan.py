"""nnU-Net v2's experiment planning reduced to 2D natural images: a dataset fingerprint in, a plan out.

Follows ``nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py`` (``ExperimentPlanner``:
``get_plans_for_configuration`` for the ``2d`` configuration, ``network_topology.get_pool_and_conv_props``) and
``dynamic_network_architectures`` 0.4.4 (``PlainConvUNet.compute_conv_feature_map_size``, the VRAM estimate) of
nnU-Net **v2.8.1**, with the planner's defaults (8 GB target, 32 base features, at most 512, two convolutions per
stage, feature maps of at least 4 px, at least 2 images per batch, at most 5 % of the dataset per batch).

For 2D natural images nnU-Net's image reader gives every pixel the spacing 1 in both axes, so the spacing-driven
rules reduce to: pool an axis while it is at least 8 px (12 px when it is the only one left), 3x3 kernels
everywhere. The plan is a pure function of the fingerprint (median image size, number of training images,
channels); nothing here reads data. ``tests/test_nnunet.py`` pins plans computed by the official planner.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

# ExperimentPlanner.__init__ of nnU-Net v2.8.1 (2D values).
PLANNER_DEFAULTS = dict(
    base_features=32,  # UNet_base_num_features
    max_features=512,  # UNet_max_features_2d
    gpu_memory_gb=8.0,  # gpu_memory_target_in_gb
    min_feature_map_size=4,  # UNet_featuremap_min_edge_length
    min_batch_size=2,  # UNet_min_batch_size
    max_dataset_covered=0.05,  # a batch sees at most 5 % of the dataset's pixels
    convs_per_stage=2,  # UNet_blocks_per_stage_encoder / _decoder
)
REFERENCE_VRAM_2D = 85_000_000  # UNet_reference_val_2d: feature-map elements at 8 GB ...
REFERENCE_GB = 8  # UNet_reference_val_corresp_GB
REFERENCE_BATCH_2D = 12  # ... and batch 12 (UNet_reference_val_corresp_bs_2d)
INITIAL_PATCH_PIXELS_2D = 2048**2  # the planner starts from a 2048^2 patch clipped to the median shape


@dataclasses.dataclass(frozen=True)
class Plan:
    """A 2D nnU-Net plan: the patch and batch size and the PlainConvUNet that goes with them."""

    patch_size: tuple[int, int]
    batch_size: int | None  # None: not known here (planned from the training set's size at start-up)
    features_per_stage: tuple[int, ...]
    strides: tuple[tuple[int, int], ...]
    kernel_sizes: tuple[tuple[int, int], ...]
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    vram_estimate: int  # feature-map elements of one image (compute_conv_feature_map_size)
    vram_reference: float  # what the GPU target allows for batch REFERENCE_BATCH_2D

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    def architecture(self) -> dict:
        """The model's keyword arguments (``diffseg_jax.models.nnunet.NNUNet``)."""
        return dict(
            features_per_stage=self.features_per_stage,
            strides=self.strides,
            kernel_sizes=self.kernel_sizes,
            n_conv_per_stage=self.n_conv_per_stage,
            n_conv_per_stage_decoder=self.n_conv_per_stage_decoder,
        )


def pad_to_multiple(shape: Sequence[float], multiple: Sequence[int]) -> tuple[int, ...]:
    """Each side rounded up to a multiple (``network_topology.pad_shape``: a side already a multiple stays)."""
    return tuple(int(math.ceil(s / m) * m) if s % m else int(s) for s, m in zip(shape, multiple))


def topology(patch_size: Sequence[float], min_feature_map_size: int = 4):
    """Pooling per axis, strides, kernel sizes and the padded patch (``get_pool_and_conv_props`` at spacing 1).

    Returns ``(num_pool_per_axis, strides, kernel_sizes, patch_size, must_be_divisible_by)``; ``strides`` starts
    with (1, 1) (the first stage does not downsample) and there is one kernel size per stage.
    """
    dim = len(patch_size)
    size = [float(s) for s in patch_size]
    num_pool = [0] * dim
    strides = [(1,) * dim]
    while True:
        axes = [d for d in range(dim) if size[d] >= 2 * min_feature_map_size]
        # A single remaining axis is only pooled while it is at least 3x the minimum edge.
        if not axes or (len(axes) == 1 and size[axes[0]] < 3 * min_feature_map_size):
            break
        for d in axes:
            num_pool[d] += 1
            size[d] = math.ceil(size[d] / 2)
        strides.append(tuple(2 if d in axes else 1 for d in range(dim)))
    divisible_by = tuple(2**n for n in num_pool)
    kernel_sizes = ((3,) * dim,) * len(strides)  # isotropic spacing: 3x3 from the first stage on
    return num_pool, tuple(strides), kernel_sizes, pad_to_multiple(patch_size, divisible_by), divisible_by


def features_per_stage(n_stages: int, base_features: int = 32, max_features: int = 512) -> tuple[int, ...]:
    """Features double per stage from ``base_features`` up to ``max_features``."""
    return tuple(min(max_features, base_features * 2**i) for i in range(n_stages))


def feature_map_size(
    patch_size: Sequence[int],
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    n_conv_per_stage: Sequence[int],
    n_conv_per_stage_decoder: Sequence[int],
    num_classes: int,
    deep_supervision: bool = False,
) -> int:
    """Elements of every conv feature map of PlainConvUNet for one image: nnU-Net's VRAM proxy.

    Encoder: each convolution's output; decoder: its convolutions, the transposed convolution and the
    segmentation output at each skip's size (every head with ``deep_supervision``, else the last one only, as
    the planner instantiates the network).
    """
    total = 0
    size = list(patch_size)
    skip_sizes = []
    for f, stride, n in zip(features, strides, n_conv_per_stage):
        size = [s // st for s, st in zip(size, stride)]
        total += n * f * math.prod(size)
        skip_sizes.append(size)
    n_dec = len(features) - 1
    for s in range(n_dec):  # from the lowest resolution up
        size, f = skip_sizes[-(s + 2)], features[-(s + 2)]
        total += (n_conv_per_stage_decoder[s] + 1) * f * math.prod(size)  # convs + transposed conv
        if deep_supervision or s == n_dec - 1:
            total += num_classes * math.prod(size)
    return int(total)


def plan_2d(
    median_size: Sequence[float],
    num_images: int,
    channels: int,
    num_classes: int = 2,
    base_features: int = PLANNER_DEFAULTS["base_features"],
    max_features: int = PLANNER_DEFAULTS["max_features"],
    gpu_memory_gb: float = PLANNER_DEFAULTS["gpu_memory_gb"],
) -> Plan:
    """nnU-Net v2.8.1's 2D plan for images of median size (H, W), ``num_images`` training images.

    ``num_classes`` counts the background (nnU-Net's ``labels``: 2 for a binary mask); it only enters the VRAM
    estimate through the segmentation output. ``channels`` is kept for the record: the planner's estimate
    counts no input channels.
    """
    del channels  # compute_conv_feature_map_size does not count the input
    median = [float(s) for s in median_size]
    if len(median) != 2 or min(median) <= 0:
        raise ValueError(f"median_size must be a positive (H, W), got {tuple(median_size)}.")
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}.")
    d = PLANNER_DEFAULTS
    min_fm, n_conv = d["min_feature_map_size"], d["convs_per_stage"]

    def build(patch):
        _, strides, kernels, patch, divisible = topology(patch, min_fm)
        n = len(strides)
        feats = features_per_stage(n, base_features, max_features)
        arch = (feats, strides, kernels, (n_conv,) * n, (n_conv,) * (n - 1))
        estimate = feature_map_size(patch, feats, strides, arch[3], arch[4], num_classes)
        return list(patch), divisible, arch, estimate

    # Aspect ratio from the spacing (1, 1), scaled to 2048^2 pixels, clipped to the median shape.
    initial = [min(round(math.sqrt(INITIAL_PATCH_PIXELS_2D)), m) for m in median]
    patch, divisible, arch, estimate = build(initial)
    if len(arch[0]) < 2:
        raise ValueError(f"Images of median size {tuple(median_size)} are too small to pool once (< 8 px).")
    reference = REFERENCE_VRAM_2D * gpu_memory_gb / REFERENCE_GB
    # Shrink the axis that is largest relative to the median (the later axis on ties) until two images fit.
    while estimate / REFERENCE_BATCH_2D * 2 > reference:
        ratios = [p / m for p, m in zip(patch, median)]
        axis = max(range(len(patch)), key=lambda i: (ratios[i], i))
        trial = list(patch)
        trial[axis] -= divisible[axis]
        _, _, _, _, divisible_after = topology(trial, min_fm)  # recomputed so no valid size is skipped
        patch[axis] -= divisible_after[axis]
        patch, divisible, arch, estimate = build(patch)
    batch = round(reference / estimate * REFERENCE_BATCH_2D)
    # At most 5 % of the dataset's pixels per batch, at least 2 images.
    dataset_pixels = math.prod(median) * num_images
    batch_5_percent = round(dataset_pixels * d["max_dataset_covered"] / math.prod(patch))
    batch = max(min(batch, batch_5_percent), d["min_batch_size"])
    feats, strides, kernels, n_enc, n_dec = arch
    return Plan(
        patch_size=(int(patch[0]), int(patch[1])),
        batch_size=int(batch),
        features_per_stage=tuple(feats),
        strides=tuple(tuple(s) for s in strides),
        kernel_sizes=tuple(tuple(k) for k in kernels),
        n_conv_per_stage=tuple(n_enc),
        n_conv_per_stage_decoder=tuple(n_dec),
        vram_estimate=int(estimate),
        vram_reference=float(reference),
    )


def format_plan(plan: Plan, fingerprint: str | None = None) -> str:
    """The plan as the few lines printed at the start of training."""
    lines = [
        "nnU-Net 2D plan (nnU-Net v2.8.1 planner rules)" + (f" for {fingerprint}" if fingerprint else "")
    ]
    batch = "from the training set" if plan.batch_size is None else plan.batch_size
    lines.append(
        f"  patch size {plan.patch_size[0]}x{plan.patch_size[1]}, batch size {batch}, {plan.n_stages} stages"
    )
    lines.append(f"  features per stage {list(plan.features_per_stage)}")
    lines.append(f"  strides {[list(s) for s in plan.strides]}")
    lines.append(f"  kernel sizes {[list(k) for k in plan.kernel_sizes]}")
    lines.append(
        f"  convs per stage: encoder {list(plan.n_conv_per_stage)}, decoder {list(plan.n_conv_per_stage_decoder)}"
    )
    if plan.vram_estimate:
        lines.append(
            f"  VRAM estimate {plan.vram_estimate:,} feature-map elements per image "
            f"(reference {plan.vram_reference:,.0f} at batch {REFERENCE_BATCH_2D})"
        )
    return "\n".join(lines)
