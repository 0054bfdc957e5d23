"""``--mode analyse``: the analyses named in ``config.analysis.analyses`` for one run, as arrays and figures.

Writes into ``<workdir>/analysis/``:

* ``curves.csv`` / ``curves.npz`` (t, value, curve, model, experiment, dataset, step): the trained network's
  mask prediction error (E2, E3) and eps loss (E2, E4) at every t of the grid, averaged over the first
  ``num_images`` test images and ``num_draws`` noise draws each (needs a checkpoint in the workdir);
* ``model_free.csv`` / ``.npz``: the training-free fingerprint of the test masks (see ``model_free``), and
  ``convergence.json``: whether it has converged by t = T-1 under the run's schedule (information left at T) and
  the terminal ᾱ at which it would (``diffseg_jax.analysis.adaptive``);
* ``forward.npz``: the forward process of the first test image and mask at ``forward_timesteps`` (Fig. 2);
* ``curves.png``, ``model_free.png``, ``forward.png``: drawn from those arrays by ``diffseg_jax.plots``.

Fig. 4 across runs and datasets: ``python -m diffseg_jax.analysis.fingerprints --runs DIR... --out DIR``.
"""

from __future__ import annotations

import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffseg_jax import data, diffusion, evaluate, objectives, planning, plots, train
from diffseg_jax.analysis import adaptive, curves, forward, model_free

ANALYSES = ("mask_error", "loss", "forward", "model_free")
CSV_COLUMNS = ("t", "value", "curve", "model", "experiment", "dataset", "step")
# Which curves a trained network of each experiment has.
CURVES = {"e2": ("mask_error", "eps_loss"), "e3": ("mask_error",), "e4": ("eps_loss",)}


def timestep_grid(num_timesteps: int, step: int) -> np.ndarray:
    """0, step, 2 step, ... and always the last timestep T - 1."""
    grid = np.arange(0, num_timesteps, max(1, step))
    return grid if grid[-1] == num_timesteps - 1 else np.append(grid, num_timesteps - 1)


