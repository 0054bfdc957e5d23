"""The paper's feed-forward protocol (Öttl et al., Sec. 3.2), one command: ``--mode e1_protocol``.

1. *Select*: train E1 (Dice + CE, Adam, lr 1e-5, random noise in place of x_t) on the ``fit`` split, the 80 % of
   the training set (``data.validation_fraction`` = 0.2 held out, deterministically), and compute the loss on
   the ``validation`` split after every epoch. The epoch count with the lowest validation loss wins.
2. *Retrain*: train from scratch on the whole training set for that many epochs (of the whole set), without
   validation, so the feed-forward model sees as much data as the diffusion models; then evaluate it.

Phase 1 runs in ``<workdir>/select`` (its validation losses in ``validation.jsonl``), phase 2 in ``<workdir>``
itself, so ``--mode evaluate`` and the report read it like any run; ``<workdir>/e1_protocol.json`` records the
losses, the chosen epoch count and the step counts. Both phases resume after a crash: rerun the command.
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

from diffseg_jax import data, evaluate, objectives, planning, train


def epoch_steps(data_config: ml_collections.ConfigDict, split: str, batch_size: int) -> int:
    """Steps per epoch of ``split`` (the last incomplete batch is dropped, as the training stream does)."""
    n = len(data.load_split(data_config, split))
    steps = n // batch_size
    if steps < 1:
        raise ValueError(
            f"The {split!r} split has {n} examples, fewer than train.batch_size={batch_size}; lower the batch "
            "size or lower data.validation_fraction."
        )
    return steps


def make_validation_fn(config: ml_collections.ConfigDict, model, schedule):
    """``state -> mean E1 loss over the validation split``, with fixed noise per batch (comparable epochs).

    Uses the weights evaluation would use (``eval.use_ema``); no dropout.
    """
    arrays = data.model_sized_arrays(config.data, "validation")  # tiles where stored larger than the model
    batch_size = config.eval.batch_size
    e1_t = config.objective.e1_timestep
    settings = train.loss_settings(config)

    @jax.jit
    def batch_loss(params, model_state, batch, key):
        apply = train.make_apply_fn(model, train=False, model_state=model_state)
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

    def validation_loss(state: train.TrainState) -> float:
        params = state.ema_params if config.eval.use_ema else state.params
        total, count = 0.0, 0
        for i, start in enumerate(range(0, len(arrays["image"]), batch_size)):
            batch = {k: jnp.asarray(v[start : start + batch_size]) for k, v in arrays.items()}
            n = len(batch["image"])
            key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), i)
            total += float(batch_loss(params, state.model_state, batch, key)) * n
            count += n
        return total / count

    return validation_loss


def _read_records(path: str) -> dict[int, dict[str, Any]]:
    """Validation records by epoch (a record repeated after a crash-and-resume keeps its last value)."""
    records = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    records[int(r["epoch"])] = r
    return records


def choose_epochs(losses: dict[int, float]) -> int:
    """The epoch count with the lowest validation loss (the earliest on ties)."""
    if not losses:
        raise ValueError("No validation losses recorded; the selection phase did not complete an epoch.")
    return min(sorted(losses), key=lambda e: losses[e])


def _selection_done(records: dict[int, dict[str, Any]], max_epochs: int, patience: int) -> bool:
    """Whether phase 1 already ran to its end (all epochs, or stopped early by ``patience``)."""
    if not records:
        return False
    best = choose_epochs({e: r["validation_loss"] for e, r in records.items()})
    return max(records) >= max_epochs or (patience > 0 and max(records) - best >= patience)


def _unlocked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs both phases in ``workdir`` (see the module docstring); returns the recorded protocol summary."""
    if config.experiment != "e1":
        raise ValueError(
            f"--mode e1_protocol trains the feed-forward experiment; config.experiment={config.experiment!r}. "
            "Use an e1 config (e.g. configs/e1_isic.py)."
        )
    config = planning.resolve(config)  # nnU-Net's plan sets the batch size the epochs are counted in
    batch_size = config.train.batch_size
    fit_steps = epoch_steps(config.data, "fit", batch_size)
    train_steps = epoch_steps(config.data, "train", batch_size)
    max_epochs = config.protocol.max_epochs
    if max_epochs <= 0:  # as many steps as the architecture's training budget, in whole epochs of `fit`
        max_epochs = max(1, math.ceil(config.train.num_steps / fit_steps))
    patience = config.protocol.patience

    # Phase 1: select the epoch count on the validation split.
    select_dir = os.path.join(workdir, "select")
    os.makedirs(select_dir, exist_ok=True)
    select = _unlocked(config)
    select.train.num_steps = max_epochs * fit_steps
    select.train.ckpt_every = fit_steps
    select.train.keep_checkpoints = 1
    records_path = os.path.join(select_dir, "validation.jsonl")
    records = _read_records(records_path)
    _, model, schedule, _, _ = train.setup(select, abstract=True, split="fit")
    validation_loss = make_validation_fn(select, model, schedule)

    def hook(step: int, state: train.TrainState) -> bool:
        epoch = step // fit_steps
        loss = validation_loss(state)
        records[epoch] = {"epoch": epoch, "step": step, "validation_loss": loss}
        with open(records_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(records[epoch]) + "\n")
        best = choose_epochs({e: r["validation_loss"] for e, r in records.items()})
        logging.info(
            "e1_protocol: epoch %d/%d validation loss %.5f (best: epoch %d)", epoch, max_epochs, loss, best
        )
        return bool(patience > 0 and epoch - best >= patience)

    if not _selection_done(records, max_epochs, patience):
        logging.info(
            "e1_protocol: selecting the epoch count: up to %d epochs of %d steps on the %d%% fit split.",
            max_epochs,
            fit_steps,
            round(100 * (1 - config.data.validation_fraction)),
        )
        train.train(select, select_dir, split="fit", hook=hook, hook_every=fit_steps)
    losses = {e: r["validation_loss"] for e, r in sorted(records.items())}
    chosen = choose_epochs(losses)

    # Phase 2: retrain on all training data for the chosen number of epochs.
    final = _unlocked(config)
    final.train.num_steps = chosen * train_steps
    summary = {
        "chosen_epochs": chosen,
        "max_epochs": max_epochs,
        "patience": patience,
        "validation_fraction": config.data.validation_fraction,
        "steps_per_epoch_fit": fit_steps,
        "steps_per_epoch_train": train_steps,
        "final_steps": final.train.num_steps,
        "validation_losses": {str(e): v for e, v in losses.items()},
    }
    with open(os.path.join(workdir, "e1_protocol.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    logging.info(
        "e1_protocol: lowest validation loss after %d epoch(s); retraining on all %d training batches per epoch "
        "for %d steps.",
        chosen,
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
