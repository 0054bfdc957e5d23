"""Config checks run at start-up, and config (de)serialisation.

Configs are locked ``ml_collections.ConfigDict`` objects (``configs/base.py``), so an override of an unknown
key fails in the flag parser; :func:`validate` then rejects values and combinations that cannot work,
naming the key, the value and a fix, before any data is built or compiled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re

import ml_collections

from diffseg_jax import data, diffusion, hub, models, objectives, writers
from diffseg_jax.data.augment import AUGMENTATIONS
from diffseg_jax.diffusion import timesteps
from diffseg_jax.models import segformer

COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config that cannot work (or does not fit the run it is used on); the message names the key and the fix."""


def _fail(key: str, value, fix: str):
    raise ConfigError(f"Invalid config: {key}={value!r}. {fix}")


def _validate_data(config: ml_collections.ConfigDict, check_data: bool) -> None:
    d = config.data
    if check_data and d.name not in data.MANUAL_DATASETS and d.get("manual_dir", None) is not None:
        _fail(
            "data.manual_dir",
            d.manual_dir,
            f"Dataset {d.name!r} is not read from a folder, so this folder would be ignored. For a folder of "
            f"images/ and masks/ set --config.data.name=segmentation_folder (or one of "
            f"{sorted(data.MANUAL_DATASETS)} for its official layout).",
        )
    if not d.image_size > 0:
        _fail(
            "data.image_size", d.image_size, "Use a positive size in pixels (e.g. 64, or 256 as the paper)."
        )
    if d.name == "synthetic":
        if d.get("kind", "lesion") not in data.synthetic.KINDS:
            _fail(
                "data.kind",
                d.kind,
                f"Choose one of {list(data.synthetic.KINDS)} ('lesion' ~ ISIC16, 'nuclei' ~ MoNuSeg, 'clusters' ~ "
                "HER2).",
            )
        for key in ("num_train", "num_test"):
            if d[key] < 1:
                _fail(f"data.{key}", d[key], "The synthetic dataset needs at least one image per split.")
    if check_data and d.name in data.DOWNLOADED_DATASETS and d.get("manual_dir", None) is None:
        url = d.get("download_base_url", None) or ""
        if not url.startswith(("http://", "https://")):
            _fail(
                "data.download_base_url",
                d.get("download_base_url", None),
                f"Dataset {d.name!r} is downloaded from this URL (the folder its official zips are in); give an "
                "http(s) URL, or an unpacked copy as --config.data.manual_dir.",
            )
    elif check_data and d.name in data.MANUAL_DATASETS:
        manual_dir = d.get("manual_dir", None)
        if manual_dir is None:
            _fail(
                "data.manual_dir",
                manual_dir,
                f"Dataset {d.name!r} is read from a folder: pass --config.data.manual_dir=/path/to/it.\n"
                + data.pipeline.MANUAL_INSTRUCTIONS[d.name],
            )
    manual_dir = d.get("manual_dir", None)
    if (
        check_data
        and d.name in data.MANUAL_DATASETS
        and manual_dir is not None
        and not os.path.isdir(os.path.expanduser(manual_dir))
    ):
        _fail(
            "data.manual_dir",
            manual_dir,
            "No such folder; pass the folder that holds the unpacked data.\n"
            + data.pipeline.MANUAL_INSTRUCTIONS[d.name],
        )
    scaling = d.get("image_scaling", "auto")
    if scaling not in data.files.IMAGE_SCALINGS:
        _fail("data.image_scaling", scaling, f"Choose one of {list(data.files.IMAGE_SCALINGS)}.")
    if scaling != "auto" and d.name != "segmentation_folder":
        _fail(
            "data.image_scaling",
            scaling,
            f"Dataset {d.name!r} stores 8-bit images as they are; the setting is for segmentation_folder "
            "datasets (and --mode predict of a run trained on one). Leave it at 'auto'.",
        )
    stored = data.stored_size(d)
    if stored < d.image_size:
        _fail("data.resize", d.resize, f"Store images at least at data.image_size={d.image_size} px.")
    if d.eval_tiling not in ("tiles", "whole"):
        _fail("data.eval_tiling", d.eval_tiling, "Choose 'tiles' or 'whole'.")
    if stored != d.image_size and d.eval_tiling == "tiles" and stored % d.image_size:
        _fail(
            "data.resize",
            d.resize,
            f"Tiled evaluation needs a multiple of data.image_size={d.image_size}; or set data.eval_tiling=whole.",
        )
    if stored != d.image_size and d.eval_tiling == "whole" and config.model.name.startswith("medsegdiff"):
        _fail(
            "data.eval_tiling",
            d.eval_tiling,
            "MedSegDiff's FF-Parser weights have the training size, so it cannot run on whole "
            f"{stored} px images; use data.eval_tiling=tiles.",
        )
    for key in ("validation_fraction", "test_fraction"):
        if not 0.0 <= d[key] < 1.0:
            _fail(f"data.{key}", d[key], "Use a fraction in [0, 1).")
    augment = d.get("augment", "none")
    if augment not in AUGMENTATIONS:
        _fail("data.augment", augment, f"Choose one of {sorted(AUGMENTATIONS)}.")


