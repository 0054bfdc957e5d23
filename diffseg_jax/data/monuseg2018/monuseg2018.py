"""The `diffseg_monuseg2018` tfds builder: MoNuSeg 2018 nuclei from the official release (Kumar et al.).

Reads the official archives as unpacked (recursively, so an extra nesting level does not matter):

    MoNuSeg 2018 Training Data/Tissue Images/TCGA-*.tif    MoNuSeg 2018 Training Data/Annotations/TCGA-*.xml
    MoNuSegTestData/TCGA-*.tif + TCGA-*.xml side by side

The split comes from the folder names ('train'/'test' in any folder below manual_dir) or, failing that, from the
official tile ids. Each tile's Aperio XML polygons (X = column, Y = row) are rasterised at 1000 x 1000 into an
instance map (see `annotations`), whose union is the binary mask; the image is resized (PIL bilinear) and the
instance map (nearest) to `resize` (512 as SegDiff, tomeramit/SegDiff `datasets/monu.py`). The training split
holds the classic 30 tiles by default (the distributed zip now carries 7 more; `train_ids='all'` keeps them).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffseg_jax.data import files, manual
from diffseg_jax.data.monuseg2018 import annotations

# The 30 training tiles of MoNuSeg 2018 (Kumar et al. 2017), as in the paper's 30 train / 14 test split.
CLASSIC_TRAIN_IDS = (
    "TCGA-A7-A13E-01Z-00-DX1 TCGA-A7-A13F-01Z-00-DX1 TCGA-AR-A1AK-01Z-00-DX1 TCGA-AR-A1AS-01Z-00-DX1 "
    "TCGA-E2-A1B5-01Z-00-DX1 TCGA-E2-A14V-01Z-00-DX1 TCGA-B0-5711-01Z-00-DX1 TCGA-HE-7128-01Z-00-DX1 "
    "TCGA-HE-7129-01Z-00-DX1 TCGA-HE-7130-01Z-00-DX1 TCGA-B0-5710-01Z-00-DX1 TCGA-B0-5698-01Z-00-DX1 "
    "TCGA-18-5592-01Z-00-DX1 TCGA-38-6178-01Z-00-DX1 TCGA-49-4488-01Z-00-DX1 TCGA-50-5931-01Z-00-DX1 "
    "TCGA-21-5784-01Z-00-DX1 TCGA-21-5786-01Z-00-DX1 TCGA-G9-6336-01Z-00-DX1 TCGA-G9-6348-01Z-00-DX1 "
    "TCGA-G9-6356-01Z-00-DX1 TCGA-G9-6363-01Z-00-DX1 TCGA-CH-5767-01Z-00-DX1 TCGA-G9-6362-01Z-00-DX1 "
    "TCGA-DK-A2I6-01A-01-TS1 TCGA-G2-A2EK-01A-02-TSB TCGA-AY-A8YK-01A-01-TS1 TCGA-NH-A8F7-01A-01-TS1 "
    "TCGA-KB-A93J-01A-01-TS1 TCGA-RD-A8N9-01A-01-TS1"
).split()
# The 14 tiles of the official test set (MoNuSegTestData).
TEST_IDS = (
    "TCGA-2Z-A9J9-01A-01-TS1 TCGA-44-2665-01B-06-BS6 TCGA-69-7764-01A-01-TS1 TCGA-A6-6782-01A-01-BS1 "
    "TCGA-AC-A2FO-01A-01-TS1 TCGA-AO-A0J2-01A-01-BSA TCGA-CU-A0YN-01A-02-BSB TCGA-EJ-A46H-01A-03-TSC "
    "TCGA-FG-A4MU-01B-01-TS1 TCGA-GL-6846-01A-01-BS1 TCGA-HC-7209-01A-01-TS1 TCGA-HT-8564-01Z-00-DX1 "
    "TCGA-IZ-8196-01A-01-BS1 TCGA-ZF-A9R5-01A-01-TS1"
).split()
OFFICIAL_COUNTS = {"train": 30, "test": 14}
TRAIN_ID_CHOICES = ("classic30", "all")
BOUNDARY_CHOICES = ("include", "half_open")

LAYOUT = """\
  <manual_dir>/MoNuSeg 2018 Training Data/Tissue Images/TCGA-*.tif
  <manual_dir>/MoNuSeg 2018 Training Data/Annotations/TCGA-*.xml
  <manual_dir>/MoNuSegTestData/TCGA-*.tif and TCGA-*.xml (side by side)
