"""Runs a grid of E1/E2 experiments and writes Table 1: ``python -m diffseg_jax.table1 --config C --workdir W``.

The config (e.g. ``configs/table1_synthetic.py``) holds the shared settings and a ``table`` group: synthetic
``kinds``, image/mask ``folders`` (real datasets in the ``segmentation_folder`` layout, read with the grid's
``data.resize``, ``data.eval_tiling`` and ``data.mask_threshold``), ``models`` and ``experiments``. Each cell
is the model's tiny config with its published scheme, the shared settings laid over it, trained and evaluated
in ``<workdir>/<dataset>/<model>_<experiment>`` (``<dataset>`` a kind or the folder's name; the E1 cells
through the feed-forward protocol with ``table.e1_protocol``, the E2 cells through ``--mode e2_protocol`` with
``table.e2_protocol``). With ``table.seeds`` every cell is run once per seed (the run with the grid's own
``seed`` in the cell's folder, the others beside it in ``<model>_<experiment>_seed<S>``), and Table 1 gives
each cell's mean ± standard deviation over its seeds and Welch intervals for the differences
(:mod:`diffseg_jax.report`). Finished cells are skipped, unfinished ones resume; identical programs compile
once (a persistent compilation cache in ``<workdir>/.jax_cache`` unless one is set already).
With ``table.eval_steps`` (e.g. ``(1000, 2000, 5000)``, checkpoints kept with ``train.keep_every``) each cell is also
evaluated at those steps, with each sampler of ``table.eval_samplers`` (``'ddpm'``, ``'ddim<K>'``; default the
grid's), and ``<workdir>/learning_curves.{md,csv,png}`` give IoU, ECE and the std map's error AUROC against the
step (:func:`evaluate_steps`, :func:`diffseg_jax.learning_curves.collect_learning_curves`); for E2/E3 cells also the
network's mask prediction error at t = T - 1 beside the predict-the-mean limit at each step
(:mod:`diffseg_jax.analysis.late_error`, which ``python -m diffseg_jax.analysis.late_error --runs CELL`` also
runs on the kept steps of an existing cell without training).
``--workers N`` runs N runs at a time (:func:`run_workers`): the grid's runs (cells × seeds) are dealt to N worker
processes (this command with ``--shard=i/N``), each pinned to one of the cores this command may use (so
``taskset -c 0,1 ... --workers 2`` puts one on each core), its output in ``<workdir>/workers/worker<i>ofN.log``;
the tables are written once all have finished. A worker whose run fails goes on with its other runs and exits
non-zero; the command then exits non-zero naming the failed runs and the logs, and a rerun resumes.
With ``table.analyse`` every diffusion cell (E2, E3, E4) is also analysed (``--mode analyse``, with the grid's
``analysis`` settings) and ``<workdir>/fingerprints/`` gets Fig. 4 across the grid.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import jax
import ml_collections
from absl import app, flags, logging

from diffseg_jax import (
    checkpoints,
    cli,
    collection,
    configlib,
    defaults,
    evaluate,
    learning_curves,
    models,
    protocol,
    report,
    result_files,
    train,
    validation,
    workers,
    writers,
)
from diffseg_jax.analysis import fingerprints, late_error
from diffseg_jax.analysis import run as analysis_run
from diffseg_jax.data import synthetic

_CONFIG = configlib.define_config_flag("config", None, "Grid config, e.g. configs/table1_synthetic.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the runs and the table.")
_WORKERS = flags.DEFINE_integer(
    "workers", 1, "Worker processes, each pinned to one CPU core, sharing the grid's runs (run_workers)."
)
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: run every n-th run from the i-th (--workers sets it).")

# Groups copied from the grid config onto every cell (the model and its scheme come from the cell's model).
SHARED = {
    "data": ("num_train", "num_test", "seed", "augment_flips", "data_dir"),
    # The process and the options beyond the paper (issue 33) too: a grid given --config.diffusion.process=bernoulli
    # or --config.objective.self_condition=True once trained every cell without them, silently.
    "diffusion": ("process",),
    "objective": (
        "loss",
        "prediction",
        "self_condition",
        "self_condition_prob",
        "recycle_prob",
        "loss_weighting",
        "snr_gamma",
        "bernoulli_bce_weight",
    ),
    "train": (
        "num_steps",
        "batch_size",
        "lr",
        "ema_decay",
        "log_every",
        "ckpt_every",
        "keep_every",
        "grad_clip",
    ),
    "eval": (
        "use_ema",
        "ensemble_size",
        "sampler",
        "ddim_steps",
        "ddim_eta",
        "member_output",
        "num_images",
        "batch_size",
        "member_chunk",
        "seed",
        "pooling",
        "ece_bins",
    ),
    "protocol": ("max_epochs", "patience", "validate_every", "ensemble_size", "ddim_steps"),
}
# A feed-forward reference (nnU-Net) keeps its own training: optimizer settings, its planned batch size, no EMA,
# one ensemble member. It has an E1 cell only (its reference row of Table 1).
REFERENCE_OWN = {
    "train": ("batch_size", "lr", "ema_decay", "grad_clip"),
    "eval": ("use_ema", "ensemble_size"),
}


# What a folder dataset's cells take from the grid's data group (the synthetic cells have no use for them).
FOLDER_DATA = ("resize", "eval_tiling", "mask_threshold", "image_scaling")


def datasets(grid: ml_collections.ConfigDict) -> list[str]:
    """The grid's datasets: its synthetic kinds, then its folders (as given, but ``./`` before one named like a
    synthetic kind).

    A kind that is not a synthetic kind is refused here, before any cell trains: the cells would take it for a
    folder's path (:func:`cell_config`), so a misspelt kind would fail as a missing folder, far from the typo.
    """
    unknown = [k for k in grid.table.kinds if k not in synthetic.KINDS]
    if unknown:
        what = "is not a synthetic kind" if len(unknown) == 1 else "are not synthetic kinds"
        raise configlib.ConfigError(
            f"--config.table.kinds: {', '.join(map(repr, unknown))} {what}; the synthetic kinds are "
            f"{list(synthetic.KINDS)}. A folder of images and masks goes in --config.table.folders, e.g. "
            "--config.table.folders='(\"/data/my_set\",)'."
        )
    # A folder named like a synthetic kind ("nuclei", relative to the working directory) is spelt "./nuclei":
    # the cells tell a kind from a folder by the name (:func:`cell_config`), and the folder is the same one.
    folders = [os.path.join(".", f) if f in synthetic.KINDS else f for f in grid.table.get("folders", ())]
    names = [*grid.table.kinds, *folders]
    seen: dict[str, str] = {}
    for dataset in names:
        label = dataset_name(dataset)
        if label in seen:
            raise ValueError(
                f"table: datasets {[seen[label], dataset]} would share the folder <workdir>/{label}; rename a "
                "folder or drop one."
            )
        seen[label] = dataset
    return names


def dataset_name(dataset: str) -> str:
    """Where a dataset's cells live under the workdir: a synthetic kind as it is, a folder by its name."""
    return dataset if dataset in synthetic.KINDS else evaluate.folder_label(dataset)


