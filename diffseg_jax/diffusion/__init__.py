"""Discrete diffusion: schedules, the Gaussian forward process and samplers, Bernoulli diffusion (BerDiff)."""

from diffseg_jax.diffusion import bernoulli
from diffseg_jax.diffusion.bernoulli import BERNOULLI_SAMPLERS
from diffseg_jax.diffusion.gaussian import (
    MASK_RANGES,
    PREDICTIONS,
    diffusion_to_mask_scale,
    diffusion_to_prob,
    extract,
    mask_to_diffusion,
    predict_eps_from_x0,
    predict_x0_from_eps,
    prediction_target,
    q_posterior,
    q_sample,
    v_from_x0_eps,
    x0_eps_from_prediction,
)
from diffseg_jax.diffusion.samplers import (
    FIXED_VARIANCES,
    SAMPLERS,
    TTA_TRANSFORMS,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    dihedral,
    ensemble_sample,
    ensemble_statistics,
    model_x0_eps,
    step_log_variance,
)
from diffseg_jax.diffusion.schedule import (
    BETA_SCHEDULES,
    TERMINAL_METHODS,
    Schedule,
    adapt_terminal,
    alphas_cumprod_of,
    get_schedule,
    register_beta_schedule,
    schedule_from_betas,
)

# diffusion.process: Gaussian noise (the paper's) or Bernoulli flips of binary masks (BerDiff, beyond the paper).
PROCESSES = ("gaussian", "bernoulli")


def samplers_of(process: str) -> dict:
    """The samplers ``eval.sampler`` names ('ddpm', 'ddim') for a diffusion ``process``."""
    if process == "gaussian":
        return SAMPLERS
    if process == "bernoulli":
        return BERNOULLI_SAMPLERS
    raise ValueError(f"diffusion process must be one of {PROCESSES}, got {process!r}")


__all__ = [
    "BERNOULLI_SAMPLERS",
    "BETA_SCHEDULES",
    "FIXED_VARIANCES",
    "MASK_RANGES",
    "PREDICTIONS",
    "PROCESSES",
    "SAMPLERS",
    "TERMINAL_METHODS",
    "TTA_TRANSFORMS",
    "Schedule",
    "adapt_terminal",
    "alphas_cumprod_of",
    "bernoulli",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "diffusion_to_mask_scale",
    "diffusion_to_prob",
    "dihedral",
    "ensemble_sample",
    "ensemble_statistics",
    "extract",
    "get_schedule",
    "mask_to_diffusion",
    "model_x0_eps",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "prediction_target",
    "q_posterior",
    "q_sample",
    "register_beta_schedule",
    "samplers_of",
    "schedule_from_betas",
    "step_log_variance",
    "v_from_x0_eps",
    "x0_eps_from_prediction",
]
