"""The `diffseg_segmentation_folder` tfds builder (any images/ + masks/ folder pair)."""

from diffseg_jax.data.segmentation_folder.segmentation_folder import (
    DiffsegSegmentationFolder,
    FolderConfig,
    find_pairs,
    load_pair,
    make_builder,
)

__all__ = ["DiffsegSegmentationFolder", "FolderConfig", "find_pairs", "load_pair", "make_builder"]
