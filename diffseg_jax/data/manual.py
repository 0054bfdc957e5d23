"""The shared base of the builders that read a user's copy of a dataset from `manual_dir` (no download, no TF).

A subclass says how to find its examples (`find_examples(root, config) -> {split: [record, ...]}`, where pairing
and every check that needs no decoding happen) and how to turn one record into features (`load_example`). The base
class owns the features, the splits and the config naming:

* every example has `image` (resize x resize x 3 uint8 PNG), `mask` (resize x resize x 1, 0/255 PNG), `id` and
  `original_size` (H, W of the file on disk), plus the subclass's `extra_features()`;
* the config name holds the resize and a fingerprint of the file set and options, so a changed folder or setting
  builds a new dataset next to the old one instead of silently reusing it;
* splits are the ones found on disk (at least one): a user may evaluate on a test folder alone;
* tfds writes into a temporary folder and renames it only when every example was written, so a bad file found
  half-way leaves no dataset registered as complete; the error names the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from diffseg_jax import locks
from diffseg_jax.data import files


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example of an image/mask dataset: its id, split, image path and mask path."""

    id: str
    split: str
    image: pathlib.Path
    mask: pathlib.Path


@dataclasses.dataclass
class ManualConfig(tfds.core.BuilderConfig):
    """Stored resolution and a fingerprint of the source files and options (see :func:`config_name`)."""

    resize: int = 256
    fingerprint: str = ""


def config_name(resize: int, fingerprint: str) -> str:
    """e.g. `r256_1a2b3c4d`: stored at 256 x 256, from the file set and options hashed to 1a2b3c4d."""
    return f"r{int(resize)}_{fingerprint}"


class ManualBuilder(tfds.core.GeneratorBasedBuilder):
    """Base class; subclasses set `name`, `code_path`, `VERSION`, `MANUAL_DOWNLOAD_INSTRUCTIONS`, `LAYOUT`."""

    LAYOUT = ""  # the folder layout, shown in every error about the folder
    BUILDER_CONFIGS: list = []

    @classmethod
    def find_examples(cls, root: pathlib.Path, config: Any) -> dict[str, list[Any]]:
        """{split: records} from the files under `root`; raises DatasetFileError for pairing problems."""
        raise NotImplementedError

    def load_example(self, record: Any) -> tuple[str, np.ndarray, np.ndarray, dict[str, Any]]:
        """(id, image uint8 (H, W, 3) at the file's size, mask bool (H, W), extra features already resized)."""
        raise NotImplementedError

    @classmethod
    def extra_features(cls, resize: int) -> dict[str, tfds.features.FeatureConnector]:
        """Features beyond image, mask, id and original_size."""
        del resize
        return {}

    @classmethod
    def mask_resize_method(cls) -> str:
        """How masks are brought to the stored size: 'bilinear' (then > 127) or 'nearest'."""
        return "bilinear"

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.resize
        return self.dataset_info_from_configs(
            description=self.__class__.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), dtype=np.uint8, encoding_format="png"),
                    "mask": tfds.features.Image(shape=(s, s, 1), dtype=np.uint8, encoding_format="png"),
                    "id": tfds.features.Text(),
                    "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    **self.extra_features(s),
                }
            ),
            supervised_keys=("image", "mask"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        root = files.require_dir(dl_manager._manual_dir, self.name, self.LAYOUT)  # noqa: SLF001 (tfds' own check asserts)
        examples = self.find_examples(root, self.builder_config)
        return {
            split: self._generate_examples(records, split == "train", root)
            for split, records in examples.items()
        }

    def _generate_examples(
        self, records: list[Any], training: bool = False, root: pathlib.Path | None = None
    ) -> Iterator[tuple[str, dict]]:
        """The examples of one split; a training split whose masks are all empty is refused at its end (a test
        set of images without findings is fine)."""
        size = self.builder_config.resize
        any_foreground = False
        for record in records:
            example_id, image, mask, extra = self.load_example(record)
            any_foreground = any_foreground or bool(np.any(mask))
            yield (
                example_id,
                {
                    "image": files.png_bytes(files.resize_image(image, size)),
                    "mask": files.mask_png(files.resize_mask(mask, size, self.mask_resize_method())),
                    "id": example_id,
                    "original_size": np.asarray(image.shape[:2], np.int32),
                    **extra,
                },
            )
        if training and records and not any_foreground:
            raise files.DatasetFileError(
                f"All {len(records)} training masks of {self.name} in {root} are empty (no foreground pixel): a "
                "model trained on them predicts background everywhere. If the masks hold their foreground as a "
                "small value (e.g. 0/1 masks) and config.data.mask_threshold is set, lower it below that value or "
                "leave it unset; otherwise check that the masks/ folder holds the segmentations."
            )


def check_counts(dataset: str, found: dict[str, int], expected: dict[str, int]) -> None:
    """Logs a warning for split sizes that differ from the official release (subsets are allowed)."""
    for split, want in expected.items():
        have = found.get(split, 0)
        if have != want:
            logging.warning(
                "%s: found %d %s examples, the official release has %d; check manual_dir if this is unintended.",
                dataset,
                have,
                split,
                want,
            )


def build(builder: tfds.core.DatasetBuilder, **options) -> tfds.core.DatasetBuilder:
    """``builder.download_and_prepare(**options)`` under a lock per dataset and config in its data folder
    (``<data_dir>/<name>/<config>.lock``): a second process building the same config on this data folder (two
    runs started together) logs whom it waits for, waits, and then reads the finished build; before, one of
    them died when tfds renamed its temporary folder. Returns the builder to read from: one made again after
    a wait (a builder made before the files existed cannot read them)."""
    folder = os.path.dirname(os.path.dirname(builder.data_dir))  # <data_dir>/<name>/<config>/<version>
    with locks.build_lock(folder, builder.builder_config.name) as waited:
        if waited:
            config = builder.builder_config
            predefined = type(builder).builder_configs.get(config.name) == config  # tfds wants those by name
            builder = type(builder)(
                config=config.name if predefined else config, data_dir=builder.data_dir_root
            )
        builder.download_and_prepare(**options)
    return builder


def prepare(builder: ManualBuilder, manual_dir: str | pathlib.Path) -> dict[str, Any]:
    """Builds `builder` from `manual_dir` unless built already (see :func:`build`); its {split: random-access
    source}."""
    builder = build(
        builder,
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
    )
    return builder.as_data_source()
