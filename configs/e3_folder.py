"""E3 mask prediction without the image (predict x0 from x_t; Eq. 2, Sec. 4.2) on an image/mask folder (e.g. the paper's private HER2 set).

  python -m diffseg_jax.main --config configs/e3_folder.py --workdir runs/e3_folder \
      --config.data.manual_dir=/path/to/folder
  python -m diffseg_jax.main --config configs/e3_folder.py:segdiff ...   # EnsemDiff by default; MedSegDiff needs its image
  python -m diffseg_jax.main --config configs/e3_folder.py:tiny ...   # CPU-test scale

Any images/ + masks/ folder (optionally train/ and test/), 256 px; a fifth held out as test when
there is no test/ folder; sampled ensembles of 5 (the paper's HER2 size).
The architecture's published scheme; the image branch is removed (EnsemDiff, SegDiff).
The README's "Data" section shows the folder layout.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e3", "folder", arg)
