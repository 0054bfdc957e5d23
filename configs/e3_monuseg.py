"""E3 mask prediction without the image (predict x0 from x_t; Eq. 2, Sec. 4.2) on MoNuSeg 2018.

  python -m diffseg_jax.main --config configs/e3_monuseg.py --workdir runs/e3_monuseg \
      --config.data.manual_dir=/path/to/MoNuSeg
  python -m diffseg_jax.main --config configs/e3_monuseg.py:segdiff ...   # EnsemDiff by default; MedSegDiff needs its image
  python -m diffseg_jax.main --config configs/e3_monuseg.py:tiny ...   # CPU-test scale

Tiles resized 1000 -> 512, random 256 crops with flips for training; the 512 test images
evaluated as four stitched 256 tiles; sampled ensembles of 25 (Table 1).
The architecture's published scheme; the image branch is removed (EnsemDiff, SegDiff).
The README's "Data" section shows the folder layout.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e3", "monuseg", arg)
