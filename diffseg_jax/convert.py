"""``python -m diffseg_jax.convert``: an official PyTorch state dict (EnsemDiff, SegDiff, MedSegDiff, SegFormer,
nnU-Net) written as a step-0 checkpoint of the config's model, ready for ``--mode evaluate``.

  python -m diffseg_jax.convert --config configs/e2_isic.py:ensemdiff --weights savedmodel.pt --workdir DIR
  python -m diffseg_jax.main --config configs/e2_isic.py:ensemdiff --workdir DIR --mode evaluate

The config takes the same ``--config.key=value`` overrides as ``diffseg_jax.main`` (the data is needed for
the model's input size; a workdir that already holds a checkpoint is refused). The mapping by name, the layouts
and the file formats read without executing anything are :mod:`diffseg_jax.state_dicts`'. To start training
from imported weights instead, set ``--config.train.init_weights=PATH``: a run without a checkpoint imports them
into its step-0 state (SegFormer's ImageNet encoder: ``model.pretrained``, a Hub id).
"""

from __future__ import annotations

import os
from typing import Any

from diffseg_jax import build, checkpoints, configlib, planning
from diffseg_jax.data import files


def convert_to_workdir(config: Any, weights: str, workdir: str) -> str:
    """Writes a step-0 checkpoint of ``config``'s model holding the weights file ``weights`` into
    ``<workdir>/checkpoints``, ready for ``--mode evaluate``; returns the checkpoint folder.

    Refuses a workdir that already holds a checkpoint: evaluation reads the latest step, which would then
    be the older one, not the imported weights.
    """
    config = planning.prepare(config, workdir, "train")  # the model as training would build it
    directory = os.path.join(workdir, "checkpoints")
    latest = checkpoints.latest_step(directory)  # creates no folder before the weights are read
    if latest is not None:
        raise FileExistsError(
            f"{os.path.abspath(directory)} already holds a checkpoint at step {latest}; --mode evaluate reads the "
            "latest step, so the imported weights would not be used. Give a new --workdir."
        )
    _, model, _, optimizer, state = build.setup(config)
    try:
        state = build.imported_state(weights, model, optimizer, state)
    except files.DatasetFileError:
        raise
    except ValueError as e:  # names and shapes that do not fit the config's model
        raise configlib.ConfigError(
            f"Cannot import --weights {weights} into the config's {config.model.name!r} model: {e}"
        ) from None
    ckpt = checkpoints.Checkpointer(directory)
    ckpt.save(0, state, {"imported_from": os.path.abspath(weights), "config": config.to_dict()})
    ckpt.close()
    return os.path.join(ckpt.directory, "0")


def main() -> None:
    """CLI: ``--config FILE[:arg]`` (with ``--config.key=value`` overrides, as ``diffseg_jax.main``),
    ``--weights FILE``, ``--workdir DIR``. Run through ``cli.run``, as ``diffseg_jax.main``: a bad config or
    weights file (or a used workdir) is one message, not a traceback."""
    from absl import flags  # noqa: PLC0415 — flags are defined only when this module is the command

    from diffseg_jax import cli, configlib, writers  # noqa: PLC0415 — only when run as the command

    config = configlib.define_config_flag("config", None, "Config file, e.g. configs/e2_isic.py:ensemdiff.")
    weights = flags.DEFINE_string(
        "weights", None, ".pt/.pth/.bin (read without torch), .safetensors or .npz state dict"
    )
    workdir = flags.DEFINE_string(
        "workdir", None, "a new run folder; the checkpoint goes to DIR/checkpoints/0"
    )
    flags.mark_flags_as_required(["config", "weights", "workdir"])

    def run(_):
        writers.quiet_libraries()
        written = cli.reporting_user_errors(  # a used workdir too: its message says what to do
            lambda: convert_to_workdir(config.value, weights.value, workdir.value), also=(FileExistsError,)
        )
        print(f"Imported {weights.value} into {written}")

    cli.run(run)


if __name__ == "__main__":
    main()
