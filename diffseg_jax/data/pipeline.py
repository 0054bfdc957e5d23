"""Input pipeline: the dataset registry, splits, preprocessing, the random-access training stream, whole-split arrays.

Every dataset is a loader `data_config -> {split: source}` in `DATASETS`, a source being random access (`len` and
`[i]`) over examples `{'image': uint8 (S, S, 3), 'mask': uint8 (S, S, 1) in {0, 255} or {0, 1}, 'id': str, ...}`
stored at S = `stored_size(data_config)` (`data.resize`, else `data.image_size`). `load_split` adds the derived
splits: `fit` and `validation`, a deterministic (1 - f, f) partition of `train` with f = `data.validation_fraction`
(the feed-forward protocol's 80/20 split), and, for a dataset without a test split (a flat image folder), `test`
held out of `train` by `data.test_fraction`.

The training stream is a `grain.MapDataset` whose element `ds[step]` is the batch of training step `step`, a pure
function of (seed, step): the trainer resumes after a crash by reading `ds[step]`, with no iterator state to
checkpoint. Training images larger than `data.image_size` are randomly cropped to it (MoNuSeg: 256 crops of the
512 tile, as SegDiff); evaluation sees whole stored images, which `to_tiles` / `from_tiles` cut into model-sized
tiles and stitch back (`data.eval_tiling`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator, Protocol

import grain
import ml_collections
import numpy as np

from diffseg_jax.data import files, isic2016, manual, monuseg2018, segmentation_folder, synthetic

DEFAULT_DATA_DIR = "~/tensorflow_datasets"


class Source(Protocol):
    """A random-access source of examples: what `load_split` returns and grain's `MapDataset.source` accepts."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class _StrIds:
    """Wraps a tfds data source so that ids come out as `str` (tfds returns Text features as bytes)."""

    def __init__(self, source: Source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self._source[index])
        if isinstance(example.get("id"), bytes):
            example["id"] = example["id"].decode("utf-8")
        return example

    def __repr__(self) -> str:
        return f"_StrIds({self._source!r})"


def _data_dir(data_config: ml_collections.ConfigDict) -> str:
    """The tfds data_dir from the config; when unset, tfds's own default: ``$TFDS_DATA_DIR``, else
    `~/tensorflow_datasets`."""
    data_dir = data_config.get("data_dir", None)
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or DEFAULT_DATA_DIR
    return os.path.expanduser(str(data_dir))


def stored_size(data_config: ml_collections.ConfigDict) -> int:
    """The side of the stored images: `data.resize` if set, else `data.image_size`."""
    resize = data_config.get("resize", None)
    return int(resize if resize is not None else data_config.image_size)


def _process_0_first(prepare: Callable[[], dict[str, Source]]) -> dict[str, Source]:
    """``prepare()`` on process 0 first, then on the other processes of a multi-host run.

    Hosts that share a data_dir would otherwise build the same dataset at once, and all but one fail when tfds
    renames its temporary folder ("Destination ... already exists"); after process 0 the others find it built
    (or, with a data_dir of their own, build their copy). ``prepare`` makes its builder itself: a tfds builder
    made before the files existed keeps the default file format and cannot read them. Every process reaches
    the barrier the same number of times: the callers are cached per dataset and run in the same order.
    """
    import jax  # noqa: PLC0415 — the data package does not need JAX otherwise (grain workers import it)

    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils  # noqa: PLC0415

    first = prepare() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("diffseg_jax: dataset prepared by process 0")
    return first if first is not None else prepare()


@functools.lru_cache(maxsize=None)
def _prepared_synthetic(
    kind: str, image_size: int, num_train: int, num_test: int, seed: int, data_dir: str
) -> dict[str, Source]:
    """Builds a synthetic variant on first use (later calls, and later processes, reuse the files); its sources."""

    def prepare():  # the builder is made here: one made before another process built the files reads them wrong
        builder = synthetic.make_builder(kind, image_size, num_train, num_test, seed, data_dir=data_dir)
        return manual.build(builder, file_format="array_record").as_data_source()  # one build at a time

    return _process_0_first(prepare)


