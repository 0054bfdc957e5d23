"""Data-driven plans, resolved before a run: nnU-Net plans its network, patch and batch from the training set.

A model config with a ``plan`` group (``diffseg_jax/defaults.py:nnunet_model``) is planned when ``model.plan.mode`` is
``'auto'``: :func:`resolve` reads the fingerprint of the ``train`` split (the median stored image size, the number
of images, the channels; nnU-Net plans on all training cases, so the feed-forward protocol's 80 % phase uses the
same plan), runs nnU-Net's 2D planner (``diffseg_jax.models.nnunet_plan``) and returns a config with the planned
architecture, ``data.image_size`` = the patch size and ``train.batch_size`` = the planned batch size (rounded up
to a multiple of the device count: a sharded batch splits evenly, where nnU-Net's DDP splits it unevenly), marked
``'planned'``. ``'fixed'`` uses the architecture, image size and batch size as configured. Every entry point
(training, evaluation, the feed-forward protocol) resolves the config it is given, and the result depends only on
the data, so they agree; a resolved config resolves to itself.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from diffseg_jax import adaptive, configlib, data, validation
from diffseg_jax.models import nnunet_plan

PLAN_MODES = ("auto", "planned", "fixed")


@functools.lru_cache(maxsize=8)
def _train_fingerprint(data_json: str) -> tuple[tuple[float, float], int, int]:
    source = data.load_split(ml_collections.ConfigDict(json.loads(data_json)), "train")
    shapes = np.array([np.shape(source[i]["image"]) for i in range(len(source))])
    if not len(shapes):
        raise ValueError("The training split is empty: nothing to plan from.")
    median = np.median(shapes[:, :2], axis=0)
    return (float(median[0]), float(median[1])), len(shapes), int(shapes[0][2])


def train_fingerprint(data_config: ml_collections.ConfigDict) -> tuple[tuple[float, float], int, int]:
    """(median stored (H, W), number of images, channels) of the ``train`` split, as nnU-Net's fingerprint."""
    return _train_fingerprint(data_config.to_json_best_effort(sort_keys=True))


def _plan_settings(plan_config: ml_collections.ConfigDict) -> dict:
    return dict(
        num_classes=plan_config.num_classes,
        base_features=plan_config.base_features,
        max_features=plan_config.max_features,
        gpu_memory_gb=plan_config.gpu_memory_gb,
    )


