"""E2 diffusion segmentation (predict eps from x_t, t and the image; Eq. 3) on an image/mask folder (e.g. the paper's private HER2 set).

  python -m diffseg_jax.main --config configs/e2_folder.py --workdir runs/e2_folder \
      --config.data.manual_dir=/path/to/folder
  python -m diffseg_jax.main --config configs/e2_folder.py:segdiff ...   # or :medsegdiff; default EnsemDiff
  python -m diffseg_jax.main --config configs/e2_folder.py:tiny ...   # CPU-test scale

Any images/ + masks/ folder (optionally train/ and test/), 256 px; a fifth held out as test when
there is no test/ folder; sampled ensembles of 5 (the paper's HER2 size).
The architecture's published training scheme (diffseg_jax/model_defaults.py PUBLISHED_SCHEMES).
The README's "Data" section shows the folder layout.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e2", "folder", arg)
