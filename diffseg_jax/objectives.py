"""The four experiments of Öttl et al. as ONE loss over sampled timesteps.

=====  ==========================  ===================  ==================  ==========================
exp.   network input x              conditioning image   target              loss
=====  ==========================  ===================  ==================  ==========================
E1     N(0, I) noise of the mask's  the image            the mask (logits)   Dice + binary CE, equal
       shape, in place of x_t                                                weight (feed-forward)
E2     x_t of the mask              the image            ε (or x0, v)        ‖ε − ε_θ‖², Eq. (3)
E3     x_t of the mask              none (withheld)      x0 (or ε, v)        ‖x0 − x̂0_θ‖², Eq. (2)
E4     x_t of the image             none                 ε                   ‖ε − ε_θ‖², Eq. (1)
=====  ==========================  ===================  ==================  ==========================

Masks enter diffusion space through :func:`diffseg_jax.diffusion.mask_to_diffusion` (``mask_range``);
images are in [0, 1] as conditions and mapped to [-1, 1] when they are the diffused variable (E4).
Timesteps are drawn uniformly from {0, …, T-1} or from a proposal ``t_probs`` with the importance
correction 1/(T p(t)); ``t_weights`` (shape (T,)) reweights the per-example losses
(``diffseg_jax.diffusion.timesteps``). ``prediction`` (``objective.prediction``, beyond the paper) trains E2 or E3
to predict x0 or v = √ᾱ ε − √(1-ᾱ) x0 instead (Salimans & Ho 2022): the loss is then the plain MSE to that
target, which weights the timesteps differently (the ε loss is SNR(t)·‖x0 − x̂0‖²). E1 feeds the timestep ``e1_timestep`` (default T-1: the noise it sees is distributed as x_T).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffseg_jax import diffusion
from diffseg_jax.diffusion import likelihood, timesteps

EXPERIMENTS = ("e1", "e2", "e3", "e4")
# apply_fn(params, x, t, cond_or_None, rng) -> output or (output, extras); rng feeds dropout in training.
ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray | None, jax.Array], jnp.ndarray]


PREDICTIONS = diffusion.PREDICTIONS  # what a diffusion network may predict: 'eps', 'x0' or 'v'
DEFAULT_PREDICTION = {"e1": "logits", "e2": "eps", "e3": "x0", "e4": "eps"}


def prediction_type(experiment: str, prediction: str | None = None) -> str:
    """What the network's output means: 'logits' (E1), else ``prediction`` ('eps', 'x0' or 'v') for E2 and E3,
    or the experiment's own when it is None: 'eps' (E2, the paper's Eq. 3; E4) or 'x0' (E3, Eq. 2).

    ``config.objective.prediction`` sets it (:func:`prediction_of`); E1 ignores it and E4 keeps 'eps'.
    """
    default = DEFAULT_PREDICTION[_check(experiment)]
    if prediction is None or experiment in ("e1", "e4"):
        return default
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (or None), got {prediction!r}")
    return prediction


def prediction_of(config) -> str:
    """:func:`prediction_type` of a config: ``objective.prediction`` (None: the experiment's own)."""
    return prediction_type(config.experiment, config.objective.get("prediction", None))


def uses_image_condition(experiment: str) -> bool:
    """Whether the network is given the image as a condition (E1, E2) or not (E3, E4)."""
    return _check(experiment) in ("e1", "e2")


def _check(experiment: str) -> str:
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {EXPERIMENTS}, got {experiment!r}")
    return experiment


def diffused_variable(
    batch: dict[str, jnp.ndarray], experiment: str, mask_range: str = "symmetric"
) -> jnp.ndarray:
    """x0 in diffusion space: the mask (E1–E3) or the image mapped to [-1, 1] (E4)."""
    if _check(experiment) == "e4":
        return 2.0 * batch["image"] - 1.0
    return diffusion.mask_to_diffusion(batch["mask"], mask_range)


def soft_dice_loss(logits: jnp.ndarray, target: jnp.ndarray, smooth: float = 1.0) -> jnp.ndarray:
    """1 − soft Dice of sigmoid(logits) against a {0,1} target, per example (all but axis 0 pooled)."""
    probs = jax.nn.sigmoid(logits)
    axes = tuple(range(1, logits.ndim))
    inter = jnp.sum(probs * target, axis=axes)
    denom = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def batch_soft_dice_loss(logits: jnp.ndarray, target: jnp.ndarray, smooth: float = 1e-5) -> jnp.ndarray:
    """1 − soft Dice with intersection and sums pooled over the whole batch (nnU-Net's ``batch_dice``)."""
    probs = jax.nn.sigmoid(logits)
    inter = jnp.sum(probs * target)
    return 1.0 - (2.0 * inter + smooth) / jnp.maximum(jnp.sum(probs) + jnp.sum(target) + smooth, 1e-8)


def e1_per_example(logits: jnp.ndarray, target: jnp.ndarray, dice: str = "per_example", smooth: float = 1.0):
    """E1's Dice + binary CE per example; ``dice='batch'`` adds the batch's pooled Dice loss to every example.

    The batch form is nnU-Net's for 2D plans (``DC_and_CE_loss`` with ``batch_dice``, foreground only): with
    one sigmoid logit, BCE and the foreground Dice equal its 2-class softmax versions.
    """
    ce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target), axis=tuple(range(1, logits.ndim)))
    if dice == "per_example":
        return soft_dice_loss(logits, target, smooth) + ce
    if dice == "batch":
        return batch_soft_dice_loss(logits, target, smooth) + ce
    raise ValueError(f"dice must be 'per_example' or 'batch', got {dice!r}")


