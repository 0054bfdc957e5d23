"""Factories from a config: the model, the noise schedule, the optimizer, the train state and its initial weights.

What training, evaluation, prediction, the analyses and the benchmarks all build from a config, kept apart from the
training loop (``diffseg_jax.train``) so that none of them imports the loop. Models take their own arguments
(:func:`build_model` passes ``config.model``'s), never the config."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from diffseg_jax import (
    configlib,
    data,
    diffusion,
    distributed,
    hub,
    models,
    objectives,
    state_dicts,
)
from diffseg_jax.data import files
from diffseg_jax.diffusion import timesteps


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
    process = process_of(config)
    # Bernoulli diffusion has no variance to learn: one output channel per mask channel whatever the scheme says.
    learn_sigma = (
        published and config.diffusion.learn_sigma and config.experiment != "e1" and process == "gaussian"
    )
    return dict(
        learn_sigma=learn_sigma,
        reduction=config.objective.reduction if published else "mean",
        # E1 is classical Dice + CE (the paper): no auxiliary head loss, e.g. MedSegDiff's cal term.
        aux_weights={"cal": config.objective.cal_weight} if published and config.experiment != "e1" else {},
        dice=config.objective.dice,
        dice_smooth=config.objective.dice_smooth,
        prediction=objectives.prediction_of(config),
        process=process,
        bce_weight=config.objective.bernoulli_bce_weight,
        **beyond_paper_settings(config),
    )


def process_of(config: ml_collections.ConfigDict) -> str:
    """The forward process a config trains and samples: ``diffusion.process`` ('gaussian', or BerDiff's 'bernoulli')
    for the diffusion experiments; E1, a feed-forward segmenter, ignores it (the quickstart's twin runs on its config)."""
    return config.diffusion.process if config.experiment != "e1" else "gaussian"


def beyond_paper_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The loss options of issue 33 as :func:`objectives.loss_fn` takes them: ``snr_gamma`` (None: no Min-SNR
    weighting), ``self_condition_prob`` (0: a network without self-conditioning), ``recycle_prob``; all off for
    E1 (a feed-forward segmenter; the quickstart's E1 twin thus runs on the same config)."""
    o = config.objective
    diffusion_model = config.experiment != "e1"
    return dict(
        snr_gamma=o.snr_gamma if diffusion_model and o.loss_weighting == "min_snr" else None,
        self_condition_prob=o.self_condition_prob if diffusion_model and o.self_condition else 0.0,
        recycle_prob=o.recycle_prob if diffusion_model else 0.0,
    )


def self_conditioned(config: ml_collections.ConfigDict) -> bool:
    """Whether the network takes the previous x̂0 as extra channels of x (``objective.self_condition``)."""
    return beyond_paper_settings(config)["self_condition_prob"] > 0


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
    betas = config_betas(d)
    terminal = d.terminal
    if terminal != "none":
        if d.alpha_bar_T <= 0:
            raise ValueError(
                "diffusion.alpha_bar_T=-1 (from the data) is resolved by diffseg_jax.planning.resolve(config); "
                "call it first, or set a value such as 1e-6."
            )
        betas = diffusion.adapt_terminal(betas, d.alpha_bar_T, terminal)
    return diffusion.schedule_from_betas(betas)


OPTIMIZERS = ("adam", "sgd_nesterov")  # config train.optimizer
LR_SCHEDULES = ("constant", "poly")  # config train.lr_schedule


def learning_rate(train_config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """``train.lr``, constant or (``lr_schedule='poly'``) nnU-Net's poly decay lr·(1 - step/num_steps)^0.9."""
    schedule = train_config.lr_schedule
    if schedule == "constant":
        return train_config.lr
    if schedule == "poly":
        return optax.polynomial_schedule(train_config.lr, 0.0, 0.9, train_config.num_steps)
    raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam (AdamW when weight decay > 0, as the published codes' ``AdamW``), optional global-norm clip.

    ``train.optimizer='sgd_nesterov'`` is nnU-Net's ``torch.optim.SGD(momentum=0.99, nesterov=True,
    weight_decay)``: torch's weight decay is an L2 term added to the (clipped) gradient before the momentum.
    """
    lr = learning_rate(train_config)
    name = train_config.optimizer
    if name == "sgd_nesterov":
        opt = optax.sgd(lr, momentum=train_config.momentum, nesterov=True)
        if train_config.weight_decay > 0:
            opt = optax.chain(optax.add_decayed_weights(train_config.weight_decay), opt)
    elif name != "adam":
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")
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
    imported = state_dicts.import_weights(model, variables, state_dicts.load_state_dict(path))
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
    if config.train.init_weights:
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

    tc = config.timesteps
    sampler_state = (
        timesteps.init_loss_history(schedule.num_timesteps, tc.history) if tc.sampling == "loss_aware" else {}
    )

    def make_state():
        state = create_train_state(init_variables(model, init_key, x_shape, cond_shape), optimizer, state_key)
        return state.replace(sampler_state=sampler_state)

    state = jax.eval_shape(make_state) if abstract else jax.jit(make_state)()
    return model, schedule, optimizer, state


def base_betas(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """Float64 betas of a registered schedule (``diffusion.BETA_SCHEDULES``)."""
    return diffusion.BETA_SCHEDULES[name](num_timesteps, **kwargs)


def config_betas(diffusion_config: ml_collections.ConfigDict) -> np.ndarray:
    """The betas ``config.diffusion`` names, before any terminal adaptation (the linear one with its end points)."""
    d = diffusion_config
    kwargs = dict(beta_start=d.beta_start, beta_end=d.beta_end) if d.schedule == "linear" else {}
    return base_betas(d.schedule, d.num_timesteps, **kwargs)


def uses_ema(config: ml_collections.ConfigDict) -> bool:
    """Whether sampling reads the EMA weights: ``eval.use_ema`` for a diffusion experiment; for E1
    ``eval.e1_use_ema`` (default False). The paper trains E1 "classically", so its protocol's epoch choice and
    its evaluation take the raw weights, whatever EMA the architecture's scheme keeps for diffusion (SegDiff's
    0.9999 lags about 10k steps behind at E1's lr 1e-5)."""
    if config.experiment == "e1":
        return bool(config.eval.e1_use_ema)
    return bool(config.eval.use_ema)
