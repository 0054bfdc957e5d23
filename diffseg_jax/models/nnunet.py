"""nnU-Net's 2D plain convolutional UNet (Isensee et al., Nat. Methods 2021) in Flax Linen: a feed-forward reference.

Follows nnU-Net **v2.8.1** (MIC-DKFZ/nnUNet, tag v2.8.1) and the ``PlainConvUNet`` of
``dynamic_network_architectures`` 0.4.4 that it builds from a plan (``diffseg_jax.models.nnunet_plan``):

* encoder stage s: ``n_conv_per_stage[s]`` x (conv k x k -> instance norm -> leaky ReLU 0.01); the first conv of
  a stage has the stage's stride (strided-conv downsampling, stride 1 in stage 0); conv bias on; instance norm
  affine with eps 1e-5;
* decoder stage s (lowest resolution first): transposed conv (kernel = stride, bias on) to the skip's features,
  concatenation [upsampled, skip], ``n_conv_per_stage_decoder[s]`` conv blocks, a 1x1 segmentation head;
* deep supervision: in training the heads of every decoder stage are returned, full resolution first; the
  loss weights them 1/2^i with the lowest resolution's weight 0, normalised (``objectives``).
* He-normal initialisation with negative slope 1e-2 for every (transposed) conv kernel, zero biases
  (nnU-Net's ``InitWeights_He(1e-2)``); norm scale 1, bias 0.

Parameter names follow the PyTorch module tree with ``.`` replaced by ``_`` (``encoder_stages_0_0_convs_1_conv``,
``decoder_transpconvs_0``, ``decoder_stages_0_convs_0_norm``, ``decoder_seg_layers_0``); the parameter count
equals ``PlainConvUNet(..., num_classes=out_channels)`` (pinned in ``tests/test_nnunet.py``).

Deviations from nnU-Net, all equivalent or outside the network:

* One sigmoid logit per pixel instead of a 2-class softmax (``out_channels=1``): softmax over (0, z) is sigmoid(z),
  so cross-entropy and the foreground Dice nnU-Net trains (``do_bg=False``) are the same functions of the logit.
  The segmentation heads have one output channel, so each has 1 + C parameters instead of 2 + 2C.
* Input normalisation inside the model: nnU-Net's ``ZScoreNormalization`` (the default for RGB channels not
  named 'CT'/'rgb_to_0_1'): each channel of each image minus its mean, divided by max(std, 1e-8). nnU-Net
  normalises the whole preprocessed image before cropping patches; here the network normalises what it sees
  (the whole image when the patch is the image, as for ISIC). ``normalize=False`` turns it off: the train step
  does that when it augments, since nnU-Net augments the normalised image (``diffseg_jax.data.augment``).
* NHWC layout; the model ignores ``x_t`` and ``t`` (the registry's feed-forward call signature).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NEGATIVE_SLOPE = 0.01  # LeakyReLU of nnU-Net's plans
NORM_EPS = 1e-5
ZSCORE_EPS = 1e-8  # ZScoreNormalization's floor on the std


def he_normal(negative_slope: float = 1e-2, in_axis: int = -2, out_axis: int = -1):
    """``torch.nn.init.kaiming_normal_(w, a=negative_slope)``: N(0, 2 / ((1 + a^2) fan_in)), not truncated."""
    return nn.initializers.variance_scaling(
        2.0 / (1.0 + negative_slope**2), "fan_in", "normal", in_axis=in_axis, out_axis=out_axis
    )


def zscore(images: jax.Array, eps: float = ZSCORE_EPS) -> jax.Array:
    """Per image and channel: (x - mean) / max(std, eps) over H, W (nnU-Net's ZScoreNormalization)."""
    mean = jnp.mean(images, axis=(-3, -2), keepdims=True)
    std = jnp.std(images, axis=(-3, -2), keepdims=True)
    return (images - mean) / jnp.maximum(std, eps)


def _pairs(values: Sequence[Any]) -> tuple[tuple[int, int], ...]:
    """Per-stage 2-tuples from ints or sequences (config values may come back from JSON as lists)."""
    return tuple((int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1])) for v in values)