def deep_supervision_weights(num_outputs: int) -> jnp.ndarray:
    """nnU-Net's weights of the outputs, full resolution first: 1/2^i, the lowest resolution 0, summing to 1."""
    weights = [0.5**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return jnp.asarray([w / total for w in weights], jnp.float32)


def downsample_mask(mask: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """A (B,H,W,C) mask at (height, width) by nearest-exact sampling (pixel i takes floor((i + 0.5)·H/h)), as
    nnU-Net's ``DownsampleSegForDSTransform``; H and W must be multiples of height and width."""
    fy, fx = mask.shape[1] // height, mask.shape[2] // width
    if fy * height != mask.shape[1] or fx * width != mask.shape[2]:
        raise ValueError(
            f"Cannot downsample a {mask.shape[1:3]} mask to {(height, width)} by an integer factor."
        )
    return mask[:, fy // 2 :: fy, fx // 2 :: fx]


def per_example_mse(pred: jnp.ndarray, target: jnp.ndarray, reduction: str = "mean") -> jnp.ndarray:
    """Squared error over all non-batch axes: mean (improved-diffusion's ``mean_flat``) or sum.

    ``reduction='sum'`` reproduces SegDiff's code, whose loss is the error summed over C·H·W.
    """
    axes = tuple(range(1, pred.ndim))
    if reduction == "mean":
        return jnp.mean(jnp.square(pred - target), axis=axes)
    if reduction == "sum":
        return jnp.sum(jnp.square(pred - target), axis=axes)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def split_output(out: Any) -> tuple[jnp.ndarray, dict[str, Any]]:
    """A network returns its prediction or ``(prediction, extras)``; extras may hold auxiliary heads
    (MedSegDiff's ``cal``) and updated non-parameter state (``model_state``, e.g. BatchNorm statistics)."""
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


def loss_fn(
    apply_fn: ApplyFn,
    params: Any,
    batch: dict[str, jnp.ndarray],
    key: jax.Array,
    schedule: diffusion.Schedule,
    *,
    experiment: str,
    mask_range: str = "symmetric",
    t_weights: jnp.ndarray | None = None,
    t_probs: jnp.ndarray | None = None,
    e1_timestep: int | None = None,
    learn_sigma: bool = False,
    reduction: str = "mean",
    aux_weights: dict[str, float] | None = None,
    dice: str = "per_example",
    dice_smooth: float = 1.0,
    prediction: str | None = None,
) -> tuple[jnp.ndarray, dict[str, Any]]:
    """The unified training loss for E1–E4 on one batch; returns (scalar loss, aux).

    ``batch`` holds ``image`` (B,H,W,C) in [0,1] and ``mask`` (B,H,W,1) in {0,1}. ``aux`` carries the
    sampled ``t``, the unweighted ``per_example`` losses (the raw material of per-timestep loss curves) and
    the network's ``model_state`` if it returned one.

    ``learn_sigma``: the network outputs [prediction, v] (twice the channels) and the loss is improved
    DDPM's hybrid ``mse + vb``, the VLB term computed with the prediction detached so that it trains only
    v (EnsemDiff's and MedSegDiff's published loss). ``aux_weights`` weights auxiliary heads: ``{'cal': w}``
    adds w · MSE(cal, mask) averaged over the batch (MedSegDiff v1 trains its sigmoid ``cal`` with w = 10).

    Timesteps: ``t_probs`` (T,) draws t from that distribution instead of uniformly, and each example's loss is
    multiplied by ``t_weights[t] / (T t_probs[t])``, so the loss estimates ``mean_t t_weights[t] L_t`` whatever
    the proposal (``t_probs = t_weights / T`` samples the weighted objective with factor 1).

    ``prediction``: what an E2/E3 network predicts ('eps', 'x0', 'v'; None: the experiment's own, see
    :func:`prediction_type`); the MSE is taken against that target, and the hybrid loss's VLB gets the x̂0 it
    implies.

    E1: ``dice`` ('per_example' or nnU-Net's 'batch') and ``dice_smooth`` pick the Dice term; a network that
    returns lower-resolution heads as ``extras['deep_supervision']`` (nnU-Net) is trained on all of them, with
    the mask downsampled to each and weighted by :func:`deep_supervision_weights`.
    """
    _check(experiment)
    t_key, noise_key, drop_key = jax.random.split(key, 3)
    num_t = schedule.num_timesteps
    x0 = diffused_variable(batch, experiment, mask_range)
    batch_size = x0.shape[0]
    cond = batch["image"] if uses_image_condition(experiment) else None

    if experiment == "e1":
        t = jnp.full((batch_size,), num_t - 1 if e1_timestep is None else e1_timestep, jnp.int32)
        x_in = jax.random.normal(noise_key, x0.shape)
        logits, extras = split_output(apply_fn(params, x_in, t, cond, drop_key))
        logits = logits[..., : x0.shape[-1]]  # A learned-variance channel has no meaning here.
        outputs = (logits, *extras.pop("deep_supervision", ()))
        weights = deep_supervision_weights(len(outputs))
        per_example = sum(
            weights[i]
            * e1_per_example(out, downsample_mask(batch["mask"], *out.shape[1:3]), dice, dice_smooth)
            for i, out in enumerate(outputs)
        )
    else:
        t = timesteps.sample_timesteps(t_key, batch_size, t_probs, num_t)
        noise = jax.random.normal(noise_key, x0.shape)
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        out, extras = split_output(apply_fn(params, x_t, t, cond, drop_key))
        pred = prediction_type(experiment, prediction)
        target = diffusion.prediction_target(pred, schedule, x0, noise, t)
        expected = (*target.shape[:-1], target.shape[-1] * (2 if learn_sigma else 1))
        # Checked here: else an error deep in a split, or a broadcast into a plausible-looking loss.
        if out.shape != expected:
            raise ValueError(
                f"The network's output {out.shape} is not the {expected} the loss takes for a target of "
                f"{target.shape} with learn_sigma={learn_sigma}. A network built with learn_sigma returns twice the "
                "target's channels (the prediction and the variance v) and needs learn_sigma=True (config: "
                "diffusion.learn_sigma); one without it, learn_sigma=False."
            )
        if learn_sigma:
            out, v = jnp.split(out, 2, axis=-1)
        per_example = per_example_mse(out, target, reduction)
        if learn_sigma:
            frozen = jax.lax.stop_gradient(out)
            model_x0, _ = diffusion.x0_eps_from_prediction(pred, schedule, x_t, t, frozen)
            log_var = diffusion.step_log_variance(schedule, t, x0.shape, "learned_range", v)
            per_example = per_example + likelihood.vb_terms_bpd(schedule, x0, x_t, t, model_x0, log_var)

    weights = jnp.ones_like(per_example) if t_weights is None else t_weights[t]
    if experiment != "e1":
        weights = weights * timesteps.importance_factor(t, t_probs)
    loss = jnp.mean(weights * per_example)
    for name, weight in (aux_weights or {}).items():
        if name in extras and weight:
            loss = loss + weight * jnp.mean(per_example_mse(extras[name], batch["mask"]))
    aux = {"t": t, "per_example": per_example}
    if "model_state" in extras:
        aux["model_state"] = extras["model_state"]
    return loss, aux
