"""Training: the train state, one jitted data-parallel train step, and the resumable training loop.

The step follows the published codes' scheme (improved/guided-diffusion ``TrainLoop``): Adam(W) at a
constant learning rate, optional gradient clipping, an EMA of the parameters. It runs data-parallel over
every device with ``jax.sharding``: a 1-D ``data`` mesh, the batch sharded on its leading axis, the state
replicated; XLA inserts the gradient all-reduce. Randomness of step s is ``fold_in(state.key, s)`` and
the batch of step s is ``train_ds[s]``, so a run resumed from a checkpoint continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffseg_jax import (
    checkpoints,
    configlib,
    convert,
    data,
    diffusion,
    distributed,
    hub,
    locks,
    models,
    objectives,
    planning,
    writers,
)
from diffseg_jax.analysis import adaptive
from diffseg_jax.data import augment as augmentation
from diffseg_jax.data import files
from diffseg_jax.diffusion import timesteps

# Progress between the logs of train.log_every: a published config on a CPU takes minutes per step (log_every
# 100 would print nothing for hours). After the first step (compilation included) a line says how long it took;
# when the second takes longer than SLOW_STEP_S seconds, every step is waited on and a progress line comes at
# least every PROGRESS_EVERY_S seconds (console only: metrics.jsonl keeps the log_every cadence).
SLOW_STEP_S = 2.0
PROGRESS_EVERY_S = 60.0


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: step counter, parameters, their EMA, optimizer state, base RNG key, and
    the model's non-parameter collections (``model_state``, e.g. MedSegDiff's BatchNorm statistics) and the
    timestep sampler's state (``sampler_state``: improved DDPM's loss history with ``timesteps.sampling=
    'loss_aware'``, else empty)."""

    step: jnp.ndarray
    params: Any
    ema_params: Any
    opt_state: Any
    key: jnp.ndarray
    model_state: Any = flax.struct.field(default_factory=dict)
    sampler_state: Any = flax.struct.field(default_factory=dict)


def loss_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The loss options of ``config`` after the ``objective.loss`` switch.

    ``'published'`` keeps each architecture's published loss as configured (learned variance and hybrid
    loss, summed reduction, auxiliary ``cal`` term); ``'eps_mse'`` is the paper's plain Eq. 3/Eq. 2 loss
    (mean squared error, fixed variance, no auxiliary terms) for every architecture.
    """
    published = config.objective.loss == "published"
    learn_sigma = published and config.diffusion.learn_sigma and config.experiment != "e1"
    return dict(
        learn_sigma=learn_sigma,
        reduction=config.objective.reduction if published else "mean",
        # E1 is classical Dice + CE (the paper): no auxiliary head loss, e.g. MedSegDiff's cal term.
        aux_weights={"cal": config.objective.cal_weight} if published and config.experiment != "e1" else {},
        dice=config.objective.get("dice", "per_example"),
        dice_smooth=config.objective.get("dice_smooth", 1.0),
        prediction=objectives.prediction_of(config),
        **beyond_paper_settings(config),
    )


def beyond_paper_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The loss options of issue 33 as :func:`objectives.loss_fn` takes them: ``snr_gamma`` (None: no Min-SNR
    weighting), ``self_condition_prob`` (0: a network without self-conditioning), ``recycle_prob``; all off for
    E1 (a feed-forward segmenter; the quickstart's E1 twin thus runs on the same config)."""
    o = config.objective
    diffusion_model = config.experiment != "e1"
    return dict(
        snr_gamma=o.snr_gamma if diffusion_model and o.get("loss_weighting", "none") == "min_snr" else None,
        self_condition_prob=(
            o.self_condition_prob if diffusion_model and o.get("self_condition", False) else 0.0
        ),
        recycle_prob=o.get("recycle_prob", 0.0) if diffusion_model else 0.0,
    )


def self_conditioned(config: ml_collections.ConfigDict) -> bool:
    """Whether the network takes the previous x̂0 as extra channels of x (``objective.self_condition``)."""
    return beyond_paper_settings(config)["self_condition_prob"] > 0


