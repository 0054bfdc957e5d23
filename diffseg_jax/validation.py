"""One check of a whole config before anything is built or written: every impossible setting fails naming the key,
the value and the fix (``diffseg_jax.configlib.ConfigError``), as one message."""

from __future__ import annotations

import os

import ml_collections

from diffseg_jax import configlib, data, diffusion, model_checks, models, objectives, run_checks
from diffseg_jax.data.augment import AUGMENTATIONS
from diffseg_jax.diffusion import timesteps


def _validate_data(config: ml_collections.ConfigDict, check_data: bool) -> None:
    d = config.data
    if check_data and d.name not in data.MANUAL_DATASETS and d.get("manual_dir", None) is not None:
        configlib.fail(
            "data.manual_dir",
            d.manual_dir,
            f"Dataset {d.name!r} is not read from a folder, so this folder would be ignored. For a folder of "
            f"images/ and masks/ set --config.data.name=segmentation_folder (or one of "
            f"{sorted(data.MANUAL_DATASETS)} for its official layout).",
        )
    if not d.image_size > 0:
        configlib.fail(
            "data.image_size", d.image_size, "Use a positive size in pixels (e.g. 64, or 256 as the paper)."
        )
    if d.name == "synthetic":
        if d.get("kind", "lesion") not in data.synthetic.KINDS:
            configlib.fail(
                "data.kind",
                d.kind,
                f"Choose one of {list(data.synthetic.KINDS)} ('lesion' ~ ISIC16, 'nuclei' ~ MoNuSeg, 'clusters' ~ "
                "HER2).",
            )
        for key in ("num_train", "num_test"):
            if d[key] < 1:
                configlib.fail(
                    f"data.{key}", d[key], "The synthetic dataset needs at least one image per split."
                )
    if check_data and d.name in data.DOWNLOADED_DATASETS and d.get("manual_dir", None) is None:
        url = d.get("download_base_url", None) or ""
        if not url.startswith(("http://", "https://")):
            configlib.fail(
                "data.download_base_url",
                d.get("download_base_url", None),
                f"Dataset {d.name!r} is downloaded from this URL (the folder its official zips are in); give an "
                "http(s) URL, or an unpacked copy as --config.data.manual_dir.",
            )
    elif check_data and d.name in data.MANUAL_DATASETS:
        manual_dir = d.get("manual_dir", None)
        if manual_dir is None:
            configlib.fail(
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
        configlib.fail(
            "data.manual_dir",
            manual_dir,
            "No such folder; pass the folder that holds the unpacked data.\n"
            + data.pipeline.MANUAL_INSTRUCTIONS[d.name],
        )
    scaling = d.get("image_scaling", "auto")
    if scaling not in data.files.IMAGE_SCALINGS:
        configlib.fail("data.image_scaling", scaling, f"Choose one of {list(data.files.IMAGE_SCALINGS)}.")
    if scaling != "auto" and d.name != "segmentation_folder":
        configlib.fail(
            "data.image_scaling",
            scaling,
            f"Dataset {d.name!r} stores 8-bit images as they are; the setting is for segmentation_folder "
            "datasets (and --mode predict of a run trained on one). Leave it at 'auto'.",
        )
    stored = data.stored_size(d)
    if stored < d.image_size:
        configlib.fail(
            "data.resize", d.resize, f"Store images at least at data.image_size={d.image_size} px."
        )
    if d.eval_tiling not in ("tiles", "whole"):
        configlib.fail("data.eval_tiling", d.eval_tiling, "Choose 'tiles' or 'whole'.")
    if stored != d.image_size and d.eval_tiling == "tiles" and stored % d.image_size:
        configlib.fail(
            "data.resize",
            d.resize,
            f"Tiled evaluation needs a multiple of data.image_size={d.image_size}; or set data.eval_tiling=whole.",
        )
    if stored != d.image_size and d.eval_tiling == "whole" and config.model.name.startswith("medsegdiff"):
        configlib.fail(
            "data.eval_tiling",
            d.eval_tiling,
            "MedSegDiff's FF-Parser weights have the training size, so it cannot run on whole "
            f"{stored} px images; use data.eval_tiling=tiles.",
        )
    for key in ("validation_fraction", "test_fraction"):
        if not 0.0 <= d[key] < 1.0:
            configlib.fail(f"data.{key}", d[key], "Use a fraction in [0, 1).")
    augment = d.get("augment", "none")
    if augment not in AUGMENTATIONS:
        configlib.fail("data.augment", augment, f"Choose one of {sorted(AUGMENTATIONS)}.")


def _validate_plan(config: ml_collections.ConfigDict) -> None:
    """A planned model (nnU-Net): a known plan mode, and image sizes its strides divide."""
    plan = config.model.get("plan", None)
    if plan is None:
        return
    if plan.mode not in ("auto", "planned", "fixed"):
        configlib.fail(
            "model.plan.mode", plan.mode, "Choose 'auto' (planned from the training set), or 'fixed'."
        )
    if plan.mode == "auto":
        return  # data.image_size and the architecture are set by the planner
    factor = 1
    for stride in config.model.strides:
        factor *= max(stride)
    model_checks.check_sizes_divisible(
        config, factor, lambda size: f"The network's strides (model.strides) need a multiple of {factor} px."
    )


def _validate_analysis(config: ml_collections.ConfigDict) -> None:
    """--mode analyse's counts (configs saved before a key existed pass)."""
    a = config.get("analysis", None)
    if a is None:
        return
    for key in ("t_step", "num_draws", "batch_size"):
        if a.get(key, 1) < 1:
            configlib.fail(f"analysis.{key}", a[key], "Use a positive integer.")
    if a.get("num_images", -1) == 0 or a.get("num_images", -1) < -1:
        configlib.fail("analysis.num_images", a.num_images, "Use -1 (every test image) or a positive count.")
    if a.get("t_chunk", 0) < 0:
        configlib.fail(
            "analysis.t_chunk", a.t_chunk, "Use 0 (as memory allows) or a positive number of timesteps."
        )


def _validate_schedule(config: ml_collections.ConfigDict) -> None:
    """The linear schedule's end points, as the betas they give (scaled by 1000 / T as the published codes)."""
    d = config.diffusion
    if d.schedule != "linear":
        return
    if not 0 < d.beta_start < d.beta_end:
        configlib.fail(
            "diffusion.beta_start/beta_end",
            (d.beta_start, d.beta_end),
            "Use 0 < beta_start < beta_end (the published codes: 1e-4 and 0.02).",
        )
    scale = 1000.0 / d.num_timesteps
    if d.beta_end * scale >= 1:
        configlib.fail(
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
        configlib.fail("diffusion.terminal", terminal, f"Choose one of {diffusion.TERMINAL_METHODS}.")
    if terminal != "none" and not (d.alpha_bar_T == -1 or 0 < d.alpha_bar_T < 1):
        configlib.fail(
            "diffusion.alpha_bar_T",
            d.alpha_bar_T,
            "Use a terminal ᾱ in (0, 1) (e.g. 1e-6), or -1 to choose it from the training masks' fingerprint.",
        )
    if terminal != "none" and 0 < d.alpha_bar_T < 1 and d.schedule in diffusion.BETA_SCHEDULES:
        kwargs = dict(beta_start=d.beta_start, beta_end=d.beta_end) if d.schedule == "linear" else {}
        first = 1.0 - float(diffusion.BETA_SCHEDULES[d.schedule](d.num_timesteps, **kwargs)[0])
        if d.alpha_bar_T >= first:
            configlib.fail(
                "diffusion.alpha_bar_T",
                d.alpha_bar_T,
                f"The terminal ᾱ must lie below the first step's ({first:.6g}) for the noise to grow; a terminal "
                "noise level is small, e.g. 1e-6, or -1 to choose it from the training masks' fingerprint.",
            )
    if d.get("terminal", "none") != "none" and not 0 < d.get("terminal_tol", 0.01) < 1:
        configlib.fail("diffusion.terminal_tol", d.terminal_tol, "Use a fraction in (0, 1), e.g. 0.01.")
    tc = config.get("timesteps", None)
    if tc is None:
        return
    if tc.get("num_masks", 1) < 1:
        configlib.fail(
            "timesteps.num_masks", tc.num_masks, "The fingerprint needs at least one training mask, e.g. 64."
        )
    if tc.weighting not in timesteps.WEIGHTINGS:
        configlib.fail("timesteps.weighting", tc.weighting, f"Choose one of {timesteps.WEIGHTINGS}.")
    if tc.sampling not in timesteps.SAMPLINGS:
        configlib.fail("timesteps.sampling", tc.sampling, f"Choose one of {timesteps.SAMPLINGS}.")
    if config.experiment == "e1" and (tc.weighting, tc.sampling) != ("uniform", "uniform"):
        configlib.fail(
            "timesteps.weighting/sampling",
            (tc.weighting, tc.sampling),
            "E1 sees one fixed timestep: leave both 'uniform'.",
        )
    if not 0.0 <= tc.floor < 1.0:
        configlib.fail("timesteps.floor", tc.floor, "Use a fraction of the mean weight in [0, 1).")
    if not 0.0 <= tc.smoothing < 1.0:
        configlib.fail("timesteps.smoothing", tc.smoothing, "Use a fraction of T in [0, 1), e.g. 0.05.")
    if tc.curve != "model_free" and not os.path.isfile(tc.curve):
        configlib.fail(
            "timesteps.curve",
            tc.curve,
            "Use 'model_free' or an existing curves.csv / model_free.csv written by --mode analyse.",
        )
    if tc.history < 1 or not 0.0 <= tc.uniform_prob <= 1.0:
        configlib.fail(
            "timesteps.history/uniform_prob",
            (tc.history, tc.uniform_prob),
            "Use history >= 1 and uniform_prob in [0, 1] (improved DDPM: 10 and 0.001).",
        )


def _validate_beyond_paper(config: ml_collections.ConfigDict) -> None:
    """The loss options of issue 33: Min-SNR-γ weights, self-conditioning, recycling (E1 ignores them)."""
    o = config.objective
    weighting = o.get("loss_weighting", "none")
    if weighting not in ("none", "min_snr"):
        configlib.fail(
            "objective.loss_weighting", weighting, "Choose 'none' or 'min_snr' (Min-SNR-γ, Hang et al. 2023)."
        )
    if weighting == "min_snr" and not o.get("snr_gamma", 5.0) > 0:
        configlib.fail("objective.snr_gamma", o.snr_gamma, "Use a positive γ, e.g. 5 (Hang et al. 2023).")
    if not 0.0 < o.get("self_condition_prob", 0.5) <= 1.0:
        configlib.fail(
            "objective.self_condition_prob",
            o.self_condition_prob,
            "Use a probability in (0, 1], e.g. 0.5 (Analog Bits); objective.self_condition=False turns it off.",
        )
    if not 0.0 <= o.get("recycle_prob", 0.0) <= 1.0:
        configlib.fail(
            "objective.recycle_prob", o.recycle_prob, "Use a probability in [0, 1]: 0 is off, 1 Fu et al.'s."
        )
    if config.experiment == "e4" and (o.get("self_condition", False) or o.get("recycle_prob", 0.0) > 0):
        configlib.fail(
            "objective.self_condition / objective.recycle_prob",
            (o.get("self_condition", False), o.get("recycle_prob", 0.0)),
            "Self-conditioning and recycling are options of mask diffusion (E2, E3); turn them off for E4.",
        )


def _validate_process(config: ml_collections.ConfigDict) -> None:
    """diffusion.process, and what Bernoulli diffusion (BerDiff) cannot be combined with (E1 ignores it)."""
    process = config.diffusion.get("process", "gaussian")
    if process not in diffusion.PROCESSES:
        configlib.fail(
            "diffusion.process",
            process,
            f"Choose one of {diffusion.PROCESSES} ('bernoulli': BerDiff's Bernoulli diffusion of binary masks).",
        )
    if process != "bernoulli" or config.experiment == "e1":
        return
    o = config.objective
    if config.experiment == "e4":
        configlib.fail(
            "diffusion.process",
            process,
            "Bernoulli diffusion flips the pixels of binary masks (E2, E3); E4 generates images: use 'gaussian'.",
        )
    prediction = o.get("prediction", None)
    if prediction not in (None, *diffusion.bernoulli.PREDICTIONS):
        configlib.fail(
            "objective.prediction",
            prediction,
            f"A Bernoulli diffusion network predicts one of {diffusion.bernoulli.PREDICTIONS} as a probability "
            "(BerDiff's released model: eps, the flipped pixels); v has no Bernoulli counterpart.",
        )
    if o.get("loss_weighting", "none") != "none":
        configlib.fail(
            "objective.loss_weighting",
            o.loss_weighting,
            "Min-SNR weights the Gaussian losses; BerDiff's KL + BCE takes none: set it to 'none' with "
            "diffusion.process='bernoulli'.",
        )
    if o.get("recycle_prob", 0.0) > 0:
        configlib.fail(
            "objective.recycle_prob",
            o.recycle_prob,
            "Recycling is implemented for Gaussian diffusion only: set it to 0 with diffusion.process='bernoulli'.",
        )
    if not o.get("bernoulli_bce_weight", 1.0) >= 0:
        configlib.fail("objective.bernoulli_bce_weight", o.bernoulli_bce_weight, "Use λ ≥ 0 (BerDiff: 1).")
    if config.eval.sampler == "ddim" and config.eval.get("ddim_eta", 0.0) != 0:
        configlib.fail(
            "eval.ddim_eta",
            config.eval.ddim_eta,
            "BerDiff's DDIM-like sampler (diffusion.process='bernoulli') has no η: each step draws Bernoulli "
            "samples. Pass --config.eval.ddim_eta=0.",
        )


def validate(config: ml_collections.ConfigDict, check_data: bool = True) -> None:
    """Raises ``ValueError`` naming the offending key for an impossible or unknown setting.

    ``check_data=False`` skips the dataset registry check (``--mode summary`` needs no data).
    """
    if config.experiment not in objectives.EXPERIMENTS:
        configlib.fail("experiment", config.experiment, f"Choose one of {objectives.EXPERIMENTS}.")
    if config.model.name not in models.MODELS:
        configlib.fail("model.name", config.model.name, f"Registered models: {sorted(models.MODELS)}.")
    model_checks.check_model_group(config)
    if check_data and config.data.name not in data.DATASETS:
        configlib.fail("data.name", config.data.name, f"Registered datasets: {sorted(data.DATASETS)}.")
    _validate_data(config, check_data)
    _validate_plan(config)
    model_checks.check_unet_size(config)
    model_checks.check_unet_widths(config)
    _validate_analysis(config)
    if config.data.get("image_channels", 3) < 1:
        configlib.fail(
            "data.image_channels", config.data.image_channels, "Use 3 for RGB images (1 for grayscale)."
        )
    if not objectives.uses_image_condition(config.experiment) and not models.can_drop_image(
        config.model.name
    ):
        configlib.fail(
            "model.name",
            config.model.name,
            f"Experiment {config.experiment} withholds the image, but this architecture cannot run "
            "without it; choose an image-droppable model.",
        )
    if config.model.get("dtype", "float32") not in configlib.COMPUTE_DTYPES:
        configlib.fail(
            "model.dtype",
            config.model.dtype,
            f"Choose one of {configlib.COMPUTE_DTYPES} (bfloat16: mixed precision with float32 parameters).",
        )
    if config.model.name == "segformer":
        model_checks.check_segformer(config.model)
    if models.is_feed_forward(config.model.name) and config.experiment != "e1":
        configlib.fail(
            "experiment",
            config.experiment,
            f"{config.model.name} is a feed-forward reference (image -> mask logits, no x_t): train it as "
            "e1, or choose a diffusion architecture.",
        )
    if config.diffusion.mask_range not in diffusion.MASK_RANGES:
        configlib.fail(
            "diffusion.mask_range", config.diffusion.mask_range, f"Choose one of {diffusion.MASK_RANGES}."
        )
    if config.diffusion.schedule not in diffusion.BETA_SCHEDULES:
        configlib.fail(
            "diffusion.schedule",
            config.diffusion.schedule,
            f"Registered schedules: {sorted(diffusion.BETA_SCHEDULES)}.",
        )
    if config.objective.loss not in ("published", "eps_mse"):
        configlib.fail("objective.loss", config.objective.loss, "Choose 'published' or 'eps_mse'.")
    if config.objective.reduction not in ("mean", "sum"):
        configlib.fail("objective.reduction", config.objective.reduction, "Choose 'mean' or 'sum'.")
    prediction = config.objective.get("prediction", None)
    if prediction is not None and prediction not in objectives.PREDICTIONS:
        configlib.fail(
            "objective.prediction",
            prediction,
            f"Choose one of {objectives.PREDICTIONS} (what an E2/E3 network predicts), or leave it unset for the "
            "experiment's own (E2: eps, E3: x0).",
        )
    if prediction not in (None, "eps") and config.experiment == "e4":
        configlib.fail(
            "objective.prediction", prediction, "E4 (image generation) predicts eps; leave it unset for E4."
        )
    _validate_beyond_paper(config)
    _validate_process(config)
    if config.objective.get("dice", "per_example") not in ("per_example", "batch"):
        configlib.fail(
            "objective.dice", config.objective.dice, "Choose 'per_example' or 'batch' (nnU-Net's)."
        )
    if config.train.get("optimizer", "adam") not in ("adam", "sgd_nesterov"):
        configlib.fail(
            "train.optimizer", config.train.optimizer, "Choose 'adam' or 'sgd_nesterov' (nnU-Net's)."
        )
    if config.train.get("lr_schedule", "constant") not in ("constant", "poly"):
        configlib.fail(
            "train.lr_schedule", config.train.lr_schedule, "Choose 'constant' or 'poly' (nnU-Net's)."
        )
    if config.diffusion.variance not in ("fixed_large", "fixed_small"):
        configlib.fail(
            "diffusion.variance",
            config.diffusion.variance,
            "Choose 'fixed_large' or 'fixed_small' (a learned variance is diffusion.learn_sigma=True).",
        )
    _validate_timesteps(config)
    if config.diffusion.num_timesteps < 2:
        configlib.fail("diffusion.num_timesteps", config.diffusion.num_timesteps, "Use at least 2 timesteps.")
    _validate_schedule(config)
    if config.objective.e1_timestep >= config.diffusion.num_timesteps:
        configlib.fail(
            "objective.e1_timestep",
            config.objective.e1_timestep,
            f"Use -1 (T-1) or a value below diffusion.num_timesteps={config.diffusion.num_timesteps}.",
        )
    run_checks.check_train(config)
    run_checks.check_eval(config)
