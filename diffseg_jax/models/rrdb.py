"""ESRGAN-style RRDBNet, SegDiff's image encoder F, in Flax Linen (NHWC).

Follows ``improved_diffusion/RRDB.py`` of tomeramit/SegDiff (see ``/work/shared/reference/segdiff.md``):
``conv_first`` -> ``RRDB_trunk`` (nb x RRDB) -> ``trunk_conv`` + global residual -> ``HRconv`` ->
LeakyReLU(0.2) -> ``conv_last``.  There is no normalisation and no resampling, so F runs at the input
resolution.  Every conv is 3x3, padding 1, with a bias.

Sub-module names are the PyTorch attribute names (``RRDB_trunk.{i}`` -> ``RRDB_trunk_{i}``), so a state
dict maps one-to-one.  Initialisation is PyTorch's ``nn.Conv2d`` default (the official code leaves the
ESRGAN 0.1-scaled init commented out): kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffseg_jax.models.layers import PAD1

Dtype = Any

LRELU_SLOPE = 0.2
RESIDUAL_SCALE = 0.2  # both the inner (RDB) and outer (RRDB) residual branches are scaled by 0.2

# kaiming_uniform(a=sqrt(5)), PyTorch's default conv weight init, has variance 1 / (3 fan_in).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_conv3x3(x: jax.Array, features: int, dtype: Dtype, name: str) -> jax.Array:
    """Apply a new 3x3, padding-1, biased conv with PyTorch's default init (inside a compact method)."""
    conv = nn.Conv(
        features,
        (3, 3),
        padding=PAD1,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_torch_kernel_init,
        bias_init=_torch_bias_init(9 * x.shape[-1]),
        name=name,
    )
    return conv(x)


class ResidualDenseBlock5C(nn.Module):
    """Five densely connected 3x3 convs; returns ``conv5(...) * 0.2 + x`` (``ResidualDenseBlock_5C``)."""

    growth: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B,H,W,nf) -> (B,H,W,nf); conv k sees concat([x, x1, ..., x_{k-1}]) in that order."""
        feats = [x]
        for k in range(1, 5):
            y = torch_conv3x3(jnp.concatenate(feats, axis=-1), self.growth, self.dtype, f"conv{k}")
            feats.append(nn.leaky_relu(y, LRELU_SLOPE))
        x5 = torch_conv3x3(jnp.concatenate(feats, axis=-1), x.shape[-1], self.dtype, "conv5")
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs, then ``out * 0.2 + x``."""

    growth: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B,H,W,nf) -> (B,H,W,nf)."""
        out = x
        for k in range(1, 4):
            out = ResidualDenseBlock5C(self.growth, dtype=self.dtype, name=f"RDB{k}")(out)
        return out * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """SegDiff's image encoder F: (B,H,W,Cin) image -> (B,H,W,out_channels) features, same H and W."""

    out_channels: int = 128
    features: int = 64  # nf
    num_blocks: int = 3  # nb (SegDiff's --rrdb_blocks; 12 for MoNuSeg)
    growth: int = 32  # gc
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Encode an image at full resolution (no normalisation, no resampling)."""
        x = x.astype(self.dtype)
        fea = torch_conv3x3(x, self.features, self.dtype, "conv_first")
        trunk = fea
        for i in range(self.num_blocks):
            trunk = RRDB(self.growth, dtype=self.dtype, name=f"RRDB_trunk_{i}")(trunk)
        fea = fea + torch_conv3x3(trunk, self.features, self.dtype, "trunk_conv")
        h = nn.leaky_relu(torch_conv3x3(fea, self.features, self.dtype, "HRconv"), LRELU_SLOPE)
        return torch_conv3x3(h, self.out_channels, self.dtype, "conv_last")