def resolve(
    config: ml_collections.ConfigDict, fingerprint: tuple[tuple[float, float], int, int] | None = None
) -> ml_collections.ConfigDict:
    """``config`` with its model planned if ``model.plan.mode == 'auto'`` (see the module docstring) and, with
    ``diffusion.terminal`` set and ``diffusion.alpha_bar_T == -1``, the terminal noise chosen from the training
    masks (``diffseg_jax.adaptive``); else ``config`` itself.

    ``fingerprint`` ((H, W), images, channels) replaces reading the training split (``--mode summary``, which
    leaves an automatic terminal noise unresolved: it needs the masks).
    """
    if fingerprint is None:
        config = adaptive.resolve_terminal(config)
    plan_config = config.model.get("plan", None)
    if plan_config is None or plan_config.mode != "auto":
        return config
    (h, w), num_images, channels = fingerprint or train_fingerprint(config.data)
    plan = nnunet_plan.plan_2d((h, w), num_images, channels, **_plan_settings(plan_config))
    patch, stored = plan.patch_size, data.stored_size(config.data)
    if patch[0] != patch[1] or patch[0] > stored:
        raise ValueError(
            f"nnU-Net planned a {patch[0]}x{patch[1]} patch for {h:g}x{w:g} images stored at {stored} px; the input "
            "pipeline trains on square crops of the stored images. Store the images at a multiple of 16 px "
            "(data.resize), or set model.plan.mode=fixed with the architecture, data.image_size and "
            "train.batch_size of your choice."
        )
    c = copy.deepcopy(config)
    for key, value in plan.architecture().items():
        c.model[key] = value
    c.model.plan.mode = "planned"
    c.model.plan.median_size = (h, w)
    c.model.plan.num_images = num_images
    c.data.image_size = patch[0]
    devices = jax.device_count()
    c.train.batch_size = -(-plan.batch_size // devices) * devices
    if c.train.batch_size != plan.batch_size:
        logging.warning(
            "nnU-Net planned batch size %d; using %d, a multiple of the %d devices.",
            plan.batch_size,
            c.train.batch_size,
            devices,
        )
    validation.validate(c, check_data=fingerprint is None)
    return c


# What a trained network means, beyond its array shapes (which the checkpoint restore checks): sampling a run
# under other values gives wrong results without an error, e.g. an E1 network run as an E2 denoiser.
AS_TRAINED = (
    "experiment",
    "model.name",
    "data.image_size",
    "diffusion.schedule",
    "diffusion.num_timesteps",
    "diffusion.beta_start",
    "diffusion.beta_end",
    "diffusion.mask_range",
    "diffusion.learn_sigma",
    "diffusion.terminal",
    "objective.e1_timestep",
)


def _check_as_trained(config, recorded, path: str, workdir: str, resuming: bool = False) -> None:
    """Raises if ``config`` differs from the run's record on a key of :data:`AS_TRAINED` (``resuming``: when
    training would go on from the run's checkpoint)."""

    def get(c, dotted):
        node = c
        for part in dotted.split("."):
            node = node.get(part, None) if node is not None else None
        return node

    keys = [
        k
        for k in AS_TRAINED
        if not (k == "data.image_size" and config.model.get("plan"))  # a planned patch comes from the record
        and not (k == "objective.e1_timestep" and config.experiment != "e1")
    ]
    differ = [(k, get(recorded, k), get(config, k)) for k in keys]
    differ = [(k, a, b) for k, a, b in differ if a is not None and b is not None and a != b]
    if differ:
        shown = "; ".join(f"{k}: trained with {a!r}, this config has {b!r}" for k, a, b in differ)
        if resuming:
            raise configlib.ConfigError(
                f"The run in {workdir} was trained with other settings than this command's config ({shown}); "
                f"resuming from its checkpoint would train on a different model or process. Pass the config it "
                f"was trained with ({path} records it; configs/from_run.py:{workdir} reads it back), or start "
                "the new setting in another --workdir."
            )
        raise configlib.ConfigError(
            f"The run in {workdir} was trained with other settings than this command's config ({shown}); its "
            f"network would sample wrong results. Pass the config it was trained with (the same --config file and "
            f"overrides; {path} records them). Another test set (data.name, data.manual_dir, data.resize) and "
            "the sampling settings (eval.*, diffusion.variance) may differ."
        )


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Before training resumes from ``workdir``'s checkpoint: refuses a ``config`` (resolved) that differs from
    the run's ``config.json`` on what the network means (:data:`AS_TRAINED`), naming the keys, and logs every
    other setting that changes (e.g. ``train.num_steps`` raised to train on). A run without a record passes."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    recorded = configlib.load(path)
    _check_as_trained(config, recorded, path, workdir, resuming=True)
    old, new = configlib.flatten(recorded.to_dict()), configlib.flatten(config.to_dict())
    changed = [
        f"{k}: {configlib.tuples(old[k])!r} -> {configlib.tuples(new[k])!r}"
        for k in sorted(set(old) & set(new))
        if configlib.tuples(old[k]) != configlib.tuples(new[k])
    ]
    if changed:
        logging.info("Resuming the run in %s with changed settings: %s.", workdir, "; ".join(changed))


def resolve_as_trained(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """``config`` resolved as the training run in ``workdir`` resolved it, from the ``config.json`` it recorded.

    The data-driven parts (nnU-Net's automatic plan: architecture, patch and batch size; an automatic terminal
    noise) are taken from the record instead of the data, so that a trained run can be evaluated on an external
    test set or segment image files (whose folders have no training split to plan from) with the network its
    checkpoint holds. Without a record, or with nothing to resolve, this is :func:`resolve`. A config that
    differs from the record on what the network means (:data:`AS_TRAINED`) is refused, naming the keys.
    """
    plan_config = config.model.get("plan", None)
    needs_plan = plan_config is not None and plan_config.mode == "auto"
    d = config.diffusion
    needs_terminal = d.terminal != "none" and d.alpha_bar_T <= 0
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return resolve(config)
    recorded = configlib.load(path)
    _check_as_trained(config, recorded, path, workdir)
    if not (needs_plan or needs_terminal):
        return resolve(config)
    c = copy.deepcopy(config)
    if needs_terminal:
        c.diffusion.alpha_bar_T = float(recorded.diffusion.alpha_bar_T)
    if needs_plan:
        if recorded.model.get("name") != config.model.name or recorded.model.plan.mode != "planned":
            raise configlib.ConfigError(
                f"{path} records model {recorded.model.get('name')!r} (plan {recorded.model.plan.mode!r}), not the "
                f"planned {config.model.name!r} of this config; pass the config the run in {workdir} was trained with."
            )
        with c.unlocked():
            for key, value in recorded.model.items():
                c.model[key] = configlib.tuples(
                    value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
                )
        c.data.image_size = int(recorded.data.image_size)
        c.train.batch_size = int(recorded.train.batch_size)
    logging.info("Plan / terminal noise as recorded by the training run in %s.", path)
    return c


def describe(config: ml_collections.ConfigDict, source: str | None = None) -> str | None:
    """The plan of ``config``'s model as printed at the start of training (None for a model without a plan).

    ``source`` replaces the description of where the plan came from; the config's batch size is shown unless
    ``source`` is given and the config's ``train.batch_size`` is not from a plan (``--mode summary``)."""
    p = config.model.get("plan", None)
    if p is None:
        return None
    m = config.model
    size = config.data.image_size
    strides = tuple(tuple(s) for s in m.strides)
    estimate = nnunet_plan.feature_map_size(
        (size, size),
        m.features_per_stage,
        strides,
        m.n_conv_per_stage,
        m.n_conv_per_stage_decoder,
        p.num_classes,
    )
    plan = nnunet_plan.Plan(
        patch_size=(size, size),
        batch_size=config.train.batch_size if source is None else None,
        features_per_stage=tuple(m.features_per_stage),
        strides=strides,
        kernel_sizes=tuple(tuple(k) for k in m.kernel_sizes),
        n_conv_per_stage=tuple(m.n_conv_per_stage),
        n_conv_per_stage_decoder=tuple(m.n_conv_per_stage_decoder),
        vram_estimate=estimate,
        vram_reference=nnunet_plan.REFERENCE_VRAM_2D * p.gpu_memory_gb / nnunet_plan.REFERENCE_GB,
    )
    if source is None:
        source = {
            "planned": f"a training set of {p.num_images} images of median size "
            f"{p.median_size[0]:g}x{p.median_size[1]:g}",
            "fixed": "model.plan.mode=fixed: as configured",
        }.get(p.mode, "not yet planned (model.plan.mode=auto plans from the training set)")
    return nnunet_plan.format_plan(plan, source)


# Modes whose network is a trained run's: the plan and terminal noise come from its config.json, not the data.
AS_TRAINED_MODES = ("evaluate", "predict", "analyse")
MODES = ("train", "e1_protocol", "e2_protocol", "fingerprint", "summary") + AS_TRAINED_MODES


def prepare(
    config: ml_collections.ConfigDict, workdir: str | None = None, mode: str = "train"
) -> ml_collections.ConfigDict:
    """The one preparation of a config before ``mode`` runs: validation (every impossible setting named with its
    key and fix, before anything is built or written), then the data-driven parts: nnU-Net's plan and an
    automatic terminal noise from the training data (:func:`resolve`), or, for a trained run in ``workdir``
    (:data:`AS_TRAINED_MODES`), as its ``config.json`` records them (:func:`resolve_as_trained`). ``predict``
    and ``summary`` need no data (``summary`` plans from an assumed fingerprint itself). A prepared config
    prepares to itself, so each entry point (``train.train``, ``evaluate.evaluate``, ``predict.predict``,
    ``analysis.run.analyse``, ``protocol.run``) calls this whether or not its caller did."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    validation.validate(config, check_data=mode not in ("predict", "summary"))
    if mode == "summary":
        return config
    if mode in AS_TRAINED_MODES:
        if workdir is None:
            raise ValueError(f"mode {mode!r} prepares a trained run's config: pass its workdir.")
        return resolve_as_trained(config, workdir)
    return resolve(config)
