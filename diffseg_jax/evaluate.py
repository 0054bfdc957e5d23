"""Ensemble evaluation: sample N members per test image (vmapped, jitted, sharded), mean/std maps, IoU, ECE.

Follows the EnsemDiff protocol (Wolleb et al.; author's answer in JuliaWolleb/Diffusion-based-Segmentation
issue #48): N independent reverse runs per image, the pixel-wise mean of the members thresholded at 0.5
is the segmentation, their pixel-wise spread the uncertainty map. E1 (feed-forward) models get their
members from the random noise fed in place of x_t, as in the paper (Sec. 4.1).
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging

from diffseg_jax import (
    build,
    comparison,
    configlib,
    data,
    distributed,
    metrics,
    planning,
    plots,
    restore,
    sampling,
    writers,
)


def dataset_label(data_config: ml_collections.ConfigDict) -> str:
    """The dataset's name for tables: ``isic2016``, ``monuseg2018``, the folder's name, ``synthetic-lesion``."""
    if data_config.name == "synthetic":
        return f"synthetic-{data_config.kind}"
    if data_config.name == "segmentation_folder" and data_config.get("manual_dir"):
        return folder_label(data_config.manual_dir)
    return str(data_config.name)


def trained_dataset(workdir: str) -> str | None:
    """The :func:`dataset_label` of the data the run in ``workdir`` trained on, as its ``config.json`` records
    it (None without a record)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    recorded = configlib.load(path).get("data", None)
    return dataset_label(recorded) if recorded else None


def other_trained_data(data_config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """The :func:`trained_dataset` of the run in ``workdir`` when it is not ``data_config``'s data, else None."""
    trained = trained_dataset(workdir)
    return trained if trained is not None and trained != dataset_label(data_config) else None


def _check_trained_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to evaluate into the run's own ``eval/`` on another dataset than it trained on (as its
    ``config.json`` records it): an external test set's scores would replace the run's own, which Table 1 reads,
    and a config file retyped without the training's data overrides would score the wrong data unnoticed."""
    path = os.path.join(workdir, "config.json")
    trained, this = other_trained_data(config.data, workdir), dataset_label(config.data)
    if trained is not None:
        raise configlib.ConfigError(
            f"The run in {workdir} was trained on {trained} ({path}), this config's data is {this}. For an "
            f"external test set pass --eval_dir (e.g. {workdir}/eval_{this}), so the run's own eval/ stays; to "
            f"evaluate on its own data, pass the config it was trained with (--config configs/from_run.py:{workdir})."
        )


