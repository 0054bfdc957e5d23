"""E4 unconditional image generation (predict eps of the image; Eq. 1, Sec. 4.2) on an image/mask folder (e.g. the paper's private HER2 set).

  python -m diffseg_jax.main --config configs/e4_folder.py --workdir runs/e4_folder \
      --config.data.manual_dir=/path/to/folder
  python -m diffseg_jax.main --config configs/e4_folder.py:segdiff ...   # EnsemDiff by default; MedSegDiff needs its image
  python -m diffseg_jax.main --config configs/e4_folder.py:tiny ...   # CPU-test scale

Any images/ + masks/ folder (optionally train/ and test/), 256 px; a fifth held out as test when
there is no test/ folder; sampled ensembles of 5 (the paper's HER2 size).
The architecture's published scheme; no image condition (EnsemDiff, SegDiff).
The README's "Data" section shows the folder layout.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e4", "folder", arg)
