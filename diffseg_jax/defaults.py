"""All config defaults, shared by every experiment config (the repository's ``configs/`` files start from them).

``get_config(arg)`` takes comma-separated variant tokens: a model name from the registry (``ensemdiff``) and
``tiny`` (a few-channel, few-step variant for tests and CPUs). Experiment files (``configs/e2_isic.py``) do
``from diffseg_jax import defaults``, call :func:`get_config` and set what differs. The command line locks the
returned config: overriding an unknown key fails. Part of the package, so a config file finds it from any working
directory and from an installed package (``configs/base.py`` re-exports it for older config files).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from diffseg_jax.model_defaults import (  # noqa: F401 — also the names config files use as defaults.<name>
    MODEL_DEFAULTS,
    PUBLISHED_SCHEMES,
    apply_reference,
    apply_scheme,
    is_feed_forward,
    tiny_model,
)


def parse_arg(arg: str | None) -> tuple[str, bool]:
    """Splits ``'ensemdiff,tiny'`` into (model name, tiny?)."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    tiny = "tiny" in tokens
    names = [t for t in tokens if t != "tiny"]
    unknown = [t for t in names if t not in MODEL_DEFAULTS]
    if unknown or len(names) > 1:
        raise ValueError(
            f"Unknown config variant(s) {unknown or names} in {arg!r}; use at most one of "
            f"{sorted(MODEL_DEFAULTS)} and/or 'tiny', e.g. ':ensemdiff,tiny'."
        )
    return (names[0] if names else "ensemdiff"), tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default configuration: E2 with EnsemDiff on the synthetic lesion dataset."""
    model_name, tiny = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.experiment = "e2"  # e1 feed-forward, e2 diffusion segmentation, e3 mask prediction, e4 generation
    c.seed = 0

    c.data = ml_collections.ConfigDict(
        dict(
            name="synthetic",
            kind="lesion",
            image_size=64,
            image_channels=3,  # for --mode summary, which reads no data; training takes the data's channels
            num_train=512,
            num_test=64,
            seed=0,
            augment_flips=False,
            # Input pipeline: threads read batches ahead; worker processes (grain mp_prefetch) decode and
            # augment off the training process for real datasets on accelerators (0 in tests and on CPUs).
            num_threads=4,
            num_workers=0,
            prefetch=8,
            augment="none",  # or 'nnunet' / 'segdiff': nnU-Net's 2D / SegDiff's MoNuSeg augmentation in the step
        )
    )
    c.data.data_dir = config_dict.placeholder(str)  # tfds data_dir; None → ~/tensorflow_datasets
    # Real datasets (monuseg2018, segmentation_folder; isic2016 when set) are read from manual_dir, stored at
    # resize x resize px (None: image_size). Training images larger than image_size are randomly cropped
    # to it; evaluation cuts them into image_size tiles and stitches the outputs ('tiles') or feeds them
    # whole ('whole'). fit/validation splits hold out validation_fraction of train; a dataset without a
    # test split holds out test_fraction of train. mask_threshold binarises many-valued folder masks;
    # image_scaling brings folder (and --mode predict) images of more than 8 bits to 8: 'auto' stretches each
    # 16-bit/float image from its 1st to 99.8th percentile, 'high_byte' keeps 16-bit images' high byte,
    # 'percentile' stretches every image (see diffseg_jax.data.files.read_image); train_ids picks MoNuSeg's
    # classic 30 training tiles or all the zip holds.
    c.data.manual_dir = config_dict.placeholder(str)
    # isic2016 with no manual_dir downloads the four official Part 1 zips from this folder URL (tfds' download
    # manager: cached in <data_dir>/downloads, checksums recorded on the first download and verified after).
    c.data.download_base_url = "https://isic-challenge-data.s3.amazonaws.com/2016"
    c.data.resize = config_dict.placeholder(int)
    c.data.eval_tiling = "tiles"
    c.data.validation_fraction = 0.2
    c.data.test_fraction = 0.2
    c.data.split_seed = 0
    c.data.mask_threshold = config_dict.placeholder(float)
    c.data.image_scaling = "auto"
    c.data.train_ids = "classic30"

    c.model = MODEL_DEFAULTS[model_name]()

    # Linear 1e-4 → 0.02 over T = 1000, as in all three published codes.
    # learn_sigma: the network also predicts v for improved DDPM's learned-range variance (hybrid loss).
    # variance: the sampler's fixed variance when learn_sigma is off ('fixed_large' as all three codes).
    c.diffusion = ml_collections.ConfigDict(
        dict(
            schedule="linear",
            num_timesteps=1000,
            beta_start=1e-4,
            beta_end=0.02,
            mask_range="symmetric",
            learn_sigma=False,
            variance="fixed_large",
        )
    )
    # Terminal noise (beyond the paper, diffseg_jax.adaptive): 'rescale' (√ᾱ rescaled, Lin et al. 2024)
    # or 'snr_shift' moves ᾱ_{T-1} to alpha_bar_T; -1 picks the largest ᾱ_{T-1} at which the training masks'
    # model-free error curve has converged (information left <= terminal_tol), recorded in config.json.
    # process (beyond the paper, issue 33): 'gaussian' noise (the paper's), or 'bernoulli': BerDiff's Bernoulli
    # diffusion of the {0,1} mask (Chen et al. 2023; diffseg_jax.diffusion.bernoulli) on the same betas, with its
    # KL + objective.bernoulli_bce_weight x BCE loss (no learned variance whatever learn_sigma says; mean over pixels
    # whatever objective.reduction says) and its samplers (eval.sampler 'ddpm': ancestral over all T; 'ddim': its
    # DDIM-like K steps, no η). mask_range maps x_t ∈ {0,1} for the network ('binary': {0,1} as BerDiff's code).
    # E2/E3 only; E1 ignores it.
    c.diffusion.process = "gaussian"
    c.diffusion.terminal = "none"
    c.diffusion.alpha_bar_T = -1.0
    c.diffusion.terminal_tol = 0.01

    # Which timesteps training sees (diffseg_jax.diffusion.timesteps). weighting 'fingerprint': loss weights
    # ∝ |d error/dt| of the mask prediction error curve (smoothed over smoothing·T steps, floored at floor x the
    # mean, mean 1). sampling 'fingerprint': t drawn ∝ those weights; 'loss_aware': improved DDPM's sampler
    # (history losses per t, uniform_prob); any proposal comes with the importance correction 1/(T p(t)).
    # curve: 'model_free' (from num_masks training masks, under the run's schedule) or a curves.csv /
    # model_free.csv from --mode analyse.
    c.timesteps = ml_collections.ConfigDict(
        dict(
            weighting="uniform",
            sampling="uniform",
            curve="model_free",
            smoothing=0.05,
            floor=0.1,
            num_masks=64,
            history=10,
            uniform_prob=0.001,
        )
    )

    # loss: 'published' = each architecture's published loss (learned variance, reduction, cal term, as
    # set by its scheme below); 'eps_mse' = the paper's plain Eq. 3 (Eq. 2 for E3) for every architecture.
    c.objective = ml_collections.ConfigDict(
        dict(loss="published", reduction="mean", cal_weight=0.0, e1_timestep=-1)  # e1_timestep -1: T-1
    )
    # prediction: what an E2/E3 network predicts, 'eps', 'x0' or 'v' (Salimans & Ho 2022); None: the experiment's
    # own (E2 ε as the paper's Eq. 3, E3 x0 as Eq. 2). Through the loss, both samplers and the curves; beyond
    # the paper for E2 (the published schemes keep ε). E1 ignores it, E4 keeps ε.
    c.objective.prediction = config_dict.placeholder(str)
    # E1's Dice term: 'per_example' (smooth 1) or nnU-Net's 'batch' Dice (pooled over the batch, smooth 1e-5).
    c.objective.dice = "per_example"
    c.objective.dice_smooth = 1.0
    # Beyond the paper (issue 33), options of the same loss for E2/E3 (E1 ignores them; see diffseg_jax.objectives):
    # loss_weighting 'min_snr': Min-SNR-γ weights over t (Hang et al. 2023), snr_gamma = γ; 'none': the plain loss.
    c.objective.loss_weighting = "none"
    c.objective.snr_gamma = 5.0
    # self_condition: the previous x̂0 as extra input channels (Chen et al. 2022, "Analog Bits"); in training a
    # stop-gradient first pass feeds them with probability self_condition_prob (else zeros); samplers feed the
    # previous step's x̂0. A self-conditioned network takes twice the mask's channels as x.
    c.objective.self_condition = False
    c.objective.self_condition_prob = 0.5
    # recycle_prob: the probability that x_t is built from the model's own stop-gradient x̂0 instead of the ground
    # truth (Fu et al. 2023, "A Recycling Training Strategy", arXiv 2308.16355, which uses 1); 0 = off.
    c.objective.recycle_prob = 0.0
    # λ of Bernoulli diffusion's loss, KL + λ·BCE of the network's target (diffusion.process='bernoulli'; BerDiff's
    # code adds the two: 1).
    c.objective.bernoulli_bce_weight = 1.0

    # EnsemDiff's published scheme: AdamW(lr 1e-4, wd 0) = Adam, batch 10, EMA 0.9999, no clipping.
    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=60_000,
            batch_size=10,
            lr=1e-4,
            weight_decay=0.0,
            grad_clip=0.0,
            ema_decay=0.9999,
            log_every=100,
            ckpt_every=5000,
            keep_checkpoints=3,
            # Checkpoints at multiples of keep_every (0: none) are kept for good besides the last
            # keep_checkpoints (e.g. 1000: a learning curve's models); and one at each fraction of num_steps in
            # keep_at, saved there whatever ckpt_every: 0.75 keeps the model after 75 % of training (the paper's
            # Fig. 3) for --mode analyse --config.eval.step=45000 of 60000 steps.
            keep_every=0,
            keep_at=(0.75,),
        )
    )
    # A weights file (.safetensors, .pt/.pth/.bin, .npz) imported by name into a run that has no checkpoint
    # yet (diffseg_jax.convert, with the model's import rules). None: random init, or SegFormer's
    # model.pretrained (a Hub repo id such as nvidia/mit-b3, or a file), which this setting overrides.
    c.train.init_weights = config_dict.placeholder(str)
    # optimizer: 'adam' (AdamW if weight_decay > 0) or nnU-Net's 'sgd_nesterov' (momentum, L2 weight decay);
    # lr_schedule: 'constant' or nnU-Net's 'poly' (lr·(1 - step/num_steps)^0.9).
    c.train.optimizer = "adam"
    c.train.momentum = 0.99
    c.train.lr_schedule = "constant"

    # batch_size: images (or tiles) per device call; 0 chooses it from the device's memory (XLA's memory analysis
    # of one image's ensemble against the free memory: auto_batch.auto_batch_size, logged), an explicit value fixes
    # it (the samples depend on it: batch i draws from fold_in(seed, i)).
    # member_chunk: members sampled at once per image (lax.map over chunks bounds memory; 0 = all at once).
    # pooling: which IoU / ECE metrics.json reports as `iou` / `ece` (both are always written):
    # 'pooled' over all test pixels (a torchmetrics metric object accumulated over the test set) or
    # 'per_image' (the mean of per-image values). ece_bins: equal-width bins (the paper: 10).
    # predict_chunk: images --mode predict reads and samples at a time (a multiple of batch_size; bounds memory).
    # step: the checkpoint that evaluate, predict and analyse read (-1: the latest; an earlier one must be kept,
    # see train.keep_every). tta: test-time augmentation, every member also run on the flipped ('flips', x4) or
    # all eight rotated/flipped ('d4', x8) images and its output turned back (E1/E2; beyond the paper).
    # member_output: 'soft' averages the members' values in [0, 1] (a diffusion sample mapped from mask space, a
    # feed-forward sigmoid), as all three official codes do; 'hard' thresholds each member at 0.5 first, so the
    # mean is the fraction of members voting foreground (E1/E2/E3; beyond the paper).
    c.eval = ml_collections.ConfigDict(
        dict(
            enabled=True,
            ensemble_size=5,
            sampler="ddpm",
            ddim_steps=50,
            ddim_eta=0.0,
            num_images=-1,
            batch_size=0,
            member_chunk=5,
            use_ema=False,
            clip_denoised=True,
            seed=10,
            num_figure_images=4,
            pooling="pooled",
            ece_bins=10,
            predict_chunk=256,
            step=-1,
            tta="none",
            member_output="soft",
            # E1 samples (and its protocol validates) with the raw weights, as the paper's classical training;
            # True: with the EMA weights as eval.use_ema says for diffusion.
            e1_use_ema=False,
        )
    )

    # The feed-forward protocol (--mode e1_protocol): at most max_epochs epochs on the 80 % split (-1: as
    # many as train.num_steps allows), stopping after `patience` validations without a better validation loss
    # (0: never); then retraining on all training data for the best epoch count. The same for diffusion
    # segmentation (--mode e2_protocol, beyond the paper): every validate_every steps (0: train.ckpt_every) the
    # pooled validation IoU of an ensemble_size-member ensemble (sampler 'ddim' with ddim_steps steps, or 'ddpm'
    # over all T: slower, but what an evaluation with DDPM sees, which can differ by 15 IoU points for a
    # short-trained model; see the README's results); the best step count (in epochs) is retrained on all
    # training data.
    c.protocol = ml_collections.ConfigDict(
        dict(max_epochs=-1, patience=0, validate_every=0, ensemble_size=3, sampler="ddim", ddim_steps=25)
    )

    # --mode analyse (Sec. 4.2-4.3): which analyses, on a timestep grid of every t_step-th t, over the first
    # num_images test images and num_draws noise draws each; t_chunk timesteps at once (0: all; the
    # model-free curve sizes its chunks to memory, model_free.CHUNK_FLOATS, with t_chunk as the cap);
    # smoothing: moving-average window of the figures, in timesteps whatever t_step is (the arrays stay raw).
    c.analysis = ml_collections.ConfigDict(
        dict(
            analyses=("mask_error", "loss", "forward", "model_free"),
            t_step=1,
            num_images=16,
            num_draws=2,
            batch_size=8,
            t_chunk=50,
            smoothing=25,
            forward_timesteps=(0, 100, 200, 400, 600, 800, 999),
            seed=20,
        )
    )

    apply_scheme(c, model_name)
    if tiny:
        apply_tiny(c)
    apply_reference(c, model_name)
    return c


def apply_tiny(c: ml_collections.ConfigDict) -> None:
    """Shrinks a config to CPU-test scale: 32 px, a 32-channel 3-level UNet, T = 100, a few steps."""
    c.model = tiny_model(c.model.name)
    c.data.image_size = 32
    c.data.num_train = 32
    c.data.num_test = 8
    c.diffusion.num_timesteps = 100
    c.train.num_steps = 4
    c.train.batch_size = 8
    c.train.log_every = 2
    c.train.ckpt_every = 2
    c.train.ema_decay = 0.9
    c.eval.ensemble_size = 2
    c.eval.sampler = "ddim"
    c.eval.ddim_steps = 5
    c.eval.num_images = 4
    c.eval.batch_size = 4
    c.eval.num_figure_images = 2
    c.analysis.num_images = 4
    c.analysis.num_draws = 1
    c.analysis.t_step = 10
    c.analysis.smoothing = 30  # timesteps: 3 samples of the t_step=10 grid
    c.analysis.forward_timesteps = (0, 20, 40, 60, 80, 99)


# The paper's three datasets (Sec. 3.1 and 4.1): where they are read from, how they are stored and cut, and the
# ensemble sizes of Table 1 (25 for MoNuSeg, 10 for ISIC16, 5 for HER2, whose stand-in is any image folder).
DATASET_SETTINGS = {
    # MedSegDiff's ISIC loader: resized to 256 x 256, no augmentation.
    "isic": dict(
        data=dict(name="isic2016", image_size=256, resize=256, augment_flips=False), ensemble_size=10
    ),
    # SegDiff's MoNuSeg loader: tiles resized 1000 -> 512, random 256 crops with flips for training, the 512
    # image evaluated as four 256 tiles (its random affine and colour jitter: ARCHITECTURE_DATASET_SETTINGS).
    "monuseg": dict(
        data=dict(name="monuseg2018", image_size=256, resize=512, augment_flips=True, eval_tiling="tiles"),
        ensemble_size=25,
    ),
    # A private folder such as the paper's HER2 set: 256 px, a fifth held out as test if no test/ folder.
    "folder": dict(
        data=dict(
            name="segmentation_folder", image_size=256, resize=256, augment_flips=True, test_fraction=0.2
        ),
        ensemble_size=5,
    ),
}
# What an architecture's published code does on one dataset beyond its scheme: SegDiff's MoNuSeg loader applies
# RandomAffine(22°, scale 0.75-1.25) and ColorJitter(0.4, 0.4, 0.4, 0.1) (diffseg_jax.data.augment, in the
# step); --config.data.augment=none turns it off.
ARCHITECTURE_DATASET_SETTINGS = {("segdiff", "monuseg"): dict(data=dict(augment="segdiff"))}
# At test scale ('tiny'): 32 px models; MoNuSeg keeps its 2 x 2 tiles of a twice-as-large stored image.
TINY_RESIZE = {"isic": 32, "monuseg": 64, "folder": 32}
# What each experiment changes beyond the architecture's published scheme.
# A feed-forward reference (SegFormer) keeps its own published scheme: these are the paper's protocol for the
# diffusion architectures.
EXPERIMENT_SETTINGS = {
    "e1": dict(train=dict(lr=1e-5)),  # The paper's feed-forward protocol: Dice + CE, Adam, lr 1e-5.
    "e2": {},
    "e3": {},
    "e4": {},
}


def experiment_config(experiment: str, dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Experiment ``e1``..``e4`` on dataset ``isic`` / ``monuseg`` / ``folder``; ``arg`` as in :func:`get_config`."""
    model_name, tiny = parse_arg(arg)
    c = get_config(model_name)
    c.experiment = experiment
    settings = DATASET_SETTINGS[dataset]
    for key, value in settings["data"].items():
        c.data[key] = value
    for group, values in ARCHITECTURE_DATASET_SETTINGS.get((model_name, dataset), {}).items():
        for key, value in values.items():
            c[group][key] = value
    feed_forward = is_feed_forward(model_name)
    c.eval.ensemble_size = 1 if feed_forward else settings["ensemble_size"]
    for group, values in ({} if feed_forward else EXPERIMENT_SETTINGS[experiment]).items():
        for key, value in values.items():
            c[group][key] = value
    if tiny:
        apply_tiny(c)
        c.data.resize = TINY_RESIZE[dataset]
    if feed_forward:
        if experiment != "e1":
            raise ValueError(
                f"{model_name} is a feed-forward reference: it runs in E1 only, not {experiment}."
            )
        apply_reference(c, model_name)
        if model_name == "segformer" and dataset in PRETRAINED_DATASETS and not tiny:
            c.model.pretrained = PRETRAINED_ENCODER
    return c


# SegFormer's ImageNet-1k encoder on the Hugging Face Hub (the paper's reference is ImageNet-pretrained), for the
# E1 configs of the paper's public datasets; tiny (CPU-test) configs have other widths and start at random.
PRETRAINED_ENCODER = "nvidia/mit-b3"
PRETRAINED_DATASETS = ("isic", "monuseg")
