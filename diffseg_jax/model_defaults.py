"""Each architecture's published model group (``config.model``), its training scheme and its tiny variant.

The widths, depths, attention resolutions and schemes of the official codes (EnsemDiff: JuliaWolleb/
Diffusion-based-Segmentation; SegDiff: tomeramit/SegDiff; MedSegDiff: KidsWithTokens/MedSegDiff; SegFormer:
Hugging Face ``SegformerForSemanticSegmentation``; nnU-Net: MIC-DKFZ/nnUNet's plan), as ``MODEL_DEFAULTS[name]()``,
``PUBLISHED_SCHEMES[name]`` (optimizer, learning rate, batch, EMA, steps, T and β, loss), and
``tiny_model(name)``: a few-channel variant from the same code for tests and CPUs.
``diffseg_jax.defaults`` builds whole configs from them."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from diffseg_jax import models

# How the guided-diffusion UNets (EnsemDiff, MedSegDiff, SegDiff) compute their train step (issue 31); the
# same parameters under every value, and these defaults are the published computation. remat_policy: what
# model.remat=True keeps ('nothing': guided-diffusion's use_checkpoint; 'conv_outputs': the ResBlocks' 3x3
# conv outputs; 'dots': every conv and matmul output). norm_impl: GroupNorm entirely in float32 ('float32')
# or only its statistics ('stats_float32', applied in the compute dtype). attention_impl: the explicit
# softmax(QK^T)V ('explicit'), jax.nn.dot_product_attention ('dot_product') or its cuDNN fused kernel
# ('cudnn', GPU and bf16 only). See docs/performance.md, "Train step on the GPU (issue 31)".
TRAIN_STEP_FORMS = dict(remat_policy="nothing", norm_impl="float32", attention_impl="explicit")


def ensemdiff_model(image_size: int = 256) -> ml_collections.ConfigDict:
    """The EnsemDiff UNet as in the JuliaWolleb/Diffusion-based-Segmentation README flags."""
    channel_mult = {
        512: (1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }.get(image_size, (1, 1, 2, 2, 4, 4))
    return ml_collections.ConfigDict(
        dict(
            name="ensemdiff",
            model_channels=128,
            channel_mult=channel_mult,
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_heads=1,
            num_head_channels=-1,
            dropout=0.0,
            use_scale_shift_norm=False,
            dtype="float32",  # compute dtype: 'bfloat16' for mixed precision (params stay float32)
            remat=False,  # recompute ResBlock activations in the backward pass to save memory
            **TRAIN_STEP_FORMS,
        )
    )


def segdiff_model(image_size: int = 256) -> ml_collections.ConfigDict:
    """SegDiff as run for MoNuSeg (tomeramit/SegDiff: deeper_net, 3 res blocks, attention "16,8", 12 RRDB)."""
    del image_size  # Attention sits at downsample factors, as in the official code at 256 px.
    return ml_collections.ConfigDict(
        dict(
            name="segdiff",
            model_channels=128,
            channel_mult=(1, 1, 1, 2, 2, 4, 4),
            num_res_blocks=3,
            attention_resolutions=(16, 32),
            num_heads=4,
            num_head_channels=-1,
            dropout=0.0,
            use_scale_shift_norm=False,
            rrdb_blocks=12,
            rrdb_features=64,
            rrdb_growth=32,
            # The official loader's per-channel statistics of MoNuSeg on the 0-255 scale (datasets/monu.py),
            # applied to the [0, 1] image inside the model.
            image_mean=(142.07, 98.48, 132.96),
            image_std=(65.78, 57.05, 57.78),
            dtype="float32",
            remat=False,
            **TRAIN_STEP_FORMS,
        )
    )


def medsegdiff_model(image_size: int = 256, version: str = "v1") -> ml_collections.ConfigDict:
    """MedSegDiff at its ISIC flags (EnsemDiff's UNet on [image, x_t]) plus the nnU-Net condition network.

    ``version='v1'`` is the paper's model (FF-Parser, dynamic conditional encoding); ``'new'`` is the
    repository's current default. The FF-Parser's weights take the data's image size (set at build time).
    """
    model = ensemdiff_model(image_size)
    model.name = "medsegdiff" if version == "v1" else "medsegdiff_new"
    model.update(cond_features=(32, 64, 128, 256, 480), cond_dropout=0.5, bottleneck="trained")
    return model


def segformer_model(image_size: int = 256, variant: str = "b3") -> ml_collections.ConfigDict:
    """The SegFormer feed-forward reference (HF SegformerForSemanticSegmentation), B3 by default.

    ``variant`` picks depths, widths, heads, spatial-reduction ratios and decoder width from
    ``diffseg_jax/models/segformer.py:VARIANTS`` (b0..b5); the keys left at None override single entries
    (``--config.model.depths='(1,1,1,1)'``). ``normalize``: ImageNet mean/std inside the model, as HF's
    image processor (the pretrained encoders expect it); needs 3-channel images. ``depthwise``: the Mix-FFN's
    depthwise conv as shifted multiply-adds (``'shift'``, faster under XLA) or ``nn.Conv`` (``'conv'``, HF's
    form); the same parameters and outputs. ``pretrained``: the weights a run without a checkpoint starts from,
    a Hugging Face Hub repo id (``nvidia/mit-b3``: the ImageNet-1k encoder, its classifier skipped and the
    decoder left at initialisation) fetched through the Hub's cache, or a local file; ``pretrained_revision``
    pins the repo's branch, tag or commit (None: main). The E1 ISIC/MoNuSeg configs default to
    ``nvidia/mit-b3``, as the paper's ImageNet-pretrained reference; ``train.init_weights`` takes precedence.
    """
    del image_size  # Any size: the logits are upsampled to the input.
    return ml_collections.ConfigDict(
        dict(
            name="segformer",
            variant=variant,
            depths=config_dict.placeholder(tuple),
            hidden_sizes=config_dict.placeholder(tuple),
            num_heads=config_dict.placeholder(tuple),
            sr_ratios=config_dict.placeholder(tuple),
            decoder_size=config_dict.placeholder(int),
            drop_path_rate=0.1,
            classifier_dropout=0.1,
            normalize=True,
            depthwise="shift",
            dtype="float32",  # compute dtype ('bfloat16': parameters, norms, softmax and the head stay float32)
            pretrained=config_dict.placeholder(str),
            pretrained_revision=config_dict.placeholder(str),
        )
    )


def nnunet_model(image_size: int = 256) -> ml_collections.ConfigDict:
    """nnU-Net's 2D PlainConvUNet (nnU-Net v2.8.1 planner and trainer defaults), a feed-forward reference.

    ``plan.mode='auto'`` plans the network, the patch (``data.image_size``) and the batch size from the training
    split at start-up (``diffseg_jax.planning``); ``'fixed'`` uses the values below as they stand: the plan of
    256 px images (ISIC 2016: 900 training images, 7 stages, batch 45). ``plan.num_classes`` counts the
    background, as nnU-Net's labels (it enters the VRAM estimate only); the network predicts one logit.
    """
    del image_size  # the plan follows the data
    return ml_collections.ConfigDict(
        dict(
            name="nnunet",
            plan=dict(
                mode="auto",
                base_features=32,
                max_features=512,
                gpu_memory_gb=8.0,
                num_classes=2,
                median_size=(0.0, 0.0),  # set by the planner: the fingerprint it planned from
                num_images=0,
            ),
            features_per_stage=(32, 64, 128, 256, 512, 512, 512),
            strides=((1, 1),) + ((2, 2),) * 6,
            kernel_sizes=((3, 3),) * 7,
            n_conv_per_stage=(2,) * 7,
            n_conv_per_stage_decoder=(2,) * 6,
            deep_supervision=True,
            normalize=True,  # nnU-Net's per-image, per-channel z-score, inside the network
            dtype="float32",  # compute dtype ('bfloat16': parameters, norm statistics and the heads stay float32)
        )
    )


def tiny_model(name: str) -> ml_collections.ConfigDict:
    """A few-channel variant of ``name`` from the same code, for tests and CPU runs."""
    model = MODEL_DEFAULTS[name]()
    if name == "segformer":  # not a UNet: a B0-like Mix Transformer with one block per stage
        model.update(
            depths=(1, 1, 1, 1), hidden_sizes=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), decoder_size=32
        )
        return model
    if name == "nnunet":  # still planned from the data, with 8 base features up to 32: 4 stages at 32 px
        model.plan.update(base_features=8, max_features=32)
        model.update(
            features_per_stage=(8, 16, 32, 32),
            strides=((1, 1),) + ((2, 2),) * 3,
            kernel_sizes=((3, 3),) * 4,
            n_conv_per_stage=(2,) * 4,
            n_conv_per_stage_decoder=(2,) * 3,
        )
        return model
    model.update(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=1
    )
    if name == "segdiff":
        model.update(rrdb_blocks=1, rrdb_features=16, rrdb_growth=8)
    if name == "medsegdiff":  # v1: one condition level per UNet downsampling
        model.update(cond_features=(16, 32))
    if name == "medsegdiff_new":  # 'new': anchors of 2·f0 + f1 = model_channels·channel_mult[0] channels
        model.update(cond_features=(8, 16, 32))
    return model


MODEL_DEFAULTS = {
    "ensemdiff": ensemdiff_model,
    "segdiff": segdiff_model,
    "medsegdiff": medsegdiff_model,
    "medsegdiff_new": lambda image_size=256: medsegdiff_model(image_size, version="new"),
    "segformer": segformer_model,
    "nnunet": nnunet_model,
}


def is_feed_forward(model_name: str) -> bool:
    """Whether ``model_name`` is a feed-forward reference (the registry's ``FEED_FORWARD``): E1 only, and
    deterministic, so one ensemble member is the whole ensemble."""
    return models.is_feed_forward(model_name)


# Each architecture's published training scheme, in one place (see shared/reference/*.md for sources).
# Applied by get_config for the chosen model; every value stays overridable from the command line, and
# --config.objective.loss=eps_mse swaps the loss-related parts for the paper's plain ε-MSE.
PUBLISHED_SCHEMES = {
    # JuliaWolleb/Diffusion-based-Segmentation README: AdamW(1e-4, wd 0), batch 10, EMA 0.9999 (sampled with
    # the raw weights), 60k iterations (issue #41), T=1000 linear, learn_sigma with the hybrid loss; masks
    # diffused in {0, 1} as its loader and loss give them (x̂0 still clipped to [-1, 1] when sampling).
    "ensemdiff": {
        "train": dict(lr=1e-4, batch_size=10, ema_decay=0.9999, num_steps=60_000, weight_decay=0.0),
        "diffusion": dict(
            num_timesteps=1000, beta_start=1e-4, beta_end=0.02, learn_sigma=True, mask_range="binary"
        ),
        "objective": dict(reduction="mean", cal_weight=0.0),
        "eval": dict(use_ema=False, clip_denoised=True),
    },
    # tomeramit/SegDiff MoNuSeg: AdamW(1e-4), batch 2 x 4 GPUs, EMA 0.9999 (evaluated with EMA), 300k
    # iterations, T=100 linear (1e-3 -> 0.2), eps-MSE summed over C,H,W, no clipping when sampling; masks
    # diffused as 2m - 1 in {-1, 1}. Its MoNuSeg loader's RandomAffine and ColorJitter: DATASET_SETTINGS.
    # Not reproduced: fp16 training with dynamic loss scaling (fp32 here; bf16 via model.dtype later).
    "segdiff": {
        "train": dict(lr=1e-4, batch_size=8, ema_decay=0.9999, num_steps=300_000, weight_decay=0.0),
        "diffusion": dict(
            num_timesteps=100, beta_start=1e-4, beta_end=0.02, learn_sigma=False, mask_range="symmetric"
        ),
        "objective": dict(reduction="sum", cal_weight=0.0),
        "eval": dict(use_ema=True, clip_denoised=False),
    },
    # KidsWithTokens/MedSegDiff README (ISIC): AdamW(1e-4), batch 8, EMA 0.9999 (the sampler loads either
    # file; raw weights here as EnsemDiff), ~100k steps ("converged"), T=1000 linear, learn_sigma hybrid
    # loss + 10 x MSE(cal, mask); masks diffused in {0, 1} (`res = mask > 0`), x̂0 clipped to [-1, 1].
    # Not reproduced: its "staple" ensembling ((mean)^2); we average members.
    "medsegdiff": {
        "train": dict(lr=1e-4, batch_size=8, ema_decay=0.9999, num_steps=100_000, weight_decay=0.0),
        "diffusion": dict(
            num_timesteps=1000, beta_start=1e-4, beta_end=0.02, learn_sigma=True, mask_range="binary"
        ),
        "objective": dict(reduction="mean", cal_weight=10.0),
        "eval": dict(use_ema=False, clip_denoised=True),
    },
}
PUBLISHED_SCHEMES["medsegdiff_new"] = PUBLISHED_SCHEMES["medsegdiff"]
# NVlabs/SegFormer (mmseg configs segformer_mit-b*_512x512_160k_ade20k) and HF's fine-tuning recipe: AdamW(6e-5,
# wd 0.01), batch 16 (2 x 8 GPUs), 160k iterations, no EMA; deterministic, so one ensemble member.
# Not reproduced: the poly (power 1) decay after a 1500-iteration linear warm-up, the decoder's 10x learning
# rate and no weight decay on norms (a constant rate, one group here), and the random resize / crop / flip /
# photometric augmentation (as for the other architectures, data.augment_flips only).
PUBLISHED_SCHEMES["segformer"] = {
    "train": dict(lr=6e-5, batch_size=16, num_steps=160_000, weight_decay=0.01, grad_clip=0.0),
    "eval": dict(use_ema=False, ensemble_size=1),
}
# nnU-Net v2.8.1's nnUNetTrainer: SGD (Nesterov, momentum 0.99, weight decay 3e-5), lr 1e-2 with poly decay
# (exponent 0.9; per epoch there, per step here), gradients clipped to norm 12, 1000 epochs x 250 iterations,
# Dice (batch, smooth 1e-5) + CE with deep supervision, its 2D augmentation, no EMA; batch size from the plan.
PUBLISHED_SCHEMES["nnunet"] = {
    "train": dict(
        optimizer="sgd_nesterov",
        momentum=0.99,
        lr=1e-2,
        lr_schedule="poly",
        weight_decay=3e-5,
        grad_clip=12.0,
        num_steps=250_000,
        ema_decay=0.0,
    ),
    "objective": dict(dice="batch", dice_smooth=1e-5),
    "data": dict(augment="nnunet"),
    "eval": dict(use_ema=False),
}


def apply_scheme(c: ml_collections.ConfigDict, model_name: str) -> None:
    """Sets ``model_name``'s published training scheme on config ``c``."""
    for group, values in PUBLISHED_SCHEMES.get(model_name, {}).items():
        for key, value in values.items():
            c[group][key] = value


def apply_reference(c: ml_collections.ConfigDict, model_name: str) -> None:
    """For a feed-forward reference: E1, its own published learning rate, and one ensemble member."""
    if is_feed_forward(model_name):
        c.experiment = "e1"
        c.train.lr = PUBLISHED_SCHEMES[model_name]["train"]["lr"]
        c.eval.ensemble_size = 1
