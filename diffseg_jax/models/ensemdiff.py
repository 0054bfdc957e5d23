"""EnsemDiff UNet (Wolleb et al., MIDL 2022) in Flax Linen.

Follows ``guided_diffusion/unet.py::UNetModel`` of JuliaWolleb/Diffusion-based-Segmentation at commit
676f214 (a fork of openai/guided-diffusion), configured by that repository's README flags; see
``/work/shared/reference/ensemdiff.md``.

Deviations from the published code:

* NHWC layout instead of NCHW.
* in/out channels are not hard-coded to 5/2: the input width is inferred by Flax at init from
  ``concat([cond, x_t])`` and ``out_channels`` is an attribute (1 = eps only, 2 = eps + learned-range v).
* The mask value range ({0, 1} in the reference, [-1, 1] elsewhere) is handled by the diffusion /
  objective code, not here.
* Class conditioning, ``resblock_updown``, ``use_new_attention_order`` and gradient checkpointing are
  not implemented (all off in the reference; checkpointing only trades memory for compute).

Parameter names follow the PyTorch module tree with ``.`` replaced by ``_``: ``time_embed``,
``input_blocks_{i}_{j}``, ``middle_block_{j}``, ``output_blocks_{i}_{j}``, ``out_norm`` (``out.0``)
and ``out_conv`` (``out.2``).  E.g. PyTorch ``input_blocks.4.1.qkv`` -> ``input_blocks_4_1/qkv``.
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
from diffseg_jax.models.torch_names import unet_torch_key as torch_key  # noqa: F401 — weight import


def default_channel_mult(image_size: int) -> tuple[int, ...]:
    """channel_mult that guided-diffusion's ``create_model`` derives from ``image_size``."""
    table = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if image_size not in table:
        raise ValueError(f"unsupported image size: {image_size} (known: {sorted(table)})")
    return table[image_size]


def attention_ds(image_size: int, resolutions: tuple[int, ...] = (16,)) -> tuple[int, ...]:
    """Downsample factors for the ``--attention_resolutions`` flag, as ``create_model`` converts them."""
    return tuple(image_size // int(r) for r in resolutions)


class EnsemDiffUNet(nn.Module):
    """guided-diffusion UNet with the image concatenated to the noisy mask at the input."""

    CAN_DROP_IMAGE = True  # cond=None feeds only x_t (experiments E3/E4)

    out_channels: int
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # downsample FACTORS, not feature-map sizes
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1  # -1: same as num_heads
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    dtype: Any = jnp.float32  # compute dtype of the UNet body; parameters stay float32
    remat: bool = (
        False  # recompute ResBlock activations in the backward pass (guided-diffusion use_checkpoint)
    )
    # Issue 31's train-step options (layers.py): what remat keeps ('nothing': guided-diffusion's), the
    # GroupNorm and attention forms; the defaults are the published computation, with the same parameters.
    remat_policy: str = "nothing"  # 'nothing' | 'conv_outputs' | 'dots'
    norm_impl: str = "float32"  # 'float32' | 'stats_float32'
    attention_impl: str = "explicit"  # 'explicit' | 'dot_product' | 'cudnn'

    @nn.compact
    def __call__(
        self, x_t: jax.Array, t: jax.Array, cond: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        """Predict (B,H,W,out_channels) from x_t (B,H,W,Cx), integer t (B,) and image cond (B,H,W,Ci)."""
        mc = self.model_channels
        # Like convert_to_fp16 in guided-diffusion: time_embed and the head stay float32,
        # only the input/middle/output blocks use the compute dtype.
        emb = TimestepEmbed(mc, dtype=jnp.float32, name="time_embed")(t)

        x = x_t if cond is None else jnp.concatenate([cond, x_t], axis=-1)  # image first, then x_t
        h = x.astype(self.dtype)

        h = conv3x3(int(self.channel_mult[0] * mc), self.dtype, "input_blocks_0_0")(h)
        h, hs, _, ds = unet_encoder(self, h, emb, train)
        return unet_middle_decoder_head(self, h, hs, ds, emb, train, self.out_channels)
