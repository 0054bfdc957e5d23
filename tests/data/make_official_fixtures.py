"""Writes the official-output fixtures ``<model>_official.npz`` + ``<model>_official_io.npz`` (the oracles of
``tests/test_{models,segdiff,medsegdiff,nnunet}.py::test_*_matches_official_fixture``).

For each of EnsemDiff, SegDiff, MedSegDiff v1 and nnU-Net's ``PlainConvUNet``, a tiny configuration of the
*official* PyTorch module is built, **every** tensor of its state dict randomised (norm weights and biases,
BatchNorm running statistics and the zero-initialised output convs too), run in eval mode on fixed inputs, and

* ``<model>_official.npz``: the state dict under its official names (float16; the values are float16-exact,
  so the float32 the test reads is exactly what torch ran) -- the file a user would hand to
  ``diffseg_jax.convert``;
* ``<model>_official_io.npz``: ``config`` (JSON: our model's kwargs), the inputs ``x_t`` (NHWC), ``t``,
  ``image`` (NHWC, in [0, 1] as our models take it) and the official outputs (NHWC, float32): ``out``;
  MedSegDiff also ``cal``; nnU-Net ``ds_0`` (full resolution) ... ``ds_k``, every deep-supervision head.

Needs torch (not a dependency of the package; the tests only read the .npz files) and the official code, each
checked out somewhere and given on the command line (nothing of it is committed here)::

  python tests/data/make_official_fixtures.py \\
      --ensemdiff /src/Diffusion-based-Segmentation \\   # JuliaWolleb, 676f214
      --segdiff /src/SegDiff \\                           # tomeramit, e6592c9
      --medsegdiff /src/MedSegDiff \\                     # KidsWithTokens, 60850bf
      --nnunet /src/dynamic-network-architectures        # MIC-DKFZ, v0.4.4

Any subset of the four may be given. What had to be patched to make the official code tiny, all in this file:

* SegDiff: ``UNetModel`` hard-codes ``RRDBNet(nb=rrdb_blocks, out_nc=model_channels)`` with nf 64 and gc 32;
  its ``rrdb`` is replaced by the official ``RRDBNet(nf=8, gc=4)`` (our ``rrdb_features``/``rrdb_growth``).
* MedSegDiff v1: ``UNetModel_v1preview`` hard-codes ``Generic_UNet(3, 32, 1, 5, highway=True)`` with gating
  convs from ``int(d/2+1)*128`` channels and FF-Parser weights for 256 px; ``hwm`` is rebuilt as the official
  ``Generic_UNet`` with base 4 (max 32 features) and its gating convs / FF-Parsers at this model's widths and
  32 px (our ``cond_features``/``image_size``).  The bottleneck conv the official forward creates afresh on
  every call (``conv_nd(2, C, 512, 1)``, 512 hard-coded) is one fixed registered conv ``hwm.bottleneck_proj``
  to this model's bottleneck width: our ``bottleneck='trained'``.  ``batchgenerators`` (imported by the
  official ``unet.py`` for inference helpers the forward does not use) is stubbed when missing.
* The official SegDiff loader standardises the 0-255 image with MoNuSeg's mean/std; ours does that inside the
  model (``image_mean``/``image_std``), so the official model gets ``(255 * image - mean) / std``.  nnU-Net's
  z-score (``ZScoreNormalization``, population std) is applied to the image the official network gets; ours
  z-scores inside the network.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SEGDIFF_MEAN, SEGDIFF_STD = (142.07, 98.48, 132.96), (65.78, 57.05, 57.78)  # defaults.py (MoNuSeg)


def exact(x: np.ndarray) -> np.ndarray:
    """As float16 (the values below are float16-exact, so float16 and float32 hold the same numbers)."""
    return np.asarray(x, np.float32).astype(np.float16)


def levels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Integers in -3..3: a random tensor of few distinct values, so that the file compresses."""
    return rng.integers(-3, 4, shape).astype(np.float64)


