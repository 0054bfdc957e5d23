"""The paper's analyses (Sec. 4.2-4.3): per-timestep error and loss curves, the forward process, fingerprints."""

from diffseg_jax.analysis.curves import timestep_curves
from diffseg_jax.analysis.forward import forward_process
from diffseg_jax.diffusion.model_free import box_sum, model_free_curve

__all__ = ["box_sum", "forward_process", "model_free_curve", "timestep_curves"]
