"""Training: the train state, one jitted data-parallel train step, and the resumable training loop.

The step follows the published codes' scheme (improved/guided-diffusion ``TrainLoop``): Adam(W) at a
constant learning rate, optional gradient clipping, an EMA of the parameters. It runs data-parallel over
every device with ``jax.sharding``: a 1-D ``data`` mesh, the batch sharded on its leading axis, the state
replicated; XLA inserts the gradient all-reduce. Randomness of step s is ``fold_in(state.key, s)`` and
the batch of step s is ``train_ds[s]``, so a run resumed from a checkpoint continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffseg_jax import (
    adaptive,
    build,
    checkpoints,
    configlib,
    data,
    diffusion,
    distributed,
    locks,
    models,
    objectives,
    planning,
    writers,
)
from diffseg_jax.data import augment as augmentation
from diffseg_jax.diffusion import timesteps
from diffseg_jax.progress import Progress


def kept_steps(train_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Steps saved and kept for good besides ``keep_every``'s: ``round(f · num_steps)`` for each fraction f of
    ``train.keep_at`` (default 0.75: the paper's Fig. 3 model, so ``--mode analyse --config.eval.step=<75 %>``
    works on any finished run)."""
    n = train_config.num_steps
    return tuple(sorted({round(f * n) for f in train_config.keep_at if 0 < round(f * n) < n}))


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: diffusion.Schedule,
    config: ml_collections.ConfigDict,
    tables: dict[str, Any] | None = None,
):
    """The (un-jitted) train step ``(state, batch) -> (state, metrics)`` for ``config``'s experiment.

    ``tables``: the timestep weights and proposal of ``config.timesteps`` (``adaptive.training_tables``;
    computed here when not given). With ``timesteps.sampling='loss_aware'`` the proposal comes from the loss
    history in ``state.sampler_state``, which the step updates with the batch's unweighted losses.
    """
    tables = adaptive.training_tables(config, schedule) if tables is None else tables
    t_weights = None if tables["weights"] is None else jnp.asarray(tables["weights"], jnp.float32)
    t_probs = None if tables["probs"] is None else jnp.asarray(tables["probs"], jnp.float32)
    tc = config.timesteps
    loss_aware = tc.sampling == "loss_aware"
    e1_t = config.objective.e1_timestep
    loss = functools.partial(
        objectives.loss_fn,
        schedule=schedule,
        experiment=config.experiment,
        mask_range=config.diffusion.mask_range,
        e1_timestep=None if e1_t < 0 else e1_t,
        **build.loss_settings(config),
    )
    ema_decay = config.train.ema_decay
    # data.augment: a jitted per-example augmentation inside the step (nnU-Net's); none by default.
    augment, model = augmentation.for_training(config.data.augment, model)

    def train_step(state: build.TrainState, batch: dict[str, jnp.ndarray]):
        key = jax.random.fold_in(state.key, state.step)
        if augment is not None:
            key, augment_key = jax.random.split(key)
            batch = augment(augment_key, batch)
        apply = build.make_apply_fn(model, train=True, model_state=state.model_state)
        probs = timesteps.loss_aware_probs(state.sampler_state, tc.uniform_prob) if loss_aware else t_probs
        (value, aux), grads = jax.value_and_grad(
            lambda p: loss(apply, p, batch, key, t_weights=t_weights, t_probs=probs), has_aux=True
        )(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=ema,
            opt_state=opt_state,
            model_state=aux.get("model_state", state.model_state),
            sampler_state=(
                timesteps.update_loss_history(state.sampler_state, aux["t"], aux["per_example"])
                if loss_aware
                else state.sampler_state
            ),
        )
        return new_state, {"loss": value, "grad_norm": optax.tree.norm(grads)}

    return train_step


