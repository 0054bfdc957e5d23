"""Model summaries without data or training: parameter counts from abstract shapes (``jax.eval_shape``)."""

from __future__ import annotations

import ml_collections

from diffseg_jax import models, objectives, train


def model_param_count(config: ml_collections.ConfigDict) -> int:
    """Parameters of ``config``'s model for its experiment, from shapes only (allocates nothing)."""
    channels, size = config.data.image_channels, config.data.image_size
    model = train.build_model(config.model, train.output_channels(config, channels), size)
    x_shape = (1, size, size, channels if config.experiment == "e4" else 1)
    cond_shape = (1, size, size, channels) if objectives.uses_image_condition(config.experiment) else None
    return models.count_params(model, x_shape, cond_shape, (1,))


def summary_text(config: ml_collections.ConfigDict) -> str:
    """The text ``--mode summary`` prints; its last line is ``params: N``."""
    return (
        f"model: {config.model.name}  experiment: {config.experiment}  "
        f"input: {config.data.image_size}x{config.data.image_size}x{config.data.image_channels}\n"
        f"params: {model_param_count(config)}"
    )
