"""SegFormer (Xie et al., NeurIPS 2021) in Flax Linen: the feed-forward reference (image -> mask logits).

Follows Hugging Face transformers' ``SegformerForSemanticSegmentation`` (``modeling_segformer.py``, read at
transformers 5.24), itself a port of NVlabs/SegFormer (mmseg ``mix_transformer.py`` + ``segformer_head.py``):

* Mix Transformer encoder, four stages. Each stage: an overlapping patch embedding (conv, kernel 7/3/3/3,
  stride 4/2/2/2, padding kernel//2, then LayerNorm); ``depths[i]`` pre-norm blocks of efficient
  self-attention (queries from every token; keys and values from a ``sr_ratios[i]``-strided conv of the
  tokens + LayerNorm) and a Mix-FFN (Linear -> 3x3 depthwise conv -> exact GELU -> Linear, ratio 4), each
  branch with stochastic depth (rates linear from 0 to ``drop_path_rate`` over all blocks); a LayerNorm.
* All-MLP decoder: per stage a Linear to ``decoder_size``, bilinear upsampling to the 1/4-resolution
  map, concatenation in reversed stage order (stage 4 first, as HF), a 1x1 conv without bias, BatchNorm,
  ReLU, dropout, a 1x1 classifier conv.

The variants B0..B5 are data (:data:`VARIANTS`); ``variant`` picks one and ``depths`` / ``hidden_sizes`` /
``num_heads`` / ``sr_ratios`` / ``decoder_size`` override single entries (None: the variant's).

Numerics as HF (checked against it to float32 precision by ``tests/test_segformer.py``):

* LayerNorm eps 1e-5 everywhere: HF builds every LayerNorm with PyTorch's default (its
  ``config.layer_norm_eps = 1e-6`` is unused). NVlabs uses 1e-6 in the blocks' and the stages' norms.
* BatchNorm eps 1e-5, PyTorch momentum 0.1 (= Flax 0.9); exact (erf) GELU; softmax in float32.
* Bilinear resizing is ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``: half-pixel
  centres, no antialiasing (:func:`resize_bilinear`; equal to torch for up- and downsampling, tested).
  Every resize in the model upsamples anyway: stage sizes are ceil divisions, so stage 1 (ceil(H/4)) is at
  least the size of every later stage and at least H/4.

Deviations from HF:

* The Mix-FFN's depthwise 3x3 conv is computed as nine shifted multiply-adds (:class:`DepthwiseConv`,
  ``depthwise='shift'``): the same parameters and outputs as the grouped conv, whose gradient XLA runs far
  slower than its FLOPs; ``depthwise='conv'`` uses ``nn.Conv(feature_group_count=C)`` as HF's ``nn.Conv2d``.
* NHWC layout. The registry's call ``apply(variables, x_t, t, cond, train=...)``: ``x_t`` and ``t`` are
  ignored (``FEED_FORWARD``), ``cond`` is the image in [0, 1]; with ``normalize`` (default) the model
  standardises it with ImageNet's mean and std as HF's image processor does after rescaling by 1/255.
* The logits are upsampled to the input size inside the model (HF returns 1/4-resolution logits and
  upsamples them the same way in its loss and post-processing).
* Dropout before the classifier is element-wise as HF's ``nn.Dropout`` (mmseg: channel-wise Dropout2d).
  HF's attention and hidden dropouts (0 in every SegFormer config) are not implemented.
* BatchNorm: Flax updates the running variance with the biased batch variance (PyTorch: unbiased), and
  under ``jit`` with a sharded batch the statistics are the global batch's.
* Initialisation as HF's ``_init_weights``: Linear and conv weights N(0, 0.02), biases 0, norms 1/0
  (NVlabs: truncated normal for Linear, fan-out normal for convs). Pretrained weights come from
  :mod:`diffseg_jax.convert` (:func:`torch_key` and the import rules below).

Parameter names mirror the Hub checkpoints (``nvidia/mit-b3``, ``nvidia/segformer-b3-finetuned-*``), whose
keys are HF's module names before transformers 5 (``save_pretrained`` still writes them):
``encoder/block_2_17/attention/query`` <-> ``segformer.encoder.block.2.17.attention.self.query``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffseg_jax.models.torch_names import LEAF, indices_to_dots

# depths, widths, heads, spatial-reduction ratios and decoder width of the published variants (NVlabs'
# mit_b0..mit_b5 and the decode-head configs; the same values as the Hub's nvidia/mit-b* config.json).
VARIANTS: dict[str, dict[str, tuple[int, ...] | int]] = {
    "b0": dict(depths=(2, 2, 2, 2), hidden_sizes=(32, 64, 160, 256), decoder_size=256),
    "b1": dict(depths=(2, 2, 2, 2), hidden_sizes=(64, 128, 320, 512), decoder_size=256),
    "b2": dict(depths=(3, 4, 6, 3), hidden_sizes=(64, 128, 320, 512), decoder_size=768),
    "b3": dict(depths=(3, 4, 18, 3), hidden_sizes=(64, 128, 320, 512), decoder_size=768),
    "b4": dict(depths=(3, 8, 27, 3), hidden_sizes=(64, 128, 320, 512), decoder_size=768),
    "b5": dict(depths=(3, 6, 40, 3), hidden_sizes=(64, 128, 320, 512), decoder_size=768),
}
for _spec in VARIANTS.values():
    _spec.update(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1))
PATCH_SIZES = (7, 3, 3, 3)
STRIDES = (4, 2, 2, 2)
LAYER_NORM_EPS = 1e-5  # PyTorch's default, as every LayerNorm in HF's SegFormer.
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # HF's SegformerImageProcessor defaults (ImageNet statistics).
IMAGENET_STD = (0.229, 0.224, 0.225)

_kernel_init = nn.initializers.normal(0.02)  # HF _init_weights: Linear and Conv2d weights N(0, 0.02).


def drop_path_rates(depths: Sequence[int], rate: float) -> list[float]:
    """Stochastic-depth rate of every block: linear from 0 to ``rate`` over all blocks, as HF."""
    total = sum(depths)
    return [rate * i / max(total - 1, 1) for i in range(total)]


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)`` of an NHWC array."""
    size = tuple(int(s) for s in size)
    if x.shape[1:3] == size:
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=_kernel_init, name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=jnp.float32, name=name)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with padding kernel//2 (overlapping patches), then LayerNorm."""

    hidden_size: int
    patch_size: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size // 2
        x = nn.Conv(
            self.hidden_size,
            (self.patch_size, self.patch_size),
            strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dtype=self.dtype,
            kernel_init=_kernel_init,
            name="proj",
        )(x)
        return _layer_norm("layer_norm")(x)


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a ``sr_ratio``-strided conv of the tokens."""

    hidden_size: int
    num_heads: int
    sr_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads, head_dim = self.num_heads, self.hidden_size // self.num_heads
        if head_dim * heads != self.hidden_size:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {heads} heads")
        q = _dense(c, self.dtype, "query")(x).reshape(b, h * w, heads, head_dim)
        kv = x
        if self.sr_ratio > 1:
            r = self.sr_ratio
            kv = nn.Conv(
                c,
                (r, r),
                strides=(r, r),
                padding="VALID",
                dtype=self.dtype,
                kernel_init=_kernel_init,
                name="sr",
            )(kv)
            kv = _layer_norm("layer_norm")(kv)
        kv = kv.reshape(b, -1, c)
        k = _dense(c, self.dtype, "key")(kv).reshape(b, -1, heads, head_dim)
        v = _dense(c, self.dtype, "value")(kv).reshape(b, -1, heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h, w, c)
        return _dense(c, self.dtype, "output")(out)


DEPTHWISE_IMPLS = ("shift", "conv")


def depthwise_conv_shift(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Depthwise k x k convolution, stride 1, zero padding k // 2, as k*k shifted multiply-adds.

    ``x`` (B,H,W,C), ``kernel`` (k,k,1,C) as ``nn.Conv(C, (k,k), feature_group_count=C)`` stores it (a
    cross-correlation, as every conv here), ``bias`` (C,). Accumulates in float32 whatever the inputs' dtype
    (as the convolution kernels do) and returns the inputs' dtype. XLA fuses the sum into one elementwise
    loop and its gradient into elementwise products and reductions, where a depthwise convolution's gradient
    goes through XLA's grouped-convolution lowering, far slower than its FLOPs (jax-ml/jax#13800).
    """
    k = kernel.shape[0]
    if kernel.shape != (k, k, 1, x.shape[-1]) or k % 2 != 1:
        raise ValueError(
            f"a depthwise kernel for {x.shape[-1]} channels must be (k, k, 1, C), k odd; got {kernel.shape}"
        )
    h, w = x.shape[1:3]
    r = k // 2
    padded = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    acc = jnp.zeros(x.shape, jnp.float32)
    for i in range(k):
        for j in range(k):
            window = padded[:, i : i + h, j : j + w, :].astype(jnp.float32)
            acc = acc + window * kernel[i, j, 0].astype(jnp.float32)
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(x.dtype)


