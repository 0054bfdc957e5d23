"""The `diffseg_isic2016` tfds builder (downloads the official Part 1 zips, or reads an unpacked copy)."""

from diffseg_jax.data.isic2016.isic2016 import (
    ARCHIVES,
    DEFAULT_BASE_URL,
    OFFICIAL_COUNTS,
    DiffsegIsic2016,
    IsicConfig,
    archive_urls,
    find_pairs,
    instructions,
    load_pair,
    make_builder,
    make_download_builder,
    prepare,
)

__all__ = [
    "ARCHIVES",
    "DEFAULT_BASE_URL",
    "OFFICIAL_COUNTS",
    "DiffsegIsic2016",
    "IsicConfig",
    "archive_urls",
    "find_pairs",
    "instructions",
    "load_pair",
    "make_builder",
    "make_download_builder",
    "prepare",
]
