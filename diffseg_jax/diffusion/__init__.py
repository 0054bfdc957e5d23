"""Discrete Gaussian diffusion: schedules, the forward process, samplers."""

from diffseg_jax.diffusion.gaussian import (
    MASK_RANGES,
    diffusion_to_prob,
    extract,
    mask_to_diffusion,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
)
from diffseg_jax.diffusion.samplers import (
    SAMPLERS,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
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

__all__ = [
    "BETA_SCHEDULES",
    "MASK_RANGES",
    "SAMPLERS",
    "Schedule",
    "TERMINAL_METHODS",
    "adapt_terminal",
    "alphas_cumprod_of",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "diffusion_to_prob",
    "ensemble_sample",
    "ensemble_statistics",
    "extract",
    "get_schedule",
    "mask_to_diffusion",
    "model_x0_eps",
    "step_log_variance",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "q_posterior",
    "q_sample",
    "register_beta_schedule",
    "schedule_from_betas",
]
