"""Tests for the synthetic datasets (fingerprints, determinism, tfds round trip) and the input pipeline."""

from __future__ import annotations

import collections
import pathlib

import ml_collections
import numpy as np
import pytest

from diffseg_jax import data
from diffseg_jax.data import pipeline, synthetic

NUM_EXAMPLES = 30  # per fingerprint check


def _components(mask: np.ndarray, connectivity: int = 4) -> list[int]:
    """Sizes of the connected components of a 2-D bool mask (breadth-first flood fill; no scipy)."""
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    sizes = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, size = collections.deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for dy, dx in steps:
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    queue.append((yy, xx))
        sizes.append(size)
    return sizes


def test_components_helper():
    m = np.zeros((6, 6), bool)
    m[0:2, 0:2] = True
    m[2, 2] = True  # touches the first block diagonally only
    m[4:6, 3:6] = True
    assert sorted(_components(m, 4)) == [1, 4, 6]
    assert sorted(_components(m, 8)) == [5, 6]


def _examples(kind: str, size: int = 64, n: int = NUM_EXAMPLES):
    return [synthetic.generate(kind, size, 0, "train", i) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Generators.


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_generator_deterministic_and_varied(kind):
    image, mask = synthetic.generate(kind, 32, 0, "train", 3)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert mask.shape == (32, 32) and mask.dtype == bool
    again_image, again_mask = synthetic.generate(kind, 32, 0, "train", 3)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(mask, again_mask)
    for other in [(0, "train", 4), (1, "train", 3), (0, "test", 3)]:  # index, seed and split all matter
        other_image, _ = synthetic.generate(kind, 32, *other)
        assert not np.array_equal(image, other_image), other


def test_lesion_fingerprint():
    size = 64
    for image, mask in _examples("lesion", size):
        assert len(_components(mask, 4)) == 1  # exactly one blob, even under the strict 4-connectivity
        assert 0.15 <= mask.mean() <= 0.45
        cy, cx = np.argwhere(mask).mean(0) + 0.5
        assert abs(cy - size / 2) < 0.2 * size and abs(cx - size / 2) < 0.2 * size


def test_nuclei_fingerprint():
    size = 64
    fractions = []
    for image, mask in _examples("nuclei", size):
        sizes = _components(mask, 8)
        assert len(sizes) >= 10  # many objects, even where some touch
        assert np.mean(sizes) < 0.02 * size * size  # small: a radius-4 disc is 50 px = 1.2% of 64x64
        fractions.append(mask.mean())
    assert 0.05 <= min(fractions) and max(fractions) <= 0.32
    assert 0.12 <= np.mean(fractions) <= 0.25


def test_clusters_fingerprint():
    fractions = np.array([mask.mean() for _, mask in _examples("clusters")])
    assert 1 <= np.sum(fractions == 0.0) <= 0.5 * len(fractions)  # some images have no tumour
    assert np.sum(fractions > 0.5) >= 1  # some are mostly tumour
    nonempty = fractions[fractions > 0]
    assert nonempty.max() - nonempty.min() > 0.4  # clusters of widely varying extent


def test_nuclei_scale_with_image_size():
    small = np.mean([m.mean() for _, m in _examples("nuclei", 32, 10)])
    large = np.mean([m.mean() for _, m in _examples("nuclei", 128, 10)])
    assert abs(small - large) < 0.05  # radii scale with the size: the same fraction of the image


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_image_relates_to_mask_but_not_trivially(kind):
    gray, masks, colour_checked, texture_checked = [], [], 0, 0
    for image, mask in _examples(kind, 64, 20):
        g = image.astype(np.float64).mean(-1)
        if 0 < mask.mean() < 1:
            colour_checked += 1
            # The foreground colour differs on average...
            assert abs(g[mask].mean() - g[~mask].mean()) > 10.0
            # ...and its texture is rougher: median absolute horizontal gradient away from the border (the median
            # ignores the sparse dark distractor dots outside the HER2-like clusters).
            inner, outer = _erode(mask)[:, 1:], _erode(~mask)[:, 1:]
            grad = np.abs(np.diff(g, axis=1))
            if inner.sum() > 20 and outer.sum() > 20:
                texture_checked += 1
                assert np.median(grad[inner]) > 1.1 * np.median(grad[outer])
        gray.append(g)
        masks.append(mask)
    # Both checks ran on most images (clusters: 15 of 20 have a tumour and background).
    assert colour_checked >= 15 and texture_checked >= 15, (colour_checked, texture_checked)
    # ...but no single global gray threshold segments the data set well.
    gray, masks = np.stack(gray), np.stack(masks)
    best = max(
        (((gray < t) == flip) & masks).sum() / (((gray < t) == flip) | masks).sum()
        for t in range(0, 256, 4)
        for flip in (True, False)
    )
    assert best < 0.9


def _erode(mask: np.ndarray, steps: int = 2) -> np.ndarray:
    for _ in range(steps):
        m = mask.copy()
        m[1:] &= mask[:-1]
        m[:-1] &= mask[1:]
        m[:, 1:] &= mask[:, :-1]
        m[:, :-1] &= mask[:, 1:]
        mask = m
    return mask


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="'blobs'.*lesion"):
        synthetic.make_example("blobs", 32, np.random.default_rng(0))


