"""Fingerprint-adaptive diffusion: a dataset's mask prediction error curve sets the schedule's end and the weights.

Öttl et al. end with three proposals they never test (Sec. 5): raise the final noise level where the mask
prediction error has not converged at t = T (their ISIC16 and HER2 curves still rise there), and put less weight
on the timesteps where the noisy mask gives away everything or nothing, e.g. by weighting with the first
derivative of the error. Here both come from the training masks alone, before training, through the model-free
fingerprint (``diffseg_jax.diffusion.model_free``: the best local-average posterior denoiser), or from the curves
of a trained run (``--mode analyse``'s ``curves.csv``):

* **Convergence** (:func:`convergence`): at ᾱ → 0 every denoiser predicts the foreground rate π and its error is
  the limit ``mean((π - m)²)`` (= π(1-π)); ``information_T = 1 - error_T / limit`` is the share of the mask the
  best mask-only denoiser still recovers at t = T-1, and the curve has *converged* when it is at most ``tol``.
* **Terminal noise** (:func:`terminal_alpha_bar`, :func:`adapted_schedule`): the largest ᾱ_{T-1} at which the
  curve has converged (bisection in log ᾱ on the model-free error, common random numbers), reached by rescaling
  √ᾱ (Lin et al. 2024) or a constant SNR shift (``diffusion.adapt_terminal``). A schedule that already converges
  is kept.
* **Timestep weights** (:func:`timestep_weights`): ``diffusion.timesteps.derivative_weights`` of the curve under
  the schedule that is trained, as loss weights or as the proposal of t (``config.timesteps``).

In a run these are resolved at start-up (:func:`resolve_terminal`, called by ``planning.resolve``: the chosen
ᾱ_{T-1} is recorded in config.json) and by :func:`training_tables` (the weights, written to
``<workdir>/timesteps.csv``); both depend only on the data, the config and ``seed``, so a resumed run,
evaluation and analysis agree with training.
"""

from __future__ import annotations

import copy
import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffseg_jax import build, data, diffusion, result_files
from diffseg_jax.diffusion import model_free, timesteps

CURVE_GRID = 100  # timesteps at which the model-free curve for the weights is computed (interpolated between)


def training_masks(data_config: ml_collections.ConfigDict, num: int) -> np.ndarray:
    """The first ``num`` training masks (N, S, S, 1) in {0, 1}, centre crops of ``data.image_size`` px (the
    network's training size)."""
    source = data.load_split(data_config, "train")
    size = int(data_config.image_size)
    masks = []
    for i in range(min(num, len(source))):
        mask = data.preprocess(source[i])["mask"]
        top, left = (mask.shape[0] - size) // 2, (mask.shape[1] - size) // 2
        masks.append(mask[top : top + size, left : left + size])
    if not masks:
        raise ValueError(f"The training split of {data_config.name!r} is empty: no masks to fingerprint.")
    return np.stack(masks)


@functools.partial(jax.jit, static_argnames=("windows", "num_draws"))
def _information(alpha_bar, masks, key, windows, num_draws):
    """(best error over windows, limit, information = 1 - error / limit) at noise level ``alpha_bar``."""
    errors = model_free.window_errors(alpha_bar, masks, key, windows=windows, num_draws=num_draws)
    rate, _ = model_free.foreground_prior(masks)
    limit = jnp.mean(jnp.square(rate - masks))
    error = jnp.min(errors)
    return error, limit, 1.0 - error / jnp.maximum(limit, 1e-12)


def information_at(
    alpha_bar: float, masks: np.ndarray, key: jax.Array, num_draws: int = 2
) -> dict[str, float]:
    """The model-free error, its limit and the information left at noise level ᾱ = ``alpha_bar``."""
    masks = jnp.asarray(masks, jnp.float32)
    windows = model_free.windows_for(masks.shape[1])
    error, limit, info = _information(jnp.float32(alpha_bar), masks, key, windows, num_draws)
    return {"error": float(error), "limit": float(limit), "information": float(info)}