def kept_steps(train_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Steps saved and kept for good besides ``keep_every``'s: ``round(f · num_steps)`` for each fraction f of
    ``train.keep_at`` (default 0.75: the paper's Fig. 3 model, so ``--mode analyse --config.eval.step=<75 %>``
    works on any finished run)."""
    n = train_config.num_steps
    return tuple(sorted({round(f * n) for f in train_config.get("keep_at", ()) if 0 < round(f * n) < n}))


def output_channels(config: ml_collections.ConfigDict, image_channels: int, mask_channels: int = 1) -> int:
    """Channels the network predicts: the image's for E4 (generation), else the mask's; doubled for a
    learned variance."""
    channels = image_channels if config.experiment == "e4" else mask_channels
    return channels * (2 if loss_settings(config)["learn_sigma"] else 1)


def build_model(
    model_config: ml_collections.ConfigDict, out_channels: int, image_size: int | None = None
) -> nn.Module:
    """Instantiates the registered model named ``model_config.name`` with its own arguments only.

    ``image_size`` is passed to models whose weights depend on it (MedSegDiff's FF-Parser). A ``dtype``
    name (``'bfloat16'``) becomes the model's compute dtype; parameters stay float32 either way.
    """
    # 'plan' holds a model's planning settings (nnU-Net), consumed before the build (diffseg_jax.planning);
    # 'pretrained*' the weights a run starts from (initial_weights), imported after it.
    kwargs = {k: v for k, v in model_config.to_dict().items() if k not in configlib.MODEL_SETTINGS}
    if "dtype" in kwargs:
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    cls = models.MODELS.get(model_config.name)
    if (
        image_size is not None
        and cls is not None
        and "image_size" in getattr(cls, "__dataclass_fields__", {})
    ):
        kwargs["image_size"] = image_size
    return models.get_model(model_config.name, out_channels=out_channels, **kwargs)


def build_schedule(diffusion_config: ml_collections.ConfigDict) -> diffusion.Schedule:
    """The noise schedule named by the config, its terminal ᾱ moved to ``alpha_bar_T`` if ``terminal`` is set.

    An automatic terminal (``alpha_bar_T=-1``) must have been resolved from the data first
    (``planning.resolve``, which every entry point calls).
    """
    d = diffusion_config
    betas = adaptive.config_betas(d)
    terminal = d.get("terminal", "none")
    if terminal != "none":
        if d.alpha_bar_T <= 0:
            raise ValueError(
                "diffusion.alpha_bar_T=-1 (from the data) is resolved by diffseg_jax.planning.resolve(config); "
                "call it first, or set a value such as 1e-6."
            )
        betas = diffusion.adapt_terminal(betas, d.alpha_bar_T, terminal)
    return diffusion.schedule_from_betas(betas)


def learning_rate(train_config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """``train.lr``, constant or (``lr_schedule='poly'``) nnU-Net's poly decay lr·(1 - step/num_steps)^0.9."""
    schedule = train_config.get("lr_schedule", "constant")
    if schedule == "constant":
        return train_config.lr
    if schedule == "poly":
        return optax.polynomial_schedule(train_config.lr, 0.0, 0.9, train_config.num_steps)
    raise ValueError(f"train.lr_schedule must be 'constant' or 'poly', got {schedule!r}")


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam (AdamW when weight decay > 0, as the published codes' ``AdamW``), optional global-norm clip.

    ``train.optimizer='sgd_nesterov'`` is nnU-Net's ``torch.optim.SGD(momentum=0.99, nesterov=True,
    weight_decay)``: torch's weight decay is an L2 term added to the (clipped) gradient before the momentum.
    """
    lr = learning_rate(train_config)
    name = train_config.get("optimizer", "adam")
    if name == "sgd_nesterov":
        opt = optax.sgd(lr, momentum=train_config.momentum, nesterov=True)
        if train_config.weight_decay > 0:
            opt = optax.chain(optax.add_decayed_weights(train_config.weight_decay), opt)
    elif name != "adam":
        raise ValueError(f"train.optimizer must be 'adam' or 'sgd_nesterov', got {name!r}")
    elif train_config.weight_decay > 0:
        opt = optax.adamw(lr, weight_decay=train_config.weight_decay)
    else:
        opt = optax.adam(lr)
    if train_config.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(train_config.grad_clip), opt)
    return opt


def init_variables(
    model: nn.Module, key: jax.Array, x_shape: tuple[int, ...], cond_shape: tuple[int, ...] | None
) -> dict[str, Any]:
    """Initialises the model's variables (``params`` and any state) for inputs of the given shapes.

    Traceable (call it under ``jax.jit``: eager init of a UNet takes ~20 s on 2 cores). ``key`` seeds an
    'rbg' key for the initialisers, which compile several times faster on CPU than threefry ones.
    """
    x = jnp.zeros(x_shape, jnp.float32)
    cond = None if cond_shape is None else jnp.zeros(cond_shape, jnp.float32)
    t = jnp.zeros((x_shape[0],), jnp.int32)
    seed = jax.random.randint(key, (), 0, jnp.iinfo(jnp.int32).max)
    return dict(model.init({"params": jax.random.key(seed, impl="rbg")}, x, t, cond, train=False))


def create_train_state(
    variables: dict[str, Any], optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """A fresh state at step 0; the EMA starts as a copy of the parameters."""
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        key=jnp.asarray(key),
        model_state={k: v for k, v in variables.items() if k != "params"},
    )


def imported_state(
    path: str, model: nn.Module, optimizer: optax.GradientTransformation, state: TrainState
) -> TrainState:
    """A fresh step-0 state whose variables are imported from the weights file ``path`` by name and shape
    (:mod:`diffseg_jax.convert`, with the model's import rules); the rest is ``state``'s initialisation. A
    file that does not fit the model is a ValueError; the caller names the option that gave the file."""
    variables = {"params": state.params, **state.model_state}
    imported = convert.import_weights(model, variables, convert.load_state_dict(path))
    logging.info("Initialised %s from %s.", type(model).__name__, path)
    return create_train_state(imported, optimizer, state.key).replace(sampler_state=state.sampler_state)


def import_initial_weights(
    path: str,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    option: str = "train.init_weights",
) -> TrainState:
    """:func:`imported_state` for ``train.init_weights`` (or the ``option`` that gave ``path``): a file of another
    model is a ConfigError naming it."""
    try:
        return imported_state(path, model, optimizer, state)
    except files.DatasetFileError:
        raise  # names the file already
    except ValueError as e:  # names and shapes that do not fit the model: say which file and which setting
        raise configlib.ConfigError(f"{option}={path!r} does not fit {type(model).__name__}: {e}") from e


def initial_weights(config: ml_collections.ConfigDict) -> tuple[str, str] | None:
    """(option, local file) of the weights a run without a checkpoint starts from: ``train.init_weights`` (the
    whole model), else ``model.pretrained`` (a Hub repo id resolved through the Hub's cache, or a file); None:
    random initialisation."""
    if config.train.get("init_weights"):
        return "train.init_weights", config.train.init_weights
    pretrained = hub.requested(config.model.get("pretrained", None))
    if pretrained is None:
        return None
    path = hub.resolve(pretrained, config.model.get("pretrained_revision", None))
    logging.info("model.pretrained=%s: %s", pretrained, path)
    return "model.pretrained", path


def model_rngs(rng: jax.Array) -> dict[str, jax.Array]:
    """The RNG streams a model may ask for: dropout, and MedSegDiff's optional per-call random projection."""
    return {"dropout": rng, "bottleneck": jax.random.fold_in(rng, 1)}


def make_apply_fn(
    model: nn.Module, train: bool, model_state: dict[str, Any] | None = None
) -> objectives.ApplyFn:
    """``apply(params, x, t, cond, rng)`` for the objective; rng drives dropout when training.

    With ``model_state`` (non-parameter collections) in training, the collections are mutable and their
    new values are returned in the extras as ``model_state``.
    """
    model_state = model_state or {}

    def apply(params, x, t, cond, rng):
        variables = {"params": params, **model_state}
        if train and model_state:
            out, updates = model.apply(
                variables, x, t, cond, train=True, rngs=model_rngs(rng), mutable=list(model_state)
            )
            out, extras = objectives.split_output(out)
            return out, {**extras, "model_state": updates}
        return model.apply(variables, x, t, cond, train=train, rngs=model_rngs(rng))

    return apply


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
    tc = config.get("timesteps", None)
    loss_aware = tc is not None and tc.sampling == "loss_aware"
    e1_t = config.objective.e1_timestep
    loss = functools.partial(
        objectives.loss_fn,
        schedule=schedule,
        experiment=config.experiment,
        mask_range=config.diffusion.mask_range,
        e1_timestep=None if e1_t < 0 else e1_t,
        **loss_settings(config),
    )
    ema_decay = config.train.ema_decay
    # data.augment: a jitted per-example augmentation inside the step (nnU-Net's); none by default.
    augment, model = augmentation.for_training(config.data.get("augment", "none"), model)

    def train_step(state: TrainState, batch: dict[str, jnp.ndarray]):
        key = jax.random.fold_in(state.key, state.step)
        if augment is not None:
            key, augment_key = jax.random.split(key)
            batch = augment(augment_key, batch)
        apply = make_apply_fn(model, train=True, model_state=state.model_state)
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


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh named ``data`` over every device.

    Axis type Auto: XLA propagates shardings through the model (with JAX's newer default, Explicit, every
    op must agree on shardings by hand, e.g. concatenating the sharded image with unsharded noise fails).
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Puts this host's rows of a batch on the devices as one global array split along the batch axis.

    On a single host the rows are the whole batch; on several, each host passes its own rows (see
    :func:`diffseg_jax.data.train_dataset`'s ``shard``) and the global batch is their concatenation.
    """
    sharding = NamedSharding(mesh, P("data"))
    return {k: distributed.global_array(v, sharding) for k, v in batch.items() if k != "id"}


def device_batches(batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh, ahead: int = 2):
    """Yields device batches with ``ahead`` more already transferred: the copy of step s+1's batch overlaps
    step s's compute (``device_put`` is asynchronous)."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(shard_batch(batch, mesh))
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def jit_train_step(train_step, mesh: jax.sharding.Mesh):
    """Compiles the step with the state replicated and the batch sharded; the old state is donated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(replicated, NamedSharding(mesh, P("data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


class TrainingDivergedError(FloatingPointError):
    """Training stopped on a non-finite loss, gradient or parameter; the message names the checkpoint kept."""


def params_finite(state: TrainState) -> bool:
    """Whether every parameter of ``state`` is finite (one reduction on the device, one value read back)."""
    leaves = jax.tree_util.tree_leaves(state.params)
    return bool(jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))) if leaves else True


def host_copy(state: TrainState) -> TrainState:
    """``state`` as NumPy arrays in host memory: a checkpoint that waits a step for its check survives the
    donation of the device buffers to that step. The state is replicated, so one device's copy is all of it."""
    local = jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, state)
    for x in jax.tree_util.tree_leaves(local):
        if isinstance(x, jax.Array):
            x.copy_to_host_async()  # every leaf's transfer at once, then each waited on below
    # np.array copies: the device buffers are donated to the next step, and a view of them would change with it
    return jax.tree.map(lambda x: np.array(x) if isinstance(x, jax.Array) else x, local)


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


def setup(config: ml_collections.ConfigDict, abstract: bool = False, split: str = "train"):
    """Builds (train dataset, model, schedule, optimizer, initial state) from a validated config.

    With ``abstract`` the state is only shapes (``jax.ShapeDtypeStruct``), e.g. as a restore target: no
    initialiser is compiled or run. ``split`` is the data split to train on (``fit`` for the 80 % part).
    On several hosts the dataset yields this host's rows of each batch.
    """
    train_ds = data.train_dataset(
        config.data,
        batch_size=config.train.batch_size,
        seed=config.seed,
        split=split,
        shard=distributed.host_shard(),
    )
    model, schedule, optimizer, state = model_and_state(config, train_ds[0]["image"].shape[1:], abstract)
    return train_ds, model, schedule, optimizer, state


def model_and_state(
    config: ml_collections.ConfigDict, image_shape: tuple[int, int, int], abstract: bool = False
):
    """(model, schedule, optimizer, initial state) for images of ``image_shape`` (H, W, C), reading no data.

    What :func:`setup` builds from the shape of the dataset's first batch; with a state restored afterwards (a
    trained run's checkpoint), sampling a model needs nothing else (``--mode predict``).
    """
    h, w, image_channels = (int(d) for d in image_shape)
    model = build_model(config.model, output_channels(config, image_channels), h)
    schedule = build_schedule(config.diffusion)
    optimizer = make_optimizer(config.train)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
    x_shape = (1, h, w, image_channels if config.experiment == "e4" else 1)
    if self_conditioned(config):  # x_t and the previous x̂0 (Analog Bits)
        x_shape = (*x_shape[:-1], 2 * x_shape[-1])
    cond_shape = (1, h, w, image_channels) if objectives.uses_image_condition(config.experiment) else None

    tc = config.get("timesteps", None)
    sampler_state = (
        timesteps.init_loss_history(schedule.num_timesteps, tc.history)
        if tc is not None and tc.sampling == "loss_aware"
        else {}
    )

    def make_state():
        state = create_train_state(init_variables(model, init_key, x_shape, cond_shape), optimizer, state_key)
        return state.replace(sampler_state=sampler_state)

    state = jax.eval_shape(make_state) if abstract else jax.jit(make_state)()
    return model, schedule, optimizer, state


def _save_on_interrupt(ckpt, state: TrainState, meta: dict, last_saved: int | None) -> None:
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
    hook: Callable[[int, TrainState], bool] | None = None,
    hook_every: int = 0,
) -> TrainState:
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
    hook: Callable[[int, TrainState], bool] | None,
    hook_every: int,
) -> TrainState:
    configlib.validate(config)
    config = planning.resolve(config)  # a data-driven plan (nnU-Net's), recorded in config.json
    os.makedirs(workdir, exist_ok=True)
    primary = distributed.is_primary()
    if checkpoints.latest_step(os.path.join(workdir, "checkpoints")) is not None:
        planning.check_resume(config, workdir)  # the same model, or stop before anything is built or written
    mesh = data_mesh()
    n_dev = mesh.size
    if config.train.batch_size % n_dev:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} is not divisible by the "
            f"{n_dev} devices; choose a multiple of {n_dev}."
        )
    train_ds, model, schedule, optimizer, state = setup(config, split=split)
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
        config.train.get("keep_every", 0),
        keep_steps,
    )
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            state, _ = ckpt.restore(latest, state)
            logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
        elif (initial := initial_weights(config)) is not None:
            state = import_initial_weights(initial[1], model, optimizer, state, option=initial[0])
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
    # SLOW_STEP_S are then each waited on, so progress shows between logs (see PROGRESS_EVERY_S).
    sync_every = max(1, min(config.train.log_every, 8))
    meta = {"config": config.to_dict(), "num_devices": n_dev}
    last_saved = latest
    # A due checkpoint waits one step: it is written only once the loss and gradient computed from its parameters
    # (the next step's) are finite. An update can blow the parameters up while its own loss was fine, and such a
    # state would otherwise displace good checkpoints under keep_checkpoints (see docs/reliability.md).
    pending: tuple[int, Any] | None = None
    t_start = last_log = t_first = time.time()  # t_first: when the first step (and its compilation) ended
    d = config.data  # (.get: configs saved before these keys existed still load)
    stream = data.batch_stream(
        train_ds, start, d.get("num_threads", 4), d.get("num_workers", 0), d.get("prefetch", 8)
    )
    batches = device_batches(stream, mesh)

    def read(done: int, metrics: dict[str, jax.Array]) -> tuple[float, float]:
        """Waits on step ``done``'s loss and gradient norm; a non-finite one stops training, keeping only
        checkpoints whose parameters gave finite values (the one waiting for this step is dropped)."""
        loss = float(metrics["loss"])  # Blocks: keeps the device queue short.
        grad_norm = float(metrics["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise diverged(f"the training loss is {loss} at step {done} (gradient norm {grad_norm})", done)
        return loss, grad_norm

    def diverged(what: str, done: int) -> TrainingDivergedError:
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
        return TrainingDivergedError(
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
                    or done % sync_every == 0
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
                    now = time.time()
                    if done > start + 1:  # the steps since the first, whose time includes compiling
                        rate = (done - start - 1) / max(now - t_first, 1e-9)
                    else:
                        rate = (done - start) / max(now - t_start, 1e-9)
                    eta = (num_steps - done) / max(rate, 1e-9)
                    logged = done % config.train.log_every == 0 or is_last
                    if done == start + 1 and not logged:
                        logging.info(
                            "step %d/%d  loss %.5f  first step %s (compilation included); logged every %d steps",
                            done,
                            num_steps,
                            loss,
                            writers.format_duration(now - t_start),
                            config.train.log_every,
                        )
                        last_log = now
                    elif logged or now - last_log >= PROGRESS_EVERY_S:  # the latter: slow steps, between logs
                        logging.info(
                            "step %d/%d  loss %.5f  %.2f steps/s  ETA %s",
                            done,
                            num_steps,
                            loss,
                            rate,
                            writers.format_duration(eta),
                        )
                        last_log = now
                    if logged:
                        writer.write(done, {"loss": loss, "grad_norm": grad_norm, "steps_per_second": rate})
                    if done == start + 1:
                        t_first = now
                    elif done == start + 2 and now - t_first > SLOW_STEP_S and sync_every > 1:
                        sync_every = 1  # waiting on each step costs nothing beside its seconds
                        logging.info(
                            "The second step took %s: progress is logged at least every %s.",
                            writers.format_duration(now - t_first),
                            writers.format_duration(PROGRESS_EVERY_S),
                        )
                # Read after the wait above: SIGTERM's handler runs when the blocking read returns.
                terminate = term.requested
                if due or terminate:
                    if not synced:
                        read(done, metrics)
                    if not params_finite(state):
                        raise diverged(f"the parameters after step {done} are not finite", done)
                    if is_last or stop or terminate:  # no next step to check it: finite parameters suffice
                        ckpt.save(done, state, {**meta, "step": done})
                        last_saved = done
                    else:
                        pending = (done, host_copy(state))
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