(from https://monuseg.grand-challenge.org/Data/ ; each .tif needs its .xml with the same name; a folder whose
name contains 'train' or 'test' sets the split, else the official tile ids do)"""


INSTRUCTIONS = f"""\
MoNuSeg 2018 is not downloaded automatically: its official zips are behind Google Drive links. One manual step:
  1. On https://monuseg.grand-challenge.org/Data/ download the training data ('MoNuSeg 2018 Training Data.zip')
     and the test data ('MoNuSegTestData.zip').
  2. Unzip both into one folder:
       mkdir -p ~/data/MoNuSeg && cd ~/data/MoNuSeg
       unzip '/path/to/MoNuSeg 2018 Training Data.zip' && unzip /path/to/MoNuSegTestData.zip
  3. Pass that folder: --config.data.manual_dir=~/data/MoNuSeg
The folder then holds:
{LAYOUT}"""


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile: its id, split, image path and annotation path."""

    id: str
    split: str
    image: pathlib.Path
    xml: pathlib.Path


@dataclasses.dataclass
class MonusegConfig(manual.ManualConfig):
    """Stored size, which training tiles to keep, the outline rule, and the source fingerprint."""

    train_ids: str = "classic30"
    boundary: str = "include"


def _split(path: pathlib.Path, root: pathlib.Path) -> str:
    split = files.split_of(path, root)
    if split is not None:
        return split
    stem = path.stem
    if stem in TEST_IDS:
        return "test"
    if stem in CLASSIC_TRAIN_IDS:
        return "train"
    raise files.DatasetFileError(
        f"Cannot tell whether {path} is a training or a test tile: no folder between manual_dir and the file "
        f"says 'train' or 'test', and {stem!r} is not an official tile id. Put it under a folder named like the "
        f"official ones. Expected layout:\n{LAYOUT}"
    )


def find_tiles(root: pathlib.Path, train_ids: str = "classic30") -> dict[str, list[Tile]]:
    """{split: tiles sorted by id}, each .tif paired with the .xml of the same name in the same split."""
    if train_ids not in TRAIN_ID_CHOICES:
        raise ValueError(f"Unknown train_ids {train_ids!r}; use one of {TRAIN_ID_CHOICES}.")
    xmls: dict[tuple[str, str], pathlib.Path] = {}
    for path in files.find_files(root, (".xml",)):
        xmls.setdefault((_split(path, root), path.stem), path)
    tiles: dict[str, dict[str, Tile]] = {}
    for path in files.find_files(root, (".tif", ".tiff")):
        split = _split(path, root)
        xml = xmls.get((split, path.stem))
        if xml is None:
            raise files.DatasetFileError(
                f"No annotation {path.stem}.xml for image {path} in the {split} split (looked for it beside the "
                f"image and in an 'Annotations' folder of the same split). Copy it from the release, or remove "
                f"the image. Expected layout:\n{LAYOUT}"
            )
        tiles.setdefault(split, {}).setdefault(path.stem, Tile(path.stem, split, path, xml))
    if not tiles:
        raise files.DatasetFileError(f"No .tif tiles under manual_dir {root}. Expected layout:\n{LAYOUT}")
    if train_ids == "classic30" and "train" in tiles:
        extra = sorted(set(tiles["train"]) - set(CLASSIC_TRAIN_IDS))
        if extra:
            logging.info("monuseg2018: keeping the classic 30 training tiles, leaving out %s.", extra)
        tiles["train"] = {k: v for k, v in tiles["train"].items() if k in CLASSIC_TRAIN_IDS}
    manual.check_counts("monuseg2018", {s: len(t) for s, t in tiles.items()}, OFFICIAL_COUNTS)
    return {split: [t[k] for k in sorted(t)] for split, t in sorted(tiles.items()) if t}


