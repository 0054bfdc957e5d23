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

Beyond the paper (issue 33), three options of the same loss for E2/E3 (E1 ignores them):

* ``snr_gamma`` (``objective.loss_weighting='min_snr'``): Min-SNR-γ weights (Hang et al. 2023, arXiv 2303.09556),
  :func:`min_snr_weights`.
* ``self_condition_prob`` (``objective.self_condition``): self-conditioning (Chen, Zhang & Hinton 2022, "Analog
  Bits", arXiv 2208.04202): the network takes the previous x̂0 as extra input channels after x_t.
* ``recycle_prob`` (``objective.recycle_prob``): recycling (Fu et al. 2023, arXiv 2308.16355): x_t is built from
  the model's own stop-gradient x̂0 instead of the ground truth.

And another forward process for E2/E3: ``process='bernoulli'`` (``diffusion.process``), Bernoulli diffusion of the
{0,1} mask (BerDiff, Chen et al. 2023, arXiv 2304.04429; :mod:`diffseg_jax.diffusion.bernoulli`): x_t flips pixels to
fair coins, the network predicts ε = x_t XOR x0 (or x0) as a probability, and the loss is BerDiff's KL between the
true and predicted Bernoulli posteriors plus ``bce_weight`` x BCE (:func:`bernoulli_per_example`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffseg_jax import diffusion
from diffseg_jax.diffusion import bernoulli, likelihood, timesteps

EXPERIMENTS = ("e1", "e2", "e3", "e4")
# apply_fn(params, x, t, cond_or_None, rng) -> output or (output, extras); rng feeds dropout in training.
ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray | None, jax.Array], jnp.ndarray]


PREDICTIONS = diffusion.PREDICTIONS  # what a diffusion network may predict: 'eps', 'x0' or 'v'
DEFAULT_PREDICTION = {"e1": "logits", "e2": "eps", "e3": "x0", "e4": "eps"}
# The loss settings' values (config objective.*): the published schemes' own losses or the paper's plain ε-MSE;
# the reduction over a mask; E1's Dice term (per example, or nnU-Net's over the batch); the weighting over t.
LOSSES = ("published", "eps_mse")
REDUCTIONS = ("mean", "sum")
DICE_TERMS = ("per_example", "batch")
LOSS_WEIGHTINGS = ("none", "min_snr")


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
    return prediction_type(config.experiment, config.objective.prediction)


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


def min_snr_weights(schedule: diffusion.Schedule, prediction: str, gamma: float) -> jnp.ndarray:
    """Min-SNR-γ loss weights over t, shape (T,) (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", arXiv 2303.09556, Sec. 3.4 and its code).

    The x0 loss ‖x0 − x̂0‖² is weighted by min(SNR(t), γ), SNR = ᾱ/(1 − ᾱ). The same weight on the x0 error, written
    in each parameterisation's own loss: the ε loss equals SNR·‖x0 − x̂0‖², so its weight is min(SNR, γ)/SNR; the v
    loss equals (SNR + 1)·‖x0 − x̂0‖² (x̂0 − x0 = −σ(v̂ − v), 1/σ² = SNR + 1), so min(SNR, γ)/(SNR + 1).
    """
    if gamma <= 0:
        raise ValueError(f"Min-SNR gamma must be positive (e.g. 5), got {gamma!r}")
    abar = schedule.alphas_cumprod.astype(jnp.float32)
    snr = abar / (1.0 - abar)
    clipped = jnp.minimum(snr, gamma)
    if prediction == "x0":
        return clipped
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _x0_estimate(apply_fn, params, x_in, t, cond, rng, schedule, prediction, x_t) -> jnp.ndarray:
    """A stop-gradient x̂0 of the network at (x_in, t), clipped to [-1, 1] as the samplers clip it; the output's
    first x_t-many channels are the prediction (a learned-variance channel is dropped)."""
    out, _ = split_output(apply_fn(params, x_in, t, cond, rng))
    out = out[..., : x_t.shape[-1]]
    x0_hat, _ = diffusion.model_x0_eps(schedule, out, x_t, t, prediction=prediction, clip_range=(-1.0, 1.0))
    return jax.lax.stop_gradient(x0_hat)


