"""The `diffseg_segmentation_folder` tfds builder: any folder of images and binary masks (e.g. the paper's HER2 set).

Layouts (folder names case-insensitive):

    <manual_dir>/images/<stem>.<png|jpg|tif|...>  and  <manual_dir>/masks/<stem>.<...>       one 'train' split
    <manual_dir>/train/images, train/masks, test/images, test/masks                          official splits

A mask pairs with the image of the same stem (`a.jpg` with `a.png`), or with the stem plus `_mask`,
`_segmentation` or `_seg` (any case). With a flat layout, the pipeline holds out `config.data.test_fraction` of
the images (deterministically) as the test split. Masks may be 0/255, 0/1 or any two levels (the higher is
foreground); masks with more levels need `mask_threshold` (foreground = value > threshold). Images of more than
8 bits are brought to 8 by `image_scaling` (see `diffseg_jax.data.files.read_image`). Images and masks are
resized to `resize` x `resize` (image bilinear, mask bilinear and re-thresholded at half).
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

MASK_SUFFIXES = ("", "_mask", "_segmentation", "_seg")
LAYOUT = """\
  <manual_dir>/images/<name>.png|jpg|tif  and  <manual_dir>/masks/<name>.png|tif   (one split; a test part is
      held out by config.data.test_fraction)
or
  <manual_dir>/train/images, <manual_dir>/train/masks, <manual_dir>/test/images, <manual_dir>/test/masks
A mask has its image's name (or the name plus _mask / _segmentation / _seg) and its image's size, and holds two
values (0/255, 0/1) or more with config.data.mask_threshold set."""


INSTRUCTIONS = f"""\
A folder of your own images and binary masks (e.g. the paper's HER2 set, which is not public). One step: put the
images and their masks in this layout and pass the folder as --config.data.manual_dir=/path/to/folder:
{LAYOUT}"""


@dataclasses.dataclass
class FolderConfig(manual.ManualConfig):
    """Stored size, mask threshold (None: two-valued masks), image scaling and the source fingerprint."""

    mask_threshold: float | None = None
    image_scaling: str = "auto"


def _child(folder: pathlib.Path, name: str) -> pathlib.Path | None:
    """The sub-folder of `folder` called `name`, in any case."""
    matches = [p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name]
    return matches[0] if matches else None


def _split_folders(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """{split: (images folder, masks folder)} of the layout found under `root`."""
    flat = (_child(root, "images"), _child(root, "masks"))
    splits = {}
    for split in ("train", "test"):
        sub = _child(root, split)
        if sub is not None:
            pair = (_child(sub, "images"), _child(sub, "masks"))
            if None in pair:
                raise files.DatasetFileError(
                    f"{sub} needs both an 'images' and a 'masks' folder. Expected layout:\n{LAYOUT}"
                )
            splits[split] = pair
    if splits and None not in flat:
        raise files.DatasetFileError(
            f"{root} has both images/ + masks/ and train/ or test/ folders; keep one layout. Expected:\n{LAYOUT}"
        )
    if not splits:
        if None in flat:
            raise files.DatasetFileError(
                f"No images/ and masks/ folders in {root}. Expected layout:\n{LAYOUT}"
            )
        splits["train"] = flat
    return splits


def find_pairs(root: pathlib.Path) -> dict[str, list[manual.Pair]]:
    """{split: pairs sorted by id}; every image needs exactly one mask."""
    pairs: dict[str, list[manual.Pair]] = {}
    for split, (image_dir, mask_dir) in _split_folders(root).items():
        masks: dict[str, list[pathlib.Path]] = {}
        for path in files.find_files(mask_dir):
            masks.setdefault(path.relative_to(mask_dir).with_suffix("").as_posix().lower(), []).append(path)
        used = set()
        images = files.find_files(image_dir)
        if not images:
            raise files.DatasetFileError(f"No image files (png, jpg, tif, bmp) in {image_dir}.")
        seen: dict[str, pathlib.Path] = {}
        for path in images:
            stem = path.relative_to(image_dir).with_suffix("").as_posix()
            if stem.lower() in seen:
                raise files.DatasetFileError(
                    f"Images {seen[stem.lower()]} and {path} share the name {stem!r}; masks pair by name, so "
                    "rename one of them."
                )
            seen[stem.lower()] = path
            found = [m for suffix in MASK_SUFFIXES for m in masks.get(stem.lower() + suffix, [])]
            if not found:
                raise files.DatasetFileError(
                    f"No mask for image {path}: expected {mask_dir}/{stem}.png (or .tif/.jpg, or the name plus "
                    f"_mask/_segmentation/_seg). Add the mask or remove the image. Expected layout:\n{LAYOUT}"
                )
            if len(found) > 1:
                raise files.DatasetFileError(
                    f"Image {path} matches several masks: {[str(m) for m in found]}; keep exactly one."
                )
            used.add(found[0])
            pairs.setdefault(split, []).append(manual.Pair(stem, split, path, found[0]))
        unused = sorted({m for ms in masks.values() for m in ms} - used)
        if unused:
            logging.warning(
                "segmentation_folder: %d masks in %s have no image (e.g. %s); ignored.",
                len(unused),
                mask_dir,
                unused[0],
            )
    return pairs


def load_pair(
    pair: manual.Pair, mask_threshold: float | None = None, image_scaling: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), mask bool (H, W)) at the file size (`image_scaling`: see `files.read_image`)."""
    return files.read_pair(pair.image, pair.mask, mask_threshold, image_scaling)


class DiffsegSegmentationFolder(manual.ManualBuilder):
    """Binary segmentation from a folder of images and masks (private data such as the paper's HER2 set).

    Features: `image`, `mask`, `id` (the image's path below images/ without suffix), `original_size`.
    """

    name = "diffseg_segmentation_folder"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Flat or train/test layouts, stem pairing, two-valued or thresholded masks."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    LAYOUT = LAYOUT
    BUILDER_CONFIGS = [FolderConfig(name=manual.config_name(256, "default"), resize=256)]

    @classmethod
    def find_examples(cls, root: pathlib.Path, config: Any) -> dict[str, list[manual.Pair]]:
        del config
        return find_pairs(root)

    def load_example(self, record: manual.Pair) -> tuple[str, np.ndarray, np.ndarray, dict[str, Any]]:
        c = self.builder_config
        image, mask = load_pair(record, c.mask_threshold, c.image_scaling)
        return record.id, image, mask, {}


def make_builder(
    manual_dir: str | pathlib.Path,
    resize: int = 256,
    mask_threshold: float | None = None,
    data_dir: str | None = None,
    image_scaling: str = "auto",
) -> DiffsegSegmentationFolder:
    """The builder for the folder `manual_dir` at these settings (named by a fingerprint of the files and
    settings)."""
    root = files.require_dir(manual_dir, "segmentation_folder", INSTRUCTIONS)
    pairs = find_pairs(root)
    paths = [p for split in pairs.values() for x in split for p in (x.image, x.mask)]
    fp = files.fingerprint(paths, root, mask_threshold, image_scaling)
    config = FolderConfig(
        name=manual.config_name(resize, fp),
        resize=int(resize),
        fingerprint=fp,
        mask_threshold=None if mask_threshold is None else float(mask_threshold),
        image_scaling=str(image_scaling),
        description=f"{root.name} at {resize} px",
    )
    return DiffsegSegmentationFolder(config=config, data_dir=data_dir)
