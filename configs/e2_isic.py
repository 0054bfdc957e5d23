"""E2 diffusion segmentation (predict eps from x_t, t and the image; Eq. 3) on ISIC 2016.

  python -m diffseg_jax.main --config configs/e2_isic.py --workdir runs/e2_isic
  python -m diffseg_jax.main --config configs/e2_isic.py:segdiff ...   # or :medsegdiff; default EnsemDiff
  python -m diffseg_jax.main --config configs/e2_isic.py:tiny ...   # CPU-test scale

Images and masks resized to 256 x 256 (masks re-thresholded); sampled ensembles of 10 (Table 1).
The architecture's published training scheme (diffseg_jax/model_defaults.py PUBLISHED_SCHEMES).
ISIC 2016 downloads itself on first use (into data.data_dir); offline, pass an unpacked copy as
--config.data.manual_dir (the README's "Data" section shows its layout).
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e2", "isic", arg)
