"""MedSegDiff's condition network: the nnU-Net ``Generic_UNet`` "highway" (``hwm``) and its FF-Parser.

Follows ``guided_diffusion/unet.py`` (``Generic_UNet``, ``StackedConvLayers``, ``ConvDropoutNormNonlin``,
``FFParser``) of KidsWithTokens/MedSegDiff at 60850bf; see ``/work/shared/reference/medsegdiff.md`` §2.2-2.4.
Layout is NHWC and every computation here runs in float32 (the reference converts only the diffusion
UNet's blocks to fp16, never ``hwm``).

Structure for ``features = (32, 64, 128, 256, 480)`` (the published widths, ``num_pool = 5``):

* encoder stage d: 2 x [conv3x3 (bias) -> Dropout2d(0.5) -> BatchNorm -> LeakyReLU(0.01)], then max-pool 2x2;
* bottleneck: 2 x the same block at the last width, also with dropout;
* decoder stage u: bilinear x2 -> concat([x, skip]) -> conv(2C -> C) -> conv(C -> C_next), BN + LReLU,
  no dropout;
* head: 1x1 conv (no bias) -> sigmoid = ``cal``.

BatchNorm keeps batch statistics in Flax's ``'batch_stats'`` collection: ``train=True`` normalises with
the batch statistics and updates the running ones, so ``apply`` must be given
``mutable=['batch_stats']``; ``train=False`` uses the running statistics (PyTorch ``model.eval()``).

Names mirror the PyTorch module tree with ``.`` -> ``_`` (``conv_blocks_context.5.0.blocks.0.instnorm`` ->
``conv_blocks_context_5_0/blocks_0/instnorm``; the BatchNorm is called ``instnorm`` in nnU-Net too).

Deviations from the published code:

* BatchNorm: Flax updates the running variance with the biased batch variance (PyTorch: unbiased) and
  has no ``num_batches_tracked`` counter.  Under ``jit`` with a sharded batch the statistics are
  those of the global batch (PyTorch DDP without SyncBN uses each GPU's share).
* The widths are an attribute; the conv1x1 inputs of the fusion (hard-coded ``int(d/2+1)*128`` in the
  reference) are inferred from the diffusion features actually passed, which is the same at the
  reference config.
* The 480->512 bottleneck conv that the reference creates afresh (random) on every forward is
  selectable: ``'trained'`` (a registered, trained conv, the default), ``'random_per_call'`` (the
  reference's behaviour) or ``'none'``; see :class:`GenericUNet`.
* The ``anchor_out`` outputs are returned at their own resolution (``decoder_features``); the caller
  upsamples the ones it uses (the reference upsamples all four and uses two).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffseg_jax.models.layers import PAD1

Initializer = Any

BOTTLENECK_MODES = ("trained", "random_per_call", "none")
# Seed of the 'random_per_call' projection when the caller passes no 'bottleneck' RNG stream.
BOTTLENECK_FALLBACK_SEED = 0


def he_normal(neg_slope: float = 1e-2) -> Initializer:
    """nnU-Net's ``InitWeights_He``: ``kaiming_normal_(a=neg_slope)``, fan_in, untruncated normal."""
    return nn.initializers.variance_scaling(2.0 / (1.0 + neg_slope**2), "fan_in", "normal")


