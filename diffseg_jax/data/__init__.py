"""Datasets (tfds builders) and the input pipeline: `load_split`, `train_dataset`, `eval_arrays`."""

from diffseg_jax.data.pipeline import (
    DATASETS,
    Source,
    eval_arrays,
    load_split,
    preprocess,
    train_dataset,
)

__all__ = ["DATASETS", "Source", "eval_arrays", "load_split", "preprocess", "train_dataset"]
