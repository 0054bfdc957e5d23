"""The `diffseg_isic2016` tfds builder: ISBI 2016 / ISIC skin-lesion segmentation (Gutman et al. 2016).

By default the builder downloads the four official Part 1 zips (`ARCHIVES`, appended to `download_base_url`, the
ISIC archive's bucket) through tfds' download manager, which shows progress, caches the zips under
`<data_dir>/downloads`, extracts them and, on a rerun after an interrupted download, starts the broken file again.
Their sha256 checksums are not known ahead (this code was written without access to the bucket), so the first
download records them in `<data_dir>/diffseg_isic2016/checksums.tsv` (tfds' checksums format) and every later
download is verified against that record: a changed or corrupted archive stops the build with a message. A
`checksums.tsv` beside this file, if one is added, is verified too (tfds' own place for a builder's checksums).

Offline, `manual_dir` reads the official archives as unpacked, in either layout (or both; duplicates are read once):

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
import hashlib
import logging
import os
import pathlib
import re
import shutil
import zipfile
from typing import Any, Iterable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffseg_jax.data import files, manual

OFFICIAL_COUNTS = {"train": 900, "test": 379}
# The ISIC archive's bucket for the 2016 challenge (https://challenge.isic-archive.com/data/#2016 links there).
DEFAULT_BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2016"
# (split, part) -> the official Part 1 archive, appended to the base URL.
ARCHIVES = {
    ("train", "images"): "ISBI2016_ISIC_Part1_Training_Data.zip",
    ("train", "masks"): "ISBI2016_ISIC_Part1_Training_GroundTruth.zip",
    ("test", "images"): "ISBI2016_ISIC_Part1_Test_Data.zip",
    ("test", "masks"): "ISBI2016_ISIC_Part1_Test_GroundTruth.zip",
}
HOMEPAGE = "https://challenge.isic-archive.com/data/#2016"
LICENSE = "CC0 1.0 (public domain dedication; the ISIC Archive's licence for the ISIC 2016 challenge data)"
CITATION = """\
@article{gutman2016skin,
  title   = {Skin Lesion Analysis toward Melanoma Detection: A Challenge at the International Symposium on
             Biomedical Imaging (ISBI) 2016, hosted by the International Skin Imaging Collaboration (ISIC)},
  author  = {Gutman, David and Codella, Noel C. F. and Celebi, Emre and Helba, Brian and Marchetti, Michael and
             Mishra, Nabin and Halpern, Allan},
  journal = {arXiv preprint arXiv:1605.01397},
  year    = {2016}
}"""
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


def _collect(
    sources: Iterable[tuple[pathlib.Path, str | None]],
) -> tuple[dict[tuple[str, str], pathlib.Path], dict[tuple[str, str], pathlib.Path], int]:
    """(images, masks, duplicates) keyed by (split, id) from (root, split) sources; a None split is read from the
    folder names below the root."""
    images: dict[tuple[str, str], pathlib.Path] = {}
    masks: dict[tuple[str, str], pathlib.Path] = {}
    duplicates = 0
    for root, split in sources:
        for path in files.find_files(root, (".jpg", ".jpeg", ".png")):
            if m := _MASK.match(path.name):
                masks.setdefault((split or _split(path, root), m.group(1)), path)
            elif m := _IMAGE.match(path.name):
                key = (split or _split(path, root), m.group(1))
                duplicates += key in images
                images.setdefault(key, path)
    return images, masks, duplicates


def find_pairs(
    root: pathlib.Path | str, archives: dict[tuple[str, str], pathlib.Path] | None = None
) -> dict[str, list[manual.Pair]]:
    """{split: pairs sorted by id}; every image needs `<id>_Segmentation.png` in the same split.

    `root` is a manual_dir (splits from its folder names); with `archives` ({(split, part): extracted folder} of
    the downloaded zips, as `ARCHIVES`) each folder's split is known and `root` only names the data in messages.
    """
    sources = [(root, None)] if archives is None else [(path, split) for (split, _), path in archives.items()]
    images, masks, duplicates = _collect(sources)
    if duplicates:
        logging.info(
            "isic2016: %d images appear twice (Part 1 and Part 3B unpacked); each is read once.", duplicates
        )
    if not images:
        raise files.DatasetFileError(
            f"No ISIC_<7 digits>.jpg images under {root}. Expected layout:\n{LAYOUT}"
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
    if archives is None:
        manual.check_counts("isic2016", {s: len(p) for s, p in pairs.items()}, OFFICIAL_COUNTS)
    else:
        for split, want in OFFICIAL_COUNTS.items():
            if len(pairs.get(split, [])) != want:
                logging.warning(
                    "isic2016: the downloaded %s archives hold %d pairs, the official release %d; check "
                    "data.download_base_url (%s) if this is unintended.",
                    split,
                    len(pairs.get(split, [])),
                    want,
                    root,
                )
    return pairs


def load_pair(pair: manual.Pair) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), mask bool (H, W)) at the file size; the mask must be 2-valued and the image's size."""
    return files.read_pair(pair.image, pair.mask)


