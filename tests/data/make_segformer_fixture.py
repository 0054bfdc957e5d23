"""Writes ``segformer_hf.npz``: a tiny Hugging Face SegFormer's weights, an input and its logits (the oracle).

Needs torch and transformers (not the package's dependencies; the test suite only reads the .npz):

  python tests/data/make_segformer_fixture.py   # in an environment with torch + transformers + safetensors

A ``SegformerForSemanticSegmentation`` with a tiny config (two blocks in stage 2, so stochastic-depth
indices and block numbering are exercised; the default spatial-reduction ratios 8/4/2/1 at an input size
where every stage attends to more than one key), every parameter and BatchNorm statistic randomised and
rounded to float16 (stored as float16, exact in float32), run in eval mode with eager attention on an
image in [0, 1] (also float16-exact) standardised as HF's image processor does (ImageNet mean/std).

Stored: ``state/<key>`` under the Hub names that ``save_pretrained`` writes (read back from its
safetensors file); ``hf5_names``/``hub_names``: transformers' own ``state_dict()`` keys paired with the
Hub keys of the same tensors; ``image`` (1,H,W,3) NHWC; ``logits_quarter`` (HF's 1/4-resolution output)
and ``logits`` (upsampled to the input size with ``interpolate(bilinear, align_corners=False)``), NHWC;
``resize_*``: bilinear up- and downsampling of a small array by ``torch.nn.functional.interpolate``.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "segformer_hf.npz")
CONFIG = dict(
    depths=[1, 2, 1, 1],
    hidden_sizes=[8, 16, 24, 32],
    num_attention_heads=[1, 2, 3, 4],
    sr_ratios=[8, 4, 2, 1],
    decoder_hidden_size=32,
    num_labels=2,
)
SIZE = (77, 70)  # stages at 20x18, 10x9, 5x5, 3x3; keys/values at 2x2, 2x2, 2x2, 3x3
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def f16(x: torch.Tensor) -> torch.Tensor:
    """Rounded to float16 and back: stored as float16, the same values in float32."""
    return x.half().float()


def main() -> None:
    torch.manual_seed(0)
    config = SegformerConfig(**CONFIG)
    config._attn_implementation = "eager"
    model = SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                value = torch.rand(tensor.shape) + 0.5
            elif tensor.ndim == 1 and ("norm" in name) and name.endswith("weight"):
                value = 1.0 + 0.2 * torch.randn(tensor.shape)
            else:
                value = 0.3 * torch.randn(tensor.shape)
            tensor.copy_(f16(value))
    hf5 = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hub = load_file(os.path.join(tmp, "model.safetensors"))
        reloaded = SegformerForSemanticSegmentation.from_pretrained(tmp, attn_implementation="eager").eval()
    hf5_names, hub_names = [], []
    for name, value in hf5.items():
        if name.endswith("num_batches_tracked"):
            continue
        (match,) = [k for k, v in hub.items() if v.shape == value.shape and np.array_equal(v, value)]
        hf5_names.append(name)
        hub_names.append(match)

    rng = np.random.default_rng(0)
    image = rng.uniform(size=(1, *SIZE, 3)).astype(np.float16).astype(np.float32)
    pixels = torch.from_numpy(((image - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        quarter = model(pixel_values=pixels).logits
        assert torch.equal(quarter, reloaded(pixel_values=pixels).logits), "Hub names do not round-trip"
        full = torch.nn.functional.interpolate(quarter, size=SIZE, mode="bilinear", align_corners=False)
        small = torch.from_numpy(rng.standard_normal((1, 2, 7, 5)).astype(np.float32))
        up = torch.nn.functional.interpolate(small, size=(11, 13), mode="bilinear", align_corners=False)
        down = torch.nn.functional.interpolate(small, size=(4, 3), mode="bilinear", align_corners=False)

    def nhwc(t: torch.Tensor) -> np.ndarray:
        return t.permute(0, 2, 3, 1).numpy().astype(np.float32)

    arrays = {
        f"state/{k}": v.astype(np.float16) for k, v in hub.items() if not k.endswith("num_batches_tracked")
    }
    np.savez_compressed(
        OUT,
        **arrays,
        hf5_names=np.array(hf5_names),
        hub_names=np.array(hub_names),
        image=image.astype(np.float16),
        logits_quarter=nhwc(quarter),
        logits=nhwc(full),
        resize_input=nhwc(small),
        resize_up=nhwc(up),
        resize_down=nhwc(down),
        versions=np.array([f"torch {torch.__version__}", f"transformers {transformers.__version__}"]),
    )
    print(
        f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB); logits range {full.min():.3f}..{full.max():.3f}"
    )


if __name__ == "__main__":
    main()
