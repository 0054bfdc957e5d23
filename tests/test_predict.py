"""``--mode predict``: segmenting image files without masks with a trained run."""

import csv
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import run_module, tiny_config
from PIL import Image

from diffseg_jax import build, checkpoints, configlib, evaluate, models, predict, restore, sampling
from diffseg_jax.data import files


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _read(path):
    return np.asarray(Image.open(path))


def _main(*args):
    return run_module("diffseg_jax.main", *args, timeout=600)


@pytest.mark.slow
def test_image_files_get_the_evaluation_ensembles_by_predict_and_by_an_external_evaluation(
    tmp_path, tfds_dir
):
    """The test images written as files, and segmented with ``--mode predict`` or evaluated as an external test
    folder with ``--mode evaluate --eval_dir``, get exactly the ensembles ``--mode evaluate`` gave them in the
    run's own dataset: the same reading, 2 x 2 tiling, batching and keys."""
    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    config.data.resize = 64  # stored at 64 px: the 32 px model sees each image as four tiles
    config.data.num_train = 16
    workdir = tmp_path / "run"
    _, state = _fresh_state(config)  # a checkpoint of random weights stands in for training
    state = state.replace(step=state.step + 3, params=_randomised(state.params))
    ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(3, state, {})
    ckpt.wait()
    ckpt.close()
    evaluate.evaluate(config, str(workdir))
    with np.load(workdir / "eval" / "ensemble.npz") as ev:
        ev = dict(ev)
    own = (workdir / "eval" / "metrics.json").read_text()
    for image_id, image, mask in zip(ev["ids"], ev["image"], ev["mask"]):
        _png(str(tmp_path / "images" / f"{image_id}.png"), image)
        _png(str(tmp_path / "external" / "test" / "images" / f"{image_id}.png"), image)
        _png(str(tmp_path / "external" / "test" / "masks" / f"{image_id}.png"), mask[..., 0] * 255)
    run = [
        "--config=configs/e2_synthetic.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={tfds_dir}",
        "--config.data.resize=64",
        "--config.data.num_train=16",
    ]
    log = _main(*run, "--mode=predict", f"--images={tmp_path / 'images'}")
    assert "predict: 16/16 images" in log  # progress over the 16 tiles
    pred_dir = workdir / "predict"
    with np.load(pred_dir / "predictions.npz") as pred:
        pred = dict(pred)
    assert pred["ids"].tolist() == ev["ids"].tolist()
    np.testing.assert_array_equal(pred["mean"], ev["mean"][..., 0])
    np.testing.assert_array_equal(pred["std"], ev["std"][..., 0])
    # The samples depend on the image (so the comparison checks how the files were read, scaled and ordered):
    # the first image replaced by its mirror image changes its maps and no other's.
    model, schedule, step, weights = restore.trained_network(config, str(workdir), 3, state)
    flipped = ev["image"].astype(np.float32) / 255
    flipped[0] = flipped[0, :, ::-1]
    changed, _ = sampling.ensemble_maps(config, model, schedule, weights, flipped, step)
    np.testing.assert_array_equal(changed[1:], ev["mean"][1:])
    assert np.abs(changed[0] - ev["mean"][0]).mean() > 0.01
    first = ev["ids"][0]
    np.testing.assert_array_equal(_read(pred_dir / f"{first}_mask.png"), (ev["mean"][0, ..., 0] > 0.5) * 255)
    np.testing.assert_array_equal(
        _read(pred_dir / f"{first}_mean.png"), np.round(ev["mean"][0, ..., 0] * 255).astype(np.uint8)
    )
    np.testing.assert_array_equal(
        _read(pred_dir / f"{first}_std.png"), np.round(ev["std"][0, ..., 0] * 510).astype(np.uint8)
    )
    record = json.loads((pred_dir / "predict.json").read_text())
    assert record["step"] == 3 and record["num_images"] == 4 and record["ensemble_size"] == 2
    assert not (pred_dir / "partial").exists() and (pred_dir / "predictions.png").stat().st_size > 1000

    # The same images with their masks as an external test folder (a test split alone, no training data);
    # --eval_dir on the command line is tested in test_cli.
    external = config.copy_and_resolve_references()
    external.data.name = "segmentation_folder"
    external.data.manual_dir = str(tmp_path / "external")
    ext_dir = tmp_path / "external_eval"
    evaluate.evaluate(external, str(workdir), out_dir=str(ext_dir))
    with np.load(ext_dir / "ensemble.npz") as ext:
        np.testing.assert_array_equal(ext["mean"], ev["mean"])
        assert ext["ids"].tolist() == ev["ids"].tolist()
    ext_metrics = json.loads((ext_dir / "metrics.json").read_text())
    own_metrics = json.loads(own)
    assert ext_metrics["dataset"] == "external" and own_metrics["dataset"] == "synthetic-lesion"
    for key in ("iou", "ece", "dice_per_image", "mean_std", "step"):
        assert ext_metrics[key] == own_metrics[key], key
    assert (workdir / "eval" / "metrics.json").read_text() == own  # the run's own evaluation is kept


