"""E4 unconditional image generation (the image is x, predict eps; Eq. 1) on a synthetic dataset.

  python -m diffseg_jax.main --config configs/e4_synthetic.py --workdir runs/e4_synthetic
  python -m diffseg_jax.main --config configs/e4_synthetic.py:tiny --workdir /tmp/e4  # CPU-test scale

Writes checkpoints, TensorBoard/JSONL logs and eval/ (metrics.json, ensemble.png) under the workdir.
Pick the fingerprint with --config.data.kind=lesion|nuclei|clusters.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    config = defaults.get_config(arg)
    config.experiment = "e4"
    return config
