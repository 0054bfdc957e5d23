"""E2 diffusion segmentation (predict eps from x_t, t and the image; Eq. 3) on MoNuSeg 2018.

  python -m diffseg_jax.main --config configs/e2_monuseg.py --workdir runs/e2_monuseg \
      --config.data.manual_dir=/path/to/MoNuSeg
  python -m diffseg_jax.main --config configs/e2_monuseg.py:segdiff ...   # or :medsegdiff; default EnsemDiff
  python -m diffseg_jax.main --config configs/e2_monuseg.py:tiny ...   # CPU-test scale

Tiles resized 1000 -> 512, random 256 crops with flips for training; the 512 test images
evaluated as four stitched 256 tiles; sampled ensembles of 25 (Table 1).
The architecture's published training scheme (diffseg_jax/model_defaults.py PUBLISHED_SCHEMES).
The README's "Data" section shows the folder layout.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e2", "monuseg", arg)
