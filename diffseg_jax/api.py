"""Programmatic use: configs by name, a trained run loaded from its folder, its jitted ensemble on any images.

::

    import diffseg_jax as dj

    config = dj.get_config("configs/quickstart.py:tiny")   # a file path, or a shipped config by name ("quickstart:tiny")
    run = dj.load_run("runs/quickstart")                   # its config.json, the weights it was evaluated with
    mean, std = run.segment(images, members=10, sampler="ddim", steps=50, key=0)

``segment`` is the ensemble ``--mode evaluate`` samples (``diffseg_jax.sampling.ensemble_maps``): members vmapped
and chunked, images batched and sharded over every device, stored images larger than the model's size cut into
tiles as the run's test images are, one compilation per setting. With the run's own settings and key
(``eval.seed``, the default) its mean map equals the one ``--mode evaluate`` wrote to ``eval/ensemble.npz``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from diffseg_jax import configlib, data, diffusion, evaluate, planning, restore, sampling, validation


def get_config(spec: str, lock: bool = True) -> ml_collections.ConfigDict:
    """The config ``--config spec`` gives: a file's path (``'configs/quickstart.py:tiny'``) or a config shipped
    with the package by name (``'quickstart:tiny'``, ``'e2_isic.py:segdiff'``), from any working directory; locked
    as on the command line unless ``lock=False``, so a misspelt key fails (``configlib.load_config``)."""
    return configlib.load_config(spec, lock)


@dataclasses.dataclass
class Run:
    """A trained run: its resolved config, network, schedule and the weights at ``step``."""

    workdir: str
    config: ml_collections.ConfigDict
    model: Any
    schedule: diffusion.Schedule
    variables: Any
    step: int
    _ensembles: dict = dataclasses.field(default_factory=dict, repr=False)

    def sampling_config(
        self,
        members: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        tta: str | None = None,
        batch_size: int | None = None,
    ) -> ml_collections.ConfigDict:
        """The run's config with these sampling settings (None: the run's own ``config.eval``), validated."""
        config = copy.deepcopy(self.config)
        with config.unlocked():
            if members is not None:
                config.eval.ensemble_size = int(members)
            if sampler is not None:
                config.eval.sampler = sampler
            if steps is not None:
                config.eval.ddim_steps = int(steps)
            if tta is not None:
                config.eval.tta = tta
            if batch_size is not None:
                config.eval.batch_size = int(batch_size)
        validation.validate(config, check_data=False)
        return config

    def ensemble(self, config: ml_collections.ConfigDict) -> Callable:
        """The jitted ensemble of ``config.eval``, built once per setting."""
        e = config.eval
        cache_key = (e.ensemble_size, e.sampler, e.ddim_steps, e.tta, e.member_chunk)
        if cache_key not in self._ensembles:
            self._ensembles[cache_key] = sampling.ensemble_fn(config, self.model, self.schedule)
        return self._ensembles[cache_key]

    def segment(
        self,
        images: np.ndarray,
        members: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        key: int | jax.Array | None = None,
        tta: str | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean and std maps (N, H, W, 1), foreground probabilities in [0, 1], of ``images``.

        ``images``: (N, H, W, C) in [0, 1] (uint8 is divided by 255), square, at the model's size or at the
        run's stored size (then tiled, as the run's test images; ``diffseg_jax.predict`` reads and resizes
        files of any size). ``members``, ``sampler`` ('ddpm' or 'ddim'), ``steps`` (DDIM's), ``tta`` and
        ``batch_size`` default to the run's ``config.eval``; ``key`` (an int seed or a PRNG key) to
        ``eval.seed``.
        """
        if self.config.experiment not in evaluate.SEGMENTATION_EXPERIMENTS:
            raise ValueError(
                f"{self.workdir} is an {self.config.experiment} run; segment() needs an e1 or e2 run (an image "
                "conditions only their networks)."
            )
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        images = images.astype(np.float32)
        if images.ndim == 3:
            images = images[..., None]
        sizes = (self.config.data.image_size, data.stored_size(self.config.data))
        if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] not in sizes:
            raise ValueError(
                f"images must be (N, S, S, C) with S the model's size {sizes[0]} or the run's stored size "
                f"{sizes[1]}; got {images.shape}. diffseg_jax.predict.read_inputs reads and resizes image files."
            )
        config = self.sampling_config(members, sampler, steps, tta, batch_size)
        if images.shape[1] != sizes[1]:  # model-sized images are fed whole
            with config.unlocked():
                config.data.resize = None
        if isinstance(key, int) or key is None:
            key = jax.random.PRNGKey(config.eval.seed if key is None else key)
        return sampling.ensemble_maps(
            config,
            self.model,
            self.schedule,
            self.variables,
            images,
            self.step,
            what="segment",
            ensemble=self.ensemble(config),
            key=key,
        )


def load_run(
    workdir: str, step: int = -1, weights: str | None = None, image_channels: int | None = None
) -> Run:
    """The run in ``workdir`` as it was trained: its recorded ``config.json``, and the checkpoint at ``step``
    (-1: the latest) with the weights it was evaluated with (``weights`` 'ema' or 'raw' overrides
    ``eval.use_ema``). Reads no data; ``image_channels`` defaults to ``data.image_channels``."""
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(
            f"{os.path.join(workdir, 'config.json')} does not exist: {workdir!r} is not a trained run's folder "
            "(--mode train writes config.json there)."
        )
    config = get_config(f"from_run.py:{workdir}")
    if weights not in (None, "ema", "raw"):
        raise ValueError(f"weights must be 'ema', 'raw' or None (as the run was evaluated), got {weights!r}.")
    with config.unlocked():
        config.eval.step = int(step)
        if weights is not None:
            config.eval.use_ema = weights == "ema"
    config = planning.prepare(config, workdir, "predict")  # as it was trained; no data needed
    channels = image_channels or config.data.image_channels
    model, schedule, at_step, variables = restore.trained_network(config, workdir, channels)
    return Run(os.path.abspath(workdir), config, model, schedule, variables, at_step)
