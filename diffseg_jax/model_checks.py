"""Config checks of the ``model`` group: known arguments of the chosen architecture, UNet sizes and widths that the
network can build, SegFormer's variant. Called by ``diffseg_jax.validation.validate``."""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import ml_collections

from diffseg_jax import configlib, data, hub, models, objectives
from diffseg_jax.models import layers, segformer


def check_unet_size(config: ml_collections.ConfigDict) -> None:
    """A diffusion UNet halves its input len(channel_mult) - 1 times (MedSegDiff's condition network
    len(cond_features) times): the training size, and whole-image evaluation's stored size, must allow it."""
    m = config.model
    if m.get("channel_mult", None) is None or m.get("plan", None) is not None:
        return
    halvings = len(m.channel_mult) - 1
    if m.get("cond_features", None) is not None and objectives.uses_image_condition(config.experiment):
        halvings = max(halvings, len(m.cond_features))
    factor = 2**halvings
    check_sizes_divisible(
        config,
        factor,
        lambda size: (
            f"{m.name} halves its input {halvings} times (model.channel_mult"
            f"{', model.cond_features' if factor > 2 ** (len(m.channel_mult) - 1) else ''}): use a multiple "
            f"of {factor} px, e.g. {max(factor, size // factor * factor)}."
        ),
    )


def check_sizes_divisible(config: ml_collections.ConfigDict, factor: int, fix) -> None:
    """The training size, and whole-image evaluation's stored size, must be multiples of ``factor`` (what the
    network downsamples by); ``fix(size)`` is the message's fix for a size that is not."""
    sizes = {"data.image_size": config.data.image_size}
    if config.data.eval_tiling == "whole":
        sizes["data.resize"] = data.stored_size(config.data)
    for key, size in sizes.items():
        if size % factor:
            configlib.fail(key, size, fix(size))


def check_unet_widths(config: ml_collections.ConfigDict) -> None:
    """The guided-diffusion UNets normalise with 32 groups (GroupNorm32), so every level's width must be a
    multiple of 32, and split attention into heads of ``num_head_channels`` where it is set."""
    m = config.model
    if m.get("channel_mult", None) is None or m.get("model_channels", None) is None:
        return
    widths = [m.model_channels * mult for mult in m.channel_mult]
    if m.model_channels < 1 or any(w % 32 for w in widths):
        configlib.fail(
            "model.model_channels",
            m.model_channels,
            f"Every level's width (model_channels x channel_mult: {widths}) must be a multiple of 32, the "
            "GroupNorm groups of the guided-diffusion UNet; e.g. 32, 64 or 128.",
        )
    head = m.get("num_head_channels", -1)
    attention = [w for i, w in enumerate(widths) if 2**i in m.get("attention_resolutions", ())]
    attention.append(widths[-1])  # the middle block attends at the lowest resolution
    if head != -1 and (head < 1 or any(w % head for w in attention)):
        configlib.fail(
            "model.num_head_channels",
            head,
            f"The attention layers' widths {sorted(set(attention))} must be multiples of it; use a divisor of "
            "them (the published configs: 64), or -1 to split by model.num_heads.",
        )


def check_train_step_forms(config: ml_collections.ConfigDict) -> None:
    """Issue 31's options of the guided-diffusion UNets (``model.remat_policy``, ``model.norm_impl``,
    ``model.attention_impl``): known values, a policy only with remat on, cuDNN attention only where it
    runs."""
    m = config.model
    policy = m.get("remat_policy", "nothing")
    if policy not in layers.REMAT_POLICIES:
        configlib.fail(
            "model.remat_policy",
            policy,
            f"Choose one of {layers.REMAT_POLICIES} (what model.remat=True keeps for the backward pass: "
            "nothing, the ResBlocks' convolution outputs, or every convolution and matmul output).",
        )
    if policy != "nothing" and not m.get("remat", False):
        configlib.fail(
            "model.remat_policy",
            policy,
            "It says what rematerialisation keeps, but model.remat=False: set --config.model.remat=True "
            "too, or leave remat_policy='nothing'.",
        )
    norm = m.get("norm_impl", "float32")
    if norm not in layers.NORM_IMPLS:
        configlib.fail(
            "model.norm_impl",
            norm,
            f"Choose one of {layers.NORM_IMPLS}: the GroupNorm in float32 (published), or only its "
            "statistics in float32 and the normalisation in the compute dtype.",
        )
    attention = m.get("attention_impl", "explicit")
    if attention not in layers.ATTENTION_IMPLS:
        configlib.fail(
            "model.attention_impl",
            attention,
            f"Choose one of {layers.ATTENTION_IMPLS}: the explicit softmax(QK^T)V (published), "
            "jax.nn.dot_product_attention, or its cuDNN fused kernel.",
        )
    if attention == "cudnn":
        _check_cudnn_attention(m)


