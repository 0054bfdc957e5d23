"""The paper's feed-forward protocol (Öttl et al., Sec. 3.2), ``--mode e1_protocol``, and the same for diffusion
segmentation, ``--mode e2_protocol`` (beyond the paper).

1. *Select*: train on the ``fit`` split, the 80 % of the training set (``data.validation_fraction`` = 0.2 held
   out, deterministically), and validate on the ``validation`` split as training goes:

   - E1 (Dice + CE, Adam, lr 1e-5, random noise in place of x_t): the loss after every epoch, as the paper;
   - E2: the paper trains its diffusion models for a fixed step count and suspects (Sec. 4.1) that the missing
     validation scheme is why they fit HER2 poorly. Every ``protocol.validate_every`` steps (default
     ``train.ckpt_every``) a small ensemble (``protocol.ensemble_size`` members, DDIM with
     ``protocol.ddim_steps`` steps or ``protocol.sampler`` = ddpm, the same noise every time) is sampled for
     every validation image, and the pooled IoU and ECE of its mean are recorded. The diffusion loss is not used: it says little about the segmentation.

   The step count with the lowest loss (E1) or the highest IoU (E2) wins; ``protocol.patience`` validations
   without a better one stop the phase early.
2. *Retrain*: train from scratch on the whole training set for as many epochs (of the whole set), without
   validation, so the model sees as much data as a plain run; then evaluate it.

Phase 1 runs in ``<workdir>/select`` (its validations in ``validation.jsonl``), phase 2 in ``<workdir>`` itself,
so ``--mode evaluate`` and the report read it like any run; ``<workdir>/e1_protocol.json`` (or
``e2_protocol.json``) records the validations, the choice and the step counts. Both phases resume after a crash:
rerun the command.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from diffseg_jax import (
    build,
    checkpoints,
    configlib,
    data,
    evaluate,
    metrics,
    objectives,
    planning,
    sampling,
    train,
)


def epoch_steps(data_config: ml_collections.ConfigDict, split: str, batch_size: int) -> int:
    """Steps per epoch of ``split`` (the last incomplete batch is dropped, as the training stream does)."""
    n = len(data.load_split(data_config, split))
    steps = n // batch_size
    if steps < 1:
        raise configlib.ConfigError(
            f"The {split!r} split has {n} examples, fewer than train.batch_size={batch_size}; lower the batch "
            "size or lower data.validation_fraction."
        )
    return steps


def make_validation_fn(config: ml_collections.ConfigDict, model, schedule):
    """``state -> mean E1 loss over the validation split``, with fixed noise per batch (comparable epochs).

    Uses the weights evaluation would use (``build.uses_ema``: raw for E1 unless ``eval.e1_use_ema``); no
    dropout.
    """
    arrays = data.model_sized_arrays(config.data, "validation")  # tiles where stored larger than the model
    # eval.batch_size=0 (chosen for sampling from the device's memory): the training batch, which fits.
    batch_size = config.eval.batch_size or config.train.batch_size
    e1_t = config.objective.e1_timestep
    settings = build.loss_settings(config)

    @jax.jit
    def batch_loss(params, model_state, batch, key):
        apply = build.make_apply_fn(model, train=False, model_state=model_state)
        loss, _ = objectives.loss_fn(
            apply,
            params,
            batch,
            key,
            schedule,
            experiment="e1",
            e1_timestep=None if e1_t < 0 else e1_t,
            **settings,
        )
        return loss

    def validation_loss(state: build.TrainState) -> float:
        params = state.ema_params if build.uses_ema(config) else state.params
        total, count = 0.0, 0
        for i, start in enumerate(range(0, len(arrays["image"]), batch_size)):
            batch = {k: jnp.asarray(v[start : start + batch_size]) for k, v in arrays.items()}
            n = len(batch["image"])
            key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), i)
            total += float(batch_loss(params, state.model_state, batch, key)) * n
            count += n
        return total / count

    return validation_loss


def make_validation_iou_fn(config: ml_collections.ConfigDict, model, schedule):
    """``state -> {validation_iou, validation_ece}`` of a small ensemble on the validation split (E2).

    ``protocol.ensemble_size`` members sampled with ``protocol.sampler`` (DDIM with ``protocol.ddim_steps``
    steps by default, cheaper than the final evaluation's; the two samplers score a short-trained model up to
    15 IoU points apart, so ``ddpm`` validates as a DDPM evaluation samples), as ``--mode evaluate`` samples
    (tiles where stored larger than the model, the weights of ``build.uses_ema``) with the same key every time,
    so validations differ only by the weights; IoU of the mean at 0.5 and ECE (``eval.ece_bins``), pooled over
    all validation pixels.
    """
    arrays = data.eval_arrays(config.data, "validation")
    truth = jnp.asarray(arrays["mask"] > 0.5)
    sample_config = _unlocked(config)
    sample_config.eval.sampler = config.protocol.sampler
    sample_config.eval.ddim_steps = config.protocol.ddim_steps
    sample_config.eval.ensemble_size = config.protocol.ensemble_size
    ensemble = sampling.ensemble_fn(sample_config, model, schedule)  # one compilation for every validation

    def validate(state: build.TrainState) -> dict[str, float]:
        params = state.ema_params if build.uses_ema(config) else state.params
        mean, _ = sampling.ensemble_maps(
            sample_config,
            model,
            schedule,
            {"params": params, **state.model_state},
            arrays["image"],
            int(state.step),
            what="validate",
            ensemble=ensemble,
        )
        scores = metrics.segmentation_report(
            jnp.asarray(mean), truth, sampling.THRESHOLD, config.eval.ece_bins
        )
        return {"validation_iou": float(scores["iou_pooled"]), "validation_ece": float(scores["ece_pooled"])}

    return validate


def _validation_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """How an E2 validation samples, recorded with each score (DDIM's step count only where DDIM samples)."""
    p = config.protocol
    sampler = p.sampler
    return dict(
        sampler=sampler, ensemble_size=p.ensemble_size, ddim_steps=p.ddim_steps if sampler == "ddim" else None
    )


def _check_recorded_settings(records: dict[int, dict[str, Any]], settings: dict[str, Any], path: str) -> None:
    """Refuses to resume a selection whose recorded validations were sampled otherwise (records written before
    the settings were recorded are taken as they are)."""
    for step, record in sorted(records.items()):
        recorded = {k: record[k] for k in settings if k in record}
        differ = {k: (v, settings[k]) for k, v in recorded.items() if v != settings[k]}
        if differ:
            what = ", ".join(f"protocol.{k}: recorded {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise configlib.ConfigError(
                f"{path} holds validations sampled with other settings (step {step}: {what}); their scores would "
                "mix with new ones. Rerun with the recorded settings, or use another --workdir."
            )


def _read_records(path: str) -> dict[int, dict[str, Any]]:
    """Validation records by step (a record repeated after a crash-and-resume keeps its last value)."""
    records = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    records[int(r["step"])] = r
    return records


def choose_epochs(losses: dict[int, float]) -> int:
    """The epoch count (or step) with the lowest validation loss (the earliest on ties)."""
    if not losses:
        raise ValueError("No validation losses recorded; the selection phase did not complete an epoch.")
    return min(sorted(losses), key=lambda e: losses[e])


def _unlocked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


# What each protocol chooses by: the record's key, and the sign that makes lower better.
_SCORE = {"e1": ("validation_loss", 1.0), "e2": ("validation_iou", -1.0)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs both phases in ``workdir`` (see the module docstring); returns the recorded protocol summary."""
    experiment = config.experiment
    if experiment not in _SCORE:
        raise configlib.ConfigError(
            f"--mode e1_protocol / e2_protocol train the feed-forward (e1) or diffusion segmentation (e2) "
            f"experiment; config.experiment={experiment!r}. Use an e1 or e2 config (e.g. configs/e1_isic.py)."
        )
    name = f"{experiment}_protocol"
    if not 0 < config.data.validation_fraction < 1:
        raise configlib.ConfigError(
            f"Invalid config: data.validation_fraction={config.data.validation_fraction!r}. The {name} selects on "
            "a validation split held out of the training images: use a fraction in (0, 1), e.g. 0.2 (the paper)."
        )
    started = os.path.exists(os.path.join(workdir, f"{name}.json"))
    held = checkpoints.latest_step(os.path.join(workdir, "checkpoints"))
    if held is not None and not started:  # phase 2 would resume that run instead of retraining from scratch
        raise configlib.ConfigError(
            f"{workdir} already holds a trained run (a checkpoint at step {held}) that this {name} did not "
            "start; its retraining phase would continue that run. Use a new --workdir for the protocol."
        )
    config = planning.prepare(
        config, workdir, f"{config.experiment}_protocol"
    )  # nnU-Net's plan sets the batch
    batch_size = config.train.batch_size
    fit_steps = epoch_steps(config.data, "fit", batch_size)
    train_steps = epoch_steps(config.data, "train", batch_size)
    # E1 validates after every epoch (the paper), E2 every protocol.validate_every steps (an ensemble each time).
    every = fit_steps if experiment == "e1" else (config.protocol.validate_every or config.train.ckpt_every)
    max_epochs = config.protocol.max_epochs
    budget = max_epochs * fit_steps if max_epochs > 0 else config.train.num_steps  # the architecture's budget
    validations = max(1, math.ceil(budget / every))
    if validations < 2:
        logging.warning(
            "%s: one validation within %d steps (every %d steps): nothing to choose between, so the retraining "
            "takes that step count. Validate more often (protocol.validate_every for E2, more epochs for E1).",
            name,
            budget,
            every,
        )
    patience = config.protocol.patience
    metric, sign = _SCORE[experiment]

    # Phase 1: select the step count on the validation split.
    select_dir = os.path.join(workdir, "select")
    os.makedirs(select_dir, exist_ok=True)
    select = _unlocked(config)
    select.train.num_steps = validations * every
    select.train.ckpt_every = every
    select.train.keep_checkpoints = 1
    records_path = os.path.join(select_dir, "validation.jsonl")
    records = _read_records(records_path)
    # E2's validation scores depend on how the ensembles are sampled: a rerun with other settings must not mix
    # its scores with the recorded ones.
    settings = {} if experiment == "e1" else _validation_settings(config)
    _check_recorded_settings(records, settings, records_path)
    _, model, schedule, _, _ = build.setup(select, abstract=True, split="fit")
    if experiment == "e1":
        loss_fn = make_validation_fn(select, model, schedule)
        validate = lambda state: {"validation_loss": loss_fn(state)}
    else:
        validate = make_validation_iou_fn(select, model, schedule)

    def best_step() -> int:
        return choose_epochs({s: sign * r[metric] for s, r in records.items()})

    def hook(step: int, state: build.TrainState) -> bool:
        record = {"step": step, "epoch": step // fit_steps} if experiment == "e1" else {"step": step}
        record.update(validate(state), epochs=round(step / fit_steps, 3), **settings)
        records[step] = record
        with open(records_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        best = best_step()
        logging.info(
            "%s: step %d/%d (%.1f epochs) %s %.5f (best: step %d)",
            name,
            step,
            select.train.num_steps,
            step / fit_steps,
            metric,
            record[metric],
            best,
        )
        return bool(patience > 0 and (step - best) // every >= patience)

    done = bool(records) and (
        max(records) >= select.train.num_steps
        or (patience > 0 and (max(records) - best_step()) // every >= patience)
    )
    if not done:
        logging.info(
            "%s: selecting the step count: up to %d steps (%d validations, %d steps per epoch) on the %d%% fit "
            "split.",
            name,
            select.train.num_steps,
            validations,
            fit_steps,
            round(100 * (1 - config.data.validation_fraction)),
        )
        train.train(select, select_dir, split="fit", hook=hook, hook_every=every)
    chosen = best_step()  # (no record: says that no validation was recorded)

    # Phase 2: retrain on all training data for as many epochs (of the whole training set).
    final = _unlocked(config)
    final.train.num_steps = max(1, round(chosen * train_steps / fit_steps))
    summary = {
        "validation_fraction": config.data.validation_fraction,
        "steps_per_epoch_fit": fit_steps,
        "steps_per_epoch_train": train_steps,
        "patience": patience,
        "final_steps": final.train.num_steps,
    }
    if experiment == "e1":
        summary.update(
            chosen_epochs=chosen // fit_steps,
            max_epochs=validations,
            validation_losses={str(r["epoch"]): r[metric] for _, r in sorted(records.items())},
        )
    else:
        summary.update(
            chosen_step=chosen,
            chosen_epochs=round(chosen / fit_steps, 3),
            validate_every=every,
            max_steps=select.train.num_steps,
            ensemble_size=config.protocol.ensemble_size,
            sampler=config.protocol.sampler,
            ddim_steps=config.protocol.ddim_steps,
            validation_iou={str(s): r["validation_iou"] for s, r in sorted(records.items())},
            validation_ece={str(s): r["validation_ece"] for s, r in sorted(records.items())},
        )
    with open(os.path.join(workdir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    logging.info(
        "%s: best validation %s after %d steps (%.1f epochs); retraining on all %d training batches per epoch "
        "for %d steps.",
        name,
        metric,
        chosen,
        chosen / fit_steps,
        train_steps,
        final.train.num_steps,
    )
    state = train.train(final, workdir)
    if int(state.step) < final.train.num_steps:
        logging.warning("Training stopped early at step %d; not evaluating.", int(state.step))
        return summary
    if config.eval.enabled:
        summary["metrics"] = evaluate.evaluate(final, workdir, state=state)
    return summary
