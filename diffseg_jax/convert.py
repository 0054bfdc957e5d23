"""Import official PyTorch weights (EnsemDiff, SegDiff, MedSegDiff) into our Flax variables.

Each model module exports ``torch_key(path) -> str``, the official state-dict key of one Flax leaf
(``('input_blocks_1_0', 'in_conv', 'kernel')`` → ``'input_blocks.1.0.in_layers.2.weight'``). This module
maps every tensor by that name, converts layouts (conv OIHW → HWIO, Linear (out, in) → (in, out), the 1×1
Conv1d of attention (out, in, 1) → (in, out)) and checks shapes, failing on any unmapped, missing or
mis-shaped tensor with its name. PyTorch is optional: ``.pt``/``.pth`` files need it installed; an ``.npz``
of named arrays (``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``) does not.

  python -m diffseg_jax.convert --config configs/e2_isic.py:ensemdiff --weights savedmodel.pt --workdir DIR
  python -m diffseg_jax.main --config configs/e2_isic.py:ensemdiff --workdir DIR --mode evaluate
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

TorchKey = Callable[[tuple[str, ...]], str]
# PyTorch buffers with no Flax counterpart.
IGNORED_SUFFIXES = (".num_batches_tracked",)
_CONV1D_KERNELS = ("qkv", "proj_out")  # guided-diffusion's attention uses 1x1 Conv1d; ours are Dense.


def _leaf_path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def to_flax_layout(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    """One PyTorch tensor in Flax layout."""
    if path[-1] != "kernel":
        return w
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if w.ndim == 3:
        return w[:, :, 0].T
    return w.T


def to_torch_layout(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    """One Flax leaf in the official PyTorch layout (inverse of :func:`to_flax_layout`)."""
    if path[-1] != "kernel":
        return w
    if w.ndim == 4:
        return w.transpose(3, 2, 0, 1)
    if any(name.startswith(_CONV1D_KERNELS) for name in path[:-1][-1:]):
        return w.T[:, :, None]
    return w.T


def import_state_dict(state_dict: Mapping[str, Any], template: Any, torch_key: TorchKey) -> Any:
    """Flax variables shaped like ``template`` from an official state dict; strict both ways.

    ``template`` is any pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape`` of the
    model's ``init``). Raises ``ValueError`` naming every missing, mis-shaped or unused tensor.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves, used, missing, bad = [], set(), [], []
    for key_path, leaf in flat:
        path = _leaf_path(key_path)
        key = torch_key(path)
        if key not in state_dict:
            missing.append(f"{key} (for {'/'.join(path)})")
            leaves.append(None)
            continue
        used.add(key)
        w = to_flax_layout(path, np.asarray(state_dict[key], dtype=np.float32))
        if w.shape != tuple(leaf.shape):
            bad.append(f"{key}: {tuple(np.shape(state_dict[key]))} → {w.shape}, expected {tuple(leaf.shape)}")
        leaves.append(jnp.asarray(w, dtype=leaf.dtype))
    unused = sorted(k for k in set(state_dict) - used if not k.endswith(IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing from the state dict: {missing[:8]}")
    if bad:
        problems.append(f"{len(bad)} tensors of the wrong shape: {bad[:8]}")
    if unused:
        problems.append(f"{len(unused)} state-dict tensors not mapped to any parameter: {unused[:8]}")
    if problems:
        raise ValueError(
            "Cannot import the state dict: " + "; ".join(problems) + ". Check that the config "
            "(architecture, channels, learn_sigma) matches the checkpoint."
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def export_state_dict(variables: Any, torch_key: TorchKey) -> dict[str, np.ndarray]:
    """Our variables as an official-named state dict of NumPy arrays (for comparisons and tests)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    out = {}
    for key_path, leaf in flat:
        path = _leaf_path(key_path)
        key = torch_key(path)
        if key in out:
            raise ValueError(f"two parameters map to {key}")
        out[key] = to_torch_layout(path, np.asarray(leaf))
    return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.npz`` of named arrays, or a PyTorch ``.pt``/``.pth`` (needs torch installed)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path}")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    try:
        import torch  # noqa: PLC0415 — optional dependency.
    except ImportError as e:
        raise ImportError(
            f"Reading {path} needs PyTorch (pip install torch), or convert it to .npz where torch is "
            "installed: np.savez(out, **{k: v.cpu().numpy() for k, v in sd.items()})"
        ) from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in sd.items()}


def torch_key_for(model) -> TorchKey:
    """The ``torch_key`` function exported by the module that defines ``model``'s class."""
    module = importlib.import_module(type(model).__module__)
    if not hasattr(module, "torch_key"):
        raise NotImplementedError(f"{type(model).__name__} has no official-weight mapping (torch_key).")
    return module.torch_key


def import_weights(model, template: Any, state_dict: Mapping[str, Any]) -> Any:
    """Imports ``state_dict`` into variables shaped like ``template`` for ``model``."""
    return import_state_dict(state_dict, template, torch_key_for(model))


def main(argv: list[str] | None = None) -> None:
    """CLI: write a step-0 checkpoint holding official weights into a workdir, ready for --mode evaluate."""
    import argparse

    from ml_collections import config_flags  # noqa: F401 — config files are plain modules here.

    from diffseg_jax import checkpoints, configlib, train

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
    parser.add_argument("--weights", required=True, help=".pt/.pth (needs torch) or .npz state dict")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    file, _, arg = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("_config", file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.getcwd())
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    configlib.validate(config)
    _, model, _, optimizer, state = train.setup(config)
    variables = {"params": state.params, **state.model_state}
    state_dict = load_state_dict(args.weights)
    imported = import_weights(model, variables, state_dict)
    state = train.create_train_state(imported, optimizer, state.key)
    ckpt = checkpoints.Checkpointer(os.path.join(args.workdir, "checkpoints"))
    ckpt.save(0, state, {"imported_from": os.path.abspath(args.weights), "config": config.to_dict()})
    ckpt.close()
    print(f"Imported {len(state_dict)} tensors into {ckpt.directory}/0")


if __name__ == "__main__":
    main()
