"""Datasets (tfds builders) and the input pipeline: `load_split`, `train_dataset`, `eval_arrays`, tiling."""

from diffseg_jax.data.files import DatasetFileError
from diffseg_jax.data.pipeline import (
    DATASETS,
    DOWNLOADED_DATASETS,
    EVAL_TILINGS,
    MANUAL_DATASETS,
    SPLITS,
    Source,
    Subset,
    batch_stream,
    eval_arrays,
    from_tiles,
    holdout,
    load_split,
    model_sized_arrays,
    preprocess,
    stored_size,
    to_tiles,
    train_dataset,
)

__all__ = [
    "DATASETS",
    "DOWNLOADED_DATASETS",
    "EVAL_TILINGS",
    "MANUAL_DATASETS",
    "SPLITS",
    "DatasetFileError",
    "Source",
    "Subset",
    "eval_arrays",
    "from_tiles",
    "holdout",
    "load_split",
    "model_sized_arrays",
    "preprocess",
    "stored_size",
    "to_tiles",
    "batch_stream",
    "train_dataset",
]
