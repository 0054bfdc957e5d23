"""The `diffseg_isic2016` tfds builder: ISBI 2016 / ISIC skin-lesion segmentation (Gutman et al. 2016).

Reads the official archives as unpacked, in either layout (or both; duplicates are read once):

    Part 1:  ISBI2016_ISIC_Part1_Training_Data/ISIC_<id>.jpg  +  ISBI2016_ISIC_Part1_Training_GroundTruth/
             ISIC_<id>_Segmentation.png   (and the same for _Test_)
    Part 3B: ISBI2016_ISIC_Part3B_Training_Data/ with ISIC_<id>.jpg and ISIC_<id>_Segmentation.png side by side

Images and masks are paired by the 7-digit ISIC id within a split, never by a CSV's row order (MedSegDiff's
first loader read the header-less Part 3B CSV with a header and so dropped the first image of each split). The
split comes from the folder names ('Training'/'Test'). Images are resized to `resize` x `resize` (256, as
MedSegDiff, KidsWithTokens/MedSegDiff `isicloader.py`: PIL bilinear with antialiasing, aspect ratio ignored);
masks, 0/255 PNGs of the image's size, are resized the same way and re-thresholded at half (MedSegDiff leaves the
interpolated border soft and binarises at > 0 in its loss, which grows lesions by about a pixel).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffseg_jax.data import files, manual

OFFICIAL_COUNTS = {"train": 900, "test": 379}
_IMAGE = re.compile(r"^(ISIC_\d{7})\.(jpe?g|png)$", re.IGNORECASE)
_MASK = re.compile(r"^(ISIC_\d{7})_Segmentation\.png$", re.IGNORECASE)

LAYOUT = """\
  <manual_dir>/ISBI2016_ISIC_Part1_Training_Data/ISIC_<id>.jpg
  <manual_dir>/ISBI2016_ISIC_Part1_Training_GroundTruth/ISIC_<id>_Segmentation.png
  <manual_dir>/ISBI2016_ISIC_Part1_Test_Data/ISIC_<id>.jpg
  <manual_dir>/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_<id>_Segmentation.png
or the Part 3B zips (ISBI2016_ISIC_Part3B_{Training,Test}_Data/ with images and masks side by side), from
https://challenge.isic-archive.com/data/#2016 ; folder names must say 'Training' or 'Test'."""


def _split(path: pathlib.Path, root: pathlib.Path) -> str:
    split = files.split_of(path, root)
    if split is None:
        raise files.DatasetFileError(
            f"Cannot tell whether {path} belongs to the training or the test split: no folder between manual_dir "
            f"and the file says 'Training' or 'Test'. Keep the official folder names. Expected layout:\n{LAYOUT}"
        )
    return split


def find_pairs(root: pathlib.Path) -> dict[str, list[manual.Pair]]:
    """{split: pairs sorted by id}; every image needs `<id>_Segmentation.png` in the same split."""
    images: dict[tuple[str, str], pathlib.Path] = {}
    masks: dict[tuple[str, str], pathlib.Path] = {}
    duplicates = 0
    for path in files.find_files(root, (".jpg", ".jpeg", ".png")):
        if m := _MASK.match(path.name):
            masks.setdefault((_split(path, root), m.group(1)), path)
        elif m := _IMAGE.match(path.name):
            key = (_split(path, root), m.group(1))
            duplicates += key in images
            images.setdefault(key, path)
    if duplicates:
        logging.info(
            "isic2016: %d images appear twice (Part 1 and Part 3B unpacked); each is read once.", duplicates
        )
    if not images:
        raise files.DatasetFileError(
            f"No ISIC_<7 digits>.jpg images under manual_dir {root}. Expected layout:\n{LAYOUT}"
        )
    pairs: dict[str, list[manual.Pair]] = {}
    for (split, image_id), path in sorted(images.items()):
        mask = masks.get((split, image_id))
        if mask is None:
            raise files.DatasetFileError(
                f"No mask {image_id}_Segmentation.png for image {path} in the {split} split (looked in every "
                f"{split} folder, e.g. the *_GroundTruth folder of Part 1 or beside the image for Part 3B). Unpack "
                f"the ground-truth zip of the same split, or remove the image. Expected layout:\n{LAYOUT}"
            )
        pairs.setdefault(split, []).append(manual.Pair(image_id, split, path, mask))
    orphans = sorted(set(masks) - set(images))
    if orphans:
        logging.warning(
            "isic2016: %d masks have no image, e.g. %s; they are ignored.", len(orphans), masks[orphans[0]]
        )
    manual.check_counts("isic2016", {s: len(p) for s, p in pairs.items()}, OFFICIAL_COUNTS)
    return pairs


def load_pair(pair: manual.Pair) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), mask bool (H, W)) at the file size; the mask must be 2-valued and the image's size."""
    return files.read_pair(pair.image, pair.mask)


@dataclasses.dataclass
class IsicConfig(manual.ManualConfig):
    """Stored size and the source fingerprint."""


class DiffsegIsic2016(manual.ManualBuilder):
    """ISIC 2016 lesion segmentation (900 train / 379 test dermoscopy images with binary lesion masks).

    Features: `image`, `mask`, `id` (ISIC id), `original_size`. Licence CC0; cite Gutman et al. 2016
    (arXiv:1605.01397).
    """

    name = "diffseg_isic2016"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Part 1 / Part 3B layouts, pairing by id, resized with re-thresholded masks."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download and unpack the ISIC 2016 Part 1 (or Part 3B) zips:\n" + LAYOUT
    LAYOUT = LAYOUT
    BUILDER_CONFIGS = [IsicConfig(name=manual.config_name(256, "default"), resize=256)]

    @classmethod
    def find_examples(cls, root: pathlib.Path, config: Any) -> dict[str, list[manual.Pair]]:
        del config
        return find_pairs(root)

    def load_example(self, record: manual.Pair) -> tuple[str, np.ndarray, np.ndarray, dict[str, Any]]:
        image, mask = load_pair(record)
        return record.id, image, mask, {}


def make_builder(
    manual_dir: str | pathlib.Path, resize: int = 256, data_dir: str | None = None
) -> DiffsegIsic2016:
    """The builder for the copy in `manual_dir` at `resize` px (named by a fingerprint of the files)."""
    root = files.require_dir(manual_dir, "isic2016", LAYOUT)
    pairs = find_pairs(root)
    fp = files.fingerprint([p for split in pairs.values() for x in split for p in (x.image, x.mask)], root)
    config = IsicConfig(
        name=manual.config_name(resize, fp),
        resize=int(resize),
        fingerprint=fp,
        description=f"ISIC 2016 at {resize} px",
    )
    return DiffsegIsic2016(config=config, data_dir=data_dir)
