"""Segmenting new images with a trained run: ``--mode predict --images PATH`` (images without masks).

Each image file is read as the dataset builders read theirs (8-bit RGB; grey replicated, alpha dropped), resized
to the side the run's dataset stores (``data.resize``, else ``data.image_size``; PIL bilinear, the aspect ratio
ignored, as :mod:`diffseg_jax.data.manual` stores ISIC 2016 and the folders), cut into model-sized tiles where
``--mode evaluate`` cuts the test images (SegDiff's MoNuSeg protocol), and given the same ensemble as the
evaluation: ``eval.ensemble_size`` members (EnsemDiff's protocol, Wolleb et al.), the members' per-pixel mean
thresholded at 0.5 is the segmentation and their per-pixel standard deviation the uncertainty map. The maps are
then resized (bilinear) back to each file's own size. Batching and keys are the evaluation's (fewer inputs
than ``eval.batch_size`` are one smaller batch, not padded to a whole one: the same samples up to float
rounding): the run's test images written as files and segmented together get exactly their ensembles in
``eval/ensemble.npz``.

Writes into ``out_dir`` (``--predict_dir``; default ``<workdir>/predict``, or ``<workdir>/predict_step{S}`` for
the checkpoint of ``eval.step=S``; not the run's own folder, nor one in another run's), for the image ``<id>`` (its path under ``PATH``
without the suffix):

* ``<id>_mask.png``: the segmentation, 0/255, at the file's size;
* ``<id>_mean.png``: the foreground probability (ensemble mean) × 255, rounded, 8 bit;
* ``<id>_std.png``: the ensemble standard deviation × 510 (255 at 0.5, the largest spread of values in [0, 1]);
* ``predictions.csv``: per image its file, size, foreground fraction, mean and largest std (to rank the images
  a reader should check first); ``predictions.npz``: ids, files, original sizes and the float32 mean and std
  maps at the stored size; ``predictions.png``: image / mean / std of the first ``eval.num_figure_images``;
  ``predict.json``: the checkpoint step, weights, sampler and ensemble that made them, and the PNG scalings.

Only image-conditioned segmentation runs can segment an image: E1 (feed-forward) and E2 (diffusion). No training
data is read: the network comes from the config, and a data-driven plan (nnU-Net's, an automatic terminal noise)
from the run's ``config.json``.

Memory does not grow with the folder: ``eval.predict_chunk`` images (rounded up to whole evaluation batches) are
read, sampled and written at a time. Each finished chunk's maps (8 bytes a pixel at the stored size) and csv rows
are kept in ``out_dir/partial`` (``diffseg_jax.batch_store``, as evaluation keeps its batches) and
``predictions.npz`` is streamed from them at the end; the batches of an unfinished chunk are kept there too, so a
rerun after a crash samples only the rest. The chunking does not change the samples.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import time
import zipfile

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from diffseg_jax import (
    auto_batch,
    batch_store,
    build,
    data,
    distributed,
    evaluate,
    metrics,
    planning,
    plots,
    restore,
    sampling,
    writers,
)
from diffseg_jax.data import files

STD_SCALE = 510.0  # std in [0, 0.5] -> [0, 255] in <id>_std.png
# Folders of masks in a dataset's layout (diffseg_jax.data.segmentation_folder reads <split>/masks; labels/ is
# the other common name), in any case: --images on a dataset folder segments its images, not its masks.
MASK_FOLDERS = ("masks", "labels")


def find_images(
    path: str | os.PathLike, exclude: str | os.PathLike | None = None
) -> tuple[list[str], list[pathlib.Path]]:
    """(ids, files) of the images at ``path``: one image file, or every image under a folder (recursively) but
    those under ``exclude`` (the output folder, when it lies inside: a rerun must not segment its own outputs)
    and those under a ``masks/`` or ``labels/`` folder below ``path`` (``MASK_FOLDERS``: a dataset folder's
    ground truth, which is no image to segment; skipped with a warning).

    An id is the file's path under the folder without its suffix (``case1/slice03``), or the file's stem.
    """
    root = pathlib.Path(os.path.expanduser(str(path)))
    suffixes = ", ".join(files.IMAGE_SUFFIXES)
    if root.is_file():
        if not root.name.lower().endswith(files.IMAGE_SUFFIXES):
            raise files.DatasetFileError(
                f"{root} is not an image file ({suffixes}); pass an image or a folder."
            )
        return [root.stem], [root]
    if not root.is_dir():
        raise files.DatasetFileError(
            f"--images {root} does not exist; pass an image file or a folder of images."
        )
    found = files.find_files(root)
    if exclude is not None:
        skip = pathlib.Path(os.path.expanduser(str(exclude))).resolve()
        found = [p for p in found if not p.resolve().is_relative_to(skip)]
    masks = [p for p in found if any(part.lower() in MASK_FOLDERS for part in p.relative_to(root).parts[:-1])]
    if masks:
        skipped = set(masks)
        found = [p for p in found if p not in skipped]
        if not found:
            mask_dir = next(q for q in masks[0].parents if q.name.lower() in MASK_FOLDERS)
            images_dir = mask_dir.parent / "images"
            hint = images_dir if images_dir.is_dir() else "the dataset's images/ folder"
            raise files.DatasetFileError(
                f"Every image file under {root} ({len(masks)}, e.g. {masks[0]}) lies in a masks/ or labels/ "
                f"folder, and predict segments images only, not masks; pass the folder of the images: {hint}."
            )
        logging.warning(
            "predict: skipped %d files under masks/ or labels/ folders of %s (e.g. %s): predict segments "
            "images only, not masks (pass the images/ folder to search it alone).",
            len(masks),
            root,
            masks[0],
        )
    if not found:
        raise files.DatasetFileError(
            f"No image files ({suffixes}) under {root}; pass the folder that holds the images to segment."
        )
    ids = [p.relative_to(root).with_suffix("").as_posix() for p in found]
    seen: dict[str, pathlib.Path] = {}
    for image_id, p in zip(ids, found):
        if image_id in seen:
            raise files.DatasetFileError(
                f"{seen[image_id]} and {p} would write the same outputs ({image_id}_mask.png); "
                "rename one of them or move it to another folder."
            )
        seen[image_id] = p
    return ids, found


def read_inputs(paths: list[pathlib.Path], size: int, scaling: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """float32 (N, size, size, 3) images in [0, 1] as the builders store and ``data.preprocess`` scales them
    (``scaling``: ``config.data.image_scaling``, see ``files.read_image``), and the files' (H, W)."""
    images, shapes = [], []
    for p in paths:
        image = files.read_image(p, scaling)
        shapes.append(image.shape[:2])
        images.append(files.resize_image(image, size).astype(np.float32) / 255.0)
    return np.stack(images), np.asarray(shapes, np.int32)


