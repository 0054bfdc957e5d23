"""SegDiff (Amit et al. 2021) in Flax Linen: an RRDB image encoder F added to an improved-diffusion UNet.

Follows ``improved_diffusion/unet.py::UNetModel`` and ``improved_diffusion/RRDB.py`` of tomeramit/SegDiff at
commit e6592c9, with the MoNuSeg settings as defaults (see ``/work/shared/reference/segdiff.md``):

* G: ``input_blocks_0_0``, one 3x3 conv of x_t to ``model_channels``.
* F: :class:`~diffseg_jax.models.rrdb.RRDBNet` on the image at full resolution, no timestep input.
* Fusion, once: ``h = G(x_t) + F(I)``; that sum is also the first skip of the decoder.
* E/D: the improved-diffusion UNet body (ResBlocks with additive time embedding, legacy-order attention at
  the downsample factors in ``attention_resolutions``, strided-conv down / nearest+conv up), then the
  zero-initialised GN -> SiLU -> conv head, so the untrained model outputs exactly 0.

Parameter names follow the PyTorch module tree with ``.`` -> ``_`` at module indices (``time_embed``,
``input_blocks_{i}_{j}``, ``middle_block_{k}``, ``output_blocks_{i}_{j}``, ``out_norm``, ``out_conv``, and
``rrdb/RRDB_trunk_{i}/RDB{k}/conv{n}``); :func:`torch_key` gives the official state-dict key of each leaf
(used by :mod:`diffseg_jax.convert` to import official weights).

Deviations from the official code (the training-scheme items are for the trainer, not this module):

* NHWC layout.  The image may have any number of channels (Flax infers it; the official F takes 3).
* The image arrives in [0, 1] and ``image_mean``/``image_std`` standardise it inside the model (the official
  data loader does it on the 0-255 scale); the config sets MoNuSeg's statistics, as the official code.
* ``cond=None`` without ``image_features`` removes F entirely (no ``rrdb`` parameters, nothing run): the
  paper's "remove the image branch" for the image-free experiments E3/E4.  The official model always
  needs ``conditioned_image``.
* F can be computed once per image with :meth:`SegDiffUNet.encode_image` and passed as ``image_features``;
  the official sampler recomputes F at every step, which gives the same result since F sees neither x_t
  nor t.
* Precision: the official run hard-codes ``use_fp16=True`` (fp16 convs, fp32 GroupNorm, fp32 master
  weights, dynamic loss scaling from 2**20, steps with non-finite grads skipped).  Here ``dtype`` is the
  compute dtype of F and the UNet body (what ``convert_to_fp16`` converts); parameters, ``time_embed``,
  GroupNorm, softmax and the head stay float32.  Loss scaling is the trainer's business.
* The official loss is the squared error *summed* over C,H,W (mean over the batch), not the mean MSE;
  also the trainer's business.
* Initialisation: the UNet body uses the shared layers' Flax initialisers (as the EnsemDiff port does)
  rather than PyTorch's defaults; the zero-initialised convs are zero in both.  F uses PyTorch's default
  conv init, as the official F does.
* Attention scales the logits by 1/sqrt(ch) once instead of q and k by ch**-1/4 each (same value).
* Not implemented (unused for SegDiff): class conditioning (``label_emb``), gradient checkpointing,
  ``conv_resample=False``.  ``num_head_channels`` is an extension; -1 (default) is the official behaviour.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffseg_jax.models.layers import (
    TimestepEmbed,
    conv3x3,
    unet_encoder,
    unet_middle_decoder_head,
)
from diffseg_jax.models.rrdb import RRDBNet
from diffseg_jax.models.torch_names import unet_torch_key


class SegDiffUNet(nn.Module):
    """SegDiff: eps-prediction UNet whose first feature map is G(x_t) + F(image).

    ``cond=None`` (and no ``image_features``) is the paper's "remove the image branch" (E3/E4): F is
    neither created at init nor run, and the UNet sees G(x_t) alone.  ``image_features=encode_image(cond)``
    skips F and gives the same output (F sees neither x_t nor t), so a sampler can compute F once per image.
    """

    CAN_DROP_IMAGE = True  # cond=None removes the image branch F (experiments E3/E4)

    out_channels: int
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 1, 2, 2, 4, 4)  # deeper_net at 256
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 32)  # downsample FACTORS ("16,8" at 256 px)
    num_heads: int = 4
    num_heads_upsample: int = -1  # -1: same as num_heads
    num_head_channels: int = -1  # -1: use num_heads
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    rrdb_blocks: int = 12
    rrdb_features: int = 64
    rrdb_growth: int = 32
    # The official loader normalises the [0, 255] image per channel with MoNuSeg's statistics before F
    # (datasets/monu.py); the data pipeline delivers [0, 1] images, so F does it here. None: no normalisation.
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    dtype: Any = jnp.float32  # compute dtype of the UNet body; parameters stay float32
    remat: bool = (
        False  # recompute ResBlock activations in the backward pass (guided-diffusion use_checkpoint)
    )
    # Issue 31's train-step options (layers.py): what remat keeps ('nothing': guided-diffusion's), the
    # GroupNorm and attention forms; the defaults are the published computation, with the same parameters.
    remat_policy: str = "nothing"  # 'nothing' | 'conv_outputs' | 'dots'
    norm_impl: str = "float32"  # 'float32' | 'stats_float32'
    attention_impl: str = "explicit"  # 'explicit' | 'dot_product' | 'cudnn'

    def setup(self) -> None:
        # Defined in setup so that encode_image and __call__ share it; Flax creates its parameters only
        # when it is first called, so a model initialised with cond=None has no 'rrdb' parameters.
        self.rrdb = RRDBNet(
            out_channels=self.model_channels,
            features=self.rrdb_features,
            num_blocks=self.rrdb_blocks,
            growth=self.rrdb_growth,
            dtype=self.dtype,
        )

    def encode_image(self, cond: jax.Array) -> jax.Array:
        """F(image): (B,H,W,Ci) -> (B,H,W,model_channels); independent of x_t and t, so cacheable.

        ``cond`` is in [0, 1]; with ``image_mean``/``image_std`` (0-255 scale) it is first standardised as the
        official loader does.
        """
        if self.image_mean is not None:
            mean = jnp.asarray(self.image_mean, jnp.float32)
            std = jnp.asarray(self.image_std if self.image_std is not None else 1.0, jnp.float32)
            cond = (cond * 255.0 - mean) / std
        return self.rrdb(cond)

    @nn.compact
    def __call__(
        self,
        x_t: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        *,
        train: bool = False,
        image_features: jax.Array | None = None,
    ) -> jax.Array:
        """Predict (B,H,W,out_channels) from x_t (B,H,W,Cx), integer t (B,), image cond or cached F(cond)."""
        mc = self.model_channels
        # As convert_to_fp16: time_embed and the head stay float32; F and the body use the compute dtype.
        emb = TimestepEmbed(mc, dtype=jnp.float32, name="time_embed")(t)
        if image_features is None and cond is not None:
            image_features = self.encode_image(cond)

        # The official first conv always outputs model_channels (not channel_mult[0] * model_channels).
        h = conv3x3(mc, self.dtype, "input_blocks_0_0")(x_t.astype(self.dtype))
        if image_features is not None:
            if image_features.shape != h.shape:
                raise ValueError(f"image_features shape {image_features.shape} != G(x_t) shape {h.shape}")
            h = h + image_features.astype(self.dtype)

        # The fused stem output is the first skip.
        h, hs, _, ds = unet_encoder(self, h, emb, train)
        return unet_middle_decoder_head(self, h, hs, ds, emb, train, self.out_channels)


# ---------------------------------------------------------------- official-weight mapping
def torch_key(path: tuple[str, ...]) -> str:
    """Official state-dict key of a Flax param path, e.g. ('out_conv', 'kernel') -> 'out.2.weight'."""
    # The UNet body has the same module tree as guided-diffusion's, so the shared table applies.  The F
    # branch needs no table: RRDB.py names its modules by plain attributes, and its only nn.Sequential,
    # RRDB_trunk, becomes 'RRDB_trunk_{i}' here, which the shared index rule maps back to 'RRDB_trunk.{i}'.
    return unet_torch_key(path)