def test_config_names_encode_every_field():
    assert synthetic.SyntheticConfig.make("lesion", 64, 512, 64, 0).name == "lesion_64_n512x64_s0"
    names = {
        synthetic.SyntheticConfig.make(*fields).name
        for fields in [
            ("lesion", 64, 512, 64, 0),
            ("nuclei", 64, 512, 64, 0),
            ("lesion", 32, 512, 64, 0),
            ("lesion", 64, 511, 64, 0),
            ("lesion", 64, 512, 63, 0),
            ("lesion", 64, 512, 64, 1),
        ]
    }
    assert len(names) == 6


# ---------------------------------------------------------------------------------------------------------------
# tfds round trip and the pipeline.

NUM_TRAIN, NUM_TEST, SIZE = 12, 5, 32


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "synthetic",
            "kind": "clusters",
            "image_size": SIZE,
            "num_train": NUM_TRAIN,
            "num_test": NUM_TEST,
            "seed": 0,
            "data_dir": str(tmp_path_factory.mktemp("tfds")),
            "augment_flips": False,
        }
    )


def test_tfds_round_trip_is_exact(config):
    builder = synthetic.make_builder("clusters", SIZE, NUM_TRAIN, NUM_TEST, 0, data_dir=config.data_dir)
    builder.download_and_prepare(file_format="array_record")
    sources = builder.as_data_source()
    all_ids = {}
    for split, num in [("train", NUM_TRAIN), ("test", NUM_TEST)]:
        source = sources[split]
        assert len(source) == num
        ids = []
        for i in range(num):
            example = source[i]
            example_id = example["id"].decode() if isinstance(example["id"], bytes) else example["id"]
            ids.append(example_id)
            index = int(example_id.split("_")[-1])
            image, mask = synthetic.generate("clusters", SIZE, 0, split, index)
            np.testing.assert_array_equal(example["image"], image)
            assert example["mask"].shape == (SIZE, SIZE, 1)
            assert set(np.unique(example["mask"])) <= {0, 255}
            np.testing.assert_array_equal(example["mask"][..., 0] == 255, mask)
        assert sorted(ids) == [synthetic.example_id(split, i) for i in range(num)]
        all_ids[split] = ids
    assert not set(all_ids["train"]) & set(all_ids["test"])


def test_load_split_builds_once_and_reuses_files(config):
    source = data.load_split(config, "train")
    assert len(source) == NUM_TRAIN and isinstance(source[0]["id"], str)
    files = sorted(pathlib.Path(config.data_dir).rglob("*.array_record*"))
    assert files
    mtimes = [f.stat().st_mtime_ns for f in files]
    pipeline._prepared_synthetic.cache_clear()  # as a new process would: the files on disk are reused
    assert len(data.load_split(config, "test")) == NUM_TEST
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_unknown_dataset_name_is_a_clear_error(config):
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.name = "isic3000"
    with pytest.raises(ValueError, match="'isic3000'.*synthetic"):
        data.load_split(bad, "train")
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.kind = "blobs"
    with pytest.raises(ValueError, match="'blobs'"):
        data.load_split(bad, "train")


def test_preprocess_accepts_both_mask_conventions():
    image = np.full((4, 4, 3), 255, np.uint8)
    m01 = np.zeros((4, 4, 1), np.uint8)
    m01[1:3, 1:3] = 1
    a = data.preprocess({"image": image, "mask": m01})
    b = data.preprocess({"image": image, "mask": m01 * 255})
    c = data.preprocess({"image": image, "mask": m01[..., 0] * 255})  # no channel axis
    for out in (a, b, c):
        assert out["image"].dtype == np.float32 and out["image"].max() == 1.0
        assert out["mask"].dtype == np.float32 and out["mask"].shape == (4, 4, 1)
        np.testing.assert_array_equal(out["mask"], m01.astype(np.float32))