def resize_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float (S, S) map resized to (H, W) bilinearly (PIL's 32-bit float mode: no 8-bit rounding)."""
    if values.shape == tuple(shape):
        return values.astype(np.float32)
    image = Image.fromarray(np.asarray(values, np.float32), mode="F")
    return np.asarray(image.resize((int(shape[1]), int(shape[0])), Image.BILINEAR), np.float32)


def _save_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _progress_id(config, step, variables, paths, size, chunk, batch) -> dict:
    """What identifies a prediction's finished chunks: the sampling, the weights, the files (path, bytes, mtime),
    how they are read and the chunking; as it reads back from JSON."""
    stats = [p.stat() for p in paths]
    run_id = {
        "sampling": sampling.sampling_id(config, step),
        "weights": sampling.weights_digest(variables),
        "files": [[str(p), st.st_size, st.st_mtime_ns] for p, st in zip(paths, stats)],
        "stored_size": size,
        "image_scaling": config.data.image_scaling,
        "chunk": chunk,
        "batch_size": batch,
    }
    return json.loads(json.dumps(run_id, default=repr))


def _save_npz(path: str, arrays: dict, chunks: batch_store.BatchStore, num_chunks: int, shape: tuple) -> None:
    """``predictions.npz``: ``arrays`` and the float32 ``mean`` and ``std`` maps of every image, ``shape`` (N, S, S),
    streamed from the finished chunks one at a time (memory holds one chunk), compressed, written whole. It is
    the file ``np.savez_compressed`` writes."""
    tmp = path + ".tmp.npz"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": shape,
        }
        for name in ("mean", "std"):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for c in range(num_chunks):
                    f.write(np.ascontiguousarray(chunks.load(c)[name], np.float32).tobytes())
    os.replace(tmp, path)