def _validate_plan(config: ml_collections.ConfigDict) -> None:
    """A planned model (nnU-Net): a known plan mode, and image sizes its strides divide."""
    plan = config.model.get("plan", None)
    if plan is None:
        return
    if plan.mode not in ("auto", "planned", "fixed"):
        _fail("model.plan.mode", plan.mode, "Choose 'auto' (planned from the training set), or 'fixed'.")
    if plan.mode == "auto":
        return  # data.image_size and the architecture are set by the planner
    factor = 1
    for stride in config.model.strides:
        factor *= max(stride)
    sizes = {"data.image_size": config.data.image_size}
    if config.data.eval_tiling == "whole":
        sizes["data.resize"] = data.stored_size(config.data)
    for key, size in sizes.items():
        if size % factor:
            _fail(key, size, f"The network's strides (model.strides) need a multiple of {factor} px.")


def _validate_unet_size(config: ml_collections.ConfigDict) -> None:
    """A diffusion UNet halves its input len(channel_mult) - 1 times (MedSegDiff's condition network
    len(cond_features) times): the training size, and whole-image evaluation's stored size, must allow it."""
    m = config.model
    if m.get("channel_mult", None) is None or m.get("plan", None) is not None:
        return
    halvings = len(m.channel_mult) - 1
    if m.get("cond_features", None) is not None and objectives.uses_image_condition(config.experiment):
        halvings = max(halvings, len(m.cond_features))
    factor = 2**halvings
    sizes = {"data.image_size": config.data.image_size}
    if config.data.eval_tiling == "whole":
        sizes["data.resize"] = data.stored_size(config.data)
    for key, size in sizes.items():
        if size % factor:
            _fail(
                key,
                size,
                f"{m.name} halves its input {halvings} times (model.channel_mult"
                f"{', model.cond_features' if factor > 2 ** (len(m.channel_mult) - 1) else ''}): use a multiple "
                f"of {factor} px, e.g. {max(factor, size // factor * factor)}.",
            )


def _validate_unet_widths(config: ml_collections.ConfigDict) -> None:
    """The guided-diffusion UNets normalise with 32 groups (GroupNorm32), so every level's width must be a
    multiple of 32, and split attention into heads of ``num_head_channels`` where it is set."""
    m = config.model
    if m.get("channel_mult", None) is None or m.get("model_channels", None) is None:
        return
    widths = [m.model_channels * mult for mult in m.channel_mult]
    if m.model_channels < 1 or any(w % 32 for w in widths):
        _fail(
            "model.model_channels",
            m.model_channels,
            f"Every level's width (model_channels x channel_mult: {widths}) must be a multiple of 32, the "
            "GroupNorm groups of the guided-diffusion UNet; e.g. 32, 64 or 128.",
        )
    head = m.get("num_head_channels", -1)
    attention = [w for i, w in enumerate(widths) if 2**i in m.get("attention_resolutions", ())]
    attention.append(widths[-1])  # the middle block attends at the lowest resolution
    if head != -1 and (head < 1 or any(w % head for w in attention)):
        _fail(
            "model.num_head_channels",
            head,
            f"The attention layers' widths {sorted(set(attention))} must be multiples of it; use a divisor of "
            "them (the published configs: 64), or -1 to split by model.num_heads.",
        )


