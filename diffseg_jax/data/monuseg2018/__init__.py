"""The `diffseg_monuseg2018` tfds builder (official MoNuSeg 2018 layout) and its XML rasteriser."""

from diffseg_jax.data.monuseg2018.annotations import parse_regions, polygon_mask, rasterise
from diffseg_jax.data.monuseg2018.monuseg2018 import (
    CLASSIC_TRAIN_IDS,
    TEST_IDS,
    DiffsegMonuseg2018,
    MonusegConfig,
    find_tiles,
    load_tile,
    make_builder,
)

__all__ = [
    "CLASSIC_TRAIN_IDS",
    "TEST_IDS",
    "DiffsegMonuseg2018",
    "MonusegConfig",
    "find_tiles",
    "load_tile",
    "make_builder",
    "parse_regions",
    "polygon_mask",
    "rasterise",
]
