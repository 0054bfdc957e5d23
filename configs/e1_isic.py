"""E1 feed-forward segmentation (Dice + CE on the mask logits, random noise in place of x_t; Sec. 3.2) on ISIC 2016.

  python -m diffseg_jax.main --config configs/e1_isic.py --workdir runs/e1_isic
  python -m diffseg_jax.main --config configs/e1_isic.py:segdiff ...   # or :medsegdiff; default EnsemDiff
  python -m diffseg_jax.main --config configs/e1_isic.py:tiny ...   # CPU-test scale

Images and masks resized to 256 x 256 (masks re-thresholded); sampled ensembles of 10 (Table 1).
Adam lr 1e-5 as the paper's feed-forward protocol; the rest of the architecture's published scheme.
:segformer is the feed-forward reference (SegFormer-B3): its own published scheme, one deterministic member.
ISIC 2016 downloads itself on first use (into data.data_dir); offline, pass an unpacked copy as
--config.data.manual_dir (the README's "Data" section shows its layout).
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e1", "isic", arg)
