"""E1 feed-forward segmentation (Dice + CE on the mask logits, random noise in place of x_t; Sec. 3.2) on MoNuSeg 2018.

  python -m diffseg_jax.main --config configs/e1_monuseg.py --workdir runs/e1_monuseg \
      --config.data.manual_dir=/path/to/MoNuSeg
  python -m diffseg_jax.main --config configs/e1_monuseg.py:segdiff ...   # or :medsegdiff; default EnsemDiff
  python -m diffseg_jax.main --config configs/e1_monuseg.py:tiny ...   # CPU-test scale

Tiles resized 1000 -> 512, random 256 crops with flips for training; the 512 test images
evaluated as four stitched 256 tiles; sampled ensembles of 25 (Table 1).
Adam lr 1e-5 as the paper's feed-forward protocol; the rest of the architecture's published scheme.
:segformer is the feed-forward reference (SegFormer-B3): its own published scheme, one deterministic member.
The README's "Data" section shows the folder layout.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    return defaults.experiment_config("e1", "monuseg", arg)