def convergence(
    schedule: diffusion.Schedule, masks: np.ndarray, key: jax.Array, tol: float = 0.01, num_draws: int = 2
) -> dict:
    """Whether the masks' model-free error curve has converged by t = T-1 under ``schedule`` (module docstring).

    Returns ``alpha_bar_T``, ``error_T``, ``limit``, ``information_T`` and ``converged`` (information_T <= tol).
    """
    alpha_bar_T = float(schedule.alphas_cumprod[-1])
    info = information_at(alpha_bar_T, masks, key, num_draws)
    return {
        "alpha_bar_T": alpha_bar_T,
        "error_T": info["error"],
        "limit": info["limit"],
        "information_T": info["information"],
        "converged": bool(info["information"] <= tol),
    }


def tail_rise(ts: np.ndarray, values: np.ndarray, smoothing: int = 1, tail: float = 0.1) -> float:
    """How much a (smoothed) curve still rises over its last ``tail`` of timesteps, as a fraction of its range.

    The convergence test for curves of trained networks, whose limit is not known in closed form: a curve that
    has converged by T is flat at its end (Fig. 4's MoNuSeg), one that has not still climbs (ISIC16, HER2).
    """
    ts, v = np.asarray(ts, np.float64), timesteps.moving_average(values, smoothing)
    start = ts[0] + (1.0 - tail) * (ts[-1] - ts[0])
    span = v.max() - v.min()
    return float((v[-1] - np.interp(start, ts, v)) / span) if span > 0 else 0.0


def terminal_alpha_bar(
    masks: np.ndarray,
    key: jax.Array,
    upper: float,
    tol: float = 0.01,
    lower: float = 1e-12,
    iterations: int = 20,
    num_draws: int = 2,
) -> float:
    """The largest ᾱ <= ``upper`` at which the masks' model-free curve has converged (information <= ``tol``).

    ``upper`` itself when it already converges; else a bisection in log ᾱ between ``lower`` and ``upper`` (the
    information left falls as the noise grows), returning the converged end of the final bracket.
    """

    def converged(log_a):
        return information_at(math.exp(log_a), masks, key, num_draws)["information"] <= tol

    lo, hi = math.log(lower), math.log(upper)
    if converged(hi):
        return float(upper)
    if not converged(lo):
        raise ValueError(
            f"The masks keep more than tol={tol} of their information even at ᾱ={lower:g}; raise tol "
            "(diffusion.terminal_tol), or give diffusion.alpha_bar_T yourself."
        )
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if converged(mid) else (lo, mid)
    return math.exp(lo)


def terminal_report(
    schedule: diffusion.Schedule, masks: np.ndarray, key: jax.Array, tol: float = 0.01
) -> dict:
    """:func:`convergence` under ``schedule`` plus ``adapted_alpha_bar_T``, the largest ᾱ_T that converges."""
    report = convergence(schedule, masks, key, tol)
    report["adapted_alpha_bar_T"] = terminal_alpha_bar(masks, key, report["alpha_bar_T"], tol)
    return report


def adapted_schedule(
    masks: np.ndarray,
    key: jax.Array,
    base: str = "linear",
    num_timesteps: int = 1000,
    method: str = "rescale",
    tol: float = 0.01,
    num_draws: int = 2,
    **base_kwargs,
) -> tuple[diffusion.Schedule, dict]:
    """The ``base`` schedule with its terminal ᾱ lowered until the masks' curve converges by t = T-1.

    Returns (schedule, report): ``base_alpha_bar_T``, ``converged_base``, ``information_base``, ``alpha_bar_T``
    (the adapted schedule's), ``converged``, ``information_T`` and ``method``.
    """
    betas = build.base_betas(base, num_timesteps, **base_kwargs)
    base_schedule = diffusion.schedule_from_betas(betas)
    before = convergence(base_schedule, masks, key, tol, num_draws)
    target = terminal_alpha_bar(
        masks, key, float(diffusion.alphas_cumprod_of(betas)[-1]), tol, num_draws=num_draws
    )
    schedule = diffusion.schedule_from_betas(diffusion.adapt_terminal(betas, target, method))
    after = convergence(schedule, masks, key, tol, num_draws)
    report = {
        "method": method,
        "base_alpha_bar_T": before["alpha_bar_T"],
        "converged_base": before["converged"],
        "information_base": before["information_T"],
        "alpha_bar_T": after["alpha_bar_T"],
        "converged": after["converged"],
        "information_T": after["information_T"],
    }
    return schedule, report


