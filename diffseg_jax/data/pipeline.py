"""Input pipeline: the dataset registry, preprocessing, the random-access training stream and whole-split arrays.

Every dataset is a function `load_split(data_config, split)` returning a random-access source (`len` and `[i]`) of
examples `{'image': uint8 (H, W, 3), 'mask': uint8 (H, W, 1) in {0, 255} or {0, 1}, 'id': str}`. The training stream is
a `grain.MapDataset` whose element `ds[step]` is the batch of training step `step`, a pure function of (seed, step):
the trainer resumes after a crash by reading `ds[step]`, with no iterator state to checkpoint.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Protocol

import grain
import ml_collections
import numpy as np

from diffseg_jax.data import synthetic

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
    """The tfds data_dir from the config, `~/tensorflow_datasets` when unset."""
    data_dir = data_config.get("data_dir", None)
    return os.path.expanduser(str(data_dir if data_dir is not None else DEFAULT_DATA_DIR))


@functools.lru_cache(maxsize=None)
def _prepared_synthetic(
    kind: str, image_size: int, num_train: int, num_test: int, seed: int, data_dir: str
) -> dict[str, Source]:
    """Builds a synthetic variant on first use (later calls, and later processes, reuse the files); its sources."""
    builder = synthetic.make_builder(kind, image_size, num_train, num_test, seed, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder.as_data_source()


def load_synthetic_split(data_config: ml_collections.ConfigDict, split: str) -> Source:
    """The `split` of the synthetic dataset described by `data_config` (kind, image_size, num_train, num_test, seed)."""
    kind = synthetic.check_kind(data_config.kind)
    if split not in synthetic.SPLITS:
        raise ValueError(
            f"Unknown split {split!r} for the synthetic dataset; use one of {list(synthetic.SPLITS)}."
        )
    sources = _prepared_synthetic(
        kind,
        int(data_config.image_size),
        int(data_config.num_train),
        int(data_config.num_test),
        int(data_config.seed),
        _data_dir(data_config),
    )
    return _StrIds(sources[split])


DATASETS: dict[str, Callable[[ml_collections.ConfigDict, str], Source]] = {
    "synthetic": load_synthetic_split,
}


def load_split(data_config: ml_collections.ConfigDict, split: str) -> Source:
    """The random-access source of `split` of the dataset named by `data_config.name` (see `DATASETS`)."""
    name = data_config.name
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset name {name!r} in config.data.name; use one of {sorted(DATASETS)} "
            "or register a loader `load_split(data_config, split)` in diffseg_jax.data.pipeline.DATASETS."
        )
    return DATASETS[name](data_config, split)


def preprocess(example: dict[str, Any]) -> dict[str, np.ndarray]:
    """uint8 example -> {'image': float32 (H, W, 3) in [0, 1], 'mask': float32 (H, W, 1) in {0, 1}}."""
    image = np.asarray(example["image"])
    mask = np.asarray(example["mask"])
    if mask.ndim == 2:
        mask = mask[..., None]
    # Masks come as {0, 255} (PNG) or {0, 1}; the threshold is half-range for the former.
    binary = mask > 127 if mask.max(initial=0) > 1 else mask > 0
    return {"image": image.astype(np.float32) / 255.0, "mask": binary.astype(np.float32)}


def _random_flips(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Flips image and mask together, horizontally and vertically, each with probability 1/2."""
    image, mask = example["image"], example["mask"]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask)}


def train_dataset(data_config: ml_collections.ConfigDict, batch_size: int, seed: int) -> grain.MapDataset:
    """Infinite, per-epoch reshuffled, batched training stream; `ds[step]` is step's batch, a function of (seed, step)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    ds = grain.MapDataset.source(load_split(data_config, "train")).seed(seed)
    # repeat() folds the epoch into the seeds of the shuffle (and flips) upstream of it: a new order every epoch, and
    # element k of the stream is still a pure function of (seed, k).
    ds = ds.shuffle().repeat().map(preprocess)
    if data_config.get("augment_flips", False):
        ds = ds.random_map(_random_flips)
    return ds.batch(batch_size, drop_remainder=True)


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
