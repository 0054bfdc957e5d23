"""Ensemble evaluation: sample N members per test image (vmapped, jitted), mean/std maps, IoU.

Follows the EnsemDiff protocol (Wolleb et al.; author's answer in JuliaWolleb/Diffusion-based-Segmentation
issue #48): N independent reverse runs per image, the pixel-wise mean of the members thresholded at 0.5
is the segmentation, their pixel-wise spread the uncertainty map. E1 (feed-forward) models get their
members from the random noise fed in place of x_t, as in the paper (Sec. 4.1).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffseg_jax import checkpoints, data, diffusion, metrics, objectives, plots, train

THRESHOLD = 0.5  # A pixel is foreground when the ensemble mean is > 0.5.


def make_member_fn(
    model, schedule: diffusion.Schedule, config: ml_collections.ConfigDict
) -> Callable[[Any, jnp.ndarray, tuple[int, ...], jax.Array], jnp.ndarray]:
    """``member(variables, images_or_None, x_shape, key) -> values in [0,1]`` for one ensemble member.

    E1: sigmoid of the network on fresh noise; E2/E3: a reverse diffusion run of the mask (E3 without the
    image), mapped from diffusion space to [0,1]; E4: a generated image in [0,1]. A model with an
    ``encode_image`` method (SegDiff's image encoder F, independent of x_t and t) has it computed once per
    image rather than at every step — exact, and about a third of SegDiff's sampling compute. A model with
    a ``postprocess_member(sample01, extras)`` method combines the sample with the extras of its last call
    (MedSegDiff v1 blends its ``cal`` head in, as its sampler does).
    """
    experiment = config.experiment
    e1_t = config.objective.e1_timestep
    e1_t = schedule.num_timesteps - 1 if e1_t < 0 else e1_t
    settings = train.loss_settings(config)
    sampler = diffusion.SAMPLERS[config.eval.sampler]
    kwargs = dict(
        prediction=objectives.prediction_type(experiment),
        clip_range=(-1.0, 1.0) if config.eval.clip_denoised else None,
        variance="learned_range" if settings["learn_sigma"] else config.diffusion.variance,
        return_extras=True,
    )
    if config.eval.sampler == "ddim":
        kwargs.update(num_steps=config.eval.ddim_steps, eta=config.eval.ddim_eta)
    postprocess = getattr(model, "postprocess_member", None)
    encode = getattr(type(model), "encode_image", None)

    def member(variables, images, x_shape, key):
        cond = images if objectives.uses_image_condition(experiment) else None
        call_kwargs = {}
        if encode is not None and cond is not None:
            call_kwargs["image_features"] = model.apply(variables, cond, method=encode)
            cond = None
        rngs = train.model_rngs(jax.random.fold_in(key, 1))

        def model_fn(x, t):
            return model.apply(variables, x, t, cond, train=False, rngs=rngs, **call_kwargs)

        if experiment == "e1":
            t = jnp.full((x_shape[0],), e1_t, jnp.int32)
            logits, extras = objectives.split_output(model_fn(jax.random.normal(key, x_shape), t))
            out = jax.nn.sigmoid(logits[..., : x_shape[-1]])
        else:
            x, extras = sampler(model_fn, schedule, x_shape, key, **kwargs)
            if experiment == "e4":
                return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
            out = diffusion.diffusion_to_prob(x, config.diffusion.mask_range)
        return postprocess(out, extras) if postprocess is not None and extras else out

    return member


def make_ensemble_fn(member, num_members: int, member_chunk: int | None):
    """Jitted ``(variables, images, x_template, key) -> {mean, std}`` over ``num_members`` vmapped members."""

    def ensemble(variables, images, x_template, key):
        members = diffusion.ensemble_sample(
            lambda k: member(variables, images, x_template.shape, k), key, num_members, member_chunk
        )
        return diffusion.ensemble_statistics(members)

    return jax.jit(ensemble)


def evaluate(config: ml_collections.ConfigDict, workdir: str, state: train.TrainState | None = None) -> dict:
    """Samples the ensemble on the test split and writes ``workdir/eval/{metrics.json, ensemble.png}``.

    ``state`` (e.g. the state training just ended with) defaults to the latest checkpoint in ``workdir``;
    its EMA weights are used if ``eval.use_ema`` (the EnsemDiff authors sampled with the raw weights).
    """
    eval_cfg = config.eval
    _, model, schedule, _, fresh = train.setup(config, abstract=True)
    if state is None:
        ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}; train first (--mode train).")
        state, _ = ckpt.restore(step, fresh)
        ckpt.close()
    step = int(state.step)
    variables = {"params": state.ema_params if eval_cfg.use_ema else state.params, **state.model_state}
    test = data.eval_arrays(
        config.data, split="test", max_examples=None if eval_cfg.num_images < 0 else eval_cfg.num_images
    )
    num = len(test["image"])
    chunk = eval_cfg.member_chunk if eval_cfg.member_chunk > 0 else None
    ensemble = make_ensemble_fn(make_member_fn(model, schedule, config), eval_cfg.ensemble_size, chunk)
    key = jax.random.PRNGKey(eval_cfg.seed)
    x_key = "image" if config.experiment == "e4" else "mask"
    # Images stored larger than the model's size are cut into model-sized tiles (SegDiff's MoNuSeg protocol)
    # and the ensemble statistics stitched back, or fed whole to the fully convolutional network.
    inputs, template_src, grid = test["image"], test[x_key], None
    if data.stored_size(config.data) > config.data.image_size and config.data.eval_tiling == "tiles":
        inputs, grid = data.to_tiles(inputs, config.data.image_size)
        template_src, _ = data.to_tiles(template_src, config.data.image_size)
    means, stds = [], []
    t0 = time.time()
    for i, start in enumerate(range(0, len(inputs), eval_cfg.batch_size)):
        images = jnp.asarray(inputs[start : start + eval_cfg.batch_size])
        template = jnp.zeros(template_src[start : start + eval_cfg.batch_size].shape, jnp.float32)
        out = ensemble(variables, images, template, jax.random.fold_in(key, i))
        means.append(np.asarray(out["mean"]))
        stds.append(np.asarray(out["std"]))
        done = min(start + eval_cfg.batch_size, len(inputs))
        logging.info(
            "evaluate: %d/%d %s, %.2f/s",
            done,
            len(inputs),
            "tiles" if grid else "images",
            done / (time.time() - t0),
        )
    mean, std = np.concatenate(means), np.concatenate(stds)
    if grid is not None:
        mean, std = data.from_tiles(mean, grid), data.from_tiles(std, grid)

    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "experiment": config.experiment,
        "model": config.model.name,
        "ensemble_size": eval_cfg.ensemble_size,
        "sampler": eval_cfg.sampler,
        "num_images": num,
        "step": step,
    }
    if config.experiment in ("e1", "e2"):
        truth = test["mask"] > 0.5
        pred = mean > THRESHOLD
        per_image = np.asarray(metrics.per_image(metrics.iou, pred, truth))
        result.update(
            iou=float(per_image.mean()),
            iou_pooled=float(metrics.iou(pred, truth)),
            dice=float(np.mean(metrics.per_image(metrics.dice, pred, truth))),
            baseline_iou_all_foreground=float(
                np.mean(metrics.per_image(metrics.iou, np.ones_like(truth), truth))
            ),
            baseline_iou_all_background=float(
                np.mean(metrics.per_image(metrics.iou, np.zeros_like(truth), truth))
            ),
            mean_std=float(std.mean()),
        )
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    np.savez_compressed(
        os.path.join(out_dir, "ensemble.npz"),
        mean=mean,
        std=std,
        mask=test["mask"],
        ids=np.asarray(test["id"]),
    )
    n_fig = min(eval_cfg.num_figure_images, num)
    plots.ensemble_figure(
        test["image"][:n_fig],
        test["mask"][:n_fig],
        mean[:n_fig],
        std[:n_fig],
        os.path.join(out_dir, "ensemble.png"),
        generated=config.experiment == "e4",
    )
    logging.info("evaluate: %s", json.dumps(result))
    return result
