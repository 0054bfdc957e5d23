"""The network's mask prediction error at the highest timesteps against the predict-the-mean limit, per kept step
(issue 32): ``python -m diffseg_jax.analysis.late_error --runs CELL... [--steps 1000,2000]``.

At t = T - 1 the noisy mask x_t carries almost nothing of the mask, so an E2 (or E3) network that uses its image
predicts the mask from the image alone, while an estimator of the mask from x_t alone can do no better than the
training masks' foreground rate: its error on the test masks is the model-free curve
(:func:`diffseg_jax.diffusion.model_free.model_free_curve`, the analyses' model-free fingerprint) at T - 1 with
the *training* masks' rate as its prior, which tends to ``rate_test (1 - rate_test) + (rate_train - rate_test)²``
(the error of predicting the training rate at every pixel) as ᾱ → 0. A network above that line has not yet learnt
what the mean predictor knows; after 1,000 steps the ε-target EnsemDiff on ISIC was.

For each kept step of a run (:func:`write_point`, called by ``diffseg_jax.table1`` for every step of
``table.eval_steps`` of an E2/E3 cell, or by this command line for kept steps of an existing run, without
training or sampling anything) the error of :func:`diffseg_jax.analysis.run.network_curves` with the step's
weights (``eval.step``; EMA or raw as ``eval.use_ema`` says) and the limit are taken at :func:`late_timesteps` (the
last 10 % of T on a coarse grid, T - 1 included) over the test images the evaluation scores (``eval.num_images``),
with ``analysis.num_draws`` noise draws each and ``analysis.seed``; they are stored in
``<run>/learning_curve/step<S>_mask_error.json`` (skipped when present, so reruns resume), which
:func:`diffseg_jax.learning_curves.collect_learning_curves` adds to the learning curves (``mask_error_T``,
``mean_limit_T``).
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffseg_jax import (
    build,
    checkpoints,
    cli,
    configlib,
    data,
    defaults,
    evaluate,
    learning_curves,
    planning,
    writers,
)
from diffseg_jax.analysis import run
from diffseg_jax.diffusion import model_free

LATE_FRACTION, LATE_POINTS = 0.1, 5


def late_timesteps(
    num_timesteps: int, fraction: float = LATE_FRACTION, points: int = LATE_POINTS
) -> np.ndarray:
    """``points`` timesteps evenly over the last ``fraction`` of T, the last one T - 1 (e.g. 900, 925, 950, 974,
    999 for T = 1000)."""
    first = num_timesteps - max(1, round(fraction * num_timesteps))
    return np.unique(np.round(np.linspace(first, num_timesteps - 1, points)).astype(int))


def mean_limit(
    schedule,
    test_masks: np.ndarray,
    train_masks: np.ndarray,
    ts: np.ndarray,
    key: jax.Array,
    *,
    mask_range: str = "symmetric",
    num_draws: int = 1,
) -> dict[str, np.ndarray | float]:
    """The model-free curve of ``test_masks`` at ``ts`` with the training masks' foreground rate as its prior
    (the best estimator of the mask from x_t alone that knows what training showed), and both rates."""
    rate_train = float(np.mean(train_masks))
    curve = model_free.model_free_curve(
        schedule,
        jnp.asarray(test_masks, jnp.float32),
        jnp.asarray(ts),
        key,
        num_draws=num_draws,
        foreground_rate=rate_train,
        mask_range=mask_range,
    )
    return dict(
        mean_limit=np.asarray(curve["mask_error"]),
        rate_train=rate_train,
        rate_test=float(np.mean(test_masks)),
    )


def point_path(workdir: str, step: int) -> str:
    """``<workdir>/learning_curve/step<S>_mask_error.json``."""
    return os.path.join(workdir, learning_curves.CURVE_DIR, f"step{step}{learning_curves.MASK_ERROR_SUFFIX}")


def write_point(config: ml_collections.ConfigDict, workdir: str, step: int) -> str | None:
    """Writes :func:`point_path` for the run in ``workdir`` at its kept ``step`` (see the module docstring);
    returns the path, or None when it was there already or the experiment has no mask prediction (E1, E4)."""
    path = point_path(workdir, step)
    curve = run.mask_error_curve(config)  # a Bernoulli run's: the error under its own noise
    if os.path.exists(path) or curve is None:
        return None
    c = copy.deepcopy(config)
    c.eval.step = step
    c = planning.prepare(c, workdir, "analyse")  # the terminal noise and plan training used
    schedule = build.build_schedule(c.diffusion)
    ts = late_timesteps(schedule.num_timesteps)
    n = None if c.eval.num_images < 0 else c.eval.num_images
    test = data.model_sized_arrays(c.data, "test", n)
    key = jax.random.PRNGKey(c.analysis.seed)
    values, got = run.network_curves(c, workdir, test, ts, key)
    limit = mean_limit(
        schedule,
        test["mask"],
        data.model_sized_arrays(c.data, "train")["mask"],
        ts,
        key,
        mask_range=c.diffusion.mask_range,
        num_draws=c.analysis.num_draws,
    )
    record = dict(
        step=got,
        model=c.model.name,
        experiment=c.experiment,
        dataset=evaluate.dataset_label(c.data),
        num_timesteps=schedule.num_timesteps,
        t=[int(t) for t in ts],
        mask_error=[float(v) for v in values[curve]],
        mean_limit=[float(v) for v in limit["mean_limit"]],
        rate_train=limit["rate_train"],
        rate_test=limit["rate_test"],
        num_images=len(test["mask"]),
        num_draws=int(c.analysis.num_draws),
        ema=bool(build.uses_ema(c)),
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writers.save_json_whole(path, record, indent=1)
    logging.info(
        "late_error: %s step %d: mask error at t=%d %.4f, predict-the-mean limit %.4f",
        workdir,
        got,
        ts[-1],
        record["mask_error"][-1],
        record["mean_limit"][-1],
    )
    return path


def kept_steps(workdir: str) -> list[int]:
    """The steps whose checkpoints ``workdir/checkpoints`` holds (finished saves only)."""
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return list(ckpt.all_steps())
    finally:
        ckpt.close()


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded, merged onto today's defaults (as ``configs/from_run.py`` reads it)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {workdir!r} is not a trained run's folder (--mode train writes config.json)."
        )
    recorded = configlib.load(path)
    return configlib.load_onto(defaults.get_config(recorded.model.name), recorded, path)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """``python -m diffseg_jax.analysis.late_error --runs CELL... [--steps S,...] [--every N]``: the points of
    every kept step (or those listed / multiples of ``--every``) of each run, without training; returns the paths
    written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", required=True, help="trained E2/E3 run folders (with config.json)"
    )
    parser.add_argument("--steps", default="", help="comma-separated kept steps (default: every kept step)")
    parser.add_argument("--every", type=int, default=0, help="only kept steps that are multiples of this")
    args = parser.parse_args(argv)
    try:
        listed = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--steps {args.steps!r}: give comma-separated integers, e.g. --steps 1000,2000.")
    written = []
    for workdir in args.runs:
        config = cli.reporting_user_errors(lambda w=workdir: run_config(w))
        kept = kept_steps(workdir)
        missing = sorted(set(listed) - set(kept))
        if missing:
            raise SystemExit(f"{workdir} kept no checkpoint at steps {missing}; it holds {kept}.")
        steps = [s for s in kept if (not listed or s in listed) and (args.every <= 0 or s % args.every == 0)]
        for step in steps:
            path = write_point(config, workdir, step)
            if path:
                written.append(path)
        for step in steps:
            r = learning_curves.read_mask_error(point_path(workdir, step))
            if r is not None:
                print(
                    f"{workdir} step {step}: mask error at T-1 {r['mask_error_T']:.4f}, limit {r['mean_limit_T']:.4f}"
                )
    return written


if __name__ == "__main__":
    writers.quiet_libraries()
    logging.set_verbosity(logging.INFO)
    main()
