"""``--mode analyse``: the analyses named in ``config.analysis.analyses`` for one run, as arrays and figures.

Writes into ``<workdir>/analysis/``:

* ``curves.csv`` / ``curves.npz`` (t, value, curve, model, experiment, dataset, step): the trained network's
  mask prediction error (E2, E3) and eps loss (E2, E4) at every t of the grid, averaged over the first
  ``num_images`` test images and ``num_draws`` noise draws each (needs a checkpoint in the workdir);
* ``model_free.csv`` / ``.npz``: the training-free fingerprint of the test masks (see ``model_free``), and
  ``convergence.json``: whether it has converged by t = T-1 under the run's schedule (information left at T) and
  the terminal ᾱ at which it would (``diffseg_jax.adaptive``);
* ``forward.npz``: the forward process of the first test image and mask at ``forward_timesteps`` (Fig. 2);
* ``curves.png``, ``model_free.png``, ``forward.png``: drawn from those arrays by ``diffseg_jax.plots``.

The settings are checked, and the checkpoint looked up, before anything is written. The files are written into
``<workdir>/.analysis.partial/`` and swapped into place when every analysis is done (with the files of analyses
not run this time carried over), so an interrupted run leaves ``analysis/`` as it was: never half the files of
new settings beside the other half of the old ones. A leftover ``.analysis.partial/`` is removed by the next run.

Fig. 4 across runs and datasets: ``python -m diffseg_jax.analysis.fingerprints --runs DIR... --out DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffseg_jax import (
    adaptive,
    build,
    configlib,
    data,
    diffusion,
    evaluate,
    objectives,
    planning,
    plots,
    restore,
    result_files,
)
from diffseg_jax.analysis import curves, forward
from diffseg_jax.diffusion import model_free

ANALYSES = ("mask_error", "loss", "forward", "model_free")
# Which curves a trained network of each experiment has.
CURVES = {"e2": ("mask_error", "eps_loss"), "e3": ("mask_error",), "e4": ("eps_loss",)}
# The analyses that read a trained network, and the curve each one writes.
CURVE_ANALYSES = {"mask_error": "mask_error", "loss": "eps_loss"}
# A Bernoulli diffusion run (BerDiff, beyond the paper) has no Gaussian noise to predict: its network gives the
# mask prediction error under its own noise (curves.bernoulli_timestep_curves), a curve of its own name.
BERNOULLI_CURVES = {"e2": ("bernoulli_mask_error",), "e3": ("bernoulli_mask_error",)}
BERNOULLI_CURVE_ANALYSES = {"mask_error": "bernoulli_mask_error"}


def curves_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The curves the trained network of the run ``config`` describes has (its experiment's, or a Bernoulli
    run's)."""
    if build.process_of(config) == "bernoulli":
        return BERNOULLI_CURVES.get(config.experiment, ())
    return CURVES.get(config.experiment, ())