def torch_conv_default_init(fan_in: int) -> Initializer:
    """PyTorch's default ``Conv2d`` init for weight and bias alike: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
    """Bilinear x``factor`` upsampling of NHWC ``x``, as ``F.interpolate(mode='bilinear', align_corners=False)``."""
    b, h, w, c = x.shape
    # Half-pixel centres; for upsampling jax's triangle kernel renormalised at the border equals
    # PyTorch's clamp of the source index to the image.
    return jax.image.resize(x, (b, h * factor, w * factor, c), "bilinear", antialias=False)


def ff_parser(x: jax.Array, complex_weight: jax.Array) -> jax.Array:
    """FF-Parser: ``irfft2(rfft2(x, 'ortho') * w, 'ortho')`` over H, W of NHWC ``x``; w is (C, H, W//2+1, 2)."""
    h, w = x.shape[1], x.shape[2]
    spec = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")  # (B, H, W//2+1, C)
    weight = jax.lax.complex(complex_weight[..., 0], complex_weight[..., 1])  # (C, H, W//2+1)
    spec = spec * jnp.transpose(weight, (1, 2, 0))[None]
    return jnp.fft.irfft2(spec, s=(h, w), axes=(1, 2), norm="ortho")


class FFParser(nn.Module):
    """Learnable complex filter in the 2-D Fourier domain of a square ``size`` x ``size`` feature map."""

    size: int  # the feature map's H = W that the weight is built for

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Filter x (B, size, size, C) -> same shape, float32."""
        _, h, w, c = x.shape
        if h != w:
            raise ValueError(f"FF-Parser needs a square feature map, got {h}x{w}")
        if h != self.size:
            raise ValueError(
                f"FF-Parser weight was built for {self.size}x{self.size} features, got {h}x{w}; "
                "set the model's image_size to the input size"
            )
        # Stored exactly as PyTorch's ``complex_weight`` (C, H, W//2+1, [real, imag]), init randn * 0.02.
        weight = self.param(
            "complex_weight", nn.initializers.normal(0.02), (c, self.size, self.size // 2 + 1, 2), jnp.float32
        )
        return ff_parser(x, weight)


class ConvDropoutNormNonlin(nn.Module):
    """conv3x3 (bias) -> Dropout2d -> BatchNorm -> LeakyReLU(0.01), nnU-Net's basic block."""

    features: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """(B,H,W,Cin) -> (B,H,W,features)."""
        x = nn.Conv(self.features, (3, 3), padding=PAD1, kernel_init=he_normal(), name="conv")(x)
        if self.dropout > 0:
            # Dropout2d zeroes whole channels per sample: broadcast the mask over H and W.
            x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,  # PyTorch momentum 0.1: running = 0.9 running + 0.1 batch
            epsilon=1e-5,
            use_fast_variance=False,
            name="instnorm",
        )(x)
        return nn.leaky_relu(x, 1e-2)


class StackedConvLayers(nn.Module):
    """``num_convs`` basic blocks, children ``blocks_0``, ``blocks_1``, ... as in nnU-Net."""

    features: int
    num_convs: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """(B,H,W,Cin) -> (B,H,W,features)."""
        for k in range(self.num_convs):
            x = ConvDropoutNormNonlin(self.features, self.dropout, name=f"blocks_{k}")(x, train=train)
        return x


class CondOutputs(NamedTuple):
    """What :class:`GenericUNet` returns."""

    cal: jax.Array  # (B,H,W,1) sigmoid output
    emb: jax.Array | None  # bottleneck projection (B, H/2^n, W/2^n, bottleneck_features), highway only
    decoder_features: tuple[jax.Array, ...]  # decoder stage outputs, deepest first


