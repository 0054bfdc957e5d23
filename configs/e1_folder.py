"""E1 feed-forward segmentation (Dice + CE on the mask logits, random noise in place of x_t; Sec. 3.2) on an image/mask folder (e.g. the paper's private HER2 set).

  python -m diffseg_jax.main --config configs/e1_folder.py --workdir runs/e1_folder \
      --config.data.manual_dir=/path/to/folder
  python -m diffseg_jax.main --config configs/e1_folder.py:segdiff ...   # or :medsegdiff; default EnsemDiff
  python -m diffseg_jax.main --config configs/e1_folder.py:tiny ...   # CPU-test scale

Any images/ + masks/ folder (optionally train/ and test/), 256 px; a fifth held out as test when
there is no test/ folder; sampled ensembles of 5 (the paper's HER2 size).
Adam lr 1e-5 as the paper's feed-forward protocol; the rest of the architecture's published scheme.
:segformer is the feed-forward reference (SegFormer-B3): its own published scheme, one deterministic member.
The README's "Data" section shows the folder layout.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e1", "folder", arg)