class ConvBlock(nn.Module):
    """conv -> instance norm (affine) -> leaky ReLU, 'same' padding ((k - 1) // 2), the conv carrying the stride."""

    features: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = tuple(((k - 1) // 2, (k - 1) // 2) for k in self.kernel_size)
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.stride,
            padding=pad,
            use_bias=True,
            kernel_init=he_normal(),
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.InstanceNorm(epsilon=NORM_EPS, use_fast_variance=False, dtype=self.dtype, name="norm")(x)
        return nn.leaky_relu(x, NEGATIVE_SLOPE)


class NNUNet(nn.Module):
    """PlainConvUNet (2D) from an nnU-Net plan; the image ``cond`` in, mask logits out."""

    FEED_FORWARD = True  # image -> logits; x_t and t are ignored (E1 only)
    CAN_DROP_IMAGE = False

    out_channels: int
    # The 256 x 256 plan (ISIC 2016); configs set the planned values.
    features_per_stage: Sequence[int] = (32, 64, 128, 256, 512, 512, 512)
    strides: Sequence[Any] = ((1, 1),) + ((2, 2),) * 6
    kernel_sizes: Sequence[Any] = ((3, 3),) * 7
    n_conv_per_stage: Sequence[int] = (2,) * 7
    n_conv_per_stage_decoder: Sequence[int] = (2,) * 6
    deep_supervision: bool = True
    normalize: bool = True
    dtype: Any = jnp.float32

    @staticmethod
    def normalize_images(images: jax.Array) -> jax.Array:
        """What ``normalize`` does to the input: nnU-Net's per-image, per-channel z-score."""
        return zscore(images)

    def check_input_size(self, height: int, width: int) -> None:
        """Raises ValueError unless H and W are multiples of the total stride (every skip must match)."""
        strides = _pairs(self.strides)
        fy = fx = 1
        for sy, sx in strides:
            fy, fx = fy * sy, fx * sx
        if height % fy or width % fx:
            raise ValueError(
                f"nnU-Net with strides {[list(s) for s in strides]} needs images whose sides are multiples of "
                f"{fy}x{fx}, got {height}x{width}; use the planned patch size (model.plan.mode=auto) as "
                "data.image_size, or evaluate tiles of it (data.eval_tiling=tiles)."
            )

    @nn.compact
    def __call__(
        self,
        x_t: jax.Array | None,
        t: jax.Array | None,
        cond: jax.Array | None = None,
        *,
        train: bool = False,
    ):
        """Logits (B,H,W,out_channels) of the image ``cond`` (B,H,W,C) in [0, 1]; ``x_t`` and ``t`` are unused.

        In training with ``deep_supervision`` returns ``(logits, {"deep_supervision": (half, quarter, ...)})``:
        the lower-resolution heads, highest resolution first.
        """
        del x_t, t
        if cond is None:
            raise ValueError(
                "nnU-Net segments an image: cond must be given (it cannot run without the image)."
            )
        features = tuple(int(f) for f in self.features_per_stage)
        strides, kernels = _pairs(self.strides), _pairs(self.kernel_sizes)
        n_stages = len(features)
        if not (len(strides) == len(kernels) == len(self.n_conv_per_stage) == n_stages >= 2) or (
            len(self.n_conv_per_stage_decoder) != n_stages - 1
        ):
            raise ValueError(
                "nnU-Net needs at least 2 stages and one stride, kernel size and conv count per stage (one fewer "
                f"decoder conv counts); got features {features}, strides {strides}, kernels {kernels}, "
                f"n_conv_per_stage {tuple(self.n_conv_per_stage)}, "
                f"n_conv_per_stage_decoder {tuple(self.n_conv_per_stage_decoder)}."
            )
        self.check_input_size(cond.shape[1], cond.shape[2])

        h = zscore(cond) if self.normalize else cond
        h = h.astype(self.dtype)
        skips = []
        for s in range(n_stages):
            for j in range(int(self.n_conv_per_stage[s])):
                h = ConvBlock(
                    features[s],
                    kernels[s],
                    strides[s] if j == 0 else (1, 1),
                    self.dtype,
                    name=f"encoder_stages_{s}_0_convs_{j}",
                )(h)
            skips.append(h)

        heads = []
        for s in range(n_stages - 1):  # decoder stage s joins skip -(s + 2)
            skip_features, stride = features[-(s + 2)], strides[-(s + 1)]
            h = nn.ConvTranspose(
                skip_features,
                stride,
                strides=stride,
                padding="VALID",
                use_bias=True,
                # transpose_kernel: torch's ConvTranspose2d exactly, the kernel laid out (kh, kw, out, in) like
                # torch's weight (in, out, kh, kw), so torch's fan_in (out * kh * kw) is the default in_axis.
                transpose_kernel=True,
                kernel_init=he_normal(),
                dtype=self.dtype,
                name=f"decoder_transpconvs_{s}",
            )(h)
            h = jnp.concatenate([h, skips[-(s + 2)]], axis=-1)
            for j in range(int(self.n_conv_per_stage_decoder[s])):
                h = ConvBlock(
                    skip_features, kernels[-(s + 2)], (1, 1), self.dtype, name=f"decoder_stages_{s}_convs_{j}"
                )(h)
            # Every head is built (and applied: XLA drops the unused ones) so that the parameters do not depend
            # on the mode, as dynamic_network_architectures always builds them.
            heads.append(
                nn.Conv(
                    self.out_channels,
                    (1, 1),
                    use_bias=True,
                    kernel_init=he_normal(),
                    dtype=jnp.float32,
                    name=f"decoder_seg_layers_{s}",
                )(h).astype(jnp.float32)
            )
        logits = heads[-1]
        if train and self.deep_supervision:
            return logits, {"deep_supervision": tuple(heads[-2::-1])}
        return logits


# ---------------------------------------------------------------- official-weight mapping (diffseg_jax.convert)
IMPORT_HINT = (
    "Check that the plan (features_per_stage, strides, kernel sizes, convs per stage) matches the checkpoint's "
    "PlainConvUNet, and that it has one output class (num_classes=1: nnU-Net's 2-class head is not mapped)."
)


def torch_key(path: Sequence[str]) -> str:
    """The ``PlainConvUNet`` state-dict key of one Flax leaf path (a leading ``'params'`` is dropped), e.g.
    ``('encoder_stages_1_0_convs_0', 'norm', 'scale')`` -> ``'encoder.stages.1.0.convs.0.norm.weight'``,
    ``('decoder_seg_layers_2', 'kernel')`` -> ``'decoder.seg_layers.2.weight'``. Kernels need the layout
    change of :func:`diffseg_jax.state_dicts.to_flax_layout` (the transposed convs' (kh, kw, out, in) included)."""
    path = tuple(path)
    if path[0] == "params":
        path = path[1:]
    *modules, leaf = path
    names = [
        m.replace("seg_layers", "seg-layers").replace("_", ".").replace("seg-layers", "seg_layers")
        for m in modules
    ]
    return ".".join(names + ["weight" if leaf in ("kernel", "scale") else leaf])


def skip_reason(key: str) -> str | None:
    """State-dict keys that repeat tensors mapped under another key (dynamic_network_architectures registers
    each conv and norm twice, in ``convs.N.conv``/``.norm`` and ``convs.N.all_modules``, and the decoder holds
    the encoder as ``decoder.encoder``)."""
    if key.startswith("decoder.encoder."):
        return "the decoder's reference to the encoder (the same tensors as encoder.*)"
    if ".all_modules." in key:
        return "the same tensor as the block's .conv / .norm"
    return None
