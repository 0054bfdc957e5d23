"""E4 unconditional image generation (predict eps of the image; Eq. 1, Sec. 4.2) on MoNuSeg 2018.

  python -m diffseg_jax.main --config configs/e4_monuseg.py --workdir runs/e4_monuseg \
      --config.data.manual_dir=/path/to/MoNuSeg
  python -m diffseg_jax.main --config configs/e4_monuseg.py:segdiff ...   # EnsemDiff by default; MedSegDiff needs its image
  python -m diffseg_jax.main --config configs/e4_monuseg.py:tiny ...   # CPU-test scale

Tiles resized 1000 -> 512, random 256 crops with flips for training; the 512 test images
evaluated as four stitched 256 tiles; sampled ensembles of 25 (Table 1).
The architecture's published scheme; no image condition (EnsemDiff, SegDiff).
The README's "Data" section shows the folder layout.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e4", "monuseg", arg)
