"""Command line: ``python -m diffseg_jax.main --config configs/quickstart.py --workdir runs/quickstart``.

Modes (``--mode``):

* ``train`` (default): trains, resuming from the workdir's latest checkpoint, then evaluates the ensemble on
  the test split when ``eval.enabled``.
* ``evaluate``: the latest checkpoint's ensembles on the test split of ``config.data`` (which may be an
  external test set) into ``--eval_dir``, default ``<workdir>/eval`` (``eval_step{S}`` for ``eval.step=S``);
  with ``--compare_workdir`` also Fig. 1 next to that run and a comparison of their uncertainty maps.
* ``predict``: segments the image files at ``--images`` (no masks needed): mask, probability and uncertainty
  maps at each file's size in ``--predict_dir``, default ``<workdir>/predict`` (``predict_step{S}`` for
  ``eval.step=S``); see ``diffseg_jax.predict``.
* ``e1_protocol``: the paper's feed-forward protocol: the epoch count selected on an 80/20 split, retrained on
  all data, evaluated. ``e2_protocol``: the same for diffusion segmentation, selected on the validation IoU of
  small ensembles; see ``diffseg_jax.protocol``.
* ``analyse``: per-timestep error and loss curves, the forward process and the model-free fingerprint into
  ``<workdir>/analysis/``.
* ``fingerprint`` (seconds, no training): whether the training masks' error curve has converged by T under
  the config's schedule, the terminal ᾱ at which it would, where the fingerprint weights peak; printed and
  written to ``<workdir>/fingerprint.json``.
* ``summary``: the model's parameter count, without data or training.

Override any config value with ``--config.train.num_steps=10``; unknown keys fail.
"""

from __future__ import annotations

import contextlib
import os

from absl import app, flags, logging

from diffseg_jax import cli, configlib

_CONFIG = configlib.define_config_flag(
    "config",
    None,
    "Config file, e.g. configs/quickstart.py[:arg], or a config shipped with the package by name (quickstart:tiny).",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation outputs.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "predict", "e1_protocol", "e2_protocol", "analyse", "fingerprint", "summary"],
    "What to run.",
)
_IMAGES = flags.DEFINE_string(
    "images", None, "--mode predict: an image file, or a folder of images (searched recursively), to segment."
)
_PREDICT_DIR = flags.DEFINE_string(
    "predict_dir",
    None,
    "--mode predict: where to write (default WORKDIR/predict, or WORKDIR/predict_stepS for --config.eval.step=S).",
)
_EVAL_DIR = flags.DEFINE_string(
    "eval_dir",
    None,
    "--mode evaluate: where to write (default WORKDIR/eval, or WORKDIR/eval_stepS for --config.eval.step=S); e.g. "
    "an external test set's results beside the run's.",
)
_COMPARE = flags.DEFINE_string(
    "compare_workdir",
    None,
    "An evaluated run (e.g. feed-forward) to compare with: eval/figure1.png, eval/comparison.json.",
)


def main(argv):
    del argv
    # The modes' modules are imported here, not at the top: `--help` and a usage error then answer without
    # loading JAX, TensorFlow Datasets and the models (no import cycle is involved).
    from diffseg_jax import (  # noqa: PLC0415
        adaptive,
        configlib,
        distributed,
        evaluate,
        locks,
        planning,
        predict,
        protocol,
        summary,
        train,
        writers,
    )
    from diffseg_jax.analysis import run as analysis_run  # noqa: PLC0415 — as above

    writers.quiet_libraries()
    distributed.initialize_from_env()  # Several hosts: JAX_COORDINATOR_ADDRESS etc. (see distributed.py)

    config = _CONFIG.value
    mode, workdir = _MODE.value, _WORKDIR.value
    if mode == "summary":
        print(summary.summary_text(planning.prepare(config, mode=mode)))
        return
    if not workdir:
        raise app.UsageError("--workdir is required for every mode but summary.")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise app.UsageError(f"--workdir {workdir} is a file; pass a folder (it is made if missing).")
    if mode == "predict" and not _IMAGES.value:
        raise app.UsageError("--mode predict needs --images: an image file or a folder of images.")
    if mode in ("e1_protocol", "e2_protocol") and config.experiment != mode[:2]:
        raise configlib.ConfigError(
            f"--mode {mode} needs an {mode[:2]} config; config.experiment={config.experiment!r}. Use "
            f"e.g. configs/{mode[:2]}_isic.py, or --mode {config.experiment}_protocol."
        )
    # One writer per workdir: a second run there is refused, naming the process that holds it.
    lock = locks.workdir_lock(workdir, mode) if distributed.is_primary() else contextlib.nullcontext()
    with lock:
        # Each mode's function prepares the config itself (planning.prepare: validation, then the data-driven
        # plan or the trained run's record), before it reads data or writes anything.
        if mode == "fingerprint":
            report = adaptive.fingerprint_report(planning.prepare(config, workdir, mode))
            os.makedirs(workdir, exist_ok=True)
            writers.save_json_whole(os.path.join(workdir, "fingerprint.json"), report, indent=2)
            print(adaptive.report_text(report))
        elif mode == "analyse":
            analysis_run.analyse(config, workdir)
        elif mode == "predict":
            predict.predict(config, workdir, _IMAGES.value, _PREDICT_DIR.value)
        elif mode in ("e1_protocol", "e2_protocol"):
            protocol.run(config, workdir)
        elif mode == "train":
            state = train.train(config, workdir)
            if int(state.step) < config.train.num_steps:
                logging.warning("Training stopped early at step %d; not evaluating.", int(state.step))
                return
            if config.eval.enabled:
                evaluate.evaluate(config, workdir, state=state, compare_workdir=_COMPARE.value)
        else:
            evaluate.evaluate(config, workdir, compare_workdir=_COMPARE.value, out_dir=_EVAL_DIR.value)


def run():
    """Entry point for the console script."""
    flags.mark_flags_as_required(["config"])
    cli.run(main)


if __name__ == "__main__":
    run()