def write_rows(path: str, rows: list[dict]) -> None:
    """The long-format curve table (``CSV_COLUMNS``) as CSV and as NPZ columns."""
    with open(path + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    np.savez(path + ".npz", **{c: np.asarray([r[c] for r in rows]) for c in CSV_COLUMNS})


def read_rows(path: str) -> list[dict]:
    """Rows of a curve CSV written by :func:`write_rows` (t and step as int, value as float)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["t"], r["value"], r["step"] = int(r["t"]), float(r["value"]), int(r["step"])
    return rows


def network_curves(config, workdir, test, ts, key) -> tuple[dict[str, np.ndarray], int]:
    """Mean over images of the trained network's curves at ``ts``, and the checkpoint step."""
    experiment = config.experiment
    if experiment not in CURVES:
        raise ValueError(
            f"Per-timestep curves need a diffusion model (e2, e3 or e4); this run is {experiment!r}."
        )
    model, schedule, step, variables = evaluate.trained_network(config, workdir, test["image"].shape[-1])
    a = config.analysis
    prediction = objectives.prediction_type(experiment)
    mask_range = config.diffusion.mask_range if experiment != "e4" else "symmetric"

    @jax.jit
    def batch_curves(variables, images, masks, key):
        cond = images if objectives.uses_image_condition(experiment) else None
        x0 = 2.0 * images - 1.0 if experiment == "e4" else diffusion.mask_to_diffusion(masks, mask_range)

        def out_fn(x_t, t):
            out = model.apply(variables, x_t, t, cond, train=False, rngs=train.model_rngs(key))
            return objectives.split_output(out)[0]

        return curves.timestep_curves(
            out_fn,
            schedule,
            x0,
            jnp.asarray(ts),
            key,
            prediction=prediction,
            mask_range=mask_range,
            num_draws=a.num_draws,
            t_chunk=a.t_chunk if a.t_chunk > 0 else None,
            clip=config.eval.clip_denoised,
        )

    sums: dict[str, np.ndarray] = {}
    num = len(test["image"])
    t0 = time.time()
    for i, start in enumerate(range(0, num, a.batch_size)):
        images = jnp.asarray(test["image"][start : start + a.batch_size])
        masks = jnp.asarray(test["mask"][start : start + a.batch_size])
        out = batch_curves(variables, images, masks, jax.random.fold_in(key, i))
        for name, values in out.items():
            sums[name] = sums.get(name, 0.0) + np.asarray(values).sum(axis=1)
        done = min(start + a.batch_size, num)
        logging.info(
            "analyse: %d/%d images x %d timesteps, %.1f images/s",
            done,
            num,
            len(ts),
            done / (time.time() - t0),
        )
    return {name: sums[name] / num for name in CURVES[experiment]}, step


def analyse(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Runs the configured analyses for the run in ``workdir``; returns the paths written."""
    a = config.analysis
    unknown = sorted(set(a.analyses) - set(ANALYSES))
    if unknown:
        raise ValueError(f"Unknown analyses {unknown} in config.analysis.analyses; choose from {ANALYSES}.")
    config = planning.resolve_as_trained(config, workdir)  # the terminal noise and plan training used
    out_dir = os.path.join(workdir, "analysis")
    os.makedirs(out_dir, exist_ok=True)
    schedule = train.build_schedule(config.diffusion)
    ts = timestep_grid(schedule.num_timesteps, a.t_step)
    late = [t for t in a.forward_timesteps if not 0 <= t < schedule.num_timesteps]
    if "forward" in a.analyses and late:
        raise ValueError(
            f"config.analysis.forward_timesteps has {late}, outside 0..{schedule.num_timesteps - 1} "
            f"(diffusion.num_timesteps={schedule.num_timesteps}); pass timesteps inside that range."
        )
    test = data.model_sized_arrays(config.data, "test", a.num_images)
    key = jax.random.PRNGKey(a.seed)
    dataset = evaluate.dataset_label(config.data)
    meta = dict(model=config.model.name, experiment=config.experiment, dataset=dataset)
    written = {}

    if "forward" in a.analyses:
        arrays = forward.forward_process(
            schedule, test["image"][0], test["mask"][0], tuple(a.forward_timesteps), key
        )
        written["forward"] = os.path.join(out_dir, "forward.npz")
        np.savez(written["forward"], **arrays)
        plots.forward_figure(written["forward"], os.path.join(out_dir, "forward.png"))

    if "model_free" in a.analyses:
        mf = model_free.model_free_curve(
            schedule,
            jnp.asarray(test["mask"]),
            jnp.asarray(ts),
            key,
            num_draws=a.num_draws,
            t_chunk=a.t_chunk if a.t_chunk > 0 else None,
        )
        rows = [
            dict(
                t=int(t),
                value=float(v),
                curve="mask_error",
                model="model-free",
                experiment="none",
                dataset=dataset,
                step=0,
            )
            for t, v in zip(ts, np.asarray(mf["mask_error"]))
        ]
        written["model_free"] = os.path.join(out_dir, "model_free.csv")
        write_rows(written["model_free"][:-4], rows)
        np.savez(
            os.path.join(out_dir, "model_free_windows.npz"),
            t=ts,
            window=np.asarray(mf["window"]),
            errors=np.asarray(mf["errors"]),
            windows=np.asarray(model_free.WINDOWS),
        )
        plots.curve_figure([written["model_free"]], os.path.join(out_dir, "model_free.png"), a.smoothing)
        # Has the curve converged by T under this schedule, and which terminal ᾱ would make it converge?
        report = adaptive.terminal_report(
            schedule, test["mask"], key, config.diffusion.get("terminal_tol", 0.01)
        )
        written["convergence"] = os.path.join(out_dir, "convergence.json")
        with open(written["convergence"], "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        logging.info("analyse: model-free convergence at T: %s", report)

    if {"mask_error", "loss"} & set(a.analyses):
        values, step = network_curves(config, workdir, test, ts, key)
        wanted = {"mask_error": "mask_error" in a.analyses, "eps_loss": "loss" in a.analyses}
        rows = [
            dict(t=int(t), value=float(v), curve=name, step=step, **meta)
            for name, curve in values.items()
            if wanted[name]
            for t, v in zip(ts, curve)
        ]
        if rows:
            written["curves"] = os.path.join(out_dir, "curves.csv")
            write_rows(written["curves"][:-4], rows)
            plots.curve_figure([written["curves"]], os.path.join(out_dir, "curves.png"), a.smoothing)
    logging.info("analyse: wrote %s", ", ".join(written.values()))
    return written
