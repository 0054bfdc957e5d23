"""E3 mask prediction without the image (predict x0 from x_t; Eq. 2, Sec. 4.2) on ISIC 2016.

  python -m diffseg_jax.main --config configs/e3_isic.py --workdir runs/e3_isic
  python -m diffseg_jax.main --config configs/e3_isic.py:segdiff ...   # EnsemDiff by default; MedSegDiff needs its image
  python -m diffseg_jax.main --config configs/e3_isic.py:tiny ...   # CPU-test scale

Images and masks resized to 256 x 256 (masks re-thresholded); sampled ensembles of 10 (Table 1).
The architecture's published scheme; the image branch is removed (EnsemDiff, SegDiff).
ISIC 2016 downloads itself on first use (into data.data_dir); offline, pass an unpacked copy as
--config.data.manual_dir (the README's "Data" section shows its layout).
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e3", "isic", arg)