def model_free_fingerprint(
    schedule: diffusion.Schedule, masks: np.ndarray, key: jax.Array, num_points: int = CURVE_GRID
) -> tuple[np.ndarray, np.ndarray]:
    """(ts, model-free mask error) on ``num_points`` timesteps from 0 to T-1, with windows up to the mask size."""
    num_t = schedule.num_timesteps
    ts = np.unique(np.linspace(0, num_t - 1, min(num_points, num_t)).round().astype(np.int32))
    masks = jnp.asarray(masks, jnp.float32)
    windows = model_free.windows_for(masks.shape[1])
    curve = model_free.model_free_curve(schedule, masks, jnp.asarray(ts), key, windows=windows, t_chunk=10)
    return ts, np.asarray(curve["mask_error"], np.float64)


def curve_from_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ts, mask error) from an analysis CSV (``curves.csv`` / ``model_free.csv``), averaged over its models."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"timesteps.curve={path!r}: no such file. Give 'model_free' or the curves.csv / model_free.csv that "
            "--mode analyse wrote into <workdir>/analysis/."
        )
    rows = [r for r in result_files.read_rows(path) if r["curve"] == "mask_error"]
    if not rows:
        raise ValueError(f"{path} holds no mask_error curve; analyse an E2 or E3 run (--mode analyse).")
    ts = np.unique([r["t"] for r in rows])
    sums, counts = np.zeros(len(ts)), np.zeros(len(ts))
    for r in rows:
        i = np.searchsorted(ts, r["t"])
        sums[i] += r["value"]
        counts[i] += 1
    return ts, sums / counts


def timestep_weights(
    schedule: diffusion.Schedule,
    ts: np.ndarray,
    errors: np.ndarray,
    smoothing: float = 0.05,
    floor: float = 0.1,
) -> np.ndarray:
    """``derivative_weights`` of a curve for ``schedule``, smoothing over ``smoothing`` x T timesteps."""
    num_t = schedule.num_timesteps
    window = max(1, int(round(smoothing * num_t)))
    return timesteps.derivative_weights(ts, errors, num_t, window, floor)


def _run_key(config: ml_collections.ConfigDict, salt: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), salt)