def curve_analyses(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Analysis name -> the curve it writes for the run ``config`` describes (see :data:`CURVE_ANALYSES`)."""
    return BERNOULLI_CURVE_ANALYSES if build.process_of(config) == "bernoulli" else CURVE_ANALYSES


def mask_error_curve(config: ml_collections.ConfigDict) -> str | None:
    """The name of the mask prediction error curve of the run ``config`` describes, None where it has none."""
    name = curve_analyses(config).get("mask_error")
    return name if name in curves_of(config) else None


PARTIAL_DIR, OLD_DIR = ".analysis.partial", ".analysis.old"  # hidden: the fingerprints' glob skips them


def supported_analyses(experiment: str, process: str = "gaussian") -> tuple[str, ...]:
    """The analyses a run of ``experiment`` can do: the forward process and the model-free fingerprint always
    (they need the data only), the curves its trained network has (none for a feed-forward E1 model; a Bernoulli
    ``process`` run: the mask prediction error only)."""
    have = (BERNOULLI_CURVES if process == "bernoulli" else CURVES).get(experiment, ())
    mapping = BERNOULLI_CURVE_ANALYSES if process == "bernoulli" else CURVE_ANALYSES
    return tuple(a for a in ANALYSES if a not in CURVE_ANALYSES or mapping.get(a) in have)


def check_analyses(config: ml_collections.ConfigDict) -> None:
    """Raises ``configlib.ConfigError`` naming ``analysis.analyses`` for an unknown analysis, or for curves the
    experiment's network does not have when it has none of those asked for (then nothing would be written).

    A partial fit (the default ``mask_error`` and ``loss`` on an E3 or E4 run) analyses the curve it has and
    logs the other: the defaults (and table1's grid) serve every experiment.
    """
    names = tuple(config.analysis.analyses)
    unknown = sorted(set(names) - set(ANALYSES))
    if unknown:
        raise configlib.ConfigError(
            f"Invalid config: analysis.analyses={names!r}. Unknown analyses {unknown}; choose from {ANALYSES}."
        )
    experiment = config.experiment
    process = build.process_of(config)
    supported = supported_analyses(experiment, process)
    asked = [n for n in names if n in CURVE_ANALYSES]
    missing = [n for n in asked if n not in supported]
    if asked and len(missing) == len(asked):
        has = curves_of(config)
        kind = f"{experiment!r} run" + (
            " of Bernoulli diffusion (no Gaussian ε to predict)" if process == "bernoulli" else ""
        )
        raise configlib.ConfigError(
            f"Invalid config: analysis.analyses={names!r}. The per-timestep curves {missing} need a diffusion "
            f"model that predicts them, and an {kind} has "
            + (f"only {list(has)}" if has else "none (its network is feed-forward)")
            + f". An {experiment!r} run supports the analyses {list(supported)}: pass e.g. "
            "--config.analysis.analyses='(" + ",".join(f'"{n}"' for n in supported) + ")'."
        )
    if missing:
        logging.warning(
            "analyse: an %r run has no %s curve; analysing %s.",
            experiment,
            missing,
            [n for n in names if n not in missing],
        )


def timestep_grid(num_timesteps: int, step: int) -> np.ndarray:
    """0, step, 2 step, ... and always the last timestep T - 1."""
    grid = np.arange(0, num_timesteps, max(1, step))
    return grid if grid[-1] == num_timesteps - 1 else np.append(grid, num_timesteps - 1)


def network_curves(config, workdir, test, ts, key, network=None) -> tuple[dict[str, np.ndarray], int]:
    """Mean over images of the trained network's curves at ``ts``, and the checkpoint step.

    ``network``: ``restore.trained_network``'s (model, schedule, step, variables) when already looked up (as
    :func:`analyse` does before writing anything), else read from ``workdir``'s checkpoint here.
    """
    experiment = config.experiment
    if experiment not in CURVES:
        raise configlib.ConfigError(
            f"Per-timestep curves need a diffusion model (e2, e3 or e4); this run is {experiment!r}."
        )
    if network is None:
        network = restore.trained_network(config, workdir, test["image"].shape[-1])
    model, schedule, step, variables = network
    a = config.analysis
    prediction = objectives.prediction_of(config)
    mask_range = config.diffusion.mask_range if experiment != "e4" else "symmetric"
    self_conditioned = build.self_conditioned(config)
    bernoulli = build.process_of(config) == "bernoulli"  # BerDiff: its mask error under its own noise

    @jax.jit
    def batch_curves(variables, images, masks, key):
        cond = images if objectives.uses_image_condition(experiment) else None

        def out_fn(x_t, t):
            if bernoulli:  # x_t in {0, 1}, fed in the run's mask range
                x_t = diffusion.bernoulli.network_input(
                    x_t, jnp.zeros_like(x_t) if self_conditioned else (), mask_range
                )
            elif self_conditioned:  # no previous estimate on a single step: zeros (Analog Bits)
                x_t = objectives.self_condition_input(x_t, None)
            out = model.apply(variables, x_t, t, cond, train=False, rngs=build.model_rngs(key))
            return objectives.split_output(out)[0]

        options = dict(
            prediction=prediction, num_draws=a.num_draws, t_chunk=a.t_chunk if a.t_chunk > 0 else None
        )
        if bernoulli:
            return curves.bernoulli_timestep_curves(out_fn, schedule, masks, jnp.asarray(ts), key, **options)
        x0 = 2.0 * images - 1.0 if experiment == "e4" else diffusion.mask_to_diffusion(masks, mask_range)
        return curves.timestep_curves(
            out_fn,
            schedule,
            x0,
            jnp.asarray(ts),
            key,
            mask_range=mask_range,
            clip=config.eval.clip_denoised,
            **options,
        )

    found = _mean_over_images(batch_curves, variables, test, key, a.batch_size, len(ts))
    return {name: found[name] for name in curves_of(config)}, step


def _mean_over_images(batch_curves, variables, test, key, batch_size, num_t) -> dict[str, np.ndarray]:
    """Each curve of ``batch_curves(variables, images, masks, key)`` ((T, B) per batch) averaged over the test
    images, batch by batch with progress lines."""
    sums: dict[str, np.ndarray] = {}
    num = len(test["image"])
    t0 = time.time()
    for i, start in enumerate(range(0, num, batch_size)):
        images = jnp.asarray(test["image"][start : start + batch_size])
        masks = jnp.asarray(test["mask"][start : start + batch_size])
        out = batch_curves(variables, images, masks, jax.random.fold_in(key, i))
        for name, values in out.items():
            sums[name] = sums.get(name, 0.0) + np.asarray(values).sum(axis=1)
        done = min(start + batch_size, num)
        logging.info(
            "analyse: %d/%d images x %d timesteps, %.1f images/s",
            done,
            num,
            num_t,
            done / (time.time() - t0),
        )
    return {name: total / num for name, total in sums.items()}


def _prepare_partial(workdir: str) -> str:
    """An empty ``<workdir>/.analysis.partial/`` to write into; restores ``analysis/`` from ``.analysis.old/``
    when a run was stopped between the two renames of :func:`_swap_into_place`."""
    final, partial, old = (os.path.join(workdir, d) for d in ("analysis", PARTIAL_DIR, OLD_DIR))
    if os.path.isdir(old):
        if os.path.isdir(final):
            shutil.rmtree(old)
        else:
            os.rename(old, final)
    if os.path.isdir(partial):
        shutil.rmtree(partial)  # an interrupted run's files
    os.makedirs(partial)
    return partial


def _swap_into_place(partial: str, final: str) -> None:
    """Makes the complete ``partial`` folder ``final``: the files of ``final`` that ``partial`` lacks (analyses not
    run this time) are copied over first, then ``final`` is renamed away and ``partial`` renamed into place."""
    if not os.path.isdir(final):
        os.rename(partial, final)
        return
    for name in os.listdir(final):
        src, dst = os.path.join(final, name), os.path.join(partial, name)
        if not os.path.lexists(dst):
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
    old = os.path.join(os.path.dirname(final), OLD_DIR)
    os.rename(final, old)
    os.rename(partial, final)
    shutil.rmtree(old)


def analyse(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Runs the configured analyses for the run in ``workdir``; returns the paths written.

    Refuses (``configlib.ConfigError``) unknown analyses, curves the experiment does not have and forward
    timesteps outside the schedule, and looks up the checkpoint the curves need, before writing anything; then
    writes the new files beside ``analysis/`` and swaps them in at the end (see the module docstring).
    """
    a = config.analysis
    check_analyses(config)
    config = planning.prepare(config, workdir, "analyse")  # the terminal noise and plan training used
    schedule = build.build_schedule(config.diffusion)
    ts = timestep_grid(schedule.num_timesteps, a.t_step)
    late = [t for t in a.forward_timesteps if not 0 <= t < schedule.num_timesteps]
    if "forward" in a.analyses and late:
        raise configlib.ConfigError(
            f"Invalid config: analysis.forward_timesteps={tuple(a.forward_timesteps)!r} has {late}, outside "
            f"0..{schedule.num_timesteps - 1} (diffusion.num_timesteps={schedule.num_timesteps}); pass timesteps "
            "inside that range."
        )
    test = data.model_sized_arrays(config.data, "test", a.num_images)
    wanted = {name: analysis in a.analyses for analysis, name in curve_analyses(config).items()}
    wanted = {name: w for name, w in wanted.items() if name in curves_of(config)}
    # The checkpoint first: a missing one (or an eval.step not kept) fails before any file is replaced.
    network = (
        restore.trained_network(config, workdir, test["image"].shape[-1]) if any(wanted.values()) else None
    )
    key = jax.random.PRNGKey(a.seed)
    dataset = evaluate.dataset_label(config.data)
    trained = evaluate.other_trained_data(config.data, workdir)
    if trained is not None:  # analysing a model on other data is legitimate, but easy to do unawares
        logging.warning(
            "analyse: the run in %s was trained on %s; these analyses are of %s (their files name it). Pass "
            "--config configs/from_run.py:%s for the run's own data.",
            workdir,
            trained,
            dataset,
            workdir,
        )
    meta = dict(model=config.model.name, experiment=config.experiment, dataset=dataset)
    final_dir = os.path.join(workdir, "analysis")
    out_dir = _prepare_partial(workdir)
    try:
        written = _write_analyses(
            config, workdir, out_dir, schedule, ts, test, key, dataset, meta, network, wanted
        )
        _swap_into_place(out_dir, final_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    written = {k: os.path.join(final_dir, os.path.relpath(v, out_dir)) for k, v in written.items()}
    logging.info("analyse: wrote %s", ", ".join(written.values()))
    return written


def _write_analyses(config, workdir, out_dir, schedule, ts, test, key, dataset, meta, network, wanted):
    """The analyses of :func:`analyse`, written into ``out_dir``; returns the paths written."""
    a = config.analysis
    window = plots.samples_in(ts, a.smoothing)  # analysis.smoothing is in timesteps, the curves on the t grid
    written = {}
    if "forward" in a.analyses:
        arrays = forward.forward_process(
            schedule, test["image"][0], test["mask"][0], tuple(a.forward_timesteps), key
        )
        written["forward"] = os.path.join(out_dir, "forward.npz")
        np.savez(written["forward"], **arrays)
        plots.forward_figure(arrays, os.path.join(out_dir, "forward.png"))

    if "model_free" in a.analyses:
        mf = model_free.model_free_curve(
            schedule,
            jnp.asarray(test["mask"]),
            jnp.asarray(ts),
            key,
            num_draws=a.num_draws,
            t_chunk=a.t_chunk if a.t_chunk > 0 else None,
            mask_range=config.diffusion.mask_range,  # the run's: a binary range is noisier at every t
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
        result_files.write_rows(written["model_free"][:-4], rows)
        np.savez(
            os.path.join(out_dir, "model_free_windows.npz"),
            t=ts,
            window=np.asarray(mf["window"]),
            errors=np.asarray(mf["errors"]),
            windows=np.asarray(model_free.WINDOWS),
        )
        plots.curve_figure(
            result_files.read_rows(written["model_free"]), os.path.join(out_dir, "model_free.png"), window
        )
        # Has the curve converged by T under this schedule, and which terminal ᾱ would make it converge?
        report = adaptive.terminal_report(schedule, test["mask"], key, config.diffusion.terminal_tol)
        written["convergence"] = os.path.join(out_dir, "convergence.json")
        with open(written["convergence"], "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        logging.info("analyse: model-free convergence at T: %s", report)

    if any(wanted.values()):
        values, step = network_curves(config, workdir, test, ts, key, network)
        rows = [
            dict(t=int(t), value=float(v), curve=name, step=step, **meta)
            for name, curve in values.items()
            if wanted.get(name)
            for t, v in zip(ts, curve)
        ]
        if rows:
            written["curves"] = os.path.join(out_dir, "curves.csv")
            result_files.write_rows(written["curves"][:-4], rows)
            plots.curve_figure(
                result_files.read_rows(written["curves"]), os.path.join(out_dir, "curves.png"), window
            )
    return written
