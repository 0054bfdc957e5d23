"""Building blocks of the guided-/improved-diffusion UNet, as pure Flax Linen modules.

EnsemDiff, SegDiff and MedSegDiff all descend from openai's guided-diffusion ``UNetModel``; this
module holds the pieces they share.  Layout is NHWC throughout.  Every module takes a ``dtype``
attribute (the compute dtype, default float32) while its parameters are always stored in float32,
so mixed precision can be switched on later without touching checkpoints.

Sub-module names mirror the PyTorch attribute names so official state dicts can be mapped by a
small table (PyTorch -> here):

* ``ResBlock``: ``in_layers.0`` -> ``in_norm``, ``in_layers.2`` -> ``in_conv``,
  ``emb_layers.1`` -> ``emb_dense``, ``out_layers.0`` -> ``out_norm``, ``out_layers.3`` -> ``out_conv``,
  ``skip_connection`` -> ``skip_connection``.
* ``AttentionBlock``: ``norm``, ``qkv``, ``proj_out`` (PyTorch uses 1-d 1x1 convs; here they are
  ``Dense`` layers over the channel axis, which is the same map: kernel = ``weight[:, :, 0].T``).
* ``Downsample``: ``op``; ``Upsample``: ``conv``; ``TimestepEmbed``: ``dense_0``, ``dense_1``
  (PyTorch ``time_embed.0`` and ``time_embed.2``).

Conv kernels are HWIO (PyTorch OIHW needs ``transpose(2, 3, 1, 0)``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# Issue 31's train-step candidates, each a model attribute whose first value is today's (the published port's)
# computation; the same parameters under every value, so checkpoints load either way.
NORM_IMPLS = ("float32", "stats_float32")
ATTENTION_IMPLS = ("explicit", "dot_product", "cudnn")
REMAT_POLICIES = ("nothing", "conv_outputs", "dots")

# Explicit symmetric padding: PyTorch's ``padding=1``.  For a stride-2 conv on an even size,
# Flax's 'SAME' would pad (0, 1) instead of (1, 1) and shift the sampling grid by one pixel.
PAD1 = ((1, 1), (1, 1))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of integer timesteps, [cos, sin] order as in guided-diffusion."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups and PyTorch's eps 1e-5, statistics in float32, output in the input's dtype.

    Flax's own default eps is 1e-6; guided-diffusion uses ``torch.nn.GroupNorm`` defaults.  The
    exact two-pass variance (``use_fast_variance=False``) matches PyTorch's numerics more closely.

    ``impl`` (the same parameters ``scale`` and ``bias`` either way):

    * ``'float32'`` (default; guided-diffusion's ``GroupNorm32``:
      ``super().forward(x.float()).type(x.dtype)``): the whole normalisation in float32, cast back. In bf16
      the backward pass then keeps float32 tensors of the activation's size.
    * ``'stats_float32'``: only the per-group mean and variance are float32 reductions of the input; the
      normalisation ``(x - mean) * (scale / sqrt(var + eps)) + bias`` is applied in the input's dtype, and
      the whole is rematerialised: the backward pass keeps only the input (in the compute dtype) and
      recomputes the rest, so no float32 copy of the activation is kept. In float32 the same operations as
      ``'float32'``.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    use_fast_variance: bool = False
    impl: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        """Normalise ``x`` (..., C) with float32 statistics; the result has ``x.dtype``."""
        if self.impl == "float32":
            return super().__call__(x.astype(jnp.float32)).astype(x.dtype)
        if self.impl != "stats_float32":
            raise ValueError(f"GroupNorm32 impl must be one of {NORM_IMPLS}, got {self.impl!r}")
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(
                f"Number of groups ({self.num_groups}) does not divide the number of channels ({c})."
            )
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        # Rematerialised: the backward pass keeps only x (compute dtype) and recomputes the rest from it.
        return jax.checkpoint(_group_norm, static_argnums=(3, 4))(
            x, scale, bias, self.num_groups, self.epsilon
        )


def _group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
    """GroupNorm of ``x`` (B, ..., C) with float32 statistics, applied in ``x.dtype``; Flax's operations."""
    c = x.shape[-1]
    mean, var = _group_stats(x, groups)
    # Per (example, channel) float32 coefficients, broadcast over the spatial axes.
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
    mean = jnp.repeat(mean, c // groups, axis=-1).reshape(shape)
    mul = (jax.lax.rsqrt(jnp.repeat(var, c // groups, axis=-1) + eps) * scale).reshape(shape)
    y = (x - mean.astype(x.dtype)) * mul.astype(x.dtype)
    return y + bias.astype(x.dtype)


def _group_stats(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """Per-example, per-group float32 mean and two-pass variance of ``x`` (B, ..., C): each (B, groups).

    Reduced over the same axes of the same grouped shape as Flax's GroupNorm, so float32 inputs give its
    numbers."""
    xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(xg, axis=axes, dtype=jnp.float32)
    var = jnp.mean(jnp.square(xg.astype(jnp.float32) - jnp.expand_dims(mean, axes)), axis=axes)
    return mean, var


def conv3x3(features: int, dtype: Dtype, name: str, *, strides: int = 1, zero_init: bool = False) -> nn.Conv:
    """3x3 convolution with PyTorch ``padding=1``; optionally zero-initialised."""
    kwargs = {}
    if zero_init:
        kwargs = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
    return nn.Conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding=PAD1,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        **kwargs,
    )


class TimestepEmbed(nn.Module):
    """Integer t -> sinusoid(model_channels) -> Linear(4 mc) -> SiLU -> Linear(4 mc)."""

    model_channels: int
    embed_dim: int | None = None  # defaults to 4 * model_channels
    max_period: float = 10000.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """Embed timesteps ``t`` of shape (B,) into (B, embed_dim)."""
        dim = self.embed_dim or 4 * self.model_channels
        h = timestep_embedding(t, self.model_channels, self.max_period).astype(self.dtype)
        h = nn.Dense(dim, dtype=self.dtype, param_dtype=jnp.float32, name="dense_0")(h)
        h = nn.silu(h)
        return nn.Dense(dim, dtype=self.dtype, param_dtype=jnp.float32, name="dense_1")(h)


class ResBlock(nn.Module):
    """guided-diffusion ResBlock: two GN-SiLU-conv stages with the timestep embedding in between."""

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    dtype: Dtype = jnp.float32
    norm_impl: str = "float32"  # GroupNorm32.impl

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        """Map x (B,H,W,Cin) and emb (B,E) to (B,H,W,out_channels).

        The two 3x3 convolutions' outputs are named ``'conv_out'`` (``jax.ad_checkpoint.checkpoint_name``, an
        identity outside remat) for the ``'conv_outputs'`` remat policy."""
        x = x.astype(self.dtype)
        c = self.out_channels
        h = nn.silu(GroupNorm32(name="in_norm", impl=self.norm_impl)(x))
        h = checkpoint_name(conv3x3(c, self.dtype, "in_conv")(h), "conv_out")

        emb_out = nn.Dense(
            2 * c if self.use_scale_shift_norm else c,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="emb_dense",
        )(nn.silu(emb.astype(self.dtype)))
        emb_out = emb_out[:, None, None, :]
        if self.use_scale_shift_norm:
            # PyTorch: scale, shift = th.chunk(emb_out, 2, dim=1) -> scale is the first half.
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm32(name="out_norm", impl=self.norm_impl)(h) * (1 + scale) + shift
        else:
            h = GroupNorm32(name="out_norm", impl=self.norm_impl)(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = checkpoint_name(conv3x3(c, self.dtype, "out_conv", zero_init=True)(h), "conv_out")

        if x.shape[-1] == c:
            skip = x
        else:
            skip = nn.Conv(c, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="skip_connection")(x)
        return skip + h


class AttentionBlock(nn.Module):
    """Spatial self-attention: GN -> qkv -> softmax(q k / sqrt(d)) v -> zero-init proj_out -> residual.

    The qkv channels are split in guided-diffusion's *legacy* order (``QKVAttentionLegacy``): the
    3C channels are grouped per head first, ``[h0: q k v | h1: q k v | ...]`` (PyTorch reshapes to
    (B*heads, 3*ch, T) and splits).  With one head this equals the "new" order ``[q | k | v]``.

    ``attention_impl`` (the same parameters and, within rounding, outputs under each):

    * ``'explicit'`` (default): softmax(q kᵀ / sqrt(ch)) v written out, logits and softmax in float32
      (PyTorch: ``softmax(weight.float())``), as the published code.
    * ``'dot_product'``: ``jax.nn.dot_product_attention`` with its default implementation (XLA's in jax
      0.10: float32 logits and softmax, bf16 inputs through ``BF16_BF16_F32`` dots).
    * ``'cudnn'``: the same with ``implementation='cudnn'``, cuDNN's fused (flash) attention: GPU only, bf16
      or fp16 compute dtype, head width a multiple of 8 and at most 128 (256 on Hopper); jax raises
      otherwise. Published EnsemDiff/MedSegDiff attend with one head of 512 channels at 256 px, which cuDNN
      does not take.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    dtype: Dtype = jnp.float32
    attention_impl: str = "explicit"
    norm_impl: str = "float32"  # GroupNorm32.impl

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Attend over all H*W positions of x (B,H,W,C); returns the same shape."""
        x = x.astype(self.dtype)
        b, hh, ww, c = x.shape
        if self.num_head_channels == -1:
            heads = self.num_heads
        else:
            if c % self.num_head_channels:
                raise ValueError(f"channels {c} not divisible by num_head_channels {self.num_head_channels}")
            heads = c // self.num_head_channels
        ch = c // heads

        h = GroupNorm32(name="norm", impl=self.norm_impl)(x).reshape(b, hh * ww, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32, name="qkv")(h)
        qkv = qkv.reshape(b, hh * ww, heads, 3, ch)  # legacy order: per head, then q/k/v
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if self.attention_impl == "explicit":
            # Logits and softmax in float32 (PyTorch: softmax(weight.float())), scale 1/sqrt(ch).
            logits = jnp.einsum("bthc,bshc->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
            weights = jax.nn.softmax(logits / math.sqrt(ch), axis=-1).astype(self.dtype)
            a = jnp.einsum("bhts,bshc->bthc", weights, v)
        elif self.attention_impl in ("dot_product", "cudnn"):
            # (B, T, heads, ch) is jax's BTNH layout; float32 logits and softmax there too.
            a = jax.nn.dot_product_attention(
                q,
                k,
                v,
                scale=1.0 / math.sqrt(ch),
                implementation="cudnn" if self.attention_impl == "cudnn" else None,
            )
        else:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        a = a.reshape(b, hh * ww, c)
        out = nn.Dense(
            c,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="proj_out",
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
        )(a)
        return x + out.reshape(b, hh, ww, c)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv, padding 1 on every side (PyTorch ``padding=1``)."""

    out_channels: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B,H,W,C) -> (B,ceil(H/2),ceil(W/2),out_channels or C)."""
        return conv3x3(self.out_channels or x.shape[-1], self.dtype, "op", strides=2)(x.astype(self.dtype))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    out_channels: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B,H,W,C) -> (B,2H,2W,out_channels or C)."""
        x = x.astype(self.dtype)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.out_channels or x.shape[-1], self.dtype, "conv")(x)


# ---------------------------------------------------------------- the guided-diffusion UNet body
# EnsemDiff, SegDiff and MedSegDiff share the improved/guided-diffusion UNet body and differ only in what
# enters after the stem conv and at the bottleneck. These helpers build the body inside the calling
# module's compact ``__call__`` (Flax parents modules created there to the caller), with the official
# module names, from the caller's attributes: model_channels, channel_mult, num_res_blocks,
# attention_resolutions (downsample factors), num_heads, num_heads_upsample, num_head_channels, dropout,
# use_scale_shift_norm, dtype, and optionally remat, remat_policy, norm_impl and attention_impl.

# ResBlock with rematerialisation: its activations are recomputed in the backward pass instead of kept
# (guided-diffusion's ``use_checkpoint``). ``train`` (argument 3, counting self) must stay a Python bool.
# What is kept (``remat_policy``): 'nothing' (guided-diffusion's, everything recomputed), 'conv_outputs' (the
# 3x3 convolutions' outputs named 'conv_out' that the backward pass needs, i.e. the first conv's, as the
# second's feeds only the residual sum; the GroupNorms, SiLUs and the embedding's projection are recomputed),
# 'dots' (``jax.checkpoint_policies.dots_saveable``: every convolution's and matmul's output kept).
_REMAT_POLICY_FNS = {
    "nothing": None,
    "conv_outputs": jax.checkpoint_policies.save_only_these_names("conv_out"),
    "dots": jax.checkpoint_policies.dots_saveable,
}
REMAT_RESBLOCKS = {
    name: nn.remat(ResBlock, static_argnums=(3,), policy=policy) for name, policy in _REMAT_POLICY_FNS.items()
}


def _res(m: nn.Module, ch: int, name: str) -> ResBlock:
    cls = ResBlock
    if getattr(m, "remat", False):
        policy = getattr(m, "remat_policy", "nothing")
        if policy not in REMAT_RESBLOCKS:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")
        cls = REMAT_RESBLOCKS[policy]
    norm = getattr(m, "norm_impl", "float32")
    return cls(ch, m.dropout, m.use_scale_shift_norm, dtype=m.dtype, norm_impl=norm, name=name)


def _attn(m: nn.Module, heads: int, name: str) -> AttentionBlock:
    return AttentionBlock(
        heads,
        m.num_head_channels,
        dtype=m.dtype,
        attention_impl=getattr(m, "attention_impl", "explicit"),
        norm_impl=getattr(m, "norm_impl", "float32"),
        name=name,
    )


def unet_encoder(
    m: nn.Module, h: jax.Array, emb: jax.Array, train: bool
) -> tuple[jax.Array, list[jax.Array], list[jax.Array], int]:
    """Encoder levels after the stem (whose output ``h`` is the first skip): returns (h, skips, the
    downsample outputs, the final downsample factor)."""
    mc = m.model_channels
    hs, downs = [h], []
    ds, i = 1, 1
    for level, mult in enumerate(m.channel_mult):
        for _ in range(m.num_res_blocks):
            h = _res(m, mult * mc, f"input_blocks_{i}_0")(h, emb, train)
            if ds in m.attention_resolutions:
                h = _attn(m, m.num_heads, f"input_blocks_{i}_1")(h)
            hs.append(h)
            i += 1
        if level != len(m.channel_mult) - 1:
            h = Downsample(dtype=m.dtype, name=f"input_blocks_{i}_0")(h)
            hs.append(h)
            downs.append(h)
            ds *= 2
            i += 1
    return h, hs, downs, ds


def unet_middle_decoder_head(
    m: nn.Module, h: jax.Array, hs: list[jax.Array], ds: int, emb: jax.Array, train: bool, out_channels: int
) -> jax.Array:
    """Middle block (ResBlock, attention, ResBlock), decoder consuming every skip, GN-SiLU-conv head."""
    ch = h.shape[-1]
    h = _res(m, ch, "middle_block_0")(h, emb, train)
    h = _attn(m, m.num_heads, "middle_block_1")(h)
    h = _res(m, ch, "middle_block_2")(h, emb, train)

    # Each decoder ResBlock consumes concat([h, skip]) (h first, as th.cat([h, hs.pop()], 1)).
    hs = list(hs)
    heads_up = m.num_heads if m.num_heads_upsample == -1 else m.num_heads_upsample
    i = 0
    for level, mult in reversed(list(enumerate(m.channel_mult))):
        for j in range(m.num_res_blocks + 1):
            h = jnp.concatenate([h, hs.pop()], axis=-1)
            h = _res(m, mult * m.model_channels, f"output_blocks_{i}_0")(h, emb, train)
            k = 1
            if ds in m.attention_resolutions:
                h = _attn(m, heads_up, f"output_blocks_{i}_{k}")(h)
                k += 1
            if level and j == m.num_res_blocks:
                h = Upsample(dtype=m.dtype, name=f"output_blocks_{i}_{k}")(h)
                ds //= 2
            i += 1
    assert not hs, "skip stack not fully consumed"

    # time_embed and the head stay float32, as guided-diffusion's convert_to_fp16 leaves them.
    h = h.astype(jnp.float32)
    h = nn.silu(GroupNorm32(name="out_norm", impl=getattr(m, "norm_impl", "float32"))(h))
    return conv3x3(out_channels, jnp.float32, "out_conv", zero_init=True)(h)