def _validate_analysis(config: ml_collections.ConfigDict) -> None:
    """--mode analyse's counts (configs saved before a key existed pass)."""
    a = config.get("analysis", None)
    if a is None:
        return
    for key in ("t_step", "num_draws", "batch_size"):
        if a.get(key, 1) < 1:
            _fail(f"analysis.{key}", a[key], "Use a positive integer.")
    if a.get("num_images", -1) == 0 or a.get("num_images", -1) < -1:
        _fail("analysis.num_images", a.num_images, "Use -1 (every test image) or a positive count.")
    if a.get("t_chunk", 0) < 0:
        _fail("analysis.t_chunk", a.t_chunk, "Use 0 (as memory allows) or a positive number of timesteps.")


def _validate_schedule(config: ml_collections.ConfigDict) -> None:
    """The linear schedule's end points, as the betas they give (scaled by 1000 / T as the published codes)."""
    d = config.diffusion
    if d.schedule != "linear":
        return
    if not 0 < d.beta_start < d.beta_end:
        _fail(
            "diffusion.beta_start/beta_end",
            (d.beta_start, d.beta_end),
            "Use 0 < beta_start < beta_end (the published codes: 1e-4 and 0.02).",
        )
    scale = 1000.0 / d.num_timesteps
    if d.beta_end * scale >= 1:
        _fail(
            "diffusion.beta_end",
            d.beta_end,
            f"Betas are scaled by 1000 / T = {scale:g} (as the published codes), so the last one would be "
            f"{d.beta_end * scale:g}, not below 1. Use beta_end < {1 / scale:g} for "
            f"diffusion.num_timesteps={d.num_timesteps} (the published codes: 0.02).",
        )


def _validate_timesteps(config: ml_collections.ConfigDict) -> None:
    """Terminal noise and the timestep weighting / sampling (configs saved before they existed pass)."""
    d = config.diffusion
    terminal = d.get("terminal", "none")
    if terminal not in diffusion.TERMINAL_METHODS:
        _fail("diffusion.terminal", terminal, f"Choose one of {diffusion.TERMINAL_METHODS}.")
    if terminal != "none" and not (d.alpha_bar_T == -1 or 0 < d.alpha_bar_T < 1):
        _fail(
            "diffusion.alpha_bar_T",
            d.alpha_bar_T,
            "Use a terminal ᾱ in (0, 1) (e.g. 1e-6), or -1 to choose it from the training masks' fingerprint.",
        )
    if terminal != "none" and 0 < d.alpha_bar_T < 1 and d.schedule in diffusion.BETA_SCHEDULES:
        kwargs = dict(beta_start=d.beta_start, beta_end=d.beta_end) if d.schedule == "linear" else {}
        first = 1.0 - float(diffusion.BETA_SCHEDULES[d.schedule](d.num_timesteps, **kwargs)[0])
        if d.alpha_bar_T >= first:
            _fail(
                "diffusion.alpha_bar_T",
                d.alpha_bar_T,
                f"The terminal ᾱ must lie below the first step's ({first:.6g}) for the noise to grow; a terminal "
                "noise level is small, e.g. 1e-6, or -1 to choose it from the training masks' fingerprint.",
            )
    if d.get("terminal", "none") != "none" and not 0 < d.get("terminal_tol", 0.01) < 1:
        _fail("diffusion.terminal_tol", d.terminal_tol, "Use a fraction in (0, 1), e.g. 0.01.")
    tc = config.get("timesteps", None)
    if tc is None:
        return
    if tc.get("num_masks", 1) < 1:
        _fail(
            "timesteps.num_masks", tc.num_masks, "The fingerprint needs at least one training mask, e.g. 64."
        )
    if tc.weighting not in timesteps.WEIGHTINGS:
        _fail("timesteps.weighting", tc.weighting, f"Choose one of {timesteps.WEIGHTINGS}.")
    if tc.sampling not in timesteps.SAMPLINGS:
        _fail("timesteps.sampling", tc.sampling, f"Choose one of {timesteps.SAMPLINGS}.")
    if config.experiment == "e1" and (tc.weighting, tc.sampling) != ("uniform", "uniform"):
        _fail(
            "timesteps.weighting/sampling",
            (tc.weighting, tc.sampling),
            "E1 sees one fixed timestep: leave both 'uniform'.",
        )
    if not 0.0 <= tc.floor < 1.0:
        _fail("timesteps.floor", tc.floor, "Use a fraction of the mean weight in [0, 1).")
    if not 0.0 <= tc.smoothing < 1.0:
        _fail("timesteps.smoothing", tc.smoothing, "Use a fraction of T in [0, 1), e.g. 0.05.")
    if tc.curve != "model_free" and not os.path.isfile(tc.curve):
        _fail(
            "timesteps.curve",
            tc.curve,
            "Use 'model_free' or an existing curves.csv / model_free.csv written by --mode analyse.",
        )
    if tc.history < 1 or not 0.0 <= tc.uniform_prob <= 1.0:
        _fail(
            "timesteps.history/uniform_prob",
            (tc.history, tc.uniform_prob),
            "Use history >= 1 and uniform_prob in [0, 1] (improved DDPM: 10 and 0.001).",
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
}