def randomise(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """Every tensor of ``model.state_dict()`` replaced by random values (in place): multiples of powers of 2,
    exact in float16, of at most 7 distinct values per tensor (small files); weights scaled to a variance near
    1/fan_in."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            shape = tuple(tensor.shape)
            k = levels(rng, shape)
            if name.endswith("running_var"):
                value = 1.0 + k / 8
            elif name.endswith("complex_weight"):
                value = 1.0 + k / 4
            elif len(shape) == 1 and name.endswith("weight"):  # norm gains (all 1-D weights here)
                value = 1.0 + k / 16
            elif len(shape) == 1:  # biases, running means
                value = k / 16
            else:  # -1, 0, 1 with probabilities 1/4, 1/2, 1/4 (fewer bits still), variance ~1/fan_in
                k = rng.choice([-1.0, 0.0, 0.0, 1.0], shape)
                fan_in = int(np.prod(shape[1:]))
                value = k * 2.0 ** -np.round(np.log2(np.sqrt(fan_in / 2)))
            tensor.copy_(torch.from_numpy(exact(value).astype(np.float32)))


def state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {
        k: exact(v.numpy()) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy().astype(np.float32)


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float()


def inputs(rng: np.random.Generator, size: int, x_channels: int = 1, t_max: int = 1000):
    x_t = exact(rng.standard_normal((2, size, size, x_channels))).astype(np.float32)  # float16-rounded
    image = exact(rng.uniform(size=(2, size, size, 3))).astype(np.float32)
    t = np.array([rng.integers(0, t_max // 2), rng.integers(t_max // 2, t_max)], np.int32)
    return x_t, t, image


def write(name: str, model: torch.nn.Module, config: dict, x_t, t, image, **outputs) -> None:
    state = state_arrays(model)
    path = os.path.join(HERE, f"{name}_official.npz")
    np.savez_compressed(path, **state)
    io_path = os.path.join(HERE, f"{name}_official_io.npz")
    np.savez_compressed(
        io_path,
        config=np.array(json.dumps(config)),
        x_t=x_t,
        t=t,
        image=image,
        versions=np.array(f"torch {torch.__version__}"),
        **{k: v for k, v in outputs.items()},
    )
    n = sum(v.size for v in state.values())
    print(
        f"{name}: {len(state)} tensors, {n} values; {os.path.getsize(path) / 1024:.0f} + "
        f"{os.path.getsize(io_path) / 1024:.0f} KiB; "
        + ", ".join(f"{k} {v.shape} |.|max {np.abs(v).max():.3g}" for k, v in outputs.items())
    )


def import_from(path: str, package: str):
    top = package.split(".")[0]  # EnsemDiff and MedSegDiff both name their package guided_diffusion
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        if not (getattr(sys.modules[name], "__file__", None) or "").startswith(os.path.abspath(path)):
            del sys.modules[name]
    sys.path.insert(0, os.path.abspath(path))
    try:
        return importlib.import_module(package)
    finally:
        sys.path.pop(0)


# ---------------------------------------------------------------- the four models
ENSEMDIFF = dict(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=1
)


def ensemdiff(path: str) -> None:
    unet = import_from(path, "guided_diffusion.unet")
    c = ENSEMDIFF
    model = unet.UNetModel(
        image_size=16,
        in_channels=4,  # RGB image + x_t, concatenated in that order
        model_channels=c["model_channels"],
        out_channels=2,  # learned sigma, as the official config
        num_res_blocks=c["num_res_blocks"],
        attention_resolutions=c["attention_resolutions"],
        channel_mult=c["channel_mult"],
        num_heads=c["num_heads"],
    ).eval()
    rng = np.random.default_rng(1)
    randomise(model, rng)
    x_t, t, image = inputs(rng, 16)
    with torch.no_grad():
        out = model(nchw(np.concatenate([image, x_t], -1)), torch.from_numpy(t).long())
    write("ensemdiff", model, dict(out_channels=2, **c), x_t, t, image, out=nhwc(out))


SEGDIFF = dict(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_heads=4,
    rrdb_blocks=1,
    rrdb_features=8,
    rrdb_growth=4,
)


def segdiff(path: str) -> None:
    unet = import_from(path, "improved_diffusion.unet")
    rrdb = import_from(path, "improved_diffusion.RRDB")
    c = SEGDIFF
    model = unet.UNetModel(
        in_channels=1,
        model_channels=c["model_channels"],
        out_channels=1,
        num_res_blocks=c["num_res_blocks"],
        attention_resolutions=c["attention_resolutions"],
        channel_mult=c["channel_mult"],
        num_heads=c["num_heads"],
        rrdb_blocks=c["rrdb_blocks"],
    )
    model.rrdb = rrdb.RRDBNet(
        nb=c["rrdb_blocks"], out_nc=c["model_channels"], nf=c["rrdb_features"], gc=c["rrdb_growth"]
    )
    model.eval()
    rng = np.random.default_rng(2)
    randomise(model, rng)
    x_t, t, image = inputs(rng, 16, t_max=100)
    standardised = (255.0 * image - np.array(SEGDIFF_MEAN)) / np.array(SEGDIFF_STD)
    with torch.no_grad():
        out = model(nchw(x_t), torch.from_numpy(t).long(), conditioned_image=nchw(standardised))
    config = dict(out_channels=1, image_mean=SEGDIFF_MEAN, image_std=SEGDIFF_STD, **c)
    write("segdiff", model, config, x_t, t, image, out=nhwc(out))


MEDSEGDIFF = dict(
    model_channels=32,
    channel_mult=(1, 1, 1, 1, 1, 1),
    num_res_blocks=2,  # the official forward gates with hs[3], hs[6], hs[9], hs[12]: the downsample outputs
    attention_resolutions=(16,),
    num_heads=1,
    cond_features=(4, 8, 16, 32, 32),
    image_size=32,
    bottleneck="trained",
    version="v1",
)


def medsegdiff(path: str) -> None:
    try:
        import batchgenerators  # noqa: F401
    except ImportError:  # only inference helpers that the forward does not use import it
        stub = types.ModuleType("batchgenerators.augmentations.utils")
        stub.pad_nd_image = None
        for name in ("batchgenerators", "batchgenerators.augmentations"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["batchgenerators.augmentations.utils"] = stub
    unet = import_from(path, "guided_diffusion.unet")
    c = MEDSEGDIFF
    size, mc, mult, feats = c["image_size"], c["model_channels"], c["channel_mult"], c["cond_features"]
    model = unet.UNetModel_v1preview(
        image_size=size,
        in_channels=4,
        model_channels=mc,
        out_channels=2,
        num_res_blocks=c["num_res_blocks"],
        attention_resolutions=c["attention_resolutions"],
        channel_mult=mult,
        num_heads=c["num_heads"],
    )
    hwm = unet.Generic_UNet(3, feats[0], 1, len(feats), highway=True, max_num_features=max(feats))
    n = len(feats) - 1
    hwm.conv_trans_blocks_a = torch.nn.ModuleList(
        [unet.conv_nd(2, mc * mult[d], feats[d], 1) for d in range(n)]
    )
    hwm.conv_trans_blocks_b = torch.nn.ModuleList([unet.conv_nd(2, feats[d], 1, 1) for d in range(n)])
    hwm.ffparser = torch.nn.ModuleList(
        [unet.FFParser(feats[d], size // 2 ** (d + 1), size // 2 ** (d + 2) + 1) for d in range(n)]
    )
    hwm.bottleneck_proj = torch.nn.Conv2d(feats[-1], mc * mult[-1], 1)
    model.hwm = hwm
    original_conv_nd = unet.conv_nd

    def conv_nd(dims, cin, cout, *args, **kwargs):  # the per-call random 512-channel conv -> the fixed one
        if cout == 512 and cin == feats[-1]:
            return hwm.bottleneck_proj
        return original_conv_nd(dims, cin, cout, *args, **kwargs)

    unet.conv_nd = conv_nd
    model.eval()
    rng = np.random.default_rng(3)
    randomise(model, rng)
    x_t, t, image = inputs(rng, size)
    with torch.no_grad():
        out, cal = model(nchw(np.concatenate([image, x_t], -1)), torch.from_numpy(t).long())
    write("medsegdiff", model, dict(out_channels=2, **c), x_t, t, image, out=nhwc(out), cal=nhwc(cal))


NNUNET = dict(
    features_per_stage=(4, 8, 16, 16),
    strides=((1, 1), (2, 2), (2, 2), (2, 2)),
    kernel_sizes=((3, 3),) * 4,
    n_conv_per_stage=(2, 2, 2, 2),
    n_conv_per_stage_decoder=(2, 2, 2),
)


def nnunet(path: str) -> None:
    unet = import_from(path, "dynamic_network_architectures.architectures.unet")
    c = NNUNET
    # nnU-Net v2's 2D plan: instance norm (affine, eps 1e-5), leaky ReLU 0.01, conv bias on.
    model = unet.PlainConvUNet(
        input_channels=3,
        n_stages=len(c["features_per_stage"]),
        features_per_stage=list(c["features_per_stage"]),
        conv_op=torch.nn.Conv2d,
        kernel_sizes=[list(k) for k in c["kernel_sizes"]],
        strides=[list(s) for s in c["strides"]],
        n_conv_per_stage=list(c["n_conv_per_stage"]),
        num_classes=1,
        n_conv_per_stage_decoder=list(c["n_conv_per_stage_decoder"]),
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    ).eval()
    rng = np.random.default_rng(4)
    randomise(model, rng)
    image = exact(rng.uniform(size=(2, 24, 16, 3)) * np.array([1.0, 0.5, 2.0])).astype(
        np.float32
    )  # non-square
    x_t = exact(rng.standard_normal((2, 24, 16, 1))).astype(np.float32)  # ignored by both
    t = np.array([0, 999], np.int32)
    mean = image.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    std = image.astype(np.float64).std(axis=(1, 2), keepdims=True)
    z = ((image - mean) / np.maximum(std, 1e-8)).astype(np.float32)
    with torch.no_grad():
        heads = model(nchw(z))
    write(
        "nnunet",
        model,
        dict(out_channels=1, **c),
        x_t,
        t,
        image,
        **{f"ds_{i}": nhwc(h) for i, h in enumerate(heads)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name in ("ensemdiff", "segdiff", "medsegdiff", "nnunet"):
        parser.add_argument(f"--{name}", metavar="PATH", help="checkout of the official code")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, fn in (
        ("ensemdiff", ensemdiff),
        ("segdiff", segdiff),
        ("medsegdiff", medsegdiff),
        ("nnunet", nnunet),
    ):
        if getattr(args, name):
            fn(getattr(args, name))


if __name__ == "__main__":
    main()
