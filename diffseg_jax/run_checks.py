"""Config checks of training, checkpointing, the protocols and evaluation; called by ``validation.validate``."""

from __future__ import annotations

import math
import os

import ml_collections

from diffseg_jax import configlib


def check_train(config: ml_collections.ConfigDict) -> None:
    """Initial weights, learning rate, step counts, kept checkpoints and the protocols' validation ensembles."""
    init_weights = config.train.init_weights
    if init_weights is not None and not os.path.isfile(init_weights):
        configlib.fail(
            "train.init_weights",
            init_weights,
            "No such file: pass a .safetensors, .pt/.pth/.bin or .npz state dict (e.g. nvidia/mit-b3's weights "
            "file for SegFormer-B3), or leave it unset to start from random initialisation.",
        )
    if not 0 < config.train.lr < math.inf:
        configlib.fail(
            "train.lr", config.train.lr, "Use a positive, finite learning rate (the published configs: 1e-4)."
        )
    for key in ("num_steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
        if config.train[key] < 1:
            configlib.fail(f"train.{key}", config.train[key], "Use a positive integer.")
    bad = [f for f in config.train.keep_at if not 0 < f < 1]
    if bad:
        configlib.fail(
            "train.keep_at",
            tuple(config.train.keep_at),
            f"{bad} are not fractions of train.num_steps in (0, 1); e.g. (0.75,) keeps the model after 75 % of "
            "training, () none.",
        )
    keep_every = config.train.keep_every
    if keep_every < 0 or (keep_every and keep_every % config.train.ckpt_every):
        configlib.fail(
            "train.keep_every",
            keep_every,
            f"Use 0 (keep only the last train.keep_checkpoints) or a multiple of train.ckpt_every="
            f"{config.train.ckpt_every}, on which checkpoints are written.",
        )
    p = config.protocol
    if p.validate_every < 0:
        configlib.fail(
            "protocol.validate_every",
            p.validate_every,
            "Use a positive step count, or 0 for train.ckpt_every.",
        )
    if p.ensemble_size < 1:
        configlib.fail("protocol.ensemble_size", p.ensemble_size, "Use at least one member.")
    if not 1 <= p.ddim_steps <= config.diffusion.num_timesteps:
        configlib.fail(
            "protocol.ddim_steps",
            p.ddim_steps,
            f"Use 1 to diffusion.num_timesteps={config.diffusion.num_timesteps} DDIM steps for the validation ensembles.",
        )


def check_eval(config: ml_collections.ConfigDict) -> None:
    """How evaluation samples and scores: TTA, member output, step, EMA, bins, DDIM steps, batches (their choices:
    ``validation.CHOICES``)."""
    tta = config.eval.tta
    if tta != "none" and config.experiment not in ("e1", "e2"):
        configlib.fail(
            "eval.tta",
            tta,
            f"Test-time augmentation transforms the image a segmentation is conditioned on; experiment "
            f"{config.experiment!r} samples without one. Leave it at 'none'.",
        )
    member_output = config.eval.member_output
    if member_output == "hard" and config.experiment == "e4":
        configlib.fail(
            "eval.member_output",
            member_output,
            "E4 generates images, which have no foreground to vote on; use 'soft'.",
        )
    if config.eval.step < -1:
        configlib.fail(
            "eval.step", config.eval.step, "Use -1 (the latest checkpoint) or a checkpoint's step."
        )
    if not 0.0 <= config.train.ema_decay < 1.0:
        configlib.fail("train.ema_decay", config.train.ema_decay, "Use a value in [0, 1).")
    if config.eval.ece_bins < 1:
        configlib.fail(
            "eval.ece_bins", config.eval.ece_bins, "Use a positive number of bins (the paper: 10)."
        )
    if config.eval.sampler == "ddim" and not 1 <= config.eval.ddim_steps <= config.diffusion.num_timesteps:
        configlib.fail(
            "eval.ddim_steps",
            config.eval.ddim_steps,
            f"Use 1..diffusion.num_timesteps={config.diffusion.num_timesteps}.",
        )
    if config.eval.ddim_eta < 0:
        configlib.fail(
            "eval.ddim_eta",
            config.eval.ddim_eta,
            "Use η ≥ 0: 0 is deterministic DDIM, 1 DDPM's posterior variance (Song et al. 2021).",
        )
    if not isinstance(config.eval.batch_size, int) or config.eval.batch_size < 0:
        configlib.fail(
            "eval.batch_size",
            config.eval.batch_size,
            "Use a positive number of images per device call, or 0 to choose it from the device's memory.",
        )
    if config.eval.predict_chunk < 1:
        configlib.fail("eval.predict_chunk", config.eval.predict_chunk, "Use a positive number of images.")
    if config.eval.num_images == 0 or config.eval.num_images < -1:
        configlib.fail(
            "eval.num_images", config.eval.num_images, "Use -1 (every test image) or a positive count."
        )
    if config.eval.ensemble_size < 1:
        configlib.fail("eval.ensemble_size", config.eval.ensemble_size, "Use at least one member.")
