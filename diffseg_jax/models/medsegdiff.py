"""MedSegDiff (Wu et al., MIDL 2023) in Flax Linen: v1 (FF-Parser) and the repository's 'new' default.

Follows ``guided_diffusion/unet.py`` of KidsWithTokens/MedSegDiff at 60850bf, ``UNetModel_v1preview``
(``version='v1'``, the paper's model: dynamic conditional encoding + FF-Parser) and
``UNetModel_newpreview`` (``version='new'``, the repository default since 2023-04-11: an "anchor" model
without FF-Parser); see ``/work/shared/reference/medsegdiff.md``.

Both are the guided-diffusion UNet of EnsemDiff (same blocks, names and skip list; the image is
concatenated before x_t at the input, 4 channels for RGB) plus the nnU-Net condition network ``hwm``
(:mod:`diffseg_jax.models.condnet`) over the image:

* v1: the diffusion encoder's downsample outputs (128@128, 128@64, 256@32, 256@16 at 256 px) gate the
  condition encoder through conv1x1 -> FF-Parser -> (spatial map x channel mean); the condition
  bottleneck, projected 480 -> 512 by a 1x1 conv, is added to the diffusion bottleneck before the middle
  block, the only path from ``hwm`` into the denoiser.  ``hwm``'s sigmoid head gives ``cal``.
* 'new': ``hwm`` runs on the image alone; its decoder features 32@H/2 and 64@H/4, upsampled bilinearly
  to full size, are added as ``concat(a0, a0, a1)`` (128 channels) after the stem conv, under
  ``stop_gradient`` (the reference's ``.detach()``): ``hwm`` is trained only through ``cal``.

**The ``cal`` output.**  With an image, the model returns ``(out, {'cal': cal})``, cal (B,H,W,1) in (0, 1),
for both versions, as the reference does (``return out, cal``).  What the reference does with it:

* training (``train_util.forward_backward``, both versions): ``loss = mean(loss_diff + vb) +
  10 * mean(mean_flat((mask01 - cal)^2))`` with mask01 = (mask > 0) in {0,1}; in 'new' this MSE is the
  *only* signal that trains ``hwm``, so 'new' returns cal too (without it its condition net never trains);
* sampling (``p_sample_loop_known``): cal is taken from the network call of the last denoising step
  (t = 0); v1 replaces each ensemble member by ``cal_out`` = :func:`blend_cal` (final sample, cal);
  'new' uses the raw final sample and ignores cal (``blends_cal`` says which).

**Image withheld (experiments E3/E4, the paper's "remove the image branch").**  With ``cond=None`` the
condition network, FF-Parsers, bottleneck projection and cal head are neither created nor run: the
model is the diffusion UNet on x_t alone and returns just the array.

**BatchNorm.**  ``hwm`` uses BatchNorm with a ``'batch_stats'`` collection: ``apply(..., train=True)``
must be called with ``mutable=['batch_stats']`` (and ``rngs={'dropout': key}`` for ``hwm``'s
Dropout2d(0.5)); ``train=False`` uses the running statistics.

**FF-Parser shapes** come from the ``image_size`` attribute (as the reference hard-codes 256): v1 with an
image raises ValueError for any other input size.  'new' and ``cond=None`` run at any size that the
UNet (2^(len(channel_mult)-1)) and, with an image, ``hwm`` (2^len(cond_features)) can halve.

Deviations from the published code (besides those listed in ``ensemdiff.py`` and ``condnet.py``):

* Bottleneck injection (v1): the reference applies a conv created with fresh random weights on every
  forward (never trained).  Default here ``bottleneck='trained'``: a registered, trained 1x1 conv
  (+246,272 parameters).  ``'random_per_call'`` reproduces the reference (see
  :class:`~diffseg_jax.models.condnet.GenericUNet` for the RNG); ``'none'`` drops the injection.
* The gating features are the diffusion encoder's downsample outputs (the reference hard-codes
  ``hs[3], hs[6], hs[9], hs[12]``, the same tensors when ``num_res_blocks=2``), and the widths of the
  condition network are an attribute (``cond_features``), so that small test models can be built.
* 'new': only the two anchors that are used are upsampled; the discarded random bottleneck conv is not
  drawn.

Parameter names are EnsemDiff's for the diffusion UNet and ``hwm/...`` for the condition network;
:func:`torch_key` maps a Flax path to the official state-dict key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffseg_jax.models.condnet import BOTTLENECK_MODES, GenericUNet, upsample_bilinear
from diffseg_jax.models.layers import (
    TimestepEmbed,
    conv3x3,
    unet_encoder,
    unet_middle_decoder_head,
)
from diffseg_jax.models.torch_names import unet_torch_key

VERSIONS = ("v1", "new")
CAL_DICE_THRESHOLD = 0.65


def blend_cal(sample01: jax.Array, cal: jax.Array) -> jax.Array:
    """v1's ``cal_out``: mix the final diffusion sample with cal, by a Dice rule over the whole array.

    ``sample01`` is the final sample as the sampler returns it (mask scale {0,1}, x̂0 clipped to [-1, 1],
    not rescaled); ``cal`` the sigmoid map of the same shape.  With ``dice = 2 sum((s > 0) cal) /
    sum((s > 0) + cal)`` (one number for all elements, as the reference over its batch):
    ``clip(cal + 0.25 s, 0, 1)`` if dice < 0.65, else ``clip(0.5 cal + 0.5 s, 0, 1)``.  A 0/0 Dice is NaN
    and takes the second branch, as in PyTorch.  vmap it for a per-sample rule.
    """
    pred = (sample01 > 0).astype(jnp.float32)
    dice = 2.0 * jnp.sum(pred * cal) / jnp.sum(pred + cal)
    low = jnp.clip(cal + 0.25 * sample01, 0.0, 1.0)
    high = jnp.clip(0.5 * cal + 0.5 * sample01, 0.0, 1.0)
    return jnp.where(dice < CAL_DICE_THRESHOLD, low, high)


class MedSegDiffUNet(nn.Module):
    """MedSegDiff: guided-diffusion UNet on concat([image, x_t]) plus the nnU-Net condition network.

    Returns ``(out, {'cal': cal})`` with an image and ``out`` alone with ``cond=None``.  RNG streams:
    ``'dropout'`` (``train=True``: ``hwm``'s Dropout2d and the UNet's ``dropout``) and, optionally,
    ``'bottleneck'`` (``bottleneck='random_per_call'``).  ``train=True`` needs ``mutable=['batch_stats']``.
    """

    CAN_DROP_IMAGE = True  # cond=None: the diffusion UNet on x_t alone (experiments E3/E4)

    out_channels: int = 2
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # downsample FACTORS, not feature-map sizes
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1  # -1: same as num_heads
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    version: str = "v1"  # 'v1' (paper: FF-Parser) | 'new' (repository default: anchors)
    cond_features: tuple[int, ...] = (32, 64, 128, 256, 480)  # Generic_UNet(base 32, num_pool 5, max 480)
    cond_dropout: float = 0.5
    bottleneck: str = "trained"  # v1 only: 'trained' | 'random_per_call' | 'none'
    image_size: int = 256  # v1 only: the FF-Parser weights' spatial shapes
    dtype: Any = jnp.float32  # compute dtype of the UNet body; parameters stay float32
    remat: bool = (
        False  # recompute ResBlock activations in the backward pass (guided-diffusion use_checkpoint)
    )
    # Issue 31's train-step options (layers.py): what remat keeps ('nothing': guided-diffusion's), the
    # GroupNorm and attention forms; the defaults are the published computation, with the same parameters.
    remat_policy: str = "nothing"  # 'nothing' | 'conv_outputs' | 'dots'
    norm_impl: str = "float32"  # 'float32' | 'stats_float32'
    attention_impl: str = "explicit"  # 'explicit' | 'dot_product' | 'cudnn'

    @property
    def blends_cal(self) -> bool:
        """Whether the reference sampler replaces each member by :func:`blend_cal` (v1) or not ('new')."""
        return self.version == "v1"

    @nn.nowrap
    def postprocess_member(self, sample01: jax.Array, extras: dict[str, jax.Array]) -> jax.Array:
        """One ensemble member as the reference sampler outputs it: v1 blends the last call's ``cal`` in
        (:func:`blend_cal`, per image), 'new' keeps the sample. ``sample01`` is the sample on the mask's {0,1}
        scale, unclipped (``sampling.diffusion_member`` gives it so), as the reference sampler returns it."""
        if not self.blends_cal or "cal" not in extras:
            return sample01
        return jax.vmap(blend_cal)(sample01, extras["cal"])

    @nn.compact
    def __call__(
        self, x_t: jax.Array, t: jax.Array, cond: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Predict (B,H,W,out_channels) from x_t (B,H,W,1), integer t (B,) and image cond (B,H,W,3) or None."""
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version!r}")
        if self.bottleneck not in BOTTLENECK_MODES:
            raise ValueError(f"bottleneck must be one of {BOTTLENECK_MODES}, got {self.bottleneck!r}")
        n_pool = len(self.cond_features)
        if cond is not None and self.version == "new" and n_pool < 3:
            raise ValueError(
                "'new' takes anchors from the last two decoder stages but one: needs >= 3 cond_features"
            )
        if cond is not None and self.version == "v1":
            if x_t.shape[1:3] != (self.image_size, self.image_size):
                raise ValueError(
                    f"MedSegDiff v1 was built for {self.image_size}x{self.image_size} inputs (FF-Parser weights), "
                    f"got {x_t.shape[1]}x{x_t.shape[2]}; set image_size"
                )
            if len(self.channel_mult) - 1 < n_pool - 1:
                raise ValueError(f"v1 gates {n_pool - 1} condition stages but the UNet has fewer downsamples")

        mc = self.model_channels
        # As guided-diffusion's convert_to_fp16: time_embed and the head stay float32.
        emb = TimestepEmbed(mc, dtype=jnp.float32, name="time_embed")(t)
        hwm = None
        if cond is not None:
            hwm = GenericUNet(
                self.cond_features,
                dropout=self.cond_dropout,
                highway=self.version == "v1",
                image_size=self.image_size,
                bottleneck=self.bottleneck,
                bottleneck_features=mc * self.channel_mult[-1],
                name="hwm",
            )

        anchors = None
        cond_out = None
        if hwm is not None and self.version == "new":
            # 'new' runs hwm on the image before the UNet; 32@H/2 and 64@H/4 decoder features as anchors.
            cond_out = hwm(cond, t=t, train=train)
            a0 = upsample_bilinear(cond_out.decoder_features[n_pool - 2], 2)
            a1 = upsample_bilinear(cond_out.decoder_features[n_pool - 3], 4)
            anchors = jax.lax.stop_gradient(jnp.concatenate([a0, a0, a1], axis=-1))
            if anchors.shape[-1] != mc * self.channel_mult[0]:
                raise ValueError(
                    f"'new' adds 2*{self.cond_features[0]}+{self.cond_features[1]} anchor channels to the "
                    f"{mc * self.channel_mult[0]}-channel stem output; they must match"
                )

        x = x_t if cond is None else jnp.concatenate([cond, x_t], axis=-1)  # image first, then x_t
        h = x.astype(self.dtype)

        # Encoder, as EnsemDiffUNet (same names); every block output is pushed onto the skip stack.
        h = conv3x3(int(self.channel_mult[0] * mc), self.dtype, "input_blocks_0_0")(h)
        if anchors is not None:
            h = h + anchors.astype(h.dtype)  # before the push: the first skip carries the anchors too
        h, hs, downs, ds = unet_encoder(self, h, emb, train)

        if hwm is not None and self.version == "v1":
            # v1 runs hwm after the whole encoder; its first n-1 stages are gated by the downsample outputs.
            cond_out = hwm(cond, downs[: n_pool - 1], t=t, train=train)
            if cond_out.emb is not None:
                if cond_out.emb.shape[1:3] != h.shape[1:3]:
                    raise ValueError(
                        f"condition bottleneck {cond_out.emb.shape[1:3]} does not match the UNet bottleneck "
                        f"{h.shape[1:3]}: need len(channel_mult) - 1 == len(cond_features)"
                    )
                h = h + cond_out.emb.astype(h.dtype)

        out = unet_middle_decoder_head(self, h, hs, ds, emb, train, self.out_channels)
        if cond_out is None:
            return out
        return out, {"cal": cond_out.cal}


