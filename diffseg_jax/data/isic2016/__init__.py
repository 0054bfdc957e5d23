"""The `diffseg_isic2016` tfds builder (official ISIC 2016 Part 1 / Part 3B layouts)."""

from diffseg_jax.data.isic2016.isic2016 import (
    OFFICIAL_COUNTS,
    DiffsegIsic2016,
    IsicConfig,
    find_pairs,
    load_pair,
    make_builder,
)

__all__ = [
    "OFFICIAL_COUNTS",
    "DiffsegIsic2016",
    "IsicConfig",
    "find_pairs",
    "load_pair",
    "make_builder",
]