class GenericUNet(nn.Module):
    """nnU-Net ``Generic_UNet`` over the image, optionally gated by diffusion features (v1 "highway").

    ``highway=True`` (MedSegDiff v1) adds, for each encoder stage d < n-1, after its max-pool, the
    dynamic conditional encoding: ``a = FFParser_d(conv_trans_blocks_a_d(hs[d]))``,
    ``x = x * conv_trans_blocks_b_d(a) * mean_HW(a)``, where ``hs[d]`` is the diffusion encoder's
    feature map at the same resolution (the skip of stage d is stored before the gating).  It also
    projects the bottleneck to ``bottleneck_features`` channels (``emb``), chosen by ``bottleneck``:

    * ``'trained'``: a registered 1x1 conv ``bottleneck_proj`` trained with everything else (PyTorch
      default init, the distribution the reference draws from);
    * ``'random_per_call'``: the reference's behaviour, a fresh random 1x1 conv (PyTorch default init)
      on every call, never trained; drawn from the ``'bottleneck'`` RNG stream when the caller passes
      one (``rngs={'bottleneck': key}``), else from ``fold_in(key(BOTTLENECK_FALLBACK_SEED), t[0])``,
      which is deterministic given t but differs between diffusion steps;
    * ``'none'``: no projection, ``emb`` is None.
    """

    features: tuple[int, ...] = (32, 64, 128, 256, 480)
    num_convs: int = 2
    dropout: float = 0.5  # nnU-Net's default, active in the encoder and bottleneck only
    highway: bool = False
    image_size: int = 256  # FF-Parser shapes (highway only)
    bottleneck: str = "trained"
    bottleneck_features: int = 512

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        hs: Sequence[jax.Array] | None = None,
        *,
        t: jax.Array | None = None,
        train: bool = False,
    ) -> CondOutputs:
        """Run on the image x (B,H,W,Ci); ``hs``: diffusion features gating the first n-1 stages (highway)."""
        if self.bottleneck not in BOTTLENECK_MODES:
            raise ValueError(f"bottleneck must be one of {BOTTLENECK_MODES}, got {self.bottleneck!r}")
        n = len(self.features)
        if self.highway and (hs is None or len(hs) != n - 1):
            raise ValueError(
                f"highway needs {n - 1} diffusion feature maps, got {0 if hs is None else len(hs)}"
            )
        x = x.astype(jnp.float32)

        skips = []
        for d, f in enumerate(self.features):
            x = StackedConvLayers(f, self.num_convs, self.dropout, name=f"conv_blocks_context_{d}")(
                x, train=train
            )
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            if self.highway and d < n - 1:
                a = nn.Conv(f, (1, 1), kernel_init=he_normal(), name=f"conv_trans_blocks_a_{d}")(
                    hs[d].astype(jnp.float32)
                )
                a = FFParser(self.image_size // 2 ** (d + 1), name=f"ffparser_{d}")(a)
                ha = nn.Conv(1, (1, 1), kernel_init=he_normal(), name=f"conv_trans_blocks_b_{d}")(a)
                hb = jnp.mean(a, axis=(1, 2), keepdims=True)
                x = x * ha * hb

        width = self.features[-1]
        for k in range(2):  # bottleneck: StackedConvLayers(num_convs - 1) then StackedConvLayers(1)
            num = self.num_convs - 1 if k == 0 else 1
            x = StackedConvLayers(width, num, self.dropout, name=f"conv_blocks_context_{n}_{k}")(
                x, train=train
            )

        emb = None
        if self.highway and self.bottleneck == "trained":
            init = torch_conv_default_init(width)
            emb = nn.Conv(
                self.bottleneck_features, (1, 1), kernel_init=init, bias_init=init, name="bottleneck_proj"
            )(x)
        elif self.highway and self.bottleneck == "random_per_call":
            emb = self._random_projection(x, t)

        decoder_features = []
        for u in range(n):
            skip_width = self.features[n - 1 - u]
            out_width = self.features[n - 2 - u] if u != n - 1 else skip_width
            x = jnp.concatenate([upsample_bilinear(x, 2), skips[n - 1 - u]], axis=-1)
            x = StackedConvLayers(skip_width, self.num_convs - 1, name=f"conv_blocks_localization_{u}_0")(
                x, train=train
            )
            x = StackedConvLayers(out_width, 1, name=f"conv_blocks_localization_{u}_1")(x, train=train)
            decoder_features.append(x)

        logits = nn.Conv(1, (1, 1), use_bias=False, kernel_init=he_normal(), name="seg_outputs_0")(x)
        return CondOutputs(jax.nn.sigmoid(logits), emb, tuple(decoder_features))

    def _random_projection(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        """The reference's unregistered ``Conv2d(C, bottleneck_features, 1)``, drawn afresh for this call."""
        if self.has_rng("bottleneck"):
            key = self.make_rng("bottleneck")
        else:
            if t is None:
                raise ValueError(
                    "bottleneck='random_per_call' needs a 'bottleneck' RNG stream or the timesteps t"
                )
            key = jax.random.fold_in(jax.random.key(BOTTLENECK_FALLBACK_SEED), jnp.asarray(t).reshape(-1)[0])
        fan_in = x.shape[-1]
        k_key, b_key = jax.random.split(key)
        init = torch_conv_default_init(fan_in)
        kernel = init(k_key, (fan_in, self.bottleneck_features))
        bias = init(b_key, (self.bottleneck_features,))
        # Never a parameter: the reference creates it inside forward, so no gradient reaches it.
        kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
        return jnp.einsum("bhwc,cd->bhwd", x, kernel) + bias
