"""One check of a whole config before anything is built or written: every impossible setting fails naming the key,
the value and the fix (``diffseg_jax.configlib.ConfigError``), as one message."""

from __future__ import annotations

import os

import ml_collections

from diffseg_jax import configlib, data, diffusion, metrics, model_checks, models, objectives, run_checks
from diffseg_jax.data.augment import AUGMENTATIONS
from diffseg_jax.diffusion import timesteps

# Every setting that takes one of a fixed set of values, with the values the module that implements it declares
# (a registry dict: its keys, as they are when checked, so a model registered later is allowed);
# check_choices checks them all, with one message. build (optimizers) and sampling (member outputs) sit beside or
# above this module in the layers, so their tuples are repeated here; tests/test_validation.py checks they agree.
CHOICES: dict[str, tuple | dict] = {
    "experiment": objectives.EXPERIMENTS,
    "model.name": models.MODELS,
    "model.dtype": configlib.COMPUTE_DTYPES,
    "data.image_scaling": tuple(data.files.IMAGE_SCALINGS),
    "data.eval_tiling": data.EVAL_TILINGS,
    "data.augment": AUGMENTATIONS,
    "diffusion.schedule": diffusion.BETA_SCHEDULES,
    "diffusion.mask_range": diffusion.MASK_RANGES,
    "diffusion.variance": diffusion.FIXED_VARIANCES,
    "diffusion.terminal": diffusion.TERMINAL_METHODS,
    "timesteps.weighting": timesteps.WEIGHTINGS,
    "timesteps.sampling": timesteps.SAMPLINGS,
    "objective.loss": objectives.LOSSES,
    "objective.reduction": objectives.REDUCTIONS,
    "objective.prediction": (None, *objectives.PREDICTIONS),
    "objective.dice": objectives.DICE_TERMS,
    "objective.loss_weighting": objectives.LOSS_WEIGHTINGS,
    "train.optimizer": ("adam", "sgd_nesterov"),  # build.OPTIMIZERS
    "train.lr_schedule": ("constant", "poly"),  # build.LR_SCHEDULES
    "eval.sampler": diffusion.SAMPLERS,
    "eval.tta": diffusion.TTA_TRANSFORMS,
    "eval.member_output": ("soft", "hard"),  # sampling.MEMBER_OUTPUTS
    "eval.pooling": metrics.POOLINGS,
    "protocol.sampler": diffusion.SAMPLERS,
}
# What a choice means, where the values alone do not say.
_CHOICE_NOTES = {
    "model.dtype": "bfloat16: mixed precision with float32 parameters",
    "diffusion.variance": "a learned variance is diffusion.learn_sigma=True",
    "objective.loss": "each architecture's published loss, or the paper's plain ε-MSE (Eq. 3)",
    "objective.prediction": "what an E2/E3 network predicts; None: the experiment's own, E2 eps and E3 x0",
    "objective.dice": "batch: nnU-Net's Dice over the batch",
    "objective.loss_weighting": "min_snr: Min-SNR-γ, Hang et al. 2023",
    "train.optimizer": "sgd_nesterov: nnU-Net's",
    "train.lr_schedule": "poly: nnU-Net's",
    "eval.tta": "flips: 4 transforms, d4: 8 rotations and flips",
    "eval.member_output": "soft averages the members' values, as the official codes; hard their votes",
}


def allowed(key: str) -> tuple:
    """The values setting ``key`` of :data:`CHOICES` may take now (a registry's names sorted)."""
    choices = CHOICES[key]
    return tuple(sorted(choices)) if isinstance(choices, dict) else tuple(choices)


def check_choices(config: ml_collections.ConfigDict) -> None:
    """Each setting of :data:`CHOICES` holds one of its values (a model group without the setting passes)."""
    for key in CHOICES:
        choices = allowed(key)
        node = config
        *groups, name = key.split(".")
        for group in groups:
            node = node[group]
        if name not in node:
            continue
        if node[name] not in choices:
            note = f" ({_CHOICE_NOTES[key]})" if key in _CHOICE_NOTES else ""
            configlib.fail(key, node[name], f"Choose one of {choices}{note}.")


