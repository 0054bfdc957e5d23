"""E3 mask prediction (predict x0 from x_t and t, image withheld; Eq. 2) on a synthetic dataset.

  python -m diffseg_jax.main --config configs/e3_synthetic.py --workdir runs/e3_synthetic
  python -m diffseg_jax.main --config configs/e3_synthetic.py:tiny --workdir /tmp/e3  # CPU-test scale

Writes checkpoints, TensorBoard/JSONL logs and eval/ (metrics.json, ensemble.png) under the workdir.
Pick the fingerprint with --config.data.kind=lesion|nuclei|clusters.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    config = defaults.get_config(arg)
    config.experiment = "e3"
    return config