class MedSegDiffNewUNet(MedSegDiffUNet):
    """MedSegDiff with the repository's default ``--version new`` (anchor model, no FF-Parser)."""

    version: str = "new"


# ---------------------------------------------------------------- PyTorch state-dict names
def torch_key(path: Sequence[str]) -> str:
    """Official PyTorch state-dict key of one Flax 'params' or 'batch_stats' leaf path.

    E.g. ``('input_blocks_1_0', 'in_norm', 'scale')`` -> ``'input_blocks.1.0.in_layers.0.weight'``,
    ``('hwm', 'conv_blocks_context_5_0', 'blocks_0', 'instnorm', 'mean')`` ->
    ``'hwm.conv_blocks_context.5.0.blocks.0.instnorm.running_mean'``.  A leading ``'params'`` /
    ``'batch_stats'`` is dropped.  Values need layout changes, not done here: conv kernels HWIO ->
    OIHW ``transpose(3, 2, 0, 1)``; ``time_embed`` Dense kernels ``.T``; attention ``qkv``/``proj_out``
    Dense kernels -> conv1d ``kernel.T[:, :, None]``; ``complex_weight`` and norms are identical.
    ``hwm.bottleneck_proj`` (``bottleneck='trained'``) has no official counterpart, and PyTorch's
    ``num_batches_tracked`` buffers none here.
    """
    return unet_torch_key(tuple(path))