def load_tile(tile: Tile, boundary: str = "include") -> tuple[np.ndarray, np.ndarray, int]:
    """(image uint8 (H, W, 3), instance labels int32 (H, W), number of XML regions) of a tile at full size."""
    image = files.read_image(tile.image)
    polygons = annotations.parse_regions(tile.xml)
    labels = annotations.rasterise(polygons, image.shape[:2], boundary)
    return image, labels, len(polygons)


class DiffsegMonuseg2018(manual.ManualBuilder):
    """MoNuSeg 2018 nuclei segmentation (30 train / 14 test H&E tiles, 1000 x 1000, 40x).

    Features: `image`, binary `mask` (union of the nuclei), `instances` (int32 nucleus labels at the stored size),
    `num_nuclei` (nuclei rasterised at full size), `num_regions` (Region elements in the XML), `id`,
    `original_size`. Licence CC BY-NC-SA 4.0; cite Kumar et al., IEEE TMI 2017 and 2020.
    """

    name = "diffseg_monuseg2018"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official XML rasterised (skimage polygon rule), resized, instance maps kept."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    LAYOUT = LAYOUT
    BUILDER_CONFIGS = [MonusegConfig(name=manual.config_name(512, "default"), resize=512)]

    @classmethod
    def extra_features(cls, resize: int) -> dict:
        return {
            "instances": tfds.features.Tensor(
                shape=(resize, resize), dtype=np.int32, encoding=tfds.features.Encoding.ZLIB
            ),
            "num_nuclei": tfds.features.Scalar(dtype=np.int32),
            "num_regions": tfds.features.Scalar(dtype=np.int32),
        }

    @classmethod
    def mask_resize_method(cls) -> str:
        return (
            "nearest"  # the mask is the union of the nearest-resized instance map, as SegDiff resizes masks
        )

    @classmethod
    def find_examples(cls, root: pathlib.Path, config: Any) -> dict[str, list[Tile]]:
        return find_tiles(root, config.train_ids)

    def load_example(self, record: Tile) -> tuple[str, np.ndarray, np.ndarray, dict[str, Any]]:
        image, labels, num_regions = load_tile(record, self.builder_config.boundary)
        stored = files.resize_labels(labels, self.builder_config.resize)
        extra = {"instances": stored, "num_nuclei": int(labels.max()), "num_regions": num_regions}
        return record.id, image, labels > 0, extra


def make_builder(
    manual_dir: str | pathlib.Path,
    resize: int = 512,
    train_ids: str = "classic30",
    boundary: str = "include",
    data_dir: str | None = None,
) -> DiffsegMonuseg2018:
    """The builder for the copy in `manual_dir` at these settings (named by a fingerprint of the files)."""
    if boundary not in BOUNDARY_CHOICES:
        raise ValueError(f"Unknown boundary rule {boundary!r}; use one of {BOUNDARY_CHOICES}.")
    root = files.require_dir(manual_dir, "monuseg2018", INSTRUCTIONS)
    tiles = find_tiles(root, train_ids)
    paths = [p for split in tiles.values() for t in split for p in (t.image, t.xml)]
    fp = files.fingerprint(paths, root, train_ids, boundary)
    config = MonusegConfig(
        name=manual.config_name(resize, fp),
        resize=int(resize),
        fingerprint=fp,
        train_ids=train_ids,
        boundary=boundary,
        description=f"MoNuSeg 2018 at {resize} px, training tiles {train_ids}, outline {boundary}",
    )
    return DiffsegMonuseg2018(config=config, data_dir=data_dir)