# Keys of a model group that are not arguments of the model class: the name, nnU-Net's planning settings, and
# the weights a run starts from (SegFormer's model.pretrained, imported after the build).
MODEL_SETTINGS = ("name", "plan", "pretrained", "pretrained_revision")


def _validate_model_group(config: ml_collections.ConfigDict) -> None:
    """The model group must hold its architecture's settings: ``--config.model.name=segdiff`` on a config built
    for EnsemDiff would otherwise build a hybrid (EnsemDiff's widths, SegDiff's defaults for the rest, no
    published scheme) without a word, or fail on a keyword deep in Flax."""
    name = config.model.name
    args = {f.name for f in dataclasses.fields(models.MODELS[name])}
    keys = set(config.model.keys()) - set(MODEL_SETTINGS)
    foreign, missing = sorted(keys - args), sorted(args - keys - _OPTIONAL_MODEL_ARGS)
    if foreign or missing:
        held = [f"{', '.join(foreign)} of another architecture"] if foreign else []
        held += [f"none of {name}'s {', '.join(missing)}"] if missing else []
        raise ConfigError(
            f"Invalid config: model.name={name!r}, but the model group holds {' and '.join(held)}, as when "
            "--config.model.name is overridden on a config built for another model. Choose the architecture "
            f"with the config file's argument, --config configs/<file>.py:{name} (e.g. e2_isic.py:segdiff, "
            "e1_monuseg.py:nnunet), which brings the architecture's published widths and training scheme."
        )


def _validate_segformer(m: ml_collections.ConfigDict) -> None:
    """SegFormer's variant and depthwise-conv form, named here rather than deep in Flax at start-up."""
    if m.variant not in segformer.VARIANTS:
        _fail("model.variant", m.variant, f"Choose one of {sorted(segformer.VARIANTS)} (SegFormer-B0..B5).")
    if m.depthwise not in segformer.DEPTHWISE_IMPLS:
        _fail(
            "model.depthwise",
            m.depthwise,
            "Choose 'shift' (shifted multiply-adds, fast under XLA) or 'conv' (nn.Conv, HF's grouped conv); "
            "the same parameters and outputs.",
        )
    pretrained = hub.requested(m.get("pretrained", None))
    if pretrained is None:
        return
    if not os.path.exists(os.path.expanduser(pretrained)) and not hub.is_repo_id(pretrained):
        _fail(
            "model.pretrained",
            pretrained,
            "No such file, and not a Hugging Face Hub repo id (owner/name, e.g. nvidia/mit-b3). Pass a weights "
            "file (.safetensors, .bin/.pt/.pth, .npz) or a repo id, or None for random initialisation.",
        )
    mit = re.fullmatch(r"nvidia/mit-(b\d)", pretrained)
    if mit and mit.group(1) != m.variant:
        _fail(
            "model.pretrained",
            pretrained,
            f"It is the SegFormer-{mit.group(1).upper()} encoder but model.variant={m.variant!r}: set "
            f"--config.model.pretrained=nvidia/mit-{m.variant} (or --config.model.variant={mit.group(1)}).",
        )


