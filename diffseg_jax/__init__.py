"""diffseg-jax: diffusion segmentation for medical images in JAX/Flax (after Öttl et al.).

Public, jit-friendly API for notebooks::

  from diffseg_jax import diffusion, objectives, metrics
  sched = diffusion.get_schedule("linear", 1000)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  loss, aux = objectives.loss_fn(apply_fn, params, batch, key, sched, experiment="e2")
  x = diffusion.ddpm_sample(model_fn, sched, shape, key)           # or ddim_sample(..., num_steps=50)
  # A network with a learned variance (config diffusion.learn_sigma, twice the mask channels) trains with
  # loss_fn(..., learn_sigma=True) and samples with ddpm_sample(..., variance="learned_range").
  members = diffusion.ensemble_sample(lambda k: diffusion.ddim_sample(model_fn, sched, shape, k), key, 10)

A trained run, and configs by name (``diffseg_jax.api``)::

  config = diffseg_jax.get_config("configs/quickstart.py:tiny")       # or a shipped config: "quickstart:tiny"
  run = diffseg_jax.load_run("runs/quickstart")                       # its config.json and weights
  mean, std = run.segment(images, members=10, sampler="ddim", steps=50, key=0)
"""

from diffseg_jax import diffusion, metrics, objectives
from diffseg_jax.diffusion import (
    ddim_sample,
    ddpm_sample,
    ensemble_sample,
    ensemble_statistics,
    get_schedule,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_sample,
)
from diffseg_jax.objectives import loss_fn

__version__ = "0.1.0"

_API = ("Run", "get_config", "load_run")


def __getattr__(name: str):
    """``diffseg_jax.load_run`` / ``get_config`` / ``Run`` from :mod:`diffseg_jax.api`, imported on first use."""
    if name in _API:
        # Lazy: the api brings in training, evaluation and tensorflow-datasets, which `import diffseg_jax` (the
        # pure functions above) does not need.
        from diffseg_jax import api  # noqa: PLC0415

        return getattr(api, name)
    raise AttributeError(f"module 'diffseg_jax' has no attribute {name!r}")


__all__ = [
    "Run",
    "ddim_sample",
    "ddpm_sample",
    "diffusion",
    "ensemble_sample",
    "ensemble_statistics",
    "get_config",
    "get_schedule",
    "load_run",
    "loss_fn",
    "metrics",
    "objectives",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "q_sample",
]