def _chunk_rows(chunks: batch_store.BatchStore, done: int) -> list[dict]:
    """The csv rows of the first ``done`` finished chunks."""
    return [row for c in range(done) for row in json.loads(str(chunks.load(c)["rows"]))]


def _write_outputs(out_dir, ids, paths, shapes, mean, std) -> list[dict]:
    """The PNGs of some images (maps at the stored size, resized to each file's (H, W)), and their csv rows."""
    rows = []
    for image_id, path, shape, m, s in zip(ids, paths, shapes, mean, std):
        m, s = resize_map(m, shape), resize_map(s, shape)
        base = os.path.join(out_dir, image_id)
        _save_png(base + "_mask.png", ((m > sampling.THRESHOLD) * 255).astype(np.uint8))
        _save_png(base + "_mean.png", np.round(np.clip(m, 0, 1) * 255).astype(np.uint8))
        _save_png(base + "_std.png", np.round(np.clip(s * STD_SCALE, 0, 255)).astype(np.uint8))
        rows.append(
            {
                "id": image_id,
                "file": str(path),
                "height": int(shape[0]),
                "width": int(shape[1]),
                "foreground_fraction": float(np.mean(m > sampling.THRESHOLD)),
                "mean_std": float(np.mean(s)),
                "max_std": float(np.max(s)),
                # Total predictive uncertainty (binary entropy of the mean, bits): on ISIC it ranks DDPM-sampled
                # diffusion ensembles' failed images better than their std does (README, image-level ρ).
                "mean_entropy": float(np.mean(metrics.binary_entropy(m))),
            }
        )
    return rows


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: str,
    out_dir: str | None = None,
    state: build.TrainState | None = None,
) -> list[dict]:
    """Segments every image at ``images`` (a file or a folder) with the run in ``workdir``; see the module doc.

    ``state`` defaults to the latest checkpoint in ``workdir`` (its EMA weights if ``build.uses_ema``). Returns the
    rows of ``predictions.csv``.
    """
    if config.experiment not in evaluate.SEGMENTATION_EXPERIMENTS:
        raise ValueError(
            f"--mode predict segments images given the image, which experiment {config.experiment!r} does not "
            "(E3 samples masks without the image, E4 generates images); use an e1 or e2 run."
        )
    config = planning.prepare(config, workdir, "predict")  # the plan training used, as config.json records it
    out_dir = evaluate.output_dir(workdir, out_dir, config.eval.step, "predict", "--predict_dir")
    ids, paths = find_images(images, exclude=out_dir)
    num, size = len(ids), data.stored_size(config.data)
    # The run's network from its config alone (no training data), for the RGB the files are read as.
    model, schedule, step, variables = restore.trained_network(config, workdir, 3, state)
    tiles = sampling.tiles_per_image(config.data)
    ensemble = sampling.ensemble_fn(config, model, schedule)  # one compilation for every chunk
    eval_batch = config.eval.batch_size
    if eval_batch == auto_batch.AUTO_BATCH:  # chosen from the device's memory for this many tiles
        crop = config.data.image_size
        eval_batch = auto_batch.auto_batch_size(
            ensemble, variables, (crop, crop, 3), (crop, crop, 1), num * tiles, "predict"
        )
    # A few files are one smaller batch, not padded to a whole evaluation batch. Chunks are whole batches, so
    # chunk c's first batch has the index the evaluation gives it: the same keys, the same samples (with an
    # explicit eval.batch_size; an automatic one follows the number of inputs and the memory free).
    batch = min(eval_batch, num * tiles)
    chunk = -(-config.eval.predict_chunk // eval_batch) * eval_batch
    num_chunks = -(-num // chunk)
    partial = os.path.join(out_dir, "partial")
    # Finished chunks (their maps and csv rows), and inside the unfinished one its finished batches: one store.
    chunks = batch_store.BatchStore(
        os.path.join(partial, "chunks"), _progress_id(config, step, variables, paths, size, chunk, batch)
    )
    done = chunks.open()
    rows = [] if not distributed.is_primary() else _chunk_rows(chunks, done)
    logging.info("predict: %d images from %s into %s.", num, images, out_dir)
    if done:
        logging.info(
            "predict: resuming after %d of %d images, read from %s.", min(num, done * chunk), num, partial
        )
    scaling = config.data.image_scaling  # as the run's images were read
    t0 = time.time()
    for c in range(done, num_chunks):
        first, last = c * chunk, min(num, (c + 1) * chunk)
        inputs, shapes = read_inputs(paths[first:last], size, scaling)
        mean, std = sampling.ensemble_maps(
            config,
            model,
            schedule,
            variables,
            inputs,
            step,
            resume_dir=os.path.join(partial, "batches"),
            what="predict" if num_chunks == 1 else f"predict (images {first + 1}-{last} of {num})",
            batch_size=batch,
            first_batch=first * tiles // batch,
            ensemble=ensemble,
        )
        if not distributed.is_primary():
            continue  # every host samples; process 0 writes
        new_rows = _write_outputs(
            out_dir, ids[first:last], paths[first:last], shapes, mean[..., 0], std[..., 0]
        )
        chunks.save(c, mean=mean[..., 0], std=std[..., 0], rows=np.asarray(json.dumps(new_rows)))
        rows += new_rows
        if num_chunks > 1:
            rate = (last - done * chunk) / (time.time() - t0)
            logging.info(
                "predict: %d/%d images written, ETA %s",
                last,
                num,
                writers.format_duration((num - last) / rate),
            )
    if not distributed.is_primary():
        return []
    with writers.open_whole(os.path.join(out_dir, "predictions.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    arrays = {
        "ids": np.asarray(ids),
        "files": np.asarray([str(p) for p in paths]),
        "original_size": np.asarray([[r["height"], r["width"]] for r in rows], np.int32),
    }
    _save_npz(os.path.join(out_dir, "predictions.npz"), arrays, chunks, num_chunks, (num, size, size))
    n_fig = min(config.eval.num_figure_images, num)
    first_chunks = [chunks.load(c) for c in range(-(-n_fig // chunk))]
    plots.ensemble_figure(
        read_inputs(paths[:n_fig], size, scaling)[0],
        None,
        np.concatenate([saved["mean"] for saved in first_chunks])[:n_fig],
        np.concatenate([saved["std"] for saved in first_chunks])[:n_fig],
        os.path.join(out_dir, "predictions.png"),
    )
    record = {
        "workdir": os.path.abspath(workdir),
        "images": os.path.abspath(os.path.expanduser(images)),
        "num_images": num,
        "experiment": config.experiment,
        "model": config.model.name,
        "step": step,
        "weights": "ema" if build.uses_ema(config) else "raw",
        "ensemble_size": config.eval.ensemble_size,
        "tta": config.eval.tta,
        "member_output": config.eval.member_output,
        "sampler": config.eval.sampler,
        "ddim_steps": config.eval.ddim_steps if config.eval.sampler == "ddim" else None,
        "stored_size": size,
        "threshold": sampling.THRESHOLD,
        "mean_png": "probability x 255",
        "std_png": f"std x {STD_SCALE:g}",
    }
    writers.save_json_whole(os.path.join(out_dir, "predict.json"), record, indent=2)
    shutil.rmtree(partial, ignore_errors=True)  # everything is written
    logging.info("predict: wrote masks, mean and std maps of %d images to %s.", num, out_dir)
    return rows


if __name__ == "__main__":
    raise SystemExit(
        "diffseg_jax.predict has no command line of its own; segment images with a trained run by\n  "
        "python -m diffseg_jax.main --config configs/from_run.py:RUN --workdir RUN --mode predict --images PATH"
        "\n(RUN: the run's workdir; PATH: an image file or a folder of images; see README, Modes and their "
        "outputs)."
    )