def _validate_data(config: ml_collections.ConfigDict, check_data: bool) -> None:
    d = config.data
    if check_data and d.name not in data.MANUAL_DATASETS and d.manual_dir is not None:
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
        if d.kind not in data.synthetic.KINDS:
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
    if check_data and d.name in data.DOWNLOADED_DATASETS and d.manual_dir is None:
        url = d.download_base_url or ""
        if not url.startswith(("http://", "https://")):
            configlib.fail(
                "data.download_base_url",
                d.download_base_url,
                f"Dataset {d.name!r} is downloaded from this URL (the folder its official zips are in); give an "
                "http(s) URL, or an unpacked copy as --config.data.manual_dir.",
            )
    elif check_data and d.name in data.MANUAL_DATASETS:
        manual_dir = d.manual_dir
        if manual_dir is None:
            configlib.fail(
                "data.manual_dir",
                manual_dir,
                f"Dataset {d.name!r} is read from a folder: pass --config.data.manual_dir=/path/to/it.\n"
                + data.pipeline.MANUAL_INSTRUCTIONS[d.name],
            )
    manual_dir = d.manual_dir
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
    scaling = d.image_scaling
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
    """--mode analyse's counts."""
    a = config.analysis
    for key in ("t_step", "num_draws", "batch_size"):
        if a[key] < 1:
            configlib.fail(f"analysis.{key}", a[key], "Use a positive integer.")
    if a.num_images == 0 or a.num_images < -1:
        configlib.fail("analysis.num_images", a.num_images, "Use -1 (every test image) or a positive count.")
    if a.t_chunk < 0:
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
    """Terminal noise and the timestep weighting / sampling."""
    d = config.diffusion
    terminal = d.terminal
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
    if d.terminal != "none" and not 0 < d.terminal_tol < 1:
        configlib.fail("diffusion.terminal_tol", d.terminal_tol, "Use a fraction in (0, 1), e.g. 0.01.")
    tc = config.timesteps
    if tc.num_masks < 1:
        configlib.fail(
            "timesteps.num_masks", tc.num_masks, "The fingerprint needs at least one training mask, e.g. 64."
        )
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
    weighting = o.loss_weighting
    if weighting == "min_snr" and not o.snr_gamma > 0:
        configlib.fail("objective.snr_gamma", o.snr_gamma, "Use a positive γ, e.g. 5 (Hang et al. 2023).")
    if not 0.0 < o.self_condition_prob <= 1.0:
        configlib.fail(
            "objective.self_condition_prob",
            o.self_condition_prob,
            "Use a probability in (0, 1], e.g. 0.5 (Analog Bits); objective.self_condition=False turns it off.",
        )
    if not 0.0 <= o.recycle_prob <= 1.0:
        configlib.fail(
            "objective.recycle_prob", o.recycle_prob, "Use a probability in [0, 1]: 0 is off, 1 Fu et al.'s."
        )
    if config.experiment == "e4" and (o.self_condition or o.recycle_prob > 0):
        configlib.fail(
            "objective.self_condition / objective.recycle_prob",
            (o.self_condition, o.recycle_prob),
            "Self-conditioning and recycling are options of mask diffusion (E2, E3); turn them off for E4.",
        )


def _validate_process(config: ml_collections.ConfigDict) -> None:
    """diffusion.process, and what Bernoulli diffusion (BerDiff) cannot be combined with (E1 ignores it)."""
    process = config.diffusion.process
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
    if config.eval.sampler == "ddim" and config.eval.ddim_eta != 0:
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
    check_choices(config)
    model_checks.check_model_group(config)
    if check_data and config.data.name not in data.DATASETS:
        configlib.fail("data.name", config.data.name, f"Registered datasets: {sorted(data.DATASETS)}.")
    _validate_data(config, check_data)
    _validate_plan(config)
    model_checks.check_unet_size(config)
    model_checks.check_unet_widths(config)
    _validate_analysis(config)
    if config.data.image_channels < 1:
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
    model_checks.check_train_step_forms(config)
    if config.model.name == "segformer":
        model_checks.check_segformer(config.model)
    if models.is_feed_forward(config.model.name) and config.experiment != "e1":
        configlib.fail(
            "experiment",
            config.experiment,
            f"{config.model.name} is a feed-forward reference (image -> mask logits, no x_t): train it as "
            "e1, or choose a diffusion architecture.",
        )
    prediction = config.objective.prediction
    if prediction not in (None, "eps") and config.experiment == "e4":
        configlib.fail(
            "objective.prediction", prediction, "E4 (image generation) predicts eps; leave it unset for E4."
        )
    _validate_beyond_paper(config)
    _validate_process(config)
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