def archive_urls(base_url: str) -> dict[tuple[str, str], str]:
    """{(split, part): URL} of the four official Part 1 zips under `base_url`."""
    return {key: f"{base_url.rstrip('/')}/{name}" for key, name in ARCHIVES.items()}


def instructions(base_url: str = DEFAULT_BASE_URL) -> str:
    """How to get the data: the URLs the builder downloads, and the manual_dir alternative for offline use."""
    urls = "\n".join(f"  {url}" for url in archive_urls(base_url).values())
    return (
        f"The builder downloads these four zips itself (no account needed):\n{urls}\n"
        "Without network access: download them elsewhere, unzip all four into one folder and pass it as "
        "--config.data.manual_dir=/path/to/folder (or point --config.data.download_base_url at a mirror "
        f"serving the same file names). The folder's layout:\n{LAYOUT}"
    )


@dataclasses.dataclass
class IsicConfig(manual.ManualConfig):
    """Stored size, and either the source fingerprint (manual_dir) or the URL the zips are downloaded from."""

    download_base_url: str = ""


class DiffsegIsic2016(manual.ManualBuilder):
    """ISIC 2016 lesion segmentation (900 train / 379 test dermoscopy images with binary lesion masks).

    Features: `image`, `mask`, `id` (ISIC id), `original_size`. Licence CC0; cite Gutman et al. 2016
    (arXiv:1605.01397). Downloaded from the ISIC archive by default (checksums recorded on the first download
    and verified after), or read from an unpacked copy in manual_dir.
    """

    name = "diffseg_isic2016"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Part 1 / Part 3B layouts, pairing by id, resized with re-thresholded masks."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = instructions()
    LAYOUT = LAYOUT
    BUILDER_CONFIGS = [IsicConfig(name=manual.config_name(256, "default"), resize=256)]

    def dataset_info_from_configs(self, **kwargs):
        """The features of every manual builder, plus ISIC's homepage, licence and citation."""
        return super().dataset_info_from_configs(
            homepage=HOMEPAGE, license=LICENSE, citation=CITATION, **kwargs
        )

    @classmethod
    def find_examples(cls, root: pathlib.Path, config: Any) -> dict[str, list[manual.Pair]]:
        del config
        return find_pairs(root)

    def load_example(self, record: manual.Pair) -> tuple[str, np.ndarray, np.ndarray, dict[str, Any]]:
        image, mask = load_pair(record)
        return record.id, image, mask, {}

    @property
    def checksums_record(self) -> pathlib.Path:
        """Where the first download records the archives' sizes and sha256 (tfds' checksums.tsv format)."""
        return pathlib.Path(str(self.data_dir_root)) / self.name / "checksums.tsv"

    def _make_download_manager(self, download_dir, download_config: tfds.download.DownloadConfig):
        """tfds' download manager, verifying against the recorded checksums once all four are recorded and
        recording them (tfds' register mode, written after each file) until then."""
        base_url = self.builder_config.download_base_url
        if not base_url:
            return super()._make_download_manager(download_dir, download_config)
        record = self.checksums_record
        known = tfds.download.checksums.load_url_infos(record) if record.exists() else {}
        known.update(self.url_infos or {})  # a checksums.tsv shipped beside this file wins
        register = any(url not in known for url in archive_urls(base_url).values())
        if register:
            record.parent.mkdir(parents=True, exist_ok=True)
            logging.info("isic2016: recording the archives' checksums in %s on this first download.", record)
        download_dir = epath.Path(download_dir or self.data_dir_root / "downloads")
        return tfds.download.DownloadManager(
            download_dir=download_dir,
            extract_dir=download_config.extract_dir or download_dir / "extracted",
            manual_dir=download_config.manual_dir or download_dir / "manual",
            manual_dir_instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS,
            url_infos=known,
            dataset_name=self.name,
            force_download=download_config.download_mode.force_download,
            force_extraction=download_config.download_mode.force_download,
            register_checksums=register,
            register_checksums_path=record if register else None,
            verify_ssl=download_config.verify_ssl,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        base_url = self.builder_config.download_base_url
        if not base_url:
            return super()._split_generators(dl_manager)
        archives = download_archives(dl_manager, base_url, self.checksums_record)
        pairs = find_pairs(base_url, archives)
        return {
            split: self._generate_examples(records, split == "train", base_url)
            for split, records in pairs.items()
        }


def download_archives(
    dl_manager: tfds.download.DownloadManager, base_url: str, record: pathlib.Path
) -> dict[tuple[str, str], pathlib.Path]:
    """{(split, part): extracted folder} of the four zips: downloaded through `dl_manager` (progress, cache,
    checksums), extracted by :func:`extract_zip` (tfds' extractor needs TensorFlow); a failed or mismatching
    download is a DatasetFileError that says what to do."""
    import requests  # noqa: PLC0415 — tfds downloads with it; its errors are the network's

    urls = archive_urls(base_url)
    logging.info(
        "isic2016: fetching the four Part 1 zips from %s (cached ones are reused; without network this fails "
        "after tfds' retries, 3 to 4 minutes: --config.data.manual_dir reads an unpacked copy instead).",
        base_url,
    )
    try:
        downloaded = dl_manager.download(urls)
    except tfds.download.download_manager.NonMatchingChecksumError as e:
        raise files.DatasetFileError(
            f"An ISIC 2016 archive differs from the one recorded when it was first downloaded ({record}): {e}\n"
            "A corrupted transfer or a proxy's error page causes this: build again to download it anew. If the "
            f"archive really changed on the server, delete its line from {record} to record the new one."
        ) from None
    except (requests.RequestException, tfds.download.DownloadError, OSError) as e:
        raise files.DatasetFileError(
            f"Downloading ISIC 2016 failed ({type(e).__name__}: {e}). No network, or the server is unreachable? "
            "Building again resumes: finished archives are kept, a broken one starts over.\n"
            + instructions(base_url)
        ) from None
    extract_dir = pathlib.Path(str(dl_manager.download_dir)) / "extracted"
    return {key: extract_zip(pathlib.Path(str(path)), extract_dir) for key, path in downloaded.items()}


def extract_zip(archive: pathlib.Path, extract_dir: pathlib.Path) -> pathlib.Path:
    """`archive` unpacked into `extract_dir/ZIP.<archive name>` (reused when present; written to a temporary
    folder and renamed, so an interrupted extraction is redone). `zipfile` drops absolute and `..` parts of
    member names, so nothing lands outside the folder."""
    target = extract_dir / f"ZIP.{archive.name}"
    if target.is_dir():
        return target
    tmp = extract_dir / f"{target.name}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    except (zipfile.BadZipFile, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise files.DatasetFileError(
            f"Cannot unpack {archive}: {e}. Delete it (and its .INFO file) and build again to download it anew."
        ) from None
    try:
        tmp.rename(target)
    except OSError:  # another process (a second run on the same data_dir) extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def make_builder(
    manual_dir: str | pathlib.Path, resize: int = 256, data_dir: str | None = None
) -> DiffsegIsic2016:
    """The builder for the copy in `manual_dir` at `resize` px (named by a fingerprint of the files)."""
    root = files.require_dir(manual_dir, "isic2016", instructions())
    pairs = find_pairs(root)
    fp = files.fingerprint([p for split in pairs.values() for x in split for p in (x.image, x.mask)], root)
    config = IsicConfig(
        name=manual.config_name(resize, fp),
        resize=int(resize),
        fingerprint=fp,
        description=f"ISIC 2016 at {resize} px",
    )
    return DiffsegIsic2016(config=config, data_dir=data_dir)


def make_download_builder(
    base_url: str = DEFAULT_BASE_URL, resize: int = 256, data_dir: str | None = None
) -> DiffsegIsic2016:
    """The builder that downloads the official zips from `base_url` at `resize` px (the config is named by the
    URL, so a mirror's data is not mistaken for the archive's)."""
    digest = hashlib.sha1(base_url.rstrip("/").encode()).hexdigest()[:8]
    config = IsicConfig(
        name=manual.config_name(resize, f"dl{digest}"),
        resize=int(resize),
        fingerprint=f"dl{digest}",
        download_base_url=base_url.rstrip("/"),
        description=f"ISIC 2016 at {resize} px, downloaded from {base_url}",
    )
    return DiffsegIsic2016(config=config, data_dir=data_dir)


def prepare(builder: DiffsegIsic2016) -> dict[str, Any]:
    """Downloads and builds `builder` unless built already; its {split: random-access source}."""
    builder.download_and_prepare(file_format="array_record")
    return builder.as_data_source()