def _validate_beyond_paper(config: ml_collections.ConfigDict) -> None:
    """The loss options of issue 33: Min-SNR-γ weights, self-conditioning, recycling (E1 ignores them)."""
    o = config.objective
    weighting = o.get("loss_weighting", "none")
    if weighting not in ("none", "min_snr"):
        _fail(
            "objective.loss_weighting", weighting, "Choose 'none' or 'min_snr' (Min-SNR-γ, Hang et al. 2023)."
        )
    if weighting == "min_snr" and not o.get("snr_gamma", 5.0) > 0:
        _fail("objective.snr_gamma", o.snr_gamma, "Use a positive γ, e.g. 5 (Hang et al. 2023).")
    if not 0.0 < o.get("self_condition_prob", 0.5) <= 1.0:
        _fail(
            "objective.self_condition_prob",
            o.self_condition_prob,
            "Use a probability in (0, 1], e.g. 0.5 (Analog Bits); objective.self_condition=False turns it off.",
        )
    if not 0.0 <= o.get("recycle_prob", 0.0) <= 1.0:
        _fail(
            "objective.recycle_prob", o.recycle_prob, "Use a probability in [0, 1]: 0 is off, 1 Fu et al.'s."
        )
    if config.experiment == "e4" and (o.get("self_condition", False) or o.get("recycle_prob", 0.0) > 0):
        _fail(
            "objective.self_condition / objective.recycle_prob",
            (o.get("self_condition", False), o.get("recycle_prob", 0.0)),
            "Self-conditioning and recycling are options of mask diffusion (E2, E3); turn them off for E4.",
        )