def load_synthetic(data_config: ml_collections.ConfigDict) -> dict[str, Source]:
    """The splits of the synthetic dataset described by `data_config` (kind, size, num_train, num_test, seed)."""
    kind = synthetic.check_kind(data_config.kind)
    return _prepared_synthetic(
        kind,
        stored_size(data_config),
        int(data_config.num_train),
        int(data_config.num_test),
        int(data_config.seed),
        _data_dir(data_config),
    )


@functools.lru_cache(maxsize=None)
def _prepared_manual(make_builder: Callable, manual_dir: str, data_dir: str, **options) -> dict[str, Source]:
    """Builds a manual-download dataset from `manual_dir` unless built already (same files and options)."""
    return _process_0_first(
        lambda: manual.prepare(make_builder(manual_dir, data_dir=data_dir, **options), manual_dir)
    )


def _manual_dir(data_config: ml_collections.ConfigDict, dataset: str, layout: str) -> str:
    return str(files.require_dir(data_config.get("manual_dir", None), dataset, layout))


@functools.lru_cache(maxsize=None)
def _prepared_isic_download(base_url: str, data_dir: str, resize: int) -> dict[str, Source]:
    """Downloads and builds ISIC 2016 from `base_url` unless built already (tfds caches the zips too)."""
    return _process_0_first(
        lambda: isic2016.prepare(isic2016.make_download_builder(base_url, resize, data_dir=data_dir))
    )


def load_isic2016(data_config: ml_collections.ConfigDict) -> dict[str, Source]:
    """ISIC 2016, stored at `stored_size`: downloaded from `data.download_base_url` (the ISIC archive) unless
    `data.manual_dir` names an unpacked copy (see `diffseg_jax.data.isic2016`)."""
    if data_config.get("manual_dir", None) is None:
        base_url = data_config.get("download_base_url", None) or isic2016.DEFAULT_BASE_URL
        return _prepared_isic_download(str(base_url), _data_dir(data_config), stored_size(data_config))
    manual_dir = _manual_dir(data_config, "isic2016", isic2016.instructions())
    return _prepared_manual(
        isic2016.make_builder, manual_dir, _data_dir(data_config), resize=stored_size(data_config)
    )


def load_monuseg2018(data_config: ml_collections.ConfigDict) -> dict[str, Source]:
    """MoNuSeg 2018 from `data.manual_dir`, stored at `stored_size` (see `diffseg_jax.data.monuseg2018`)."""
    manual_dir = _manual_dir(data_config, "monuseg2018", monuseg2018.monuseg2018.INSTRUCTIONS)
    return _prepared_manual(
        monuseg2018.make_builder,
        manual_dir,
        _data_dir(data_config),
        resize=stored_size(data_config),
        train_ids=data_config.get("train_ids", "classic30"),
    )


def load_segmentation_folder(data_config: ml_collections.ConfigDict) -> dict[str, Source]:
    """Any images/ + masks/ folder from `data.manual_dir` (see `diffseg_jax.data.segmentation_folder`)."""
    manual_dir = _manual_dir(
        data_config, "segmentation_folder", segmentation_folder.segmentation_folder.INSTRUCTIONS
    )
    return _prepared_manual(
        segmentation_folder.make_builder,
        manual_dir,
        _data_dir(data_config),
        resize=stored_size(data_config),
        mask_threshold=data_config.get("mask_threshold", None),
        image_scaling=data_config.get("image_scaling", "auto"),
    )


DATASETS: dict[str, Callable[[ml_collections.ConfigDict], dict[str, Source]]] = {
    "synthetic": load_synthetic,
    "isic2016": load_isic2016,
    "monuseg2018": load_monuseg2018,
    "segmentation_folder": load_segmentation_folder,
}
# Datasets read from config.data.manual_dir; of them, those that download themselves when it is unset.
MANUAL_DATASETS = ("isic2016", "monuseg2018", "segmentation_folder")
DOWNLOADED_DATASETS = ("isic2016",)
# What a user does to get each dataset read from manual_dir (its builder's MANUAL_DOWNLOAD_INSTRUCTIONS).
MANUAL_INSTRUCTIONS = {
    "isic2016": isic2016.instructions(),
    "monuseg2018": monuseg2018.monuseg2018.INSTRUCTIONS,
    "segmentation_folder": segmentation_folder.segmentation_folder.INSTRUCTIONS,
}
SPLITS = ("train", "test", "fit", "validation")
# config data.eval_tiling: stored images larger than the model cut into model-sized tiles, or fed whole.
EVAL_TILINGS = ("tiles", "whole")