def folder_label(path: str) -> str:
    """An image/mask folder's name for tables and cell folders: its last component (``/data/her2/`` → ``her2``;
    ``.`` → the current folder's name, as a run's ``config.json`` records the path absolute)."""
    return os.path.basename(os.path.abspath(os.path.expanduser(path)))


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    state: build.TrainState | None = None,
    compare_workdir: str | None = None,
    out_dir: str | None = None,
) -> dict:
    """Samples the ensemble for every test image and writes ``out_dir`` (default ``workdir/eval/``, or
    ``workdir/eval_step{S}/`` for ``eval.step=S``; :func:`output_dir`).

    Only the test split is read (the network is built from the config), so a trained run can be evaluated on
    an external test set: another ``config.data`` whose folder holds a ``test`` split alone, written to another
    ``out_dir`` (``--eval_dir``) so the run's own evaluation stays.

    ``state`` (e.g. the state training just ended with) defaults to the latest checkpoint in ``workdir``;
    its EMA weights are used if ``eval.use_ema`` (the EnsemDiff authors sampled with the raw weights).
    Writes ``metrics.json`` (IoU, Dice and ECE of the thresholded / raw ensemble mean, per image averaged and
    pooled over the test set; ``iou`` and ``ece`` are the ones ``eval.pooling`` names; reliability-diagram
    bins; the Brier score; in ``uncertainty``, how well the std and entropy maps point at the errors,
    ``metrics.uncertainty_report``), ``per_image.csv``, ``ensemble.npz`` (image, mask, mean, std, ids),
    ``ensemble.png`` (Fig. 1: image / ground truth / mean / std) and, for E1/E2, ``reliability.png`` (the
    reliability diagram of the ensemble mean, :func:`diffseg_jax.plots.reliability_figure`). With
    ``compare_workdir`` (an evaluated run of the other training kind, e.g. feed-forward next to diffusion),
    also ``figure1.png`` with both side by side, ``comparison.json`` and their reliability diagrams
    (:func:`diffseg_jax.comparison.write_comparison`).
    """
    config = planning.prepare(
        config, workdir, "evaluate"
    )  # the plan training used, as config.json records it
    eval_cfg = config.eval
    if out_dir is None:
        _check_trained_data(config, workdir)
    out_dir = output_dir(workdir, out_dir, eval_cfg.step)
    if compare_workdir and not os.path.exists(os.path.join(compare_workdir, "eval", "ensemble.npz")):
        raise FileNotFoundError(  # named now, not after the sampling
            f"--compare_workdir {compare_workdir} has no eval/ensemble.npz; evaluate that run first (--mode "
            "evaluate)."
        )
    test = data.eval_arrays(
        config.data, split="test", max_examples=None if eval_cfg.num_images < 0 else eval_cfg.num_images
    )
    model, schedule, step, variables = restore.trained_network(
        config, workdir, test["image"].shape[-1], state
    )
    mean, std = sampling.ensemble_maps(
        config,
        model,
        schedule,
        variables,
        test["image"],
        step,
        resume_dir=os.path.join(out_dir, "partial"),  # batches done so far: a crash loses none
        x_channels=test["image" if config.experiment == "e4" else "mask"].shape[-1],
    )

    if not distributed.is_primary():
        return {}  # A multi-host evaluation samples on every host; process 0 scores and writes.
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "experiment": config.experiment,
        "model": config.model.name,
        "dataset": dataset_label(config.data),
        "ensemble_size": eval_cfg.ensemble_size,
        "tta": eval_cfg.tta,
        "member_output": eval_cfg.member_output,
        "sampler": eval_cfg.sampler,
        "ddim_steps": eval_cfg.ddim_steps if eval_cfg.sampler == "ddim" else None,
        "ddim_eta": eval_cfg.ddim_eta if eval_cfg.sampler == "ddim" else None,
        "weights": "ema" if build.uses_ema(config) else "raw",
        "num_images": len(mean),
        "step": step,
    }
    if config.experiment in SEGMENTATION_EXPERIMENTS:
        result.update(_segmentation_results(test, mean, std, eval_cfg, out_dir))
    # Each file whole (a crash leaves the old one or none), the ensembles before metrics.json: a run whose
    # metrics.json exists is evaluated (table1 skips it), so its ensemble.npz must be there too.
    writers.save_npz_whole(
        os.path.join(out_dir, "ensemble.npz"),
        compress=True,
        image=np.round(test["image"] * 255).astype(np.uint8),
        mask=test["mask"].astype(np.uint8),
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        ids=np.asarray(test["id"]),
    )
    writers.save_json_whole(os.path.join(out_dir, "metrics.json"), result, indent=2)
    n_fig = min(eval_cfg.num_figure_images, len(mean))
    plots.ensemble_figure(
        test["image"][:n_fig],
        test["mask"][:n_fig],
        mean[:n_fig],
        std[:n_fig],
        os.path.join(out_dir, "ensemble.png"),
        generated=config.experiment == "e4",
    )
    if "reliability" in result:
        title = f"{plots.run_name(result)} · {result['dataset']}"
        plots.reliability_figure(
            [(title, [("ensemble mean", result["reliability"])])], os.path.join(out_dir, "reliability.png")
        )
    if compare_workdir:
        comparison.write_comparison([out_dir, os.path.join(compare_workdir, "eval")], out_dir, n_fig)
    shutil.rmtree(os.path.join(out_dir, "partial"), ignore_errors=True)  # everything is in out_dir now
    logging.info("evaluate: %s", json.dumps({k: v for k, v in result.items() if k != "reliability"}))
    return result