def self_condition_input(x_t: jnp.ndarray, x0_prev: jnp.ndarray | None) -> jnp.ndarray:
    """The network input under self-conditioning: x_t with the previous x̂0 (zeros when none) as extra channels
    after it (Analog Bits' concatenation); the image condition, if any, is still prepended by the network."""
    return jnp.concatenate([x_t, jnp.zeros_like(x_t) if x0_prev is None else x0_prev], axis=-1)


def recycled_x0(apply_fn, params, x0, cond, key, schedule, prediction, self_condition: bool = False):
    """Recycling (Fu et al. 2023, arXiv 2308.16355; ImgX-DiffSeg's ``recycling_step`` with ``prev_step='max'``,
    ``reverse_step=False``, the follow-up's default): the ground truth noised to the last timestep T-1, the
    network's stop-gradient x̂0 from it (in training mode), which then replaces the ground truth when x_t is built.
    Self-conditioned networks get zeros as the previous estimate in this pass."""
    noise_key, drop_key = jax.random.split(key)
    t_last = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    x_t = diffusion.q_sample(schedule, x0, t_last, jax.random.normal(noise_key, x0.shape))
    x_in = self_condition_input(x_t, None) if self_condition else x_t
    return _x0_estimate(apply_fn, params, x_in, t_last, cond, drop_key, schedule, prediction, x_t)


def split_output(out: Any) -> tuple[jnp.ndarray, dict[str, Any]]:
    """A network returns its prediction or ``(prediction, extras)``; extras may hold auxiliary heads
    (MedSegDiff's ``cal``) and updated non-parameter state (``model_state``, e.g. BatchNorm statistics)."""
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