def test_eval_arrays_sorted_complete_and_exact(config):
    arrays = data.eval_arrays(config, "test")
    assert list(arrays["id"]) == [synthetic.example_id("test", i) for i in range(NUM_TEST)]
    assert arrays["image"].shape == (NUM_TEST, SIZE, SIZE, 3) and arrays["image"].dtype == np.float32
    assert arrays["mask"].shape == (NUM_TEST, SIZE, SIZE, 1)
    for i in range(NUM_TEST):
        image, mask = synthetic.generate("clusters", SIZE, 0, "test", i)
        np.testing.assert_array_equal(arrays["image"][i], image / np.float32(255.0))
        np.testing.assert_array_equal(arrays["mask"][i, ..., 0], mask.astype(np.float32))
    first = data.eval_arrays(config, "test", max_examples=3)
    assert list(first["id"]) == list(arrays["id"][:3])


def test_train_dataset_random_access_is_deterministic(config):
    ds = data.train_dataset(config, batch_size=4, seed=7)
    batch = ds[5]
    assert set(batch) == {"image", "mask"}
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (4, SIZE, SIZE, 1) and batch["mask"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
    rebuilt = data.train_dataset(config, batch_size=4, seed=7)  # e.g. after a crash
    for key in ("image", "mask"):
        np.testing.assert_array_equal(rebuilt[5][key], batch[key])
    assert not np.array_equal(ds[6]["image"], batch["image"])
    assert not np.array_equal(data.train_dataset(config, batch_size=4, seed=8)[5]["image"], batch["image"])
    # Steps far beyond the first epochs are addressable directly.
    np.testing.assert_array_equal(ds[10_000]["image"], rebuilt[10_000]["image"])


def _train_index(image: np.ndarray, train_images: np.ndarray) -> int:
    matches = np.nonzero((train_images == image).all(axis=(1, 2, 3)))[0]
    assert len(matches) == 1
    return int(matches[0])


def test_each_epoch_visits_every_example_once_in_a_new_order(config):
    train = data.eval_arrays(config, "train")
    batch_size = 4
    steps_per_epoch = NUM_TRAIN // batch_size
    ds = data.train_dataset(config, batch_size=batch_size, seed=3)
    orders = []
    for epoch in range(3):
        order = [
            _train_index(image, train["image"])
            for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
            for image in ds[step]["image"]
        ]
        assert sorted(order) == list(range(NUM_TRAIN))
        orders.append(order)
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_flip_augmentation_is_deterministic_and_consistent(config):
    flipped_config = ml_collections.ConfigDict(config.to_dict())
    flipped_config.augment_flips = True
    train = data.eval_arrays(config, "train")
    ds = data.train_dataset(flipped_config, batch_size=4, seed=3)
    again = data.train_dataset(flipped_config, batch_size=4, seed=3)
    flips_seen = set()
    for step in range(6):
        batch = ds[step]
        np.testing.assert_array_equal(again[step]["image"], batch["image"])
        for image, mask in zip(batch["image"], batch["mask"]):
            found = [
                (fy, fx)
                for fy in (False, True)
                for fx in (False, True)
                if (_flip(train["image"], fy, fx) == image).all(axis=(1, 2, 3)).any()
            ]
            assert len(found) == 1
            fy, fx = found[0]
            index = _train_index(_flip(image[None], fy, fx)[0], train["image"])
            np.testing.assert_array_equal(mask, _flip(train["mask"][index][None], fy, fx)[0])  # same flip
            flips_seen.add(found[0])
    assert len(flips_seen) >= 3  # 24 draws: all four flips are near certain, three is safe


def _flip(images: np.ndarray, vertical: bool, horizontal: bool) -> np.ndarray:
    if vertical:
        images = images[:, ::-1]
    if horizontal:
        images = images[:, :, ::-1]
    return images


def test_an_unset_data_dir_is_where_tfds_looks(tmp_path, monkeypatch):
    """data.data_dir unset: $TFDS_DATA_DIR as tfds itself reads it, else ~/tensorflow_datasets; a set one wins."""
    unset = ml_collections.ConfigDict({"data_dir": None})
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert pipeline._data_dir(unset) == str(pathlib.Path("~/tensorflow_datasets").expanduser())
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "shared"))
    assert pipeline._data_dir(unset) == str(tmp_path / "shared")
    assert pipeline._data_dir(ml_collections.ConfigDict({"data_dir": str(tmp_path / "mine")})) == str(
        tmp_path / "mine"
    )
