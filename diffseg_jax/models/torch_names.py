"""Official PyTorch state-dict names of the guided/improved-diffusion UNet blocks (for weight import).

Our parameter names follow the PyTorch module tree with ``.`` → ``_`` for module indices; only the
blocks whose submodules are ``nn.Sequential`` in the official code (ResBlock's ``in_layers``/``emb_layers``
/``out_layers``, the ``time_embed`` MLP and the ``out`` head) have readable names here, mapped below.
"""

from __future__ import annotations

import re

LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "complex_weight": "complex_weight",  # MedSegDiff's FF-Parser
}
RESBLOCK = {
    "in_norm": "in_layers.0",
    "in_conv": "in_layers.2",
    "emb_dense": "emb_layers.1",
    "out_norm": "out_layers.0",
    "out_conv": "out_layers.3",
}
HEAD = {"out_norm": "out.0", "out_conv": "out.2"}
TIME_EMBED = {"dense_0": "0", "dense_1": "2"}
TRUNK = ("input_blocks_", "middle_block_", "output_blocks_")  # the only parents of ResBlocks


def indices_to_dots(name: str) -> str:
    """``input_blocks_4_1`` → ``input_blocks.4.1``: numeric segments become PyTorch module indices."""
    return re.sub(r"_(\d+)(?=_|$)", r".\1", name)


def unet_torch_key(path: tuple[str, ...]) -> str:
    """Official key of a leaf of the guided/improved-diffusion UNet (time_embed, blocks, head).

    E.g. ``('input_blocks_1_0', 'in_conv', 'kernel')`` → ``'input_blocks.1.0.in_layers.2.weight'``; a
    leading ``'params'``/``'batch_stats'`` collection name is dropped. Names outside the UNet body
    (SegDiff's RRDB, MedSegDiff's condition network) already are the official ones with indices as ``_i``.
    """
    parts = [str(p) for p in path]
    if parts and parts[0] in ("params", "batch_stats"):
        parts = parts[1:]
    if len(parts) < 2 or parts[-1] not in LEAF:
        raise ValueError(f"not a parameter path: {tuple(path)}")
    *mods, leaf = parts
    out = []
    for depth, name in enumerate(mods):
        if depth == 0 and len(mods) == 1 and name in HEAD:
            out.append(HEAD[name])
        elif depth == 1 and mods[0] == "time_embed" and name in TIME_EMBED:
            out.append(TIME_EMBED[name])
        elif depth == 1 and mods[0].startswith(TRUNK) and name in RESBLOCK:
            out.append(RESBLOCK[name])
        else:
            out.append(indices_to_dots(name))
    return ".".join(out + [LEAF[leaf]])