def bernoulli_per_example(
    apply_fn, params, mask, cond, t, key, schedule, prediction, mask_range, self_condition_prob, bce_weight
) -> tuple[jnp.ndarray, dict[str, Any]]:
    """BerDiff's loss per example (bits per pixel): KL of the Bernoulli posteriors (the decoder's NLL at t = 0) +
    ``bce_weight`` x BCE of the network's target (:func:`diffseg_jax.diffusion.bernoulli.loss_terms`); its code's
    ``LossType.MIX`` takes weight 1. ``mask`` in {0, 1} is diffused as it is whatever ``mask_range``, which only maps
    x_t (and a self-conditioning x̂0) for the network. Returns (per-example loss, the network's extras)."""
    noise_key, drop_key, sc_key, first_key = jax.random.split(key, 4)
    x_t = bernoulli.q_sample(schedule, mask, t, noise_key)
    x_in = bernoulli.network_input(x_t, (), mask_range)
    channels = mask.shape[-1]
    if self_condition_prob > 0:

        def first_pass():
            out, _ = split_output(
                apply_fn(params, bernoulli.network_input(x_t, zeros, mask_range), t, cond, first_key)
            )
            x0_hat, _ = bernoulli.x0_eps_from_output(prediction, x_t, out[..., :channels])
            return jax.lax.stop_gradient(bernoulli.self_condition_channels(x0_hat, mask_range))

        zeros = jnp.zeros_like(x_in)
        prev = jax.lax.cond(jax.random.bernoulli(sc_key, self_condition_prob), first_pass, lambda: zeros)
        x_in = bernoulli.network_input(x_t, prev, mask_range)
    out, extras = split_output(apply_fn(params, x_in, t, cond, drop_key))
    if out.shape != mask.shape:
        raise ValueError(
            f"The network's output {out.shape} is not the mask's {mask.shape}: Bernoulli diffusion predicts one "
            "probability per mask channel (no learned variance; config: diffusion.learn_sigma=False)."
        )
    vb, bce = bernoulli.loss_terms(schedule, out, mask, x_t, t, prediction)
    return vb + bce_weight * bce, extras


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
    snr_gamma: float | None = None,
    self_condition_prob: float = 0.0,
    recycle_prob: float = 0.0,
    process: str = "gaussian",
    bce_weight: float = 1.0,
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

    Beyond the paper (E2/E3; E1 ignores them):

    * ``snr_gamma``: the MSE term of each example is multiplied by :func:`min_snr_weights` at its t (Min-SNR-γ);
      the hybrid loss's VLB term is not reweighted. ``aux['per_example']`` stays unweighted.
    * ``self_condition_prob`` > 0: the network takes x_t with extra channels (:func:`self_condition_input`). With
      that probability per batch (Analog Bits: 0.5) a first pass on (x_t, zeros) gives a stop-gradient x̂0 that is
      fed as those channels; otherwise they are zeros. The first pass runs only on those batches (``lax.cond``).
    * ``recycle_prob`` > 0: with that probability per example x_t is built from :func:`recycled_x0` instead of the
      ground truth (Fu et al.'s recycling, which uses 1); the target stays the ground truth x0 (for an x0 network;
      the ε target is the noise added, as in ImgX-DiffSeg). The recycling pass runs on every batch.
    * ``process='bernoulli'`` (E2/E3): BerDiff's Bernoulli diffusion and loss (:func:`bernoulli_per_example`, with
      ``bce_weight``); ``prediction`` 'eps' or 'x0', self-conditioning as above; without a learned variance,
      Min-SNR or recycling.
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
    elif process == "bernoulli":
        if experiment not in ("e2", "e3") or learn_sigma or snr_gamma is not None or recycle_prob > 0:
            raise ValueError(
                "Bernoulli diffusion (process='bernoulli') diffuses masks (E2, E3) without a learned variance, "
                f"Min-SNR weights or recycling; got experiment={experiment!r}, learn_sigma={learn_sigma}, "
                f"snr_gamma={snr_gamma}, recycle_prob={recycle_prob}."
            )
        t = timesteps.sample_timesteps(t_key, batch_size, t_probs, num_t)
        pred = prediction_type(experiment, prediction)
        per_example, extras = bernoulli_per_example(
            apply_fn, params, batch["mask"], cond, t, noise_key, schedule, pred, mask_range,
            self_condition_prob, bce_weight,
        )  # fmt: skip
    else:
        t = timesteps.sample_timesteps(t_key, batch_size, t_probs, num_t)
        noise = jax.random.normal(noise_key, x0.shape)
        pred = prediction_type(experiment, prediction)
        self_condition = self_condition_prob > 0
        x_start = x0
        if recycle_prob > 0:  # keys folded in, so that the options off leave today's random stream untouched
            rc_key, use_key = jax.random.split(jax.random.fold_in(key, 101))
            own = recycled_x0(apply_fn, params, x0, cond, rc_key, schedule, pred, self_condition)
            use = jax.random.bernoulli(use_key, recycle_prob, (batch_size,) + (1,) * (x0.ndim - 1))
            x_start = jnp.where(use, own, x0)
        x_t = diffusion.q_sample(schedule, x_start, t, noise)
        x_in = x_t
        if self_condition:
            sc_key, first_key = jax.random.split(jax.random.fold_in(key, 102))
            x0_prev = jax.lax.cond(
                jax.random.bernoulli(sc_key, self_condition_prob),
                lambda: _x0_estimate(
                    apply_fn, params, self_condition_input(x_t, None), t, cond, first_key, schedule, pred, x_t
                ),
                lambda: jnp.zeros_like(x_t),
            )
            x_in = self_condition_input(x_t, x0_prev)
        out, extras = split_output(apply_fn(params, x_in, t, cond, drop_key))
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
        mse = per_example
        if learn_sigma:
            frozen = jax.lax.stop_gradient(out)
            model_x0, _ = diffusion.x0_eps_from_prediction(pred, schedule, x_t, t, frozen)
            log_var = diffusion.step_log_variance(schedule, t, x0.shape, "learned_range", v)
            per_example = per_example + likelihood.vb_terms_bpd(schedule, x0, x_t, t, model_x0, log_var)

    weighted = per_example
    if snr_gamma is not None and experiment != "e1":
        weighted = min_snr_weights(schedule, pred, snr_gamma)[t] * mse + (per_example - mse)  # + VLB, if any
    weights = jnp.ones_like(per_example) if t_weights is None else t_weights[t]
    if experiment != "e1":
        weights = weights * timesteps.importance_factor(t, t_probs)
    loss = jnp.mean(weights * weighted)
    for name, weight in (aux_weights or {}).items():
        if name in extras and weight:
            loss = loss + weight * jnp.mean(per_example_mse(extras[name], batch["mask"]))
    aux = {"t": t, "per_example": per_example}
    if "model_state" in extras:
        aux["model_state"] = extras["model_state"]
    return loss, aux
