"""The fingerprint-adaptive diffusion experiment: E2 with uniform t vs each adaptive variant, several seeds.

  python -m diffseg_jax.analysis.adaptive_study --out runs/adaptive --workers 2

For each dataset (the three synthetic fingerprints and, when ``--monuseg_dir`` holds them, the real MoNuSeg tiles)
and each variant of :data:`VARIANTS`, trains a small EnsemDiff for ``--steps`` steps with every seed, and at every
``--eval_every`` steps samples a DDIM ensemble for the evaluation images and scores IoU and ECE of its mean
(pooled over pixels, as ``eval.pooling='pooled'``). Same data order, initialisation and evaluation noise for
every variant of a seed: only the timestep handling differs. One result file per (dataset, variant, seed) is
written as soon as it is done (``runs/*.npz``; a rerun skips what exists), then the study is summarised into
``<out>/analysis/``: ``adaptive_study.{csv,npz}`` (every evaluation), ``adaptive_study.md`` (final IoU and ECE,
mean ± sd over seeds, and each dataset's fingerprint report: the information left at T and the terminal ᾱ it
asks for) and ``adaptive_study.png`` (IoU and ECE against training steps, mean ± sd).

The ``adapted`` variant (terminal ᾱ chosen from the masks) is trained only where it changes the schedule; where
the base schedule already converges its results are the baseline's, and the report says so.

The arguments are checked before any work (every option by name, and :func:`validation.validate` on each study
config). Each result file records the settings that shape it (:data:`RESULT_SETTINGS`: ``--steps``,
``--eval_every``, ``--image_size``, ``--eval_images``); a rerun on an ``--out`` whose results were made with other
settings is refused before training, naming the files and the differences, rather than mixing them into one
report or silently overwriting them: pass the same settings, another ``--out``, or delete those files to
recompute them. (A result file of an older version without the record is checked by what its evaluation steps
tell: ``--steps`` and ``--eval_every``.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffseg_jax import (
    adaptive,
    build,
    configlib,
    data,
    defaults,
    metrics,
    planning,
    sampling,
    train,
    validation,
    workers,
    writers,
)
from diffseg_jax.analysis import adaptive_summary

SYNTHETIC = ("lesion", "nuclei", "clusters")
MONUSEG = "monuseg"
DEFAULT_MONUSEG = os.path.join("..", "shared", "data", "monuseg2018_512")
# The options a result file depends on (besides dataset, variant and seed, which its name holds).
RESULT_SETTINGS = ("steps", "eval_every", "image_size", "eval_images")


def study_config(
    dataset: str, variant: str, seed: int, steps: int, image_size: int = 32, monuseg_dir: str | None = None
) -> ml_collections.ConfigDict:
    """The E2 config of one run: a 32-channel, 3-level EnsemDiff (no attention), T = 100, plain ε-MSE, Adam
    5e-4, batch 8, EMA 0.99 (sampled with it), 5-member DDIM-10 ensembles on 16 evaluation images."""
    c = defaults.get_config("ensemdiff,tiny")
    c.experiment = "e2"
    c.seed = seed
    c.objective.loss = "eps_mse"
    c.model.update(channel_mult=(1, 1, 2), attention_resolutions=())
    c.diffusion.num_timesteps = 100
    c.data.image_size = image_size
    if dataset == MONUSEG:
        # The real tiles stored at 4 x the model size (128 px for 32 px crops: nuclei a few pixels wide), cut into
        # model-sized tiles for evaluation.
        c.data.update(
            name="segmentation_folder",
            manual_dir=monuseg_dir,
            resize=4 * image_size,
            augment_flips=True,
            eval_tiling="tiles",
        )
    else:
        c.data.update(name="synthetic", kind=dataset, num_train=512, num_test=16)
    c.train.update(num_steps=steps, batch_size=8, lr=5e-4, ema_decay=0.99, log_every=50, ckpt_every=steps)
    c.eval.update(use_ema=True, ensemble_size=5, sampler="ddim", ddim_steps=10, member_chunk=5)
    for key, value in adaptive_summary.VARIANTS[variant].items():
        group, name = key.split(".")
        c[group][name] = value
    return c


def evaluation_images(config: ml_collections.ConfigDict, num: int = 16) -> dict[str, np.ndarray]:
    """``num`` model-sized test images and masks, evenly spaced over all test tiles (all when fewer)."""
    arrays = data.model_sized_arrays(config.data, "test")
    idx = np.unique(
        np.linspace(0, len(arrays["image"]) - 1, min(num, len(arrays["image"]))).round().astype(int)
    )
    return {k: v[idx] for k, v in arrays.items()}


def run_variant(dataset: str, variant: str, seeds: Sequence[int], args: argparse.Namespace, out: str) -> None:
    """Trains and evaluates every seed of one (dataset, variant), writing ``runs/<dataset>_<variant>_s<seed>.npz``."""
    step_fn = ensemble = tables = None
    for seed in seeds:
        path = os.path.join(out, "runs", f"{dataset}_{variant}_s{seed}.npz")
        if os.path.exists(path):
            print(f"[{dataset}/{variant}/s{seed}] done before: {path}", flush=True)
            continue
        config = planning.resolve(
            study_config(dataset, variant, seed, args.steps, args.image_size, args.monuseg_dir)
        )
        train_ds, model, schedule, optimizer, state = build.setup(config)
        if step_fn is None:  # one compilation per (dataset, variant): the seeds share shapes and tables
            tables = adaptive.training_tables(config, schedule)
            step_fn = jax.jit(train.make_train_step(model, optimizer, schedule, config, tables))
            member = sampling.make_member_fn(model, schedule, config)
            ensemble = sampling.make_ensemble_fn(member, config.eval.ensemble_size, config.eval.member_chunk)
            test = evaluation_images(config, args.eval_images)
        rows, losses, t0 = [], [], time.time()
        eval_key = jax.random.PRNGKey(1000 + seed)
        for step in range(args.steps):
            batch = {k: jnp.asarray(v) for k, v in train_ds[step].items() if k != "id"}
            state, m = step_fn(state, batch)
            losses.append(m["loss"])
            done = step + 1
            if done % args.eval_every == 0 or done == args.steps:
                variables = {"params": state.ema_params, **state.model_state}
                stats = ensemble(
                    variables, jnp.asarray(test["image"]), jnp.zeros(test["mask"].shape), eval_key
                )
                report = metrics.segmentation_report(stats["mean"], jnp.asarray(test["mask"]))
                rows.append(
                    (
                        done,
                        float(report["iou_pooled"]),
                        float(report["ece_pooled"]),
                        float(jnp.mean(report["iou_per_image"])),
                        float(jnp.mean(report["ece_per_image"])),
                    )
                )
                print(
                    f"[{dataset}/{variant}/s{seed}] step {done}/{args.steps}  iou {rows[-1][1]:.4f}  "
                    f"ece {rows[-1][2]:.4f}  {time.time() - t0:.0f} s",
                    flush=True,
                )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        arr = np.asarray(rows)
        writers.save_npz_whole(  # a crash never leaves half a result
            path,
            steps=arr[:, 0].astype(np.int32),
            iou=arr[:, 1],
            ece=arr[:, 2],
            iou_per_image=arr[:, 3],
            ece_per_image=arr[:, 4],
            loss=np.asarray(jax.device_get(losses), np.float32),
            alpha_bar_T=float(schedule.alphas_cumprod[-1]),
            settings=json.dumps(result_settings(args)),
            weights=np.zeros(0) if tables["weights"] is None else tables["weights"],
            seconds=time.time() - t0,
        )


def result_settings(args: argparse.Namespace) -> dict[str, int]:
    """The :data:`RESULT_SETTINGS` of a run of the study, as recorded in each result file."""
    return {k: int(getattr(args, k)) for k in RESULT_SETTINGS}


def stored_settings(path: str) -> dict[str, int]:
    """The settings a result file was made with; for a file without the record, those its steps tell."""
    with np.load(path) as f:
        if "settings" in f.files:
            return json.loads(str(f["settings"]))
        steps = [int(x) for x in f["steps"]]
    known = {"steps": steps[-1]}
    if len(steps) > 1:
        known["eval_every"] = steps[0]
    return known


def check_results(out: str, datasets, seeds, args: argparse.Namespace) -> None:
    """Refuses (``SystemExit``) result files under ``out`` made with other :data:`RESULT_SETTINGS` than ``args``'s:
    a rerun would skip them as done and report them beside results of these settings."""
    want = result_settings(args)
    stale = []
    for d in datasets:
        for v in adaptive_summary.VARIANTS:
            for s in seeds:
                path = os.path.join(out, "runs", f"{d}_{v}_s{s}.npz")
                if os.path.exists(path):
                    have = stored_settings(path)
                    diff = {
                        k: (have[k], want[k]) for k in RESULT_SETTINGS if k in have and have[k] != want[k]
                    }
                    if diff:
                        stale.append(
                            f"{path} ("
                            + ", ".join(f"--{k}={a} there, {b} now" for k, (a, b) in diff.items())
                            + ")"
                        )
    if stale:
        raise SystemExit(
            f"Error: {len(stale)} result files in {out} were made with other settings: {'; '.join(stale[:4])}"
            f"{' ...' if len(stale) > 4 else ''}. Pass the settings they were made with, another --out, or "
            f"delete {os.path.join(out, 'runs')} to recompute them."
        )


def checked_args(args: argparse.Namespace) -> tuple[list[str], list[str], list[int]]:
    """(datasets, variants, seeds) of the command line, every option checked before any work: a mistake is one
    message (``SystemExit``) naming the option, not a traceback after hours of training."""
    known = SYNTHETIC + (MONUSEG,)
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in datasets if d not in known]
    if unknown or not datasets:
        raise SystemExit(
            f"Error: --datasets={args.datasets!r}: unknown {unknown}; choose from {list(known)}."
        )
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in adaptive_summary.VARIANTS]
    if unknown or not variants:
        raise SystemExit(
            f"Error: --variants={args.variants!r}: unknown {unknown}; choose from {list(adaptive_summary.VARIANTS)}."
        )
    for option in ("steps", "eval_every", "eval_images", "image_size", "workers"):
        if getattr(args, option) < 1:
            raise SystemExit(f"Error: --{option}={getattr(args, option)}: use a positive integer.")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(
            f"Error: --seeds={args.seeds!r}: give integers separated by commas, e.g. --seeds=0,1,2."
        ) from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"Error: --seeds={args.seeds!r} repeats a seed; give each once.")
    try:
        index, count = (int(x) for x in args.shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise SystemExit(f"Error: --shard={args.shard!r}: give i/n with 0 <= i < n, e.g. 0/1.") from None
    if MONUSEG in datasets and not os.path.isdir(args.monuseg_dir):
        print(f"Skipping MoNuSeg: no folder {args.monuseg_dir} (pass --monuseg_dir).", flush=True)
        datasets.remove(MONUSEG)
    if not datasets:
        raise SystemExit(
            f"Error: no dataset left to study (--datasets={args.datasets!r}; MoNuSeg needs its folder, "
            f"--monuseg_dir={args.monuseg_dir!r}). Pass the MoNuSeg folder, or a synthetic dataset of {list(SYNTHETIC)}."
        )
    for d in datasets:
        for v in variants:
            config = study_config(d, v, seeds[0], args.steps, args.image_size, args.monuseg_dir)
            try:
                validation.validate(config)
            except configlib.ConfigError as e:
                raise SystemExit(
                    f"Error: the study's config of {d}/{v} (--image_size={args.image_size}, --steps={args.steps}) "
                    f"cannot work: {e}"
                ) from None
    return datasets, variants, seeds


def fingerprint_reports(datasets: Sequence[str], args: argparse.Namespace) -> dict[str, dict]:
    """Per dataset: the base schedule's convergence and the terminal ᾱ the adapted variant uses."""
    out = {}
    for dataset in datasets:
        config = study_config(dataset, "adapted", 0, args.steps, args.image_size, args.monuseg_dir)
        masks = adaptive.training_masks(config.data, config.timesteps.num_masks)
        _, report = adaptive.adapted_schedule(
            masks,
            jax.random.PRNGKey(0),
            num_timesteps=config.diffusion.num_timesteps,
            tol=config.diffusion.terminal_tol,
        )
        report["foreground_rate"] = float(masks.mean())
        report["image_size"] = args.image_size
        out[dataset] = report
    return out


