"""Ensemble evaluation: sample N members per test image (vmapped, jitted, sharded), mean/std maps, IoU, ECE.

Follows the EnsemDiff protocol (Wolleb et al.; author's answer in JuliaWolleb/Diffusion-based-Segmentation
issue #48): N independent reverse runs per image, the pixel-wise mean of the members thresholded at 0.5
is the segmentation, their pixel-wise spread the uncertainty map. E1 (feed-forward) models get their
members from the random noise fed in place of x_t, as in the paper (Sec. 4.1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
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
    checkpoints,
    configlib,
    data,
    diffusion,
    distributed,
    metrics,
    objectives,
    planning,
    plots,
    report,
    train,
    writers,
)

THRESHOLD = 0.5  # A pixel is foreground when the ensemble mean is > 0.5.


def make_member_fn(
    model, schedule: diffusion.Schedule, config: ml_collections.ConfigDict
) -> Callable[[Any, jnp.ndarray, tuple[int, ...], jax.Array], jnp.ndarray]:
    """``member(variables, images_or_None, x_shape, key) -> values in [0,1]`` for one ensemble member.

    E1: sigmoid of the network on fresh noise; E2/E3: a reverse diffusion run of the mask (E3 without the
    image), mapped from diffusion space to [0,1]; E4: a generated image in [0,1]. A model with an
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
    settings = train.loss_settings(config)
    sampler = diffusion.SAMPLERS[config.eval.sampler]
    kwargs = dict(
        prediction=settings["prediction"],
        clip_range=(-1.0, 1.0) if config.eval.clip_denoised else None,
        variance="learned_range" if settings["learn_sigma"] else config.diffusion.variance,
        return_extras=True,
    )
    if settings["self_condition_prob"] > 0:  # issue 33: feed the previous step's x̂0
        kwargs["self_condition"] = True
    if config.eval.sampler == "ddim":
        kwargs.update(num_steps=config.eval.ddim_steps, eta=config.eval.ddim_eta)
    postprocess = getattr(model, "postprocess_member", None)
    encode = getattr(type(model), "encode_image", None)
    hard = config.eval.get("member_output", "soft") == "hard"

    def member(variables, images, x_shape, key):
        cond = images if objectives.uses_image_condition(experiment) else None
        call_kwargs = {}
        if encode is not None and cond is not None:
            call_kwargs["image_features"] = model.apply(variables, cond, method=encode)
            cond = None
        rngs = train.model_rngs(jax.random.fold_in(key, 1))

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
        tta=config.eval.get("tta", "none"),
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


def uses_ema(config: ml_collections.ConfigDict) -> bool:
    """Whether sampling reads the EMA weights: ``eval.use_ema`` for a diffusion experiment; for E1
    ``eval.e1_use_ema`` (default False). The paper trains E1 "classically", so its protocol's epoch choice and
    its evaluation take the raw weights, whatever EMA the architecture's scheme keeps for diffusion (SegDiff's
    0.9999 lags about 10k steps behind at E1's lr 1e-5)."""
    if config.experiment == "e1":
        return bool(config.eval.get("e1_use_ema", False))
    return bool(config.eval.use_ema)


WEIGHT_FIELDS = ("step", "params", "ema_params", "model_state")  # what sampling reads of a train state


def load_state(workdir: str, fresh: train.TrainState, step: int = -1) -> train.TrainState:
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
    state: train.TrainState | None = None,
) -> tuple[Any, diffusion.Schedule, int, dict]:
    """(model, schedule, step, variables) of the run in ``workdir`` to sample with, reading no data.

    The network is built from the (resolved) config as training built it, for ``data.image_size`` crops of
    ``image_channels``-channel images. The weights are ``state``'s when it is given and ``config.eval.step`` is -1
    or its step, else those of the checkpoint at ``eval.step`` (-1: the latest); the EMA weights if
    :func:`uses_ema`, else the raw ones.
    """
    crop = config.data.image_size
    model, schedule, _, fresh = train.model_and_state(config, (crop, crop, image_channels), abstract=True)
    step = config.eval.get("step", -1)
    if state is None or 0 <= step != int(state.step):
        state = load_state(workdir, fresh, step)
    variables = {"params": state.ema_params if uses_ema(config) else state.params, **state.model_state}
    return model, schedule, int(state.step), variables


