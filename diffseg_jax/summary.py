"""Model summaries without data or training: parameter counts from abstract shapes (``jax.eval_shape``)."""

from __future__ import annotations

import ml_collections

from diffseg_jax import build, data, models, objectives, planning


def model_param_count(config: ml_collections.ConfigDict) -> int:
    """Parameters of ``config``'s model for its experiment, from shapes only (allocates nothing)."""
    channels, size = config.data.image_channels, config.data.image_size
    model = build.build_model(config.model, build.output_channels(config, channels), size)
    x_shape = (1, size, size, channels if config.experiment == "e4" else 1)
    cond_shape = (1, size, size, channels) if objectives.uses_image_condition(config.experiment) else None
    return models.count_params(model, x_shape, cond_shape, (1,))


def assumed_fingerprint(config: ml_collections.ConfigDict) -> tuple[tuple[float, float], int, int]:
    """The training set as the config describes it, for planning without data: images of the stored size, as
    many as ``data.num_train`` (known for synthetic data only; the architecture depends on the size alone)."""
    size = float(data.stored_size(config.data))
    return (size, size), int(config.data.num_train), int(config.data.image_channels)


def summary_text(config: ml_collections.ConfigDict) -> str:
    """The text ``--mode summary`` prints; its last line is ``params: N``.

    A model planned from the data (nnU-Net, ``model.plan.mode=auto``) is planned for stored-size images and
    its plan is shown; a run plans from the actual training split.
    """
    planned = planning.resolve(config, fingerprint=assumed_fingerprint(config))
    source = None  # synthetic data: the fingerprint is exact, the plan that of a run
    if planned is not config and config.data.name != "synthetic":
        size = data.stored_size(config.data)
        source = f"{size}x{size} px images (as stored; a run plans from its training split)"
    config = planned
    plan = planning.describe(config, source)
    return (
        f"model: {config.model.name}  experiment: {config.experiment}  "
        f"input: {config.data.image_size}x{config.data.image_size}x{config.data.image_channels}\n"
        + (f"{plan}\n" if plan else "")
        + f"params: {model_param_count(config)}"
    )