def cached_reports(path: str, datasets: Sequence[str], args: argparse.Namespace) -> dict[str, dict]:
    """The fingerprint reports of ``datasets``, read from ``path`` where it has them at this image size and
    computed (and added to ``path``) for the rest, so a rerun with another dataset or size is not stale."""
    reports = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            reports = json.load(f)
    missing = [d for d in datasets if reports.get(d, {}).get("image_size") != args.image_size]
    if missing:
        reports.update(fingerprint_reports(missing, args))
        writers.save_json_whole(path, reports, indent=2)
    return {d: reports[d] for d in datasets}


def tasks(datasets: Sequence[str], reports: dict[str, dict]) -> list[tuple[str, str]]:
    """(dataset, variant) pairs to train: 'adapted' only where it moves the terminal ᾱ."""
    return [
        (d, v)
        for d in datasets
        for v in adaptive_summary.VARIANTS
        if v != "adapted"
        or not np.isclose(reports[d]["alpha_bar_T"], reports[d]["base_alpha_bar_T"], rtol=1e-3)
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/adaptive", help="output folder (results in OUT/analysis/)")
    parser.add_argument("--datasets", default=",".join(SYNTHETIC + (MONUSEG,)))
    parser.add_argument(
        "--variants",
        default=",".join(adaptive_summary.VARIANTS),
        help=f"any of {list(adaptive_summary.VARIANTS)}",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--eval_every", type=int, default=80)
    parser.add_argument("--eval_images", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument(
        "--monuseg_dir", default=DEFAULT_MONUSEG, help="MoNuSeg train/ and test/ image+mask folders"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes, each pinned to one CPU core")
    parser.add_argument(
        "--shard", default="0/1", help="i/n: run every n-th task from the i-th (workers set it)"
    )
    args = parser.parse_args(argv)
    datasets, variants, seeds = checked_args(args)  # before any work
    check_results(args.out, datasets, seeds, args)
    os.makedirs(args.out, exist_ok=True)
    reports = cached_reports(os.path.join(args.out, "fingerprints.json"), datasets, args)
    todo = [t for t in tasks(datasets, reports) if t[1] in variants]
    if args.workers > 1 and args.shard == "0/1":
        shares = [
            [f"{d} {v}" for d, v in workers.shard_runs(todo, i, args.workers)] for i in range(args.workers)
        ]
        command_line = list(sys.argv[1:] if argv is None else argv)
        codes = workers.run_processes(
            "diffseg_jax.analysis.adaptive_study", command_line, args.out, [len(s) for s in shares]
        )
        message = workers.failures(args.out, codes, shares, command="adaptive_study")
        if message:
            raise SystemExit(message)
    else:
        index, count = workers.parse_shard(args.shard)  # checked_args has refused a bad one
        failed = []
        for dataset, variant in workers.shard_runs(todo, index, count):
            if count == 1:
                run_variant(dataset, variant, seeds, args, args.out)
                continue
            try:
                run_variant(dataset, variant, seeds, args, args.out)
            except Exception:  # noqa: BLE001 — the worker goes on with its other variants; the parent names this one
                traceback.print_exc()
                failed.append(f"{dataset} {variant}")
        if count > 1:
            workers.record_failures(args.out, index, count, failed)
            if failed:
                raise SystemExit(f"adaptive_study worker {index}/{count}: {len(failed)} failed: {failed}")
            return {}
    return adaptive_summary.summarise(args.out, datasets, seeds, reports, variants)


if __name__ == "__main__":
    main()