def weights_digest(variables: Any) -> str:
    """A cheap fingerprint of the weights (sum of |w| and the leaf count): tells a retrained model from the one
    a partial evaluation sampled, without moving the weights to the host."""
    # The first local copy of each (replicated) leaf: also defined when the arrays span several hosts.
    leaves = [x.addressable_data(0) if isinstance(x, jax.Array) else x for x in jax.tree.leaves(variables)]
    total = jax.jit(lambda ls: sum(jnp.sum(jnp.abs(jnp.asarray(x, jnp.float32))) for x in ls))(leaves)
    return f"{len(leaves)}:{float(total):.9g}"


def _resumable_batches(resume_dir: str, run_id: dict) -> int:
    """How many leading batches ``resume_dir`` holds for exactly this evaluation (0 for another one)."""
    try:
        with open(os.path.join(resume_dir, "meta.json"), encoding="utf-8") as f:
            if json.load(f) != run_id:
                return 0
    except (OSError, ValueError):
        return 0
    done = 0
    while os.path.exists(os.path.join(resume_dir, f"batch_{done:05d}.npz")):
        done += 1
    return done


def _resume(resume_dir: str, run_id: dict, num: int, what: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The means and stds of the leading batches ``resume_dir`` holds for this evaluation (every process reads
    process 0's count); process 0 then clears another evaluation's batches and records ``run_id``."""
    done = distributed.primary_count(_resumable_batches(resume_dir, run_id))
    means, stds = [], []
    for i in range(done):
        with np.load(os.path.join(resume_dir, f"batch_{i:05d}.npz")) as saved:
            means.append(saved["mean"])
            stds.append(saved["std"])
    if done:
        logging.info(
            "%s: resuming after %d of %d images, read from %s.", what, sum(map(len, means)), num, resume_dir
        )
    if distributed.is_primary():
        if not done and os.path.isdir(resume_dir):
            shutil.rmtree(resume_dir)  # another evaluation's batches
        os.makedirs(resume_dir, exist_ok=True)
        with open(os.path.join(resume_dir, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(run_id, f)
    return means, stds


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
    mesh = train.data_mesh()
    n_dev = mesh.size
    per_batch = -(-batch_size // n_dev) * n_dev
    sharded = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    variables = jax.device_put(variables, replicated)
    num = len(inputs)
    means, stds = [], []  # with resume_dir: the batches a previous run of this evaluation finished
    if resume_dir is not None:
        run_id = {
            # As it reads back from meta.json (tuples as lists; anything else JSON lacks as its repr).
            **json.loads(json.dumps(run_id or {}, default=repr)),
            "num": num,
            "x_shape": [int(d) for d in x_shape],
            "batch_size": int(batch_size),
            "per_batch": int(per_batch),
            "inputs_sha1": hashlib.sha1(np.ascontiguousarray(inputs).tobytes()).hexdigest(),
            "key": np.asarray(jax.random.key_data(key)).ravel().tolist(),
            "first_batch": int(first_batch),
            "weights_digest": weights_digest(variables),
        }
        means, stds = _resume(resume_dir, run_id, num, what)
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
        if resume_dir is not None and distributed.is_primary():
            writers.save_npz_whole(
                os.path.join(resume_dir, f"batch_{i:05d}.npz"), mean=means[-1], std=stds[-1]
            )
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


def dataset_label(data_config: ml_collections.ConfigDict) -> str:
    """The dataset's name for tables: ``isic2016``, ``monuseg2018``, the folder's name, ``synthetic-lesion``."""
    if data_config.name == "synthetic":
        return f"synthetic-{data_config.kind}"
    if data_config.name == "segmentation_folder" and data_config.get("manual_dir"):
        return folder_label(data_config.manual_dir)
    return str(data_config.name)


def trained_dataset(workdir: str) -> str | None:
    """The :func:`dataset_label` of the data the run in ``workdir`` trained on, as its ``config.json`` records
    it (None without a record)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    recorded = configlib.load(path).get("data", None)
    return dataset_label(recorded) if recorded else None


def other_trained_data(data_config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """The :func:`trained_dataset` of the run in ``workdir`` when it is not ``data_config``'s data, else None."""
    trained = trained_dataset(workdir)
    return trained if trained is not None and trained != dataset_label(data_config) else None


def _check_trained_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to evaluate into the run's own ``eval/`` on another dataset than it trained on (as its
    ``config.json`` records it): an external test set's scores would replace the run's own, which Table 1 reads,
    and a config file retyped without the training's data overrides would score the wrong data unnoticed."""
    path = os.path.join(workdir, "config.json")
    trained, this = other_trained_data(config.data, workdir), dataset_label(config.data)
    if trained is not None:
        raise configlib.ConfigError(
            f"The run in {workdir} was trained on {trained} ({path}), this config's data is {this}. For an "
            f"external test set pass --eval_dir (e.g. {workdir}/eval_{this}), so the run's own eval/ stays; to "
            f"evaluate on its own data, pass the config it was trained with (--config configs/from_run.py:{workdir})."
        )


def folder_label(path: str) -> str:
    """An image/mask folder's name for tables and cell folders: its last component (``/data/her2/`` → ``her2``;
    ``.`` → the current folder's name, as a run's ``config.json`` records the path absolute)."""
    return os.path.basename(os.path.abspath(os.path.expanduser(path)))


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    state: train.TrainState | None = None,
    compare_workdir: str | None = None,
    out_dir: str | None = None,
) -> dict:
    """Samples the ensemble for every test image and writes ``out_dir`` (default ``workdir/eval/``, or
    ``workdir/eval_step{S}/`` for ``eval.step=S``; :func:`output_dir`).

    Only the test split is read (the network is built from the config), so a trained run can be evaluated on
    an external test set: another ``config.data`` whose folder holds a ``test`` split alone, written to another
    ``out_dir`` (``--eval_dir``) so the run's own evaluation stays.

    ``state`` (e.g. the state training just ended with) defaults to the latest checkpoint in ``workdir``;
    its EMA weights are used if ``eval.use_ema`` (the EnsemDiff authors sampled with the raw weights).
    Writes ``metrics.json`` (IoU, Dice and ECE of the thresholded / raw ensemble mean, per image averaged and
    pooled over the test set; ``iou`` and ``ece`` are the ones ``eval.pooling`` names; reliability-diagram
    bins; the Brier score; in ``uncertainty``, how well the std and entropy maps point at the errors,
    ``metrics.uncertainty_report``), ``per_image.csv``, ``ensemble.npz`` (image, mask, mean, std, ids),
    ``ensemble.png`` (Fig. 1: image / ground truth / mean / std) and, for E1/E2, ``reliability.png`` (the
    reliability diagram of the ensemble mean, :func:`diffseg_jax.plots.reliability_figure`). With
    ``compare_workdir`` (an evaluated run of the other training kind, e.g. feed-forward next to diffusion),
    also ``figure1.png`` with both side by side, ``comparison.json`` and their reliability diagrams
    (:func:`diffseg_jax.report.write_comparison`).
    """
    config = planning.resolve_as_trained(config, workdir)  # the plan training used, as config.json records it
    eval_cfg = config.eval
    if out_dir is None:
        _check_trained_data(config, workdir)
    out_dir = output_dir(workdir, out_dir, eval_cfg.get("step", -1))
    if compare_workdir and not os.path.exists(os.path.join(compare_workdir, "eval", "ensemble.npz")):
        raise FileNotFoundError(  # named now, not after the sampling
            f"--compare_workdir {compare_workdir} has no eval/ensemble.npz; evaluate that run first (--mode "
            "evaluate)."
        )
    test = data.eval_arrays(
        config.data, split="test", max_examples=None if eval_cfg.num_images < 0 else eval_cfg.num_images
    )
    model, schedule, step, variables = trained_network(config, workdir, test["image"].shape[-1], state)
    mean, std = ensemble_maps(
        config,
        model,
        schedule,
        variables,
        test["image"],
        step,
        resume_dir=os.path.join(out_dir, "partial"),  # batches done so far: a crash loses none
        x_channels=test["image" if config.experiment == "e4" else "mask"].shape[-1],
    )

    if not distributed.is_primary():
        return {}  # A multi-host evaluation samples on every host; process 0 scores and writes.
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "experiment": config.experiment,
        "model": config.model.name,
        "dataset": dataset_label(config.data),
        "ensemble_size": eval_cfg.ensemble_size,
        "tta": eval_cfg.get("tta", "none"),
        "member_output": eval_cfg.get("member_output", "soft"),
        "sampler": eval_cfg.sampler,
        "ddim_steps": eval_cfg.ddim_steps if eval_cfg.sampler == "ddim" else None,
        "weights": "ema" if uses_ema(config) else "raw",
        "num_images": len(mean),
        "step": step,
    }
    if config.experiment in SEGMENTATION_EXPERIMENTS:
        result.update(_segmentation_results(test, mean, std, eval_cfg, out_dir))
    # Each file whole (a crash leaves the old one or none), the ensembles before metrics.json: a run whose
    # metrics.json exists is evaluated (table1 skips it), so its ensemble.npz must be there too.
    writers.save_npz_whole(
        os.path.join(out_dir, "ensemble.npz"),
        compress=True,
        image=np.round(test["image"] * 255).astype(np.uint8),
        mask=test["mask"].astype(np.uint8),
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        ids=np.asarray(test["id"]),
    )
    writers.save_json_whole(os.path.join(out_dir, "metrics.json"), result, indent=2)
    n_fig = min(eval_cfg.num_figure_images, len(mean))
    plots.ensemble_figure(
        test["image"][:n_fig],
        test["mask"][:n_fig],
        mean[:n_fig],
        std[:n_fig],
        os.path.join(out_dir, "ensemble.png"),
        generated=config.experiment == "e4",
    )
    if "reliability" in result:
        title = f"{plots.run_name(result)} · {result['dataset']}"
        plots.reliability_figure(
            [(title, [("ensemble mean", result["reliability"])])], os.path.join(out_dir, "reliability.png")
        )
    if compare_workdir:
        report.write_comparison([out_dir, os.path.join(compare_workdir, "eval")], out_dir, n_fig)
    shutil.rmtree(os.path.join(out_dir, "partial"), ignore_errors=True)  # everything is in out_dir now
    logging.info("evaluate: %s", json.dumps({k: v for k, v in result.items() if k != "reliability"}))
    return result


