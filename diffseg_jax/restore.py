"""A trained run's network and weights from its checkpoints, reading no data.

Sampling needs only the weights (:data:`WEIGHT_FIELDS`) of a checkpoint: :func:`load_state` reads them into a
fresh (abstract) train state, :func:`trained_network` builds the network as training built it and picks the EMA
or the raw weights as ``eval.use_ema`` says."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from diffseg_jax import (
    build,
    checkpoints,
    diffusion,
)

WEIGHT_FIELDS = ("step", "params", "ema_params", "model_state")  # what sampling reads of a train state


def load_state(workdir: str, fresh: build.TrainState, step: int = -1) -> build.TrainState:
    """``fresh`` with the weights (:data:`WEIGHT_FIELDS`) of the checkpoint at ``step`` (-1: the latest) in
    ``workdir/checkpoints``.

    The optimizer's and the timestep sampler's states are not read (``fresh``'s stay): a run evaluates
    whatever optimizer trained it, and under another ``train.optimizer`` or ``timesteps.sampling`` setting.
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):  # checked first: the manager would make the folder (a mistyped workdir)
        raise FileNotFoundError(f"No checkpoint in {os.path.abspath(directory)}; train first (--mode train).")
    ckpt = checkpoints.Checkpointer(directory)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}; train first (--mode train).")
        if step >= 0 and step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {ckpt.directory} (config.eval.step={step}); it holds steps "
                f"{steps}. Pass one of them, or -1 for the latest. Training keeps the last train.keep_checkpoints "
                "checkpoints, those at multiples of train.keep_every and at the fractions train.keep_at of "
                "train.num_steps (default 0.75; set them before training to keep other models)."
            )
        weights = ckpt.restore_fields(
            steps[-1] if step < 0 else step, {k: getattr(fresh, k) for k in WEIGHT_FIELDS}
        )
    finally:
        ckpt.close()
    return fresh.replace(**weights)


def trained_network(
    config: ml_collections.ConfigDict,
    workdir: str,
    image_channels: int,
    state: build.TrainState | None = None,
) -> tuple[Any, diffusion.Schedule, int, dict]:
    """(model, schedule, step, variables) of the run in ``workdir`` to sample with, reading no data.

    The network is built from the (resolved) config as training built it, for ``data.image_size`` crops of
    ``image_channels``-channel images. The weights are ``state``'s when it is given and ``config.eval.step`` is -1
    or its step, else those of the checkpoint at ``eval.step`` (-1: the latest); the EMA weights if
    :func:`uses_ema`, else the raw ones.
    """
    crop = config.data.image_size
    model, schedule, _, fresh = build.model_and_state(config, (crop, crop, image_channels), abstract=True)
    step = config.eval.step
    if state is None or 0 <= step != int(state.step):
        state = load_state(workdir, fresh, step)
    variables = {"params": state.ema_params if build.uses_ema(config) else state.params, **state.model_state}
    return model, schedule, int(state.step), variables