def jit_train_step(train_step, mesh: jax.sharding.Mesh):
    """Compiles the step with the state replicated and the batch sharded; the old state is donated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(replicated, NamedSharding(mesh, P("data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


class _Terminate:
    """Turns SIGTERM into a flag so the loop can checkpoint and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: leave signals alone.
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _save_on_interrupt(ckpt, state: build.TrainState, meta: dict, last_saved: int | None) -> None:
    """Saves ``state`` (the last step that finished) when training is interrupted, unless no step finished since
    the last save (``last_saved``, None if none), it holds a non-finite value, or other processes train too (a
    save is collective: this one process would wait for the others forever). A second Ctrl-C while it saves
    stops the save; orbax leaves no partial checkpoint."""
    if jax.process_count() > 1:
        return
    kept = "nothing is saved" if last_saved is None else f"step {last_saved} is kept"
    if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(state)):
        # Interrupted between a step's dispatch and its result: the donated state is gone, the result not there.
        logging.warning("Interrupted in the middle of a step: %s.", kept)
        return
    step = int(state.step)
    if step <= (last_saved or 0):
        return
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(state.params)):
        logging.warning("Interrupted at step %d with non-finite parameters: not saved; %s.", step, kept)
        return
    logging.warning("Interrupted at step %d: saving a checkpoint; rerun the same command to resume.", step)
    ckpt.save(step, state, {**meta, "step": step})


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    split: str = "train",
    hook: Callable[[int, build.TrainState], bool] | None = None,
    hook_every: int = 0,
) -> build.TrainState:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint; returns the final state.

    ``split``: the data split (``train``, or ``fit`` for the feed-forward protocol's 80 %). ``hook(step,
    state)`` runs every ``hook_every`` steps, before that step's checkpoint (e.g. a validation loss per
    epoch); returning True saves a checkpoint and stops. The workdir is locked meanwhile: another process
    training or evaluating there is refused (:func:`diffseg_jax.locks.workdir_lock`).
    """
    lock = locks.workdir_lock(workdir, "train") if distributed.is_primary() else contextlib.nullcontext()
    with lock:
        return _train(config, workdir, split, hook, hook_every)


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    split: str,
    hook: Callable[[int, build.TrainState], bool] | None,
    hook_every: int,
) -> build.TrainState:
    config = planning.prepare(
        config, workdir, "train"
    )  # a data-driven plan (nnU-Net's), recorded in config.json
    os.makedirs(workdir, exist_ok=True)
    primary = distributed.is_primary()
    if checkpoints.latest_step(os.path.join(workdir, "checkpoints")) is not None:
        planning.check_resume(config, workdir)  # the same model, or stop before anything is built or written
    mesh = distributed.data_mesh()
    n_dev = mesh.size
    if config.train.batch_size % n_dev:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} is not divisible by the "
            f"{n_dev} devices; choose a multiple of {n_dev}."
        )
    train_ds, model, schedule, optimizer, state = build.setup(config, split=split)
    if split == "train" and config.eval.enabled:  # a missing test split is named now, not after training
        data.load_split(config.data, "test")
    plan = planning.describe(config)
    if plan is not None:  # printed as well as logged: the plan decides the network, patch and batch
        print(plan, flush=True)
        logging.info("%s", plan)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    keep_steps = kept_steps(config.train)
    ckpt = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        config.train.keep_checkpoints,
        config.train.keep_every,
        keep_steps,
    )
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            state, _ = ckpt.restore(latest, state)
            logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
        elif (initial := build.initial_weights(config)) is not None:
            state = build.import_initial_weights(initial[1], model, optimizer, state, option=initial[0])
            state = jax.device_put(state, NamedSharding(mesh, P()))
    except BaseException:  # another model's checkpoint or weights: the manager's threads must not outlive it
        ckpt.close()
        raise
    start = int(state.step)
    num_steps = config.train.num_steps
    if start >= num_steps:  # the record keeps the num_steps the run was trained to
        logging.warning(
            "The run in %s is at step %d, not below train.num_steps=%d: nothing to train. Raise train.num_steps "
            "to train on.",
            workdir,
            start,
            num_steps,
        )
    elif primary:
        # Only now: a resume that failed (another model's checkpoint) leaves the run's record as it was.
        configlib.save(config, os.path.join(workdir, "config.json"))
    logging.info(
        "Training %s (%s) on %d device(s) [%s] of %d host(s), %s parameters, steps %d → %d.",
        config.model.name,
        config.experiment,
        n_dev,
        jax.devices()[0].platform,
        jax.process_count(),
        f"{models.param_count(state.params):,}",
        start,
        num_steps,
    )
    tables = adaptive.training_tables(config, schedule)
    if primary and tables["curve"] is not None:
        adaptive.write_tables(os.path.join(workdir, "timesteps.csv"), tables, schedule.num_timesteps)
    step_fn = jit_train_step(make_train_step(model, optimizer, schedule, config, tables), mesh)
    # A resume (or a rerun of a run killed before its first checkpoint) redoes the steps after ``start``: their
    # old lines and events are dropped, not repeated.
    writer = writers.MetricWriter(workdir, resume_step=start) if primary else writers.NullWriter()
    # On CPU with several devices, queueing many collective steps without waiting can deadlock the
    # all-reduce: wait on the loss at least this often (and at every log / checkpoint). Also after the first
    # two steps, to report the first (compilation included) and to time the second: steps slower than
    # SLOW_STEP_S are then each waited on, so progress shows between logs (diffseg_jax.progress).
    sync_every = max(1, min(config.train.log_every, 8))
    meta = {"config": config.to_dict(), "num_devices": n_dev}
    last_saved = latest
    # A due checkpoint waits one step: it is written only once the loss and gradient computed from its parameters
    # (the next step's) are finite. An update can blow the parameters up while its own loss was fine, and such a
    # state would otherwise displace good checkpoints under keep_checkpoints (see docs/reliability.md).
    pending: tuple[int, Any] | None = None
    progress = Progress(start, num_steps, config.train.log_every, sync_every)
    d = config.data
    stream = data.batch_stream(train_ds, start, d.num_threads, d.num_workers, d.prefetch)
    batches = distributed.device_batches(stream, mesh)

    def read(done: int, metrics: dict[str, jax.Array]) -> tuple[float, float]:
        """Waits on step ``done``'s loss and gradient norm; a non-finite one stops training, keeping only
        checkpoints whose parameters gave finite values (the one waiting for this step is dropped)."""
        loss = float(metrics["loss"])  # Blocks: keeps the device queue short.
        grad_norm = float(metrics["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise diverged(f"the training loss is {loss} at step {done} (gradient norm {grad_norm})", done)
        return loss, grad_norm

    def diverged(what: str, done: int) -> checkpoints.TrainingDivergedError:
        if pending is not None:
            kept = f"step {pending[0]}, whose parameters gave these values, was not saved; "
        else:
            kept = ""
        if last_saved is None:
            kept += "no checkpoint was saved, so a rerun starts from scratch"
        elif last_saved == latest and done == start + 1:
            kept += (
                f"the checkpoint this run resumed from (step {latest} in {ckpt.directory}) gives these values "
                "already: it was saved after the divergence (by an older diffseg-jax). Delete it to resume from "
                f"an earlier one (steps on disk: {', '.join(map(str, ckpt.all_steps()))}), or train into a new "
                "--workdir"
            )
        else:
            kept += f"the last good checkpoint (step {last_saved}) is kept in {ckpt.directory}; a rerun resumes from it"
        return checkpoints.TrainingDivergedError(
            f"Training diverged: {what}; stopped without saving it. {kept[0].upper()}{kept[1:]}. Lower train.lr "
            "or set train.grad_clip (e.g. 1.0), then rerun the same command."
        )

    try:
        with _Terminate() as term:
            for step, batch in zip(range(start, num_steps), batches):
                state, metrics = step_fn(state, batch)
                done = step + 1
                is_last = done == num_steps
                stop = bool(
                    hook is not None and hook_every > 0 and done % hook_every == 0 and hook(done, state)
                )
                due = done % config.train.ckpt_every == 0 or done in keep_steps or is_last or stop
                early = done - start <= 2
                synced = False
                if (
                    early
                    or done % progress.sync_every == 0
                    or due
                    or done % config.train.log_every == 0
                    or pending is not None
                    or term.requested
                ):
                    loss, grad_norm = read(done, metrics)
                    synced = True
                    ckpt.check_for_errors()  # a background save that failed (disk full) stops the run now
                    if pending is not None:  # its parameters gave this step a finite loss and gradient
                        ckpt.save(pending[0], pending[1], {**meta, "step": pending[0]})
                        last_saved, pending = pending[0], None
                    rate, logged = progress.update(done, loss)
                    if logged:
                        writer.write(done, {"loss": loss, "grad_norm": grad_norm, "steps_per_second": rate})
                # Read after the wait above: SIGTERM's handler runs when the blocking read returns.
                terminate = term.requested
                if due or terminate:
                    if not synced:
                        read(done, metrics)
                    if not checkpoints.params_finite(state):
                        raise diverged(f"the parameters after step {done} are not finite", done)
                    if is_last or stop or terminate:  # no next step to check it: finite parameters suffice
                        ckpt.save(done, state, {**meta, "step": done})
                        last_saved = done
                    else:
                        pending = (done, checkpoints.host_copy(state))
                if terminate:
                    ckpt.wait()  # the exit status says it is saved: it is on disk before the loop ends
                    logging.warning(
                        "Stopped at step %d on SIGTERM, saved as a checkpoint; rerun the same command to resume.",
                        done,
                    )
                    break
                if stop:
                    logging.info("Stopped at step %d as asked by the training hook.", done)
                    break
    except KeyboardInterrupt:  # Ctrl-C, or Colab's "Interrupt execution": keep the steps since the last save
        try:
            _save_on_interrupt(ckpt, state, meta, last_saved)
        except Exception as e:  # a failed save never hides the interrupt
            logging.warning("Interrupted; the save of the last step failed (%s).", e)
        raise
    except (
        OSError
    ) as e:  # disk full, quota, read-only: one message naming the checkpoint a rerun resumes from
        if e.errno not in checkpoints.WRITE_ERRNOS or isinstance(e, checkpoints.CheckpointWriteError):
            raise
        raise checkpoints.write_failed(e, ckpt.directory, int(state.step)) from None
    finally:
        failing = sys.exc_info()[1] is not None
        try:
            ckpt.close()
        except OSError as e:  # the last save failed: say so, unless another error is on its way already
            if failing:
                logging.warning("The last checkpoint could not be written either (%s).", e)
            elif e.errno in checkpoints.WRITE_ERRNOS:
                raise checkpoints.write_failed(e, ckpt.directory, int(state.step)) from None
            else:
                raise
        finally:
            writer.close()
    return state