def cells(grid: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
    """(dataset, model, experiment) of every cell; feed-forward references only in E1."""
    return [
        (k, m, e)
        for k in datasets(grid)
        for m in grid.table.models
        for e in grid.table.experiments
        if e == "e1" or not models.is_feed_forward(m)
    ]


def seeds(grid: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The seeds every cell runs with: ``table.seeds``, or the grid's ``seed`` alone where that is empty."""
    listed = tuple(grid.table.get("seeds", ()))
    if len(set(listed)) < len(listed) or not all(isinstance(s, int) for s in listed):
        raise configlib.ConfigError(
            f"--config.table.seeds={listed!r}: give distinct integers, e.g. --config.table.seeds='(0,1,2)'."
        )
    return listed or (int(grid.seed),)


def cell_dir(workdir: str, dataset: str, model: str, experiment: str, seed: int, base_seed: int = 0) -> str:
    """Where a cell's run with ``seed`` lives: ``<workdir>/<dataset>/<model>_<experiment>`` for ``base_seed``
    (the grid's own ``seed``), ``..._seed<S>`` beside it for the others (so a grid given more seeds later keeps
    its runs)."""
    suffix = "" if seed == base_seed else f"_seed{seed}"
    return os.path.join(workdir, dataset_name(dataset), f"{model}_{experiment}{suffix}")


def cell_config(
    grid: ml_collections.ConfigDict, dataset: str, model: str, experiment: str, seed: int | None = None
) -> ml_collections.ConfigDict:
    """The config of one cell: ``model``'s tiny config, the grid's shared settings, ``dataset`` (a synthetic
    kind or an image/mask folder), ``experiment`` and ``seed`` (default: the grid's)."""
    c = defaults.get_config(f"{model},tiny")
    c.experiment = experiment
    c.seed = grid.seed if seed is None else seed
    if dataset in synthetic.KINDS:
        c.data.kind = dataset
    else:
        c.data.name = "segmentation_folder"
        c.data.manual_dir = dataset
        for key in FOLDER_DATA:
            c.data[key] = grid.data[key]
    if grid.table.get("mask_range", ""):  # '' keeps each architecture's published mask range
        c.diffusion.mask_range = grid.table.mask_range
    if grid.table.get("num_timesteps", 0):  # 0 keeps the cell's own T
        c.diffusion.num_timesteps = grid.table.num_timesteps
    own = REFERENCE_OWN if models.is_feed_forward(model) else {}
    for group, keys in SHARED.items():
        for key in keys:
            if key not in own.get(group, ()):
                c[group][key] = grid[group][key]
    return c


def parse_sampler(spec: str) -> tuple[str, int]:
    """``'ddpm'`` or ``'ddim<K>'`` (``table.eval_samplers``) as (eval.sampler, eval.ddim_steps)."""
    if spec == "ddpm":
        return "ddpm", 0
    if spec.startswith("ddim") and spec[4:].isdigit() and int(spec[4:]) > 0:
        return "ddim", int(spec[4:])
    raise configlib.ConfigError(
        f"--config.table.eval_samplers: {spec!r} is not a sampler; use 'ddpm' (all T steps) or 'ddim<K>' (K "
        'steps), e.g. --config.table.eval_samplers=\'("ddpm","ddim10","ddim50")\'.'
    )


def evaluate_steps(
    grid: ml_collections.ConfigDict, config: ml_collections.ConfigDict, folder: str
) -> list[str]:
    """Evaluates the cell's run in ``folder`` at each kept checkpoint of ``table.eval_steps``, with each sampler of
    ``table.eval_samplers`` (default: the grid's own), into ``<folder>/learning_curve/step<S>_<sampler>/``;
    evaluations already there are skipped. A listed step beyond ``train.num_steps`` is skipped (a longer grid
    reaches it); one within that was not kept is named in the log (keep it with ``train.keep_every`` or
    ``train.keep_at``). An E2/E3 cell also gets the network's mask prediction error at the highest t against the
    predict-the-mean limit at each such step (:func:`diffseg_jax.analysis.late_error.write_point`, skipped when
    present). Returns the folders (and mask-error files) written now."""
    steps = sorted(int(s) for s in grid.table.get("eval_steps", ()))
    if not steps:
        return []
    specs = tuple(grid.table.get("eval_samplers", ())) or (
        learning_curves.sampler_label(config.eval.sampler, config.eval.ddim_steps),
    )
    ckpt = checkpoints.Checkpointer(os.path.join(folder, "checkpoints"))
    try:
        kept = set(ckpt.all_steps())
    finally:
        ckpt.close()
    done = []
    for step in steps:
        if step > config.train.num_steps:
            continue
        if step not in kept:
            logging.warning(
                "table1: %s kept no checkpoint at step %d (it holds %s); set train.keep_every or train.keep_at "
                "before training to evaluate it.",
                folder,
                step,
                sorted(kept),
            )
            continue
        for spec in specs:
            out = os.path.join(folder, learning_curves.CURVE_DIR, f"step{step}_{spec}")
            if os.path.exists(os.path.join(out, "metrics.json")):
                continue
            c = copy.deepcopy(config)
            c.eval.step = step
            c.eval.sampler, ddim_steps = parse_sampler(spec)
            if ddim_steps:
                c.eval.ddim_steps = ddim_steps
            evaluate.evaluate(c, folder, out_dir=out)
            done.append(out)
        point = late_error.write_point(config, folder, step)  # E2/E3: the mask error at T - 1 and its limit
        if point:
            done.append(point)
    return done


def _finished(config: ml_collections.ConfigDict, workdir: str) -> bool:
    path = os.path.join(workdir, "eval", "metrics.json")
    if not os.path.exists(path):
        return False
    try:
        m = result_files.read_metrics(path)
    except ValueError:  # cut short (by a copy, or an evaluation of an older version killed while writing)
        logging.warning("%s is unreadable; the cell is evaluated again.", path)
        return False
    protocol_done = os.path.exists(os.path.join(workdir, f"{config.experiment}_protocol.json"))
    return m.get("step") == config.train.num_steps or protocol_done


def grid_runs(grid: ml_collections.ConfigDict) -> list[tuple[str, str, str, int]]:
    """(dataset, model, experiment, seed) of every run of the grid, each cell's seeds together; every run's config
    is validated here, so a mistake fails before any cell trains (or any worker starts)."""
    grid_cells = cells(grid)  # a misspelt kind or clashing folders fail here, before the workdir is made
    runs = [(*cell, seed) for cell in grid_cells for seed in seeds(grid)]
    for dataset, model, experiment, seed in runs:
        validation.validate(cell_config(grid, dataset, model, experiment, seed))
    return runs


def _cache_in(workdir: str) -> None:
    if not jax.config.jax_compilation_cache_dir:  # a cache the user set (JAX_COMPILATION_CACHE_DIR) is kept
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def run_cell(
    grid: ml_collections.ConfigDict, workdir: str, dataset: str, model: str, experiment: str, seed: int
):
    """Trains and evaluates one run (skipped when finished, resumed when not), its ``table.eval_steps`` points
    and, with ``table.analyse``, its analysis (a cell's first seed only)."""
    config = cell_config(grid, dataset, model, experiment, seed)
    folder = cell_dir(workdir, dataset, model, experiment, seed, grid.seed)
    if not _finished(config, folder):
        if grid.table.get(f"{experiment}_protocol", False):  # e1_protocol / e2_protocol
            protocol.run(config, folder)
        else:
            state = train.train(config, folder)
            if int(state.step) >= config.train.num_steps:  # not stopped early (SIGTERM, the training hook)
                evaluate.evaluate(config, folder, state=state)
        if not _finished(config, folder):
            # Stopped by SIGTERM: the grid stops too (a worker exits non-zero) instead of evaluating a model
            # halfway through training and going on with the next runs; the checkpoint is saved.
            raise SystemExit(
                f"table1: the run in {folder} stopped before train.num_steps={config.train.num_steps} (its "
                "checkpoint is saved); nothing more was done. Rerun the same command to resume."
            )
    evaluate_steps(grid, config, folder)  # table.eval_steps: the learning curves' points
    analysed = os.path.exists(os.path.join(folder, "analysis", "curves.csv"))
    # One analysis per cell (its first seed's run), so that Fig. 4 has one curve a cell.
    if grid.table.analyse and experiment in analysis_run.CURVES and seed == seeds(grid)[0] and not analysed:
        for key in ("analyses", "t_step", "num_images", "num_draws", "batch_size", "t_chunk", "smoothing"):
            config.analysis[key] = grid.analysis[key]
        analysis_run.analyse(config, folder)


def _label(run: tuple, many_seeds: bool) -> str:
    dataset, model, experiment, seed = run
    return f"{dataset_name(dataset)} {model} {experiment}" + (f" seed {seed}" if many_seeds else "")


def run(grid: ml_collections.ConfigDict, workdir: str, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Trains and evaluates every cell, then writes ``<workdir>/table1.{md,csv,tex}``; returns the rows.

    With ``shard=(i, n)``, n > 1 (a worker of :func:`run_workers`), only :func:`diffseg_jax.workers.shard_runs`' share: a run that
    fails is logged and the others go on; the failed ones are listed in :func:`diffseg_jax.workers.worker_files`' JSON and the
    worker exits non-zero; the tables are left to the parent (returns [])."""
    runs = grid_runs(grid)
    os.makedirs(workdir, exist_ok=True)
    _cache_in(workdir)
    index, count = shard
    many_seeds = len(seeds(grid)) > 1
    t0 = time.time()
    failed = []
    for i, r in workers.shard_runs(list(enumerate(runs)), index, count):  # numbered as in the whole grid
        logging.info(
            "table1: cell %d/%d %s (%s elapsed)",
            i + 1,
            len(runs),
            _label(r, many_seeds),
            writers.format_duration(time.time() - t0),
        )
        if count == 1:
            run_cell(grid, workdir, *r)
            continue
        try:
            run_cell(grid, workdir, *r)
        except Exception:  # noqa: BLE001 — the worker goes on with its other runs; the parent names this one
            logging.exception("table1: %s failed", _label(r, many_seeds))
            failed.append(_label(r, many_seeds))
    if count > 1:
        workers.record_failures(workdir, index, count, failed)
        if failed:
            raise SystemExit(f"table1 worker {index}/{count}: {len(failed)} run(s) failed: {failed}")
        return []
    return write_tables(grid, workdir, t0)


def write_tables(grid: ml_collections.ConfigDict, workdir: str, t0: float) -> list[dict]:
    """Table 1, the learning curves (with ``table.eval_steps``) and Fig. 4 (with ``table.analyse``) of the runs in
    ``workdir``; returns Table 1's rows."""
    found = collection.tables([workdir])
    rows = found["rows"]
    paths = report.write(rows, workdir, found["uncertainty"], found["reliability"]) if rows else {}
    if rows:
        print(report.markdown(rows))
    curves = learning_curves.collect_learning_curves([workdir])
    if grid.table.get("eval_steps", ()) and curves:
        paths.update(learning_curves.write_learning_curves(curves, workdir))
        print(learning_curves.learning_curves_markdown(curves))
    if grid.table.analyse:
        paths.update(fingerprints.main(["--runs", workdir, "--out", os.path.join(workdir, "fingerprints")]))
    logging.info(
        "table1: wrote %s in %s", ", ".join(paths.values()), writers.format_duration(time.time() - t0)
    )
    return rows


def run_workers(grid: ml_collections.ConfigDict, workdir: str, count: int, argv: list[str]) -> list[dict]:
    """``python -m diffseg_jax.table1 ... --workers N``: the grid's runs split over ``count`` worker processes
    (:func:`diffseg_jax.workers.run_processes`: each this command with ``--shard=i/N``, pinned to one of the
    cores this process may use, its output in ``<workdir>/workers/worker<i>ofN.log``), then the tables of them
    all, written once every worker has finished. A failed worker stops the command (exit status 1) naming its
    failed runs and its log; a rerun skips the finished runs and resumes the others. Two workers that need the
    same tfds dataset build it once (:func:`diffseg_jax.locks.build_lock`: the second waits for it)."""
    runs = grid_runs(grid)  # every mistake before a worker starts
    many_seeds = len(seeds(grid)) > 1
    shares = [[_label(r, many_seeds) for r in workers.shard_runs(runs, i, count)] for i in range(count)]
    t0 = time.time()
    codes = workers.run_processes("diffseg_jax.table1", argv, workdir, [len(s) for s in shares])
    message = workers.failures(workdir, codes, shares)
    if message:
        raise SystemExit(message)
    return write_tables(grid, workdir, t0)


def main(argv):
    del argv
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    if _WORKERS.value < 1:
        raise app.UsageError(f"--workers={_WORKERS.value}: give 1 or more worker processes.")
    writers.quiet_libraries()
    shard = workers.parse_shard(_SHARD.value)
    if _WORKERS.value > 1 and shard == (0, 1):
        run_workers(_CONFIG.value, _WORKDIR.value, _WORKERS.value, sys.argv[1:])
    else:
        run(_CONFIG.value, _WORKDIR.value, shard)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)
