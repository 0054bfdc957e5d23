"""Sampling: the jitted member and ensemble samplers of a config, and the ensembles of many images.

A member is one reverse run of the diffusion sampler (or one feed-forward pass for E1) on a batch of images; an
ensemble vmaps members in chunks (optionally over test-time augmentations); :func:`sample_statistics` runs it
over any number of images, batched and sharded over the devices, keeping each finished batch in a resumable
store so that a crash loses nothing. Evaluation, prediction, the protocols and ``diffseg_jax.api`` sample
through here."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffseg_jax import (
    auto_batch,
    batch_store,
    build,
    data,
    diffusion,
    distributed,
    objectives,
    writers,
)

THRESHOLD = 0.5  # A pixel is foreground when the ensemble mean is > 0.5.
# config eval.member_output: average the members' values ('soft', as the official codes) or their votes ('hard').
MEMBER_OUTPUTS = ("soft", "hard")


def make_member_fn(
    model, schedule: diffusion.Schedule, config: ml_collections.ConfigDict
) -> Callable[[Any, jnp.ndarray, tuple[int, ...], jax.Array], jnp.ndarray]:
    """``member(variables, images_or_None, x_shape, key) -> values in [0,1]`` for one ensemble member.

    E1: sigmoid of the network on fresh noise; E2/E3: a reverse diffusion run of the mask (E3 without the
    image), mapped from diffusion space to [0,1] (under ``diffusion.process='bernoulli'``, BerDiff's sampler, whose
    last step's x̂0 is already a probability map; ``eval.sampler`` 'ddpm' is its ancestral sampler over all T, 'ddim'
    its DDIM-like one over ``eval.ddim_steps``); E4: a generated image in [0,1]. A model with an
    ``encode_image`` method (SegDiff's image encoder F, independent of x_t and t) has it computed once per
    image rather than at every step — exact, and about a third of SegDiff's sampling compute. A model with
    a ``postprocess_member(sample, extras)`` method combines a diffusion sample with the extras of its last
    call (MedSegDiff v1 blends its ``cal`` head in, as its sampler does; :func:`diffusion_member`), with the
    extras of trained auxiliary heads only (``objective.cal_weight`` > 0 under the published loss); an E1
    member is the network's sigmoid alone (the paper's classical segmentation). With
    ``eval.member_output='hard'`` each segmentation member is then thresholded at 0.5 (a vote); the default
    'soft' keeps its values, as the EnsemDiff, SegDiff and MedSegDiff codes average their continuous samples.
    """
    experiment = config.experiment
    e1_t = config.objective.e1_timestep
    e1_t = schedule.num_timesteps - 1 if e1_t < 0 else e1_t
    settings = build.loss_settings(config)
    bernoulli = settings["process"] == "bernoulli"
    sampler = diffusion.samplers_of(settings["process"])[config.eval.sampler]
    if bernoulli:  # BerDiff (issue 33): x_T ~ B(1/2), Bernoulli draws; the member is the last step's x̂0 map
        kwargs = dict(
            prediction=settings["prediction"], mask_range=config.diffusion.mask_range, return_extras=True
        )
    else:
        kwargs = dict(
            prediction=settings["prediction"],
            clip_range=(-1.0, 1.0) if config.eval.clip_denoised else None,
            variance="learned_range" if settings["learn_sigma"] else config.diffusion.variance,
            return_extras=True,
        )
    if settings["self_condition_prob"] > 0:  # issue 33: feed the previous step's x̂0
        kwargs["self_condition"] = True
    if config.eval.sampler == "ddim":
        kwargs.update(num_steps=config.eval.ddim_steps)
        if not bernoulli:  # BerDiff's DDIM-like step has no η
            kwargs.update(eta=config.eval.ddim_eta)
    postprocess = getattr(model, "postprocess_member", None)
    encode = getattr(type(model), "encode_image", None)
    hard = config.eval.member_output == "hard"

    def member(variables, images, x_shape, key):
        cond = images if objectives.uses_image_condition(experiment) else None
        call_kwargs = {}
        if encode is not None and cond is not None:
            call_kwargs["image_features"] = model.apply(variables, cond, method=encode)
            cond = None
        rngs = build.model_rngs(jax.random.fold_in(key, 1))

        def model_fn(x, t):
            return model.apply(variables, x, t, cond, train=False, rngs=rngs, **call_kwargs)

        if experiment == "e1":  # classical segmentation: the sigmoid, no auxiliary head blended in
            t = jnp.full((x_shape[0],), e1_t, jnp.int32)
            logits, _ = objectives.split_output(model_fn(jax.random.normal(key, x_shape), t))
            out = jax.nn.sigmoid(logits[..., : x_shape[-1]])
        else:
            x, extras = sampler(model_fn, schedule, x_shape, key, **kwargs)
            if experiment == "e4":
                return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
            # Only heads the loss trained take part: with objective.loss=eps_mse MedSegDiff's cal head is
            # untrained noise, and blending it in would corrupt the members.
            extras = {k: v for k, v in (extras or {}).items() if settings["aux_weights"].get(k, 0.0) > 0}
            if bernoulli:  # already a probability map on the mask's scale
                out = postprocess(x, extras) if postprocess is not None and extras else x
            else:
                out = diffusion_member(x, extras, config.diffusion.mask_range, postprocess)
        return (out > THRESHOLD).astype(out.dtype) if hard else out

    return member


def diffusion_member(x: jnp.ndarray, extras: dict, mask_range: str, postprocess=None) -> jnp.ndarray:
    """A diffusion sample ``x`` (diffusion space) as a member's values in [0, 1].

    Without extras to combine: :func:`diffusion.diffusion_to_prob`. With a model's ``postprocess_member`` and
    the extras of its last call (MedSegDiff v1's ``cal``), the sample goes in on the mask's {0,1} scale,
    unclipped (:func:`diffusion.diffusion_to_mask_scale`): the raw output of its sampler (x̂0 clipped to
    [-1, 1] under its {0,1} masks), which its blend ``clip(cal + 0.25 s, 0, 1)`` takes, negative values included.
    """
    if postprocess is not None and extras:
        return postprocess(diffusion.diffusion_to_mask_scale(x, mask_range), extras)
    return diffusion.diffusion_to_prob(x, mask_range)


def ensemble_fn(config: ml_collections.ConfigDict, model, schedule: diffusion.Schedule) -> Callable:
    """The jitted ensemble ``config.eval`` describes (:func:`make_ensemble_fn` of :func:`make_member_fn`)."""
    chunk = config.eval.member_chunk if config.eval.member_chunk > 0 else None
    return make_ensemble_fn(
        make_member_fn(model, schedule, config),
        config.eval.ensemble_size,
        chunk,
        tta=config.eval.tta,
    )


def make_ensemble_fn(member, num_members: int, member_chunk: int | None, tta: str = "none"):
    """Jitted ``(variables, images, x_template, key) -> {mean, std}`` over ``num_members`` vmapped members.

    With test-time augmentation (``tta`` 'flips' or 'd4', square inputs) each member runs on every transform of
    the images and its output is transformed back, so the statistics are over ``num_members`` x 4 (or 8)
    outputs: the stronger feed-forward ensemble the paper (Sec. 4.1, its ref. [10]) expects to narrow the gap to
    diffusion. The transforms run in a ``lax.map`` (the sampler is traced once); the identity's members use
    ``key`` itself, so they equal the ensemble without augmentation.
    """
    transforms = diffusion.TTA_TRANSFORMS[tta]

    def members_of(variables, images, x_template, key):
        return diffusion.ensemble_sample(
            lambda k: member(variables, images, x_template.shape, k), key, num_members, member_chunk
        )

    def ensemble(variables, images, x_template, key):
        if len(transforms) == 1:
            return diffusion.ensemble_statistics(members_of(variables, images, x_template, key))

        def one(args):
            i, k = args
            forward = [lambda a, r=r, f=f: diffusion.dihedral(a, r, f) for r, f in transforms]
            back = [lambda a, r=r, f=f: diffusion.dihedral(a, r, f, inverse=True) for r, f in transforms]
            seen = jax.lax.switch(i, forward, images)
            return jax.lax.switch(i, back, members_of(variables, seen, x_template, k))

        keys = jnp.stack([key] + [jax.random.fold_in(key, i) for i in range(1, len(transforms))])
        outputs = jax.lax.map(one, (jnp.arange(len(transforms)), keys))  # (T, members, N, H, W, C)
        return diffusion.ensemble_statistics(outputs.reshape(-1, *outputs.shape[2:]))

    return jax.jit(ensemble)


def weights_digest(variables: Any) -> str:
    """A cheap fingerprint of the weights (sum of |w| and the leaf count): tells a retrained model from the one
    a partial evaluation sampled, without moving the weights to the host."""
    # The first local copy of each (replicated) leaf: also defined when the arrays span several hosts.
    leaves = [x.addressable_data(0) if isinstance(x, jax.Array) else x for x in jax.tree.leaves(variables)]
    total = jax.jit(lambda ls: sum(jnp.sum(jnp.abs(jnp.asarray(x, jnp.float32))) for x in ls))(leaves)
    return f"{len(leaves)}:{float(total):.9g}"


def sample_statistics(
    ensemble: Callable,
    variables: Any,
    inputs: np.ndarray,
    x_shape: tuple[int, ...],
    batch_size: int,
    key: jax.Array,
    resume_dir: str | None = None,
    run_id: dict | None = None,
    what: str = "evaluate",
    first_batch: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble mean and std for every input, ``batch_size`` images at a time, sharded over all devices.

    Every batch is padded to the same size, a multiple of the device count (one compilation), and split
    along the image axis over every host's devices (members stay on the device of their image: no
    communication); each host holds all inputs and gets all outputs. Batch ``i`` uses
    ``fold_in(key, first_batch + i)`` (a later part of a longer set of inputs passes its first batch's index);
    when ``batch_size`` is a multiple of the device count the samples do not depend on how many devices there
    are. Logs images/s and the time left, each line starting with ``what``.

    With ``resume_dir`` nothing sampled is lost on a crash: process 0 writes each batch's statistics there as
    it is done (whole files only), and a rerun of the same evaluation (``run_id``, e.g. the step and sampler,
    plus the inputs, the weights, the key and the batching) reads them back and samples only the rest; since
    batch ``i`` depends only on ``fold_in(key, i)``, the result equals an uninterrupted run. Several hosts
    need a shared ``resume_dir`` (as they need a shared checkpoint folder); process 0's count is used by all.
    """
    mesh = distributed.data_mesh()
    n_dev = mesh.size
    per_batch = -(-batch_size // n_dev) * n_dev
    sharded = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    variables = jax.device_put(variables, replicated)
    num = len(inputs)
    means, stds = [], []  # with resume_dir: the batches a previous run of this evaluation finished
    store = None
    if resume_dir is not None:
        run_id = {
            **(run_id or {}),
            "num": num,
            "x_shape": [int(d) for d in x_shape],
            "batch_size": int(batch_size),
            "per_batch": int(per_batch),
            "inputs_sha1": hashlib.sha1(np.ascontiguousarray(inputs).tobytes()).hexdigest(),
            "key": np.asarray(jax.random.key_data(key)).ravel().tolist(),
            "first_batch": int(first_batch),
            "weights_digest": weights_digest(variables),
        }
        store = batch_store.BatchStore(resume_dir, run_id)
        for i in range(store.open()):
            saved = store.load(i)
            means.append(saved["mean"])
            stds.append(saved["std"])
        if means:
            logging.info(
                "%s: resuming after %d of %d images, read from %s.",
                what,
                sum(map(len, means)),
                num,
                resume_dir,
            )
    t0, start0 = time.time(), len(means) * batch_size
    template = distributed.from_global(np.zeros((per_batch,) + tuple(x_shape), np.float32), sharded)
    for i, start in enumerate(range(start0, num, batch_size), start=len(means)):
        batch = inputs[start : start + batch_size]
        n = len(batch)
        pad = [(0, per_batch - n)] + [(0, 0)] * (batch.ndim - 1) if n < per_batch else None
        images = distributed.from_global(np.pad(batch, pad) if pad else batch, sharded)
        out = ensemble(variables, images, template, jax.random.fold_in(key, first_batch + i))
        means.append(distributed.to_host(out["mean"])[:n])
        stds.append(distributed.to_host(out["std"])[:n])
        if store is not None:
            store.save(i, mean=means[-1], std=stds[-1])
        done = start + n
        rate = (done - start0) / (time.time() - t0)
        logging.info(
            "%s: %d/%d images, %.2f images/s, ETA %s",
            what,
            done,
            num,
            rate,
            writers.format_duration((num - done) / rate),
        )
    return np.concatenate(means), np.concatenate(stds)


def ensemble_maps(
    config: ml_collections.ConfigDict,
    model,
    schedule: diffusion.Schedule,
    variables: Any,
    images: np.ndarray,
    step: int,
    resume_dir: str | None = None,
    x_channels: int = 1,
    what: str = "evaluate",
    batch_size: int | None = None,
    first_batch: int = 0,
    ensemble: Callable | None = None,
    key: jax.Array | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble mean and std maps of ``images`` (N, S, S, C) at the stored size, as ``--mode evaluate``
    samples them: images stored larger than the model's size are cut into model-sized tiles (SegDiff's MoNuSeg
    protocol) and the maps stitched back, or fed whole to the fully convolutional network
    (``data.eval_tiling``); ``eval.ensemble_size`` members in chunks of ``eval.member_chunk``, ``eval.batch_size``
    images (or tiles) at a time (``batch_size`` overrides it: fewer inputs than a batch can be one smaller batch
    instead of a padded whole one; ``auto_batch.AUTO_BATCH``: chosen from the device's memory, :func:`diffseg_jax.auto_batch.auto_batch_size`), ``key`` (default ``PRNGKey(eval.seed)``); ``first_batch`` is the index of the first batch when
    ``images`` continue a longer set (see :func:`sample_statistics`); such a caller passes the same
    :func:`ensemble_fn` to every part, compiled once. ``step`` and the config identify the samples kept in
    ``resume_dir``.
    """
    eval_cfg = config.eval
    ensemble = ensemble or ensemble_fn(config, model, schedule)
    inputs, grid = images, None
    if tiles_per_image(config.data) > 1:
        inputs, grid = data.to_tiles(inputs, config.data.image_size)
    batch_size = batch_size or eval_cfg.batch_size
    if batch_size == auto_batch.AUTO_BATCH:
        batch_size = auto_batch.auto_batch_size(
            ensemble,
            variables,
            inputs.shape[1:],
            inputs.shape[1:3] + (x_channels,),
            len(inputs),
            what,
            inputs.dtype,
        )
    tta = eval_cfg.tta
    logging.info(
        "%s: %d-member ensembles (%s%s) of %d %s at step %d with the %s weights.",
        what,
        eval_cfg.ensemble_size,
        eval_cfg.sampler if eval_cfg.sampler == "ddpm" else f"ddim-{eval_cfg.ddim_steps}",
        "" if tta == "none" else f", each on the {len(diffusion.TTA_TRANSFORMS[tta])} '{tta}' transforms",
        len(inputs),
        "tiles" if grid else "images",
        step,
        "EMA" if build.uses_ema(config) else "raw",
    )
    mean, std = sample_statistics(
        ensemble,
        variables,
        inputs,
        inputs.shape[1:3] + (x_channels,),
        batch_size,
        jax.random.PRNGKey(eval_cfg.seed) if key is None else key,
        resume_dir=resume_dir,
        run_id={"evaluation": sampling_id(config, step)},
        what=what,
        first_batch=first_batch,
    )
    if grid is not None:
        mean, std = data.from_tiles(mean, grid), data.from_tiles(std, grid)
    return mean, std


def tiles_per_image(data_config: ml_collections.ConfigDict) -> int:
    """How many model-sized tiles :func:`ensemble_maps` cuts each stored image into (1: fed whole)."""
    stored, size = data.stored_size(data_config), data_config.image_size
    return (stored // size) ** 2 if stored > size and data_config.eval_tiling == "tiles" else 1


def sampling_id(config: ml_collections.ConfigDict, step: int) -> dict:
    """Everything in the config, and the step, that shapes an ensemble's samples (conservative: a change to any
    of it starts a resumed evaluation or prediction afresh)."""
    return {
        "experiment": config.experiment,
        "model": config.model.to_dict(),
        "step": step,
        "diffusion": config.diffusion.to_dict(),
        "eval": {k: v for k, v in config.eval.to_dict().items() if k not in _REPORTING_ONLY},
    }


# Evaluation settings that change only the scoring, the figures or the memory held, not the samples.
_REPORTING_ONLY = ("enabled", "num_figure_images", "pooling", "ece_bins", "predict_chunk")