def _run_root(path: str) -> str | None:
    """The nearest folder at or above ``path`` that is a run's workdir (holds ``config.json``), or None."""
    path = os.path.realpath(path)
    while True:
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def output_dir(
    workdir: str, out_dir: str | None, step: int = -1, name: str = "eval", flag: str = "--eval_dir"
) -> str:
    """Where an evaluation of the run in ``workdir`` writes: ``out_dir`` (``--eval_dir``), else ``eval/`` for the
    latest checkpoint and ``eval_step{S}/`` for ``eval.step=S``, so that an earlier model's scores never replace
    the final model's, which Table 1 reads. An ``out_dir`` that is the workdir itself, or lies in another run's
    folder, is refused: it would mix this evaluation into that run's files (report would count it there).
    ``name`` and ``flag`` name another output's default folder and flag (``predict``, ``--predict_dir``)."""
    if out_dir is None:
        return os.path.join(workdir, name if step < 0 else f"{name}_step{step}")
    run, home = _run_root(out_dir), os.path.realpath(workdir)
    if os.path.realpath(out_dir) == home:
        raise configlib.ConfigError(
            f"{flag} {out_dir} is the run's own folder; pass a folder of its own, e.g. {workdir}/{name}_2."
        )
    if run is not None and run != home:
        raise configlib.ConfigError(
            f"{flag} {out_dir} lies in the folder of another run ({run}), whose files it would overwrite or "
            f"join; pass a folder in {workdir} (e.g. {workdir}/{name}_2) or outside any run."
        )
    return out_dir


SEGMENTATION_EXPERIMENTS = ("e1", "e2")  # E3 samples masks without the image, E4 images: no ground truth


def _uncertainty_entries(unc: dict) -> dict:
    """metrics.json's ``uncertainty`` block: per map (std, entropy) its error AUROC, UEO and image-level
    Spearman correlation with 1 − IoU."""
    return {
        "error_fraction": float(unc["error_fraction"]),
        **{
            name: {
                key: comparison.json_number(unc[f"{name}_{key}"])
                for key in ("error_auroc", "ueo", "ueo_threshold", "image_spearman")
            }
            for name in ("std", "entropy")
        },
    }


def _segmentation_results(test: dict, mean: np.ndarray, std: np.ndarray, eval_cfg, out_dir: str) -> dict:
    """metrics.json entries of a segmentation ensemble, and ``per_image.csv``."""
    truth = test["mask"] > 0.5
    report = metrics.segmentation_report(mean, truth, sampling.THRESHOLD, eval_cfg.ece_bins)
    report = jax.tree_util.tree_map(np.asarray, report)
    unc = jax.tree_util.tree_map(np.asarray, metrics.uncertainty_report(mean, std, truth, sampling.THRESHOLD))
    empty = np.zeros_like(truth)
    pooling = eval_cfg.pooling
    both = {  # per-image entries are averaged over the images
        f"{name}_{kind}": float(np.mean(report[f"{name}_{kind}"]))
        for name in ("iou", "dice", "ece", "ece_top_label")
        for kind in ("pooled", "per_image")
    }
    summary = {
        "pooling": pooling,
        "iou": both[f"iou_{pooling}"],
        "ece": both[f"ece_{pooling}"],
        **both,
        "ece_bins": eval_cfg.ece_bins,
        "threshold": sampling.THRESHOLD,
        "baseline_iou_all_foreground": float(np.mean(metrics.per_image(metrics.iou, ~empty, truth))),
        "baseline_iou_all_background": float(np.mean(metrics.per_image(metrics.iou, empty, truth))),
        "mean_std": float(std.mean()),
        "brier_pooled": float(unc["brier_pooled"]),
        "brier_per_image": float(np.mean(unc["brier_per_image"])),
        "uncertainty": _uncertainty_entries(unc),
        "reliability": {k: v.tolist() for k, v in report["reliability"].items()},
    }
    columns = {
        "iou": report["iou_per_image"],
        "dice": report["dice_per_image"],
        "ece": report["ece_per_image"],
        "ece_top_label": report["ece_top_label_per_image"],
        "true_fraction": report["true_fraction_per_image"],
        "pred_fraction": report["pred_fraction_per_image"],
        "mean_std": std.reshape(len(std), -1).mean(axis=1),
        "brier": unc["brier_per_image"],
        "std_error_auroc": unc["std_error_auroc_per_image"],  # nan: no error in the image
        "entropy_error_auroc": unc["entropy_error_auroc_per_image"],
    }
    with writers.open_whole(os.path.join(out_dir, "per_image.csv"), newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *columns])
        for i, image_id in enumerate(test["id"]):
            writer.writerow([image_id, *(f"{float(v[i]):.6f}" for v in columns.values())])
    return summary