class MissingSplitError(ValueError):
    """A split the dataset does not have on disk (nor holds out of another)."""


class Subset:
    """The examples of `source` at `indices` (a random-access source itself)."""

    def __init__(self, source: Source, indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._indices[index])]

    def __repr__(self) -> str:
        return f"Subset({self._source!r}, {len(self)} examples)"


def holdout(num: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted index arrays: round(fraction * num) of `num` indices drawn with `seed`.

    At least one example goes to each side when 0 < fraction < 1 and num >= 2. tfds orders a split's records by a
    hash of their keys, so the partition depends only on the set of example ids, the fraction and the seed.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"A held-out fraction must be in [0, 1), got {fraction}.")
    k = int(round(fraction * num))
    if fraction > 0 and num >= 2:
        k = min(max(k, 1), num - 1)
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(num)
    return np.sort(perm[k:]), np.sort(perm[:k])


def load_split(data_config: ml_collections.ConfigDict, split: str) -> Source:
    """The random-access source of `split` ('train', 'test', 'fit', 'validation') of `data_config.name`."""
    name = data_config.name
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset name {name!r} in config.data.name; use one of {sorted(DATASETS)} "
            "or register a loader `data_config -> {split: source}` in diffseg_jax.data.pipeline.DATASETS."
        )
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {list(SPLITS)}.")
    sources = {k: _StrIds(v) for k, v in DATASETS[name](data_config).items()}
    seed = int(data_config.get("split_seed", 0))
    if "test" not in sources and "train" in sources and data_config.get("test_fraction", 0.0) > 0:
        kept, held = holdout(len(sources["train"]), float(data_config.test_fraction), seed + 1)
        sources["train"], sources["test"] = Subset(sources["train"], kept), Subset(sources["train"], held)
    if split in ("fit", "validation") and "train" in sources:
        fraction = float(data_config.get("validation_fraction", 0.2))
        if fraction <= 0:
            raise ValueError(
                f"Split {split!r} needs config.data.validation_fraction in (0, 1), got {fraction}."
            )
        kept, held = holdout(len(sources["train"]), fraction, seed)
        return Subset(sources["train"], kept if split == "fit" else held)
    if split not in sources:
        fix = (
            "set config.data.test_fraction > 0 to hold out part of the training images, or add a test folder"
            if split == "test"
            else "add the training images to config.data.manual_dir"
        )
        raise MissingSplitError(
            f"Dataset {name!r} has no {split!r} split (found {sorted(sources)}"
            + (f" in manual_dir {data_config.get('manual_dir')}" if name in MANUAL_DATASETS else "")
            + f"); {fix}."
        )
    return sources[split]


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """A stored mask as booleans: masks come as {0, 255} (PNG) or {0, 1}; the threshold is half-range for the
    former."""
    mask = np.asarray(mask)
    return mask > 127 if mask.max(initial=0) > 1 else mask > 0


def preprocess(example: dict[str, Any]) -> dict[str, np.ndarray]:
    """uint8 example -> {'image': float32 (H, W, 3) in [0, 1], 'mask': float32 (H, W, 1) in {0, 1}}."""
    image = np.asarray(example["image"])
    mask = np.asarray(example["mask"])
    if mask.ndim == 2:
        mask = mask[..., None]
    return {"image": image.astype(np.float32) / 255.0, "mask": binary_mask(mask).astype(np.float32)}


def _augment(
    example: dict[str, Any], rng: np.random.Generator, crop: int | None, flips: bool
) -> dict[str, np.ndarray]:
    """A random `crop` x `crop` window (if set) and random h/v flips (if `flips`), the same for image and mask."""
    image, mask = np.asarray(example["image"]), np.asarray(example["mask"])
    if crop is not None:
        y = int(rng.integers(0, image.shape[0] - crop + 1))
        x = int(rng.integers(0, image.shape[1] - crop + 1))
        image, mask = image[y : y + crop, x : x + crop], mask[y : y + crop, x : x + crop]
    if flips:
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
    return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask)}


