"""E1 feed-forward segmentation (Dice + CE, random noise in place of x_t) on a synthetic dataset.

  python -m diffseg_jax.main --config configs/e1_synthetic.py --workdir runs/e1_synthetic
  python -m diffseg_jax.main --config configs/e1_synthetic.py:tiny --workdir /tmp/e1  # CPU-test scale
  python -m diffseg_jax.main --config configs/e1_synthetic.py:segformer --workdir runs/e1_segformer  # reference

Writes checkpoints, TensorBoard/JSONL logs and eval/ (metrics.json, ensemble.png) under the workdir.
Pick the fingerprint with --config.data.kind=lesion|nuclei|clusters.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    config = defaults.get_config(arg)
    config.experiment = "e1"
    config.train.lr = 1e-5  # The paper's feed-forward protocol: Adam, lr 1e-5.
    defaults.apply_reference(config, config.model.name)  # nnU-Net keeps its own training scheme
    return config
