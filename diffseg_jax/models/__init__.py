"""Model registry: names -> Flax modules, plus parameter counting helpers.

Every registered model is called as ``model.apply(variables, x_t, t, cond, train=...)`` with NHWC
arrays; ``cond=None`` is only allowed where the class sets ``CAN_DROP_IMAGE = True``. A feed-forward
reference (class attribute ``FEED_FORWARD = True``) maps the image ``cond`` to mask logits and ignores
``x_t`` and ``t``: it can only be trained as E1.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffseg_jax.models.ensemdiff import EnsemDiffUNet
from diffseg_jax.models.medsegdiff import MedSegDiffNewUNet, MedSegDiffUNet
from diffseg_jax.models.nnunet import NNUNet
from diffseg_jax.models.segdiff import SegDiffUNet
from diffseg_jax.models.segformer import SegFormer

MODELS: dict[str, type[nn.Module]] = {
    "ensemdiff": EnsemDiffUNet,
    "medsegdiff": MedSegDiffUNet,  # v1: FF-Parser + dynamic conditional encoding (the paper's model)
    "medsegdiff_new": MedSegDiffNewUNet,  # the repository's default --version new (anchors)
    "segdiff": SegDiffUNet,
    "segformer": SegFormer,  # feed-forward reference: HF SegformerForSemanticSegmentation, B3 by default
    "nnunet": NNUNet,  # feed-forward reference: nnU-Net v2.8.1's 2D PlainConvUNet, planned from the data
}


def _model_class(name: str) -> type[nn.Module]:
    """Look up a registered class or raise ValueError listing the known names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the registered model ``name`` with its own keyword arguments."""
    return _model_class(name)(**kwargs)


def can_drop_image(name: str) -> bool:
    """Whether model ``name`` accepts ``cond=None`` (no image input; experiments E3/E4)."""
    return bool(getattr(_model_class(name), "CAN_DROP_IMAGE", False))


def is_feed_forward(name: str) -> bool:
    """Whether model ``name`` is a feed-forward reference (image -> logits; ignores x_t and t; E1 only)."""
    return bool(getattr(_model_class(name), "FEED_FORWARD", False))


def param_count(params: Any) -> int:
    """Total number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct``s."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def param_shapes(
    model: nn.Module,
    x_shape: Sequence[int],
    cond_shape: Sequence[int] | None,
    t_shape: Sequence[int],
) -> Any:
    """Shapes of ``model``'s 'params' collection via ``jax.eval_shape``: no compute, no allocation."""
    x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
    t = jax.ShapeDtypeStruct(tuple(t_shape), jnp.int32)
    cond = None if cond_shape is None else jax.ShapeDtypeStruct(tuple(cond_shape), jnp.float32)
    variables = jax.eval_shape(lambda x, t, c: model.init(jax.random.key(0), x, t, c), x, t, cond)
    return variables["params"]


def count_params(
    model: nn.Module,
    x_shape: Sequence[int],
    cond_shape: Sequence[int] | None,
    t_shape: Sequence[int],
) -> int:
    """Parameter count of ``model`` for the given input shapes (input width matters, H and W do not)."""
    return param_count(param_shapes(model, x_shape, cond_shape, t_shape))


__all__ = [
    "MODELS",
    "EnsemDiffUNet",
    "NNUNet",
    "get_model",
    "can_drop_image",
    "is_feed_forward",
    "param_count",
    "param_shapes",
    "count_params",
]