def _run_root(path: str) -> str | None:
    """The nearest folder at or above ``path`` that is a run's workdir (holds ``config.json``), or None."""
    path = os.path.realpath(path)
    while True:
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def output_dir(
    workdir: str, out_dir: str | None, step: int = -1, name: str = "eval", flag: str = "--eval_dir"
) -> str:
    """Where an evaluation of the run in ``workdir`` writes: ``out_dir`` (``--eval_dir``), else ``eval/`` for the
    latest checkpoint and ``eval_step{S}/`` for ``eval.step=S``, so that an earlier model's scores never replace
    the final model's, which Table 1 reads. An ``out_dir`` that is the workdir itself, or lies in another run's
    folder, is refused: it would mix this evaluation into that run's files (report would count it there).
    ``name`` and ``flag`` name another output's default folder and flag (``predict``, ``--predict_dir``)."""
    if out_dir is None:
        return os.path.join(workdir, name if step < 0 else f"{name}_step{step}")
    run, home = _run_root(out_dir), os.path.realpath(workdir)
    if os.path.realpath(out_dir) == home:
        raise configlib.ConfigError(
            f"{flag} {out_dir} is the run's own folder; pass a folder of its own, e.g. {workdir}/{name}_2."
        )
    if run is not None and run != home:
        raise configlib.ConfigError(
            f"{flag} {out_dir} lies in the folder of another run ({run}), whose files it would overwrite or "
            f"join; pass a folder in {workdir} (e.g. {workdir}/{name}_2) or outside any run."
        )
    return out_dir


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
    instead of a padded whole one), ``key`` (default ``PRNGKey(eval.seed)``); ``first_batch`` is the index of the first batch when
    ``images`` continue a longer set (see :func:`sample_statistics`); such a caller passes the same
    :func:`ensemble_fn` to every part, compiled once. ``step`` and the config identify the samples kept in
    ``resume_dir``.
    """
    eval_cfg = config.eval
    ensemble = ensemble or ensemble_fn(config, model, schedule)
    inputs, grid = images, None
    if tiles_per_image(config.data) > 1:
        inputs, grid = data.to_tiles(inputs, config.data.image_size)
    tta = eval_cfg.get("tta", "none")
    logging.info(
        "%s: %d-member ensembles (%s%s) of %d %s at step %d with the %s weights.",
        what,
        eval_cfg.ensemble_size,
        eval_cfg.sampler if eval_cfg.sampler == "ddpm" else f"ddim-{eval_cfg.ddim_steps}",
        "" if tta == "none" else f", each on the {len(diffusion.TTA_TRANSFORMS[tta])} '{tta}' transforms",
        len(inputs),
        "tiles" if grid else "images",
        step,
        "EMA" if uses_ema(config) else "raw",
    )
    mean, std = sample_statistics(
        ensemble,
        variables,
        inputs,
        inputs.shape[1:3] + (x_channels,),
        batch_size or eval_cfg.batch_size,
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
SEGMENTATION_EXPERIMENTS = ("e1", "e2")  # E3 samples masks without the image, E4 images: no ground truth


def _uncertainty_entries(unc: dict) -> dict:
    """metrics.json's ``uncertainty`` block: per map (std, entropy) its error AUROC, UEO and image-level
    Spearman correlation with 1 − IoU."""
    return {
        "error_fraction": float(unc["error_fraction"]),
        **{
            name: {
                key: report.json_number(unc[f"{name}_{key}"])
                for key in ("error_auroc", "ueo", "ueo_threshold", "image_spearman")
            }
            for name in ("std", "entropy")
        },
    }


def _segmentation_results(test: dict, mean: np.ndarray, std: np.ndarray, eval_cfg, out_dir: str) -> dict:
    """metrics.json entries of a segmentation ensemble, and ``per_image.csv``."""
    truth = test["mask"] > 0.5
    report = metrics.segmentation_report(mean, truth, THRESHOLD, eval_cfg.ece_bins)
    report = jax.tree_util.tree_map(np.asarray, report)
    unc = jax.tree_util.tree_map(np.asarray, metrics.uncertainty_report(mean, std, truth, THRESHOLD))
    empty = np.zeros_like(truth)
    pooling = eval_cfg.pooling
    both = {  # per-image entries are averaged over the images
        f"{name}_{kind}": float(np.mean(report[f"{name}_{kind}"]))
        for name in ("iou", "dice", "ece", "ece_top_label")
        for kind in ("pooled", "per_image")
    }
    summary = {
        "pooling": pooling,
        "iou": both[f"iou_{pooling}"],
        "ece": both[f"ece_{pooling}"],
        **both,
        "ece_bins": eval_cfg.ece_bins,
        "threshold": THRESHOLD,
        "baseline_iou_all_foreground": float(np.mean(metrics.per_image(metrics.iou, ~empty, truth))),
        "baseline_iou_all_background": float(np.mean(metrics.per_image(metrics.iou, empty, truth))),
        "mean_std": float(std.mean()),
        "brier_pooled": float(unc["brier_pooled"]),
        "brier_per_image": float(np.mean(unc["brier_per_image"])),
        "uncertainty": _uncertainty_entries(unc),
        "reliability": {k: v.tolist() for k, v in report["reliability"].items()},
    }
    columns = {
        "iou": report["iou_per_image"],
        "dice": report["dice_per_image"],
        "ece": report["ece_per_image"],
        "ece_top_label": report["ece_top_label_per_image"],
        "true_fraction": report["true_fraction_per_image"],
        "pred_fraction": report["pred_fraction_per_image"],
        "mean_std": std.reshape(len(std), -1).mean(axis=1),
        "brier": unc["brier_per_image"],
        "std_error_auroc": unc["std_error_auroc_per_image"],  # nan: no error in the image
        "entropy_error_auroc": unc["entropy_error_auroc_per_image"],
    }
    with writers.open_whole(os.path.join(out_dir, "per_image.csv"), newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *columns])
        for i, image_id in enumerate(test["id"]):
            writer.writerow([image_id, *(f"{float(v[i]):.6f}" for v in columns.values())])
    return summary