def _check_cudnn_attention(m: ml_collections.ConfigDict) -> None:
    """cuDNN's fused attention: an NVIDIA GPU, a bf16 compute dtype, heads of at most 256 channels (Hopper;
    128 before), a multiple of 8; jax would otherwise fail deep in tracing."""
    fix = "use model.attention_impl='dot_product' (the same numbers through XLA)"
    if m.get("dtype", "float32") != "bfloat16":
        configlib.fail(
            "model.attention_impl",
            "cudnn",
            f"cuDNN attention needs model.dtype='bfloat16'; set it, or {fix}.",
        )
    if jax.default_backend() != "gpu":  # the process's backend: where this run computes
        configlib.fail(
            "model.attention_impl",
            "cudnn",
            f"cuDNN attention runs only on an NVIDIA GPU, and this process's backend is "
            f"{jax.default_backend()}: {fix}.",
        )
    if m.get("channel_mult", None) is None or m.get("model_channels", None) is None:
        return
    widths = [m.model_channels * mult for mult in m.channel_mult]
    attention = {w for i, w in enumerate(widths) if 2**i in m.get("attention_resolutions", ())} | {widths[-1]}
    head, up = m.get("num_head_channels", -1), m.get("num_heads_upsample", -1)
    head_counts = [m.get("num_heads", 1)] + ([up] if up != -1 else [])  # the decoder's heads may differ
    sizes = {head} if head != -1 else {w // n for w in attention for n in head_counts}
    bad = sorted(size for size in sizes if size % 8 or size > 256)
    if bad:
        configlib.fail(
            "model.attention_impl",
            "cudnn",
            "cuDNN's fused attention takes heads of at most 256 channels (128 before Hopper), a multiple "
            f"of 8; this model's attention has heads of {bad} channels (model_channels x channel_mult / "
            f"num_heads). {fix[0].upper() + fix[1:]}, or more heads (model.num_head_channels=64 changes the "
            "published model).",
        )


# Arguments of a model class that its config group may leave out: set by the code (out_channels, image_size),
# fixed by the class (MedSegDiff's version), or optional, with the default every published config keeps.
_OPTIONAL_MODEL_ARGS = {
    "parent",
    "name",
    "out_channels",
    "image_size",
    "version",
    "num_heads_upsample",
    "mlp_ratio",
    "dtype",
    "remat",
    "remat_policy",
    "norm_impl",
    "attention_impl",
}


def check_model_group(config: ml_collections.ConfigDict) -> None:
    """The model group must hold its architecture's settings: ``--config.model.name=segdiff`` on a config built
    for EnsemDiff would otherwise build a hybrid (EnsemDiff's widths, SegDiff's defaults for the rest, no
    published scheme) without a word, or fail on a keyword deep in Flax."""
    name = config.model.name
    args = {f.name for f in dataclasses.fields(models.MODELS[name])}
    keys = set(config.model.keys()) - set(configlib.MODEL_SETTINGS)
    foreign, missing = sorted(keys - args), sorted(args - keys - _OPTIONAL_MODEL_ARGS)
    if foreign or missing:
        held = [f"{', '.join(foreign)} of another architecture"] if foreign else []
        held += [f"none of {name}'s {', '.join(missing)}"] if missing else []
        raise configlib.ConfigError(
            f"Invalid config: model.name={name!r}, but the model group holds {' and '.join(held)}, as when "
            "--config.model.name is overridden on a config built for another model. Choose the architecture "
            f"with the config file's argument, --config configs/<file>.py:{name} (e.g. e2_isic.py:segdiff, "
            "e1_monuseg.py:nnunet), which brings the architecture's published widths and training scheme."
        )


def check_segformer(m: ml_collections.ConfigDict) -> None:
    """SegFormer's variant and depthwise-conv form, named here rather than deep in Flax at start-up."""
    if m.variant not in segformer.VARIANTS:
        configlib.fail(
            "model.variant", m.variant, f"Choose one of {sorted(segformer.VARIANTS)} (SegFormer-B0..B5)."
        )
    if m.depthwise not in segformer.DEPTHWISE_IMPLS:
        configlib.fail(
            "model.depthwise",
            m.depthwise,
            "Choose 'shift' (shifted multiply-adds, fast under XLA) or 'conv' (nn.Conv, HF's grouped conv); "
            "the same parameters and outputs.",
        )
    pretrained = hub.requested(m.get("pretrained", None))
    if pretrained is None:
        return
    if not os.path.exists(os.path.expanduser(pretrained)) and not hub.is_repo_id(pretrained):
        configlib.fail(
            "model.pretrained",
            pretrained,
            "No such file, and not a Hugging Face Hub repo id (owner/name, e.g. nvidia/mit-b3). Pass a weights "
            "file (.safetensors, .bin/.pt/.pth, .npz) or a repo id, or None for random initialisation.",
        )
    mit = re.fullmatch(r"nvidia/mit-(b\d)", pretrained)
    if mit and mit.group(1) != m.variant:
        configlib.fail(
            "model.pretrained",
            pretrained,
            f"It is the SegFormer-{mit.group(1).upper()} encoder but model.variant={m.variant!r}: set "
            f"--config.model.pretrained=nvidia/mit-{m.variant} (or --config.model.variant={mit.group(1)}).",
        )