def validate(config: ml_collections.ConfigDict, check_data: bool = True) -> None:
    """Raises ``ValueError`` naming the offending key for an impossible or unknown setting.

    ``check_data=False`` skips the dataset registry check (``--mode summary`` needs no data).
    """
    if config.experiment not in objectives.EXPERIMENTS:
        _fail("experiment", config.experiment, f"Choose one of {objectives.EXPERIMENTS}.")
    if config.model.name not in models.MODELS:
        _fail("model.name", config.model.name, f"Registered models: {sorted(models.MODELS)}.")
    _validate_model_group(config)
    if check_data and config.data.name not in data.DATASETS:
        _fail("data.name", config.data.name, f"Registered datasets: {sorted(data.DATASETS)}.")
    _validate_data(config, check_data)
    _validate_plan(config)
    _validate_unet_size(config)
    _validate_unet_widths(config)
    _validate_analysis(config)
    if config.data.get("image_channels", 3) < 1:
        _fail("data.image_channels", config.data.image_channels, "Use 3 for RGB images (1 for grayscale).")
    if not objectives.uses_image_condition(config.experiment) and not models.can_drop_image(
        config.model.name
    ):
        _fail(
            "model.name",
            config.model.name,
            f"Experiment {config.experiment} withholds the image, but this architecture cannot run "
            "without it; choose an image-droppable model.",
        )
    if config.model.get("dtype", "float32") not in COMPUTE_DTYPES:
        _fail(
            "model.dtype",
            config.model.dtype,
            f"Choose one of {COMPUTE_DTYPES} (bfloat16: mixed precision with float32 parameters).",
        )
    if config.model.name == "segformer":
        _validate_segformer(config.model)
    if models.is_feed_forward(config.model.name) and config.experiment != "e1":
        _fail(
            "experiment",
            config.experiment,
            f"{config.model.name} is a feed-forward reference (image -> mask logits, no x_t): train it as "
            "e1, or choose a diffusion architecture.",
        )
    if config.diffusion.mask_range not in diffusion.MASK_RANGES:
        _fail("diffusion.mask_range", config.diffusion.mask_range, f"Choose one of {diffusion.MASK_RANGES}.")
    if config.diffusion.schedule not in diffusion.BETA_SCHEDULES:
        _fail(
            "diffusion.schedule",
            config.diffusion.schedule,
            f"Registered schedules: {sorted(diffusion.BETA_SCHEDULES)}.",
        )
    if config.objective.loss not in ("published", "eps_mse"):
        _fail("objective.loss", config.objective.loss, "Choose 'published' or 'eps_mse'.")
    if config.objective.reduction not in ("mean", "sum"):
        _fail("objective.reduction", config.objective.reduction, "Choose 'mean' or 'sum'.")
    prediction = config.objective.get("prediction", None)
    if prediction is not None and prediction not in objectives.PREDICTIONS:
        _fail(
            "objective.prediction",
            prediction,
            f"Choose one of {objectives.PREDICTIONS} (what an E2/E3 network predicts), or leave it unset for the "
            "experiment's own (E2: eps, E3: x0).",
        )
    if prediction not in (None, "eps") and config.experiment == "e4":
        _fail(
            "objective.prediction", prediction, "E4 (image generation) predicts eps; leave it unset for E4."
        )
    _validate_beyond_paper(config)
    if config.objective.get("dice", "per_example") not in ("per_example", "batch"):
        _fail("objective.dice", config.objective.dice, "Choose 'per_example' or 'batch' (nnU-Net's).")
    if config.train.get("optimizer", "adam") not in ("adam", "sgd_nesterov"):
        _fail("train.optimizer", config.train.optimizer, "Choose 'adam' or 'sgd_nesterov' (nnU-Net's).")
    if config.train.get("lr_schedule", "constant") not in ("constant", "poly"):
        _fail("train.lr_schedule", config.train.lr_schedule, "Choose 'constant' or 'poly' (nnU-Net's).")
    if config.diffusion.variance not in ("fixed_large", "fixed_small"):
        _fail(
            "diffusion.variance",
            config.diffusion.variance,
            "Choose 'fixed_large' or 'fixed_small' (a learned variance is diffusion.learn_sigma=True).",
        )
    _validate_timesteps(config)
    if config.diffusion.num_timesteps < 2:
        _fail("diffusion.num_timesteps", config.diffusion.num_timesteps, "Use at least 2 timesteps.")
    _validate_schedule(config)
    if config.objective.e1_timestep >= config.diffusion.num_timesteps:
        _fail(
            "objective.e1_timestep",
            config.objective.e1_timestep,
            f"Use -1 (T-1) or a value below diffusion.num_timesteps={config.diffusion.num_timesteps}.",
        )
    init_weights = config.train.get("init_weights", None)
    if init_weights is not None and not os.path.isfile(init_weights):
        _fail(
            "train.init_weights",
            init_weights,
            "No such file: pass a .safetensors, .pt/.pth/.bin or .npz state dict (e.g. nvidia/mit-b3's weights "
            "file for SegFormer-B3), or leave it unset to start from random initialisation.",
        )
    if not 0 < config.train.lr < math.inf:
        _fail(
            "train.lr", config.train.lr, "Use a positive, finite learning rate (the published configs: 1e-4)."
        )
    for key in ("num_steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
        if config.train[key] < 1:
            _fail(f"train.{key}", config.train[key], "Use a positive integer.")
    bad = [f for f in config.train.get("keep_at", ()) if not 0 < f < 1]
    if bad:
        _fail(
            "train.keep_at",
            tuple(config.train.keep_at),
            f"{bad} are not fractions of train.num_steps in (0, 1); e.g. (0.75,) keeps the model after 75 % of "
            "training, () none.",
        )
    keep_every = config.train.get("keep_every", 0)
    if keep_every < 0 or (keep_every and keep_every % config.train.ckpt_every):
        _fail(
            "train.keep_every",
            keep_every,
            f"Use 0 (keep only the last train.keep_checkpoints) or a multiple of train.ckpt_every="
            f"{config.train.ckpt_every}, on which checkpoints are written.",
        )
    p = config.protocol
    if p.get("validate_every", 0) < 0:
        _fail(
            "protocol.validate_every",
            p.validate_every,
            "Use a positive step count, or 0 for train.ckpt_every.",
        )
    if p.get("ensemble_size", 1) < 1:
        _fail("protocol.ensemble_size", p.ensemble_size, "Use at least one member.")
    if p.get("sampler", "ddim") not in diffusion.SAMPLERS:
        _fail("protocol.sampler", p.sampler, f"Choose one of {sorted(diffusion.SAMPLERS)}.")
    if not 1 <= p.get("ddim_steps", 1) <= config.diffusion.num_timesteps:
        _fail(
            "protocol.ddim_steps",
            p.ddim_steps,
            f"Use 1 to diffusion.num_timesteps={config.diffusion.num_timesteps} DDIM steps for the validation ensembles.",
        )
    tta = config.eval.get("tta", "none")
    if tta not in diffusion.TTA_TRANSFORMS:
        _fail("eval.tta", tta, "Choose 'none', 'flips' (4 transforms) or 'd4' (8 rotations and flips).")
    if tta != "none" and config.experiment not in ("e1", "e2"):
        _fail(
            "eval.tta",
            tta,
            f"Test-time augmentation transforms the image a segmentation is conditioned on; experiment "
            f"{config.experiment!r} samples without one. Leave it at 'none'.",
        )
    member_output = config.eval.get("member_output", "soft")
    if member_output not in ("soft", "hard"):
        _fail(
            "eval.member_output",
            member_output,
            "Choose 'soft' (average the members' values, as the official codes) or 'hard' (average their votes).",
        )
    if member_output == "hard" and config.experiment == "e4":
        _fail(
            "eval.member_output",
            member_output,
            "E4 generates images, which have no foreground to vote on; use 'soft'.",
        )
    if config.eval.get("step", -1) < -1:
        _fail("eval.step", config.eval.step, "Use -1 (the latest checkpoint) or a checkpoint's step.")
    if not 0.0 <= config.train.ema_decay < 1.0:
        _fail("train.ema_decay", config.train.ema_decay, "Use a value in [0, 1).")
    if config.eval.pooling not in ("pooled", "per_image"):
        _fail("eval.pooling", config.eval.pooling, "Choose 'pooled' or 'per_image'.")
    if config.eval.ece_bins < 1:
        _fail("eval.ece_bins", config.eval.ece_bins, "Use a positive number of bins (the paper: 10).")
    if config.eval.sampler not in diffusion.SAMPLERS:
        _fail("eval.sampler", config.eval.sampler, f"Choose one of {sorted(diffusion.SAMPLERS)}.")
    if config.eval.sampler == "ddim" and not 1 <= config.eval.ddim_steps <= config.diffusion.num_timesteps:
        _fail(
            "eval.ddim_steps",
            config.eval.ddim_steps,
            f"Use 1..diffusion.num_timesteps={config.diffusion.num_timesteps}.",
        )
    if config.eval.get("ddim_eta", 0.0) < 0:
        _fail(
            "eval.ddim_eta",
            config.eval.ddim_eta,
            "Use η ≥ 0: 0 is deterministic DDIM, 1 DDPM's posterior variance (Song et al. 2021).",
        )
    for key in ("batch_size", "predict_chunk"):
        if config.eval[key] < 1:
            _fail(f"eval.{key}", config.eval[key], "Use a positive number of images.")
    if config.eval.num_images == 0 or config.eval.num_images < -1:
        _fail("eval.num_images", config.eval.num_images, "Use -1 (every test image) or a positive count.")
    if config.eval.ensemble_size < 1:
        _fail("eval.ensemble_size", config.eval.ensemble_size, "Use at least one member.")


# The config's file and folder paths: a run records them absolute.
PATH_KEYS = ("data.data_dir", "data.manual_dir", "train.init_weights")


def save(config: ml_collections.ConfigDict, path: str) -> None:
    """Writes the config as JSON (for the record; runs are configured by the config files).

    The paths of :data:`PATH_KEYS` are written absolute (``~`` expanded, relative ones resolved against the
    current directory), so ``configs/from_run.py`` finds the run's data from any directory later; ``config``
    itself is not changed.
    """
    record = json.loads(config.to_json_best_effort())
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = record.get(section, {}).get(key)
        if isinstance(value, str) and value:
            record[section][key] = os.path.abspath(os.path.expanduser(value))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writers.save_json_whole(path, record, indent=2, sort_keys=True)  # whole: a crash never leaves half of it


def flatten(node: dict, prefix: str = "") -> dict:
    """{'group.key': value} of a (config) dict's leaves."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load(path: str) -> ml_collections.ConfigDict:
    """Reads a config saved by :func:`save`."""
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def tuples(value):
    """JSON lists back as the tuples the configs hold (ml_collections does not assign a list to a tuple field)."""
    if isinstance(value, (list, tuple)):
        return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    return value


def load_onto(
    default: ml_collections.ConfigDict, recorded: ml_collections.ConfigDict, path: str
) -> ml_collections.ConfigDict:
    """A config saved by :func:`save` (a run's ``config.json`` at ``path``, read by :func:`load` into
    ``recorded``), merged onto ``default``.

    ``default`` is the config file's config for the run's architecture: it gives the declared types (tuples,
    typed placeholders) and the lock, the file gives every value. Keys the file lacks (a run recorded before
    they existed) keep their defaults; keys only the file has (a planned network's) are added.
    """
    c = copy.deepcopy(default)

    def merge(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key, None), ml_collections.ConfigDict):
                merge(node[key], value, f"{prefix}{key}.")
                continue
            try:
                with node.unlocked():
                    node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else tuples(value)
            except TypeError as e:
                raise TypeError(
                    f"{path}: {prefix}{key}={value!r} does not fit this version's config ({e})."
                ) from e

    merge(c, recorded.to_dict(), "")
    return c
