"""E2 diffusion segmentation (predict eps given x_t, t and the image; Eq. 3) on a synthetic dataset.

  python -m diffseg_jax.main --config configs/e2_synthetic.py --workdir runs/e2_synthetic
  python -m diffseg_jax.main --config configs/e2_synthetic.py:tiny --workdir /tmp/e2  # CPU-test scale

Writes checkpoints, TensorBoard/JSONL logs and eval/ (metrics.json, ensemble.png) under the workdir.
Pick the fingerprint with --config.data.kind=lesion|nuclei|clusters.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    config = defaults.get_config(arg)
    config.experiment = "e2"
    return config