def train_dataset(
    data_config: ml_collections.ConfigDict,
    batch_size: int,
    seed: int,
    split: str = "train",
    shard: tuple[int, int] = (0, 1),
) -> grain.MapDataset:
    """Infinite, per-epoch reshuffled, batched stream of `split`; `ds[step]` is step's batch, a function of (seed, step).

    Stored images larger than `data.image_size` are randomly cropped to it; `data.augment_flips` adds h/v flips.
    ``shard=(host, hosts)``: this host's rows of every global batch of ``batch_size`` (host h of n reads rows
    h·B/n … (h+1)·B/n − 1 and nothing else); the hosts' batches of a step concatenate to the single-host batch.
    """
    index, count = shard
    if batch_size < 1 or batch_size % count:
        raise ValueError(f"batch_size must be a positive multiple of the {count} hosts, got {batch_size}.")
    ds = grain.MapDataset.source(load_split(data_config, split)).seed(seed)
    # repeat() folds the epoch into the seeds of the shuffle (and crops/flips) upstream of it: a new order every
    # epoch, and element k of the stream is still a pure function of (seed, k).
    ds = ds.shuffle().repeat()
    size, stored = int(data_config.image_size), stored_size(data_config)
    crop = size if stored > size else None
    flips = bool(data_config.get("augment_flips", False))
    if crop is not None or flips:
        ds = ds.random_map(functools.partial(_augment, crop=crop, flips=flips))
    ds = ds.map(preprocess).batch(batch_size // count, drop_remainder=True)
    return ds[index::count] if count > 1 else ds


def batch_stream(
    ds: grain.MapDataset, start: int, num_threads: int = 4, num_workers: int = 0, buffer: int = 8
) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``ds[start]``, ``ds[start + 1]``, … read ahead of the training loop.

    ``num_threads`` threads read up to ``buffer`` batches ahead; ``num_workers`` > 0 moves decoding and
    augmentation into that many worker processes (grain's ``mp_prefetch``; they need a ``__main__`` guard,
    which the CLI has, and take seconds to start). The order, and so every batch, is the same either way.
    """
    it = ds[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(1, buffer))
    )
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


def to_tiles(images: np.ndarray, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(N, H, W, C) -> (N * H/tile * W/tile, tile, tile, C) non-overlapping tiles in row-major order, and the grid.

    SegDiff evaluates its 512 px MoNuSeg tiles as four 256 px tiles this way (stride = tile, no overlap).
    """
    n, h, w, c = images.shape
    if h % tile or w % tile:
        raise ValueError(
            f"Images of {h}x{w} px cannot be cut into {tile} px tiles; make config.data.resize a multiple of "
            f"config.data.image_size, or set config.data.eval_tiling='whole'."
        )
    rows, cols = h // tile, w // tile
    tiles = images.reshape(n, rows, tile, cols, tile, c).transpose(0, 1, 3, 2, 4, 5)
    return tiles.reshape(n * rows * cols, tile, tile, c), (rows, cols)


def from_tiles(tiles: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The inverse of :func:`to_tiles`: stitches (N * rows * cols, t, t, C) back into (N, rows * t, cols * t, C)."""
    rows, cols = grid
    m, t, _, c = tiles.shape
    n = m // (rows * cols)
    return tiles.reshape(n, rows, cols, t, t, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, rows * t, cols * t, c)


def eval_arrays(
    data_config: ml_collections.ConfigDict, split: str = "test", max_examples: int | None = None
) -> dict[str, np.ndarray]:
    """A whole split (the first `max_examples` by id) as stacked preprocessed arrays, sorted by id, plus 'id'."""
    source = load_split(data_config, split)
    examples = sorted((source[i] for i in range(len(source))), key=lambda e: e["id"])
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise ValueError(f"Split {split!r} of dataset {data_config.name!r} has no examples to evaluate.")
    processed = [preprocess(e) for e in examples]
    return {
        "image": np.stack([p["image"] for p in processed]),
        "mask": np.stack([p["mask"] for p in processed]),
        "id": np.array([e["id"] for e in examples]),
    }


def model_sized_arrays(
    data_config: ml_collections.ConfigDict, split: str, max_examples: int | None = None
) -> dict[str, np.ndarray]:
    """`eval_arrays` image and mask of `split`, cut into `data.image_size` tiles where stored larger."""
    arrays = eval_arrays(data_config, split, max_examples)
    size = int(data_config.image_size)
    if arrays["image"].shape[1] > size:
        return {k: to_tiles(arrays[k], size)[0] for k in ("image", "mask")}
    return {k: arrays[k] for k in ("image", "mask")}