def resolve_terminal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``diffusion.alpha_bar_T`` chosen from the training masks if it is ``-1`` (auto) and
    ``diffusion.terminal`` is not ``'none'``; else ``config`` itself."""
    d = config.diffusion
    if d.terminal == "none" or d.alpha_bar_T > 0:
        return config
    masks = training_masks(config.data, config.timesteps.num_masks)
    upper = float(diffusion.alphas_cumprod_of(build.config_betas(d))[-1])
    target = terminal_alpha_bar(masks, _run_key(config, 1), upper, d.terminal_tol)
    logging.info(
        "Terminal noise from %d training masks: alpha_bar_T %.3g -> %.3g (%s, tol %g).",
        len(masks),
        upper,
        target,
        d.terminal,
        d.terminal_tol,
    )
    c = copy.deepcopy(config)
    c.diffusion.alpha_bar_T = target
    return c


def training_tables(
    config: ml_collections.ConfigDict, schedule: diffusion.Schedule
) -> dict[str, np.ndarray | None]:
    """``{'weights', 'probs', 'ts', 'curve'}`` for ``config.timesteps``: the loss weights (None: uniform), the
    static proposal of t (None: uniform or the loss-aware sampler's, which lives in the train state) and the
    curve they came from (None when neither needs one)."""
    tc = config.timesteps
    needs_curve = tc.weighting == "fingerprint" or tc.sampling == "fingerprint"
    out = {"weights": None, "probs": None, "ts": None, "curve": None}
    if not needs_curve:
        return out
    if tc.curve == "model_free":
        masks = training_masks(config.data, tc.num_masks)
        ts, curve = model_free_fingerprint(schedule, masks, _run_key(config, 2))
    else:
        ts, curve = curve_from_csv(tc.curve)
    weights = timestep_weights(schedule, ts, curve, tc.smoothing, tc.floor)
    out.update(ts=ts, curve=curve)
    if tc.weighting == "fingerprint":
        out["weights"] = weights
    if tc.sampling == "fingerprint":
        out["probs"] = weights / weights.sum()
    return out


def write_tables(path: str, tables: dict, num_timesteps: int) -> None:
    """``t, weight, prob, curve`` per timestep as CSV (curve interpolated onto every t; blank where unused)."""
    curve = (
        None
        if tables["curve"] is None
        else np.interp(np.arange(num_timesteps), tables["ts"], tables["curve"])
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write("t,weight,prob,curve\n")
        for t in range(num_timesteps):
            cells = [tables["weights"], tables["probs"], curve]
            f.write(f"{t}," + ",".join("" if c is None else f"{c[t]:.6g}" for c in cells) + "\n")


def fingerprint_report(config: ml_collections.ConfigDict) -> dict:
    """What ``--mode fingerprint`` prints: the training masks' convergence at T under the config's schedule, the
    terminal ᾱ at which they converge, and where the fingerprint weights put their emphasis."""
    schedule = _build_schedule(config)
    masks = training_masks(config.data, config.timesteps.num_masks)
    tol = config.diffusion.terminal_tol
    report = terminal_report(schedule, masks, _run_key(config, 1), tol)
    ts, curve = model_free_fingerprint(schedule, masks, _run_key(config, 2))
    weights = timestep_weights(schedule, ts, curve, config.timesteps.smoothing, config.timesteps.floor)
    heavy = np.flatnonzero(weights >= 1.0)
    report.update(
        num_masks=int(len(masks)),
        mask_size=int(masks.shape[1]),
        foreground_rate=float(masks.mean()),
        num_timesteps=int(schedule.num_timesteps),
        t_half=int(ts[np.argmax(curve >= 0.5 * curve.max())]),
        weight_peak_t=int(np.argmax(weights)),
        weights_above_mean=[int(heavy.min()), int(heavy.max())] if len(heavy) else [],
    )
    return report


def _build_schedule(config: ml_collections.ConfigDict) -> diffusion.Schedule:

    return build.build_schedule(config.diffusion)


def report_text(report: dict) -> str:
    """A few readable lines of :func:`fingerprint_report`."""
    verdict = "has converged" if report["converged"] else "has NOT converged"
    lines = [
        f"{report['num_masks']} training masks of {report['mask_size']} px, foreground rate "
        f"{report['foreground_rate']:.3f}, T = {report['num_timesteps']}.",
        f"Model-free mask error at t = T-1 (ᾱ_T = {report['alpha_bar_T']:.3g}): {report['error_T']:.5f} of a limit "
        f"{report['limit']:.5f}; information left {report['information_T']:.2%}: the curve {verdict} by T.",
        f"Largest ᾱ_T at which it converges: {report['adapted_alpha_bar_T']:.3g} "
        "(--config.diffusion.terminal=rescale or snr_shift uses it).",
        f"Error reaches half its maximum at t = {report['t_half']}; fingerprint weights peak at t = "
        f"{report['weight_peak_t']} and exceed their mean for t in {report['weights_above_mean']}.",
    ]
    return "\n".join(lines)