class DepthwiseConv(nn.Module):
    """``nn.Conv(features, (k,k), padding k//2, feature_group_count=features)`` computed by
    :func:`depthwise_conv_shift`: the same parameters (``kernel`` (k,k,1,C), ``bias`` (C,)), initialisers
    and outputs (to float rounding; tested against ``nn.Conv``, values and gradients).
    """

    features: int
    kernel_size: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size  # depthwise_conv_shift checks the kernel against x's channels and k
        kernel = self.param("kernel", _kernel_init, (k, k, 1, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return depthwise_conv_shift(x, kernel, bias)


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (the positional information) -> exact GELU -> Linear.

    ``depthwise``: ``'shift'`` (default) computes the depthwise conv as shifted multiply-adds
    (:class:`DepthwiseConv`), ``'conv'`` as ``nn.Conv`` with ``feature_group_count`` (HF's form, a grouped
    ``nn.Conv2d``). Same parameters, same outputs to float rounding; ``'shift'`` because XLA's grouped
    convolution is slow, above all its gradient (README, Performance).
    """

    hidden_size: int
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    depthwise: str = "shift"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.hidden_size * self.mlp_ratio
        x = _dense(inner, self.dtype, "dense1")(x)
        if self.depthwise == "shift":
            x = DepthwiseConv(inner, 3, self.dtype, name="dwconv")(x)
        elif self.depthwise == "conv":
            x = nn.Conv(
                inner,
                (3, 3),
                padding=((1, 1), (1, 1)),
                feature_group_count=inner,
                dtype=self.dtype,
                kernel_init=_kernel_init,
                name="dwconv",
            )(x)
        else:
            raise ValueError(f"model.depthwise={self.depthwise!r}: use one of {DEPTHWISE_IMPLS}")
        x = nn.gelu(x, approximate=False)
        return _dense(self.hidden_size, self.dtype, "dense2")(x)


class MixBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(attention(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    hidden_size: int
    num_heads: int
    sr_ratio: int
    drop_path: float
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    depthwise: str = "shift"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        # DropPath: one Bernoulli draw per example, kept outputs scaled by 1/(1-p) (HF SegformerDropPath).
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
        h = _layer_norm("layer_norm_1")(x).astype(self.dtype)
        h = EfficientSelfAttention(
            self.hidden_size, self.num_heads, self.sr_ratio, self.dtype, name="attention"
        )(h)
        x = x + drop(h)
        h = _layer_norm("layer_norm_2")(x).astype(self.dtype)
        h = MixFFN(self.hidden_size, self.mlp_ratio, self.dtype, self.depthwise, name="mlp")(h)
        return x + drop(h)


class MixTransformer(nn.Module):
    """The hierarchical encoder: four feature maps at 1/4, 1/8, 1/16 and 1/32 resolution (ceil division)."""

    depths: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    num_heads: tuple[int, ...]
    sr_ratios: tuple[int, ...]
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32
    depthwise: str = "shift"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        rates = drop_path_rates(self.depths, self.drop_path_rate)
        features, block = [], 0
        for i, depth in enumerate(self.depths):
            x = OverlapPatchEmbed(
                self.hidden_sizes[i], PATCH_SIZES[i], STRIDES[i], self.dtype, name=f"patch_embeddings_{i}"
            )(x)
            for j in range(depth):
                x = MixBlock(
                    self.hidden_sizes[i],
                    self.num_heads[i],
                    self.sr_ratios[i],
                    rates[block],
                    self.mlp_ratio,
                    self.dtype,
                    self.depthwise,
                    name=f"block_{i}_{j}",
                )(x, train=train)
                block += 1
            x = _layer_norm(f"layer_norm_{i}")(x)
            features.append(x)
        return features


class AllMLPDecoder(nn.Module):
    """SegFormer's decode head; returns logits at the resolution of the first (1/4) feature map."""

    decoder_size: int
    out_channels: int
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], *, train: bool = False) -> jax.Array:
        size = features[0].shape[1:3]
        projected = [
            resize_bilinear(
                _dense(self.decoder_size, self.dtype, f"linear_c_{i}")(f.astype(self.dtype)), size
            )
            for i, f in enumerate(features)
        ]
        x = jnp.concatenate(projected[::-1], axis=-1)  # stage 4 first, as HF's all_hidden_states[::-1]
        x = nn.Conv(
            self.decoder_size,
            (1, 1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_kernel_init,
            name="linear_fuse",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            use_fast_variance=False,
            dtype=jnp.float32,
            name="batch_norm",
        )(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Conv(
            self.out_channels, (1, 1), dtype=jnp.float32, kernel_init=_kernel_init, name="classifier"
        )(x)
        return x


class SegFormer(nn.Module):
    """SegFormer (B3 by default) mapping the image ``cond`` to mask logits at the input resolution."""

    FEED_FORWARD = True  # ignores x_t and t: E1 only
    CAN_DROP_IMAGE = False

    out_channels: int
    variant: str = "b3"
    depths: tuple[int, ...] | None = None
    hidden_sizes: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    sr_ratios: tuple[int, ...] | None = None
    decoder_size: int | None = None
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    classifier_dropout: float = 0.1
    normalize: bool = True  # ImageNet mean/std, as HF's image processor
    dtype: Any = jnp.float32
    depthwise: str = "shift"  # the Mix-FFN depthwise conv: shifted multiply-adds, or "conv" (nn.Conv)

    def spec(self) -> dict[str, Any]:
        """The architecture: the variant's values with this module's overrides."""
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown SegFormer variant {self.variant!r}; known: {sorted(VARIANTS)}")
        spec = dict(VARIANTS[self.variant])
        for key in ("depths", "hidden_sizes", "num_heads", "sr_ratios", "decoder_size"):
            value = getattr(self, key)
            if value is not None:
                spec[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        if not all(len(spec[k]) == 4 for k in ("depths", "hidden_sizes", "num_heads", "sr_ratios")):
            raise ValueError(f"SegFormer has four stages; got {spec}")
        return spec

    @nn.compact
    def __call__(
        self,
        x_t: jax.Array | None,
        t: jax.Array | None,
        cond: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Logits (B,H,W,out_channels) of the image ``cond`` (B,H,W,C) in [0, 1]; ``x_t`` and ``t`` are unused."""
        del x_t, t
        if cond is None:
            raise ValueError("SegFormer segments the image: cond must be given (it cannot run without it).")
        spec = self.spec()
        x = cond.astype(jnp.float32)
        if self.normalize:
            if x.shape[-1] != len(IMAGENET_MEAN):
                raise ValueError(
                    f"ImageNet normalisation needs 3-channel images, got {x.shape[-1]}; set model.normalize=False."
                )
            x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        features = MixTransformer(
            spec["depths"],
            spec["hidden_sizes"],
            spec["num_heads"],
            spec["sr_ratios"],
            self.mlp_ratio,
            self.drop_path_rate,
            self.dtype,
            self.depthwise,
            name="encoder",
        )(x.astype(self.dtype), train=train)
        logits = AllMLPDecoder(
            spec["decoder_size"], self.out_channels, self.classifier_dropout, self.dtype, name="decode_head"
        )(features, train=train)
        return resize_bilinear(logits, cond.shape[1:3])


# --- Weight import (diffseg_jax.convert): Hub names, and what a partial checkpoint may leave out. ----------

_ATTENTION = {
    "query": "self.query",
    "key": "self.key",
    "value": "self.value",
    "sr": "self.sr",
    "layer_norm": "self.layer_norm",
    "output": "output.dense",
}


def torch_key(path: Sequence[str]) -> str:
    """Hub state-dict key of one leaf: ``('params', 'encoder', 'block_0_1', 'mlp', 'dwconv', 'kernel')`` →
    ``'segformer.encoder.block.0.1.mlp.dwconv.dwconv.weight'``."""
    parts = [str(p) for p in path]
    if parts and parts[0] in ("params", "batch_stats"):
        parts = parts[1:]
    if len(parts) < 3 or parts[-1] not in LEAF or parts[0] not in ("encoder", "decode_head"):
        raise ValueError(f"not a SegFormer parameter path: {tuple(path)}")
    *mods, leaf = parts
    if mods[0] == "encoder":
        # patch_embeddings_0 -> patch_embeddings.0, block_2_17 -> block.2.17, layer_norm_3 -> layer_norm.3
        out = ["segformer", "encoder", indices_to_dots(mods[1])]
        for parent, name in zip(mods[1:], mods[2:]):
            if parent == "attention":
                name = _ATTENTION[name]
            elif parent == "mlp" and name == "dwconv":
                name = "dwconv.dwconv"
            out.append(name)
    else:
        out = ["decode_head"] + [
            f"linear_c.{m.removeprefix('linear_c_')}.proj" if m.startswith("linear_c_") else m
            for m in mods[1:]
        ]
    return ".".join(out + [LEAF[leaf]])


# transformers >= 5 renamed the modules (its conversion_mapping.py); its state_dict() uses the new names while
# save_pretrained and the Hub keep the old ones. New -> Hub, applied in order.
_HF5_RENAMES = (
    (r"^(encoder|stages)\.", r"segformer.\1."),  # a bare SegformerModel state dict
    (r"^segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\.", r"segformer.encoder.block.\1.\2."),
    (r"^segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
)


def canonical_key(key: str) -> str:
    """A state-dict key in the Hub's naming (accepts transformers >= 5 module names too)."""
    for pattern, repl in _HF5_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def skip_reason(key: str) -> str | None:
    """Why a checkpoint tensor is deliberately not imported (None: it must map to a parameter)."""
    if key in ("classifier.weight", "classifier.bias"):
        return "the ImageNet classifier of an encoder checkpoint (nvidia/mit-b*), not part of SegFormer"
    return None


def optional_group(path: Sequence[str]) -> str | None:
    """Parameters a checkpoint may leave out as a whole, keeping their initialisation: the decoder (an
    encoder-only checkpoint) and, on its own, its classifier (a head trained for other classes)."""
    parts = [str(p) for p in path]
    if "decode_head" not in parts:
        return None
    return "decode_head.classifier" if "classifier" in parts else "decode_head"


IMPORT_HINT = (
    "Choose the checkpoint's variant (model.variant=b0..b5; nvidia/mit-b3 is b3) and 3-channel images. A "
    "decode head trained for other classes loads without its classifier: drop the decode_head.classifier.* "
    "tensors from the file and they keep their initialisation."
)