def _fresh_state(config):
    """An initialised state for a tiny model, made without reading any data."""
    model, _, _, state = build.model_and_state(config, (config.data.image_size, config.data.image_size, 3))
    return model, state


def _randomised(params, seed=0, scale=0.2):
    """``params`` plus N(0, scale^2) noise on every leaf: a fresh state's output convolution is zero, so its
    samples cannot depend on the image; these do."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    )


# The oracle network: an E1 model whose logits are a fixed affine function of each pixel's RGB values.
PIXEL_W = np.array([[5.0], [-4.0], [2.0]], np.float32)
PIXEL_B = np.array([-1.0], np.float32)


class PixelLogits(nn.Module):
    """E1 test network (registered as ``pixel_logits`` by :func:`_pixel_run`): ``logits = image @ W + b`` per
    pixel. Its output is a known function of the image, and, being per pixel, the same tiled or whole."""

    FEED_FORWARD = True
    out_channels: int = 1

    @nn.compact
    def __call__(self, x_t, t, cond=None, *, train=False):
        del x_t, t, train
        return nn.Dense(self.out_channels, name="head")(cond)


def _pixel_run(monkeypatch):
    """(config, state) of an E1 folder run of :class:`PixelLogits` with the weights ``PIXEL_W``, ``PIXEL_B``:
    images stored at 512 px and segmented as 2 x 2 tiles of 256 px (SegDiff's MoNuSeg protocol); its training
    data is nowhere."""
    monkeypatch.setitem(models.MODELS, "pixel_logits", PixelLogits)
    config = tiny_config("e1_folder")
    config.model = ml_collections.ConfigDict({"name": "pixel_logits"})
    config.data.manual_dir = "/nonexistent/training_data"
    config.data.image_size, config.data.resize = 256, 512
    _, state = _fresh_state(config)
    weights = {"head": {"kernel": jnp.asarray(PIXEL_W), "bias": jnp.asarray(PIXEL_B)}}
    return config, state.replace(params=weights, ema_params=weights)


def _oracle(path, stored):
    """(map at the stored size, map at the file's size) of :class:`PixelLogits` on the file, computed here with
    PIL alone: RGB (grey replicated, alpha dropped), bilinear to stored x stored, sigmoid(rgb/255 @ W + b),
    bilinear (32-bit float) back to the file's size."""
    rgb = Image.open(path).convert("RGB")
    small = np.asarray(rgb.resize((stored, stored), Image.BILINEAR), np.float64) / 255.0
    prob = (1.0 / (1.0 + np.exp(-(small @ PIXEL_W.astype(np.float64) + PIXEL_B))))[..., 0].astype(np.float32)
    full = np.asarray(Image.fromarray(prob, "F").resize(rgb.size, Image.BILINEAR), np.float32)
    return prob, full


def _smooth_image(h, w, seed):
    """An RGB uint8 image with structure at every scale (gradients, blocks, noise): both classes at any size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    blocks = ((np.floor(x * 7) + np.floor(y * 5)) % 2) * 0.6
    rgb = np.stack([x + 0.2 * np.sin(9 * y), y, blocks], -1) + 0.05 * rng.standard_normal((h, w, 3))
    return np.clip(rgb * 255, 0, 255).astype(np.uint8)


def _assert_mask_is_the_oracles(mask_png, full):
    """The written mask is the oracle's (> 0.5) at the file's size; pixels may differ only where the oracle is
    within float32 rounding of the threshold."""
    mask = _read(mask_png)
    assert mask.shape == full.shape
    differ = mask != (full > 0.5) * 255
    assert np.all(np.abs(full[differ] - 0.5) < 1e-5), f"{differ.sum()} pixels of {mask_png} differ"
    assert differ.mean() < 1e-4


@pytest.mark.slow
def test_predict_needs_no_training_data_and_returns_maps_at_each_files_size(tmp_path, monkeypatch):
    """A network whose logits are a known function of the pixels (:class:`PixelLogits`), files of other sizes,
    modes and folders (a 1000 x 1000 tile, a non-square JPEG, grey, RGBA): the stored maps are the oracle's,
    and every written mask PNG is at its file's size and equals the oracle's mask; the tiles (stored at 512 px,
    2 x 2 of 256 px) give the maps of the whole image. The run's dataset (a folder that does not exist here) is
    never read."""
    config, state = _pixel_run(monkeypatch)
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    _png(str(images / "wide.png"), _smooth_image(40, 50, 1))
    _png(str(images / "case2" / "grey.png"), _smooth_image(20, 30, 2)[..., 1])
    _png(
        str(images / "case2" / "alpha.png"),
        np.dstack([_smooth_image(32, 32, 3), rng.integers(0, 256, (32, 32))]).astype(np.uint8),
    )
    _png(str(images / "tile.png"), _smooth_image(1000, 1000, 4))  # a MoNuSeg-sized tile
    os.makedirs(images / "isic", exist_ok=True)
    Image.fromarray(_smooth_image(180, 240, 5)).save(images / "isic" / "photo.jpg", quality=90)  # non-square
    ids = ["case2/alpha", "case2/grey", "isic/photo", "tile", "wide"]
    suffix = {"isic/photo": ".jpg"}
    rows = predict.predict(config, str(tmp_path / "run"), str(images), str(tmp_path / "out"), state=state)
    out = tmp_path / "out"
    assert [r["id"] for r in rows] == ids
    with np.load(out / "predictions.npz") as pred:
        mean, std, sizes = pred["mean"], pred["std"], pred["original_size"]
    assert mean.shape == (5, 512, 512) and sizes.tolist() == [
        [32, 32],
        [20, 30],
        [180, 240],
        [1000, 1000],
        [40, 50],
    ]
    np.testing.assert_array_equal(std, 0)  # E1: every member is the same function of the image
    for i, row in enumerate(rows):
        path = images / (row["id"] + suffix.get(row["id"], ".png"))
        prob, full = _oracle(path, 512)
        np.testing.assert_allclose(mean[i], prob, atol=2e-6, err_msg=row["id"])
        assert 0.05 < np.mean(full > 0.5) < 0.95, row["id"]  # both classes: the mask depends on the image
        _assert_mask_is_the_oracles(out / f"{row['id']}_mask.png", full)
        h, w = sizes[i]
        assert (row["height"], row["width"]) == (h, w)
        assert np.abs(_read(out / f"{row['id']}_mean.png").astype(int) - np.round(full * 255)).max() <= 1
        assert row["foreground_fraction"] == pytest.approx(np.mean(full > 0.5), abs=1e-4)
        q = np.clip(full.astype(np.float64), 1e-12, 1 - 1e-12)  # the entropy's definition, in bits
        assert row["mean_entropy"] == pytest.approx(
            np.mean(-q * np.log2(q) - (1 - q) * np.log2(1 - q)), abs=1e-4
        )
    # Tiled == whole: the per-pixel network fed the 512 px images whole gives the same maps.
    whole = config.copy_and_resolve_references()
    whole.data.eval_tiling = "whole"
    predict.predict(whole, "unused", str(images), str(tmp_path / "whole"), state=state)
    with np.load(tmp_path / "whole" / "predictions.npz") as pred:
        np.testing.assert_allclose(pred["mean"], mean, atol=1e-6)
    # The stored-size inputs are the files read and resized as the dataset builders store them.
    inputs, _ = predict.read_inputs([images / "case2" / "grey.png"], 32)
    grey = files.resize_image(files.read_image(images / "case2" / "grey.png"), 32)
    np.testing.assert_array_equal(inputs[0], grey / np.float32(255))
    assert np.array_equal(grey[..., 0], grey[..., 2])  # grey replicated into RGB
    deep = tmp_path / "deep.png"  # a 12-bit image in a 16-bit file, read by the run's data.image_scaling
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 4).astype(np.uint16)).save(deep)
    for scaling in ("auto", "high_byte"):
        inputs, _ = predict.read_inputs([deep], 32, scaling)
        np.testing.assert_array_equal(inputs[0], files.read_image(deep, scaling) / np.float32(255))
    assert inputs.max() < 0.07  # high_byte leaves 0..15 of a 12-bit image; auto stretches it to 0..255
    with open(out / "predictions.csv", newline="") as f:
        assert [r["id"] for r in csv.DictReader(f)] == ids
    # One file is sampled as a batch of one, not padded to a whole evaluation batch; padding would not change
    # its samples: JAX's counter-based random numbers give each image the same noise either way (an E2 run).
    e2 = tiny_config("e2_folder")
    e2.data.manual_dir = str(tmp_path / "not_here")
    e2.eval.update(ddim_steps=2, batch_size=8)
    _, e2_state = _fresh_state(e2)
    e2_state = e2_state.replace(params=_randomised(e2_state.params))
    batches = []
    sample = sampling.sample_statistics
    monkeypatch.setattr(
        sampling, "sample_statistics", lambda *a, **k: batches.append(a[4]) or sample(*a, **k)
    )
    predict.predict(e2, "unused", str(images / "wide.png"), str(tmp_path / "one"), state=e2_state)
    with np.load(tmp_path / "one" / "predictions.npz") as pred:
        alone = pred["mean"]
    model, schedule, _, weights = restore.trained_network(e2, "unused", 3, e2_state)
    inputs, _ = predict.read_inputs([images / "wide.png"], 32)
    padded, _ = sampling.ensemble_maps(e2, model, schedule, weights, inputs, 0)
    assert batches == [1, 8]
    np.testing.assert_allclose(alone, padded[..., 0], atol=1e-5)  # programs of other shapes may round apart


@pytest.mark.slow
def test_predict_in_chunks_gives_the_same_samples_and_resumes_after_a_crash(tmp_path, monkeypatch):
    """A folder segmented ``eval.predict_chunk`` images at a time (here 2 images of 4 tiles: 4 batches a chunk)
    gets exactly the maps of one pass over all of it; after a crash in the middle of a chunk (the ensemble raises
    at its sixth batch), a rerun samples only the batches not finished and ends with the same outputs. Finished
    chunks and the batches of the unfinished one are kept by the one store evaluation uses (batch_store)."""
    config = tiny_config("e2_folder")
    config.data.manual_dir = str(tmp_path / "not_here")
    config.data.resize = 64  # the 32 px model sees each image as four tiles
    config.eval.update(ddim_steps=2, batch_size=2, predict_chunk=1)  # chunks of 2 images (whole batches)
    _, state = _fresh_state(config)
    state = state.replace(params=_randomised(state.params))  # samples that depend on the image
    rng = np.random.default_rng(1)
    images = tmp_path / "images"
    for i, shape in enumerate([(64, 64, 3), (50, 70, 3), (30, 40)]):
        _png(str(images / f"im{i}.png"), rng.integers(0, 256, shape, np.uint8))
    whole = config.copy_and_resolve_references()
    whole.eval.predict_chunk = 100
    rows = predict.predict(whole, "unused", str(images), str(tmp_path / "whole"), state=state)

    batches = []
    make_ensemble = sampling.ensemble_fn

    def crashing_ensemble_fn(*args, **kwargs):
        ensemble = make_ensemble(*args, **kwargs)

        def run(*inputs):
            if len(batches) == 5:
                raise RuntimeError("simulated crash")
            batches.append(1)
            return ensemble(*inputs)

        return run

    monkeypatch.setattr(sampling, "ensemble_fn", crashing_ensemble_fn)
    out = tmp_path / "chunked"
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict.predict(config, "unused", str(images), str(out), state=state)
    chunks, chunk_batches = out / "partial" / "chunks", out / "partial" / "batches"
    assert sorted(p.name for p in chunks.glob("batch_*.npz")) == ["batch_00000.npz"]  # chunk 0 finished
    with np.load(chunks / "batch_00000.npz") as kept:
        assert [r["id"] for r in json.loads(str(kept["rows"]))] == ["im0", "im1"]
    assert sorted(p.name for p in chunk_batches.glob("batch_*.npz")) == ["batch_00000.npz"]  # chunk 1's first
    assert (out / "im1_mask.png").exists() and not (out / "im2_mask.png").exists()

    saved = []  # whole files written on the rerun
    save = evaluate.writers.save_npz_whole
    first_batches = []
    maps = sampling.ensemble_maps
    monkeypatch.setattr(sampling, "ensemble_fn", make_ensemble)
    monkeypatch.setattr(evaluate.writers, "save_npz_whole", lambda p, **a: saved.append(p) or save(p, **a))
    monkeypatch.setattr(
        sampling, "ensemble_maps", lambda *a, **k: first_batches.append(k["first_batch"]) or maps(*a, **k)
    )
    assert predict.predict(config, "unused", str(images), str(out), state=state) == rows
    # Chunk 1 (image 2: 2 batches) starts at batch 4 and had one batch done: its second batch and the chunk.
    assert first_batches == [4]
    assert [os.path.relpath(p, out / "partial") for p in saved] == [
        "batches/batch_00001.npz",
        "chunks/batch_00001.npz",
    ]
    with np.load(tmp_path / "whole" / "predictions.npz") as a, np.load(out / "predictions.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a["mean"].shape == (3, 64, 64) and np.std(a["mean"]) > 0
        assert b["original_size"].tolist()[1] == [50, 70]
    for name in ("im1_std.png", "im2_mask.png", "predictions.csv", "predictions.png"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not (out / "partial").exists()


def test_resize_map_keeps_constants_and_the_range():
    const = np.full((32, 32), 0.37, np.float32)
    np.testing.assert_allclose(predict.resize_map(const, (45, 21)), 0.37, rtol=1e-6)
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    up = predict.resize_map(ramp, (64, 100))
    assert up.shape == (64, 100) and up.min() >= 0 and up.max() <= 1
    assert np.all(np.diff(up[0]) >= -1e-6)  # bilinear keeps a ramp monotone
    np.testing.assert_array_equal(predict.resize_map(ramp, (32, 32)), ramp)


def test_predict_refuses_what_it_cannot_segment(tmp_path):
    config = tiny_config("e2_synthetic")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(files.DatasetFileError, match="No image files .* under .*empty"):
        predict.find_images(empty)
    with pytest.raises(files.DatasetFileError, match="does not exist"):
        predict.find_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(files.DatasetFileError, match="not an image file"):
        predict.find_images(tmp_path / "notes.txt")
    twins = tmp_path / "twins"
    _png(str(twins / "a.png"), np.zeros((4, 4), np.uint8))
    _png(str(twins / "a.jpg"), np.zeros((4, 4), np.uint8))
    with pytest.raises(files.DatasetFileError, match=r"a\.jpg and .*a\.png would write the same outputs"):
        predict.find_images(twins)
    ids, paths = predict.find_images(twins / "a.png")
    assert ids == ["a"] and paths == [twins / "a.png"]
    # Outputs written inside the image folder are not segmented on a rerun.
    (twins / "a.jpg").unlink()
    _png(str(twins / "out" / "a_mask.png"), np.zeros((4, 4), np.uint8))
    assert predict.find_images(twins, exclude=twins / "out")[0] == ["a"]
    assert predict.find_images(twins)[0] == ["a", "out/a_mask"]
    e3 = tiny_config("e3_synthetic")
    with pytest.raises(ValueError, match="experiment 'e3'"):
        predict.predict(e3, str(tmp_path / "run"), str(twins / "a.png"))
    with pytest.raises(FileNotFoundError, match="No checkpoint in .*run.*train first"):
        predict.predict(config, str(tmp_path / "run"), str(twins / "a.png"))
    assert not (
        tmp_path / "run" / "checkpoints"
    ).exists()  # a mistyped workdir is not given a checkpoint folder
    # The outputs never land in the run's own folder, where <id>_mask.png files would mix with its files.
    with pytest.raises(
        configlib.ConfigError, match=r"--predict_dir .*run is the run's own folder.*run/predict_2"
    ):
        predict.predict(config, str(tmp_path / "run"), str(twins / "a.png"), str(tmp_path / "run"))


def test_predict_skips_the_masks_of_a_dataset_folder(tmp_path, caplog):
    """--images DATASET/test (test/images + test/masks, the segmentation_folder layout) segments the images
    only: files under masks/ or labels/ folders are skipped with a warning that counts them; a folder of masks
    alone is refused with the images/ folder to pass instead. A masks/ folder given itself is segmented."""
    test = tmp_path / "dataset" / "test"
    for name in ("a", "b"):
        _png(str(test / "images" / f"{name}.png"), np.zeros((4, 4, 3), np.uint8))
        _png(str(test / "Masks" / f"{name}.png"), np.zeros((4, 4), np.uint8))
    _png(str(test / "labels" / "c.png"), np.zeros((4, 4), np.uint8))
    with caplog.at_level("WARNING"):
        ids, paths = predict.find_images(test)
    assert ids == ["images/a", "images/b"] and paths == [test / "images" / "a.png", test / "images" / "b.png"]
    assert "skipped 3 files under masks/ or labels/" in caplog.text and "segments images only" in caplog.text
    (test / "images" / "a.png").unlink()
    (test / "images" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"lies in a masks/ or labels/ folder.*images only.*test/images"):
        predict.find_images(test)
    assert predict.find_images(test / "Masks")[0] == ["a", "b"]


def test_predict_module_points_to_the_predict_command():
    """``python -m diffseg_jax.predict`` has no command line: it fails, naming the documented command."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "diffseg_jax.predict"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    command = "--config configs/from_run.py:RUN --workdir RUN --mode predict --images PATH"
    assert f"python -m diffseg_jax.main {command}" in out.stderr
