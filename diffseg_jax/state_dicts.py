"""Official PyTorch state dicts into our Flax variables, by name (EnsemDiff, SegDiff, MedSegDiff, SegFormer, nnU-Net).

Each model module exports ``torch_key(path) -> str``, the official state-dict key of one Flax leaf
(``('input_blocks_1_0', 'in_conv', 'kernel')`` → ``'input_blocks.1.0.in_layers.2.weight'``). This module
maps every tensor by that name, converts layouts (conv OIHW → HWIO, Linear (out, in) → (in, out), the 1×1
Conv1d of attention (out, in, 1) → (in, out)) and checks shapes, failing on any unmapped, missing or
mis-shaped tensor with its name. A model module may add explicit, logged exceptions (:func:`import_rules`:
SegFormer skips an ImageNet classifier and lets an encoder-only checkpoint leave its decoder at
initialisation). PyTorch is not needed: ``.pt``/``.pth``/``.bin`` files are read by :mod:`diffseg_jax.torchfile`
(an allowlist unpickler that executes nothing; a pickle naming anything but tensors is refused), ``.safetensors``
by ``safetensors``, an ``.npz`` of named arrays (``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``)
by NumPy. The command line that writes a checkpoint from such a file is ``python -m diffseg_jax.convert``."""

from __future__ import annotations

import importlib
import os
import pickle
import zipfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

TorchKey = Callable[[tuple[str, ...]], str]


# PyTorch buffers with no Flax counterpart.
IGNORED_SUFFIXES = (".num_batches_tracked",)


_CONV1D_KERNELS = ("qkv", "proj_out")  # guided-diffusion's attention uses 1x1 Conv1d; ours are Dense.


DEFAULT_HINT = "Check that the config (architecture, channels, learn_sigma) matches the checkpoint."


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


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch-layout shape of a Flax leaf of ``shape`` (for error messages; allocates nothing)."""
    return tuple(to_torch_layout(path, np.broadcast_to(np.float32(0), shape)).shape)


def import_state_dict(
    state_dict: Mapping[str, Any],
    template: Any,
    torch_key: TorchKey,
    *,
    canonical_key: Callable[[str], str] | None = None,
    skip_reason: Callable[[str], str | None] | None = None,
    optional_group: Callable[[tuple[str, ...]], str | None] | None = None,
    hint: str = DEFAULT_HINT,
) -> Any:
    """Flax variables shaped like ``template`` from an official state dict; strict both ways.

    ``template`` is any pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape`` of the
    model's ``init``). Raises ``ValueError`` naming every missing, mis-shaped or unused tensor, ending with
    ``hint`` (the fix). A model module may relax this with explicit, logged rules (see :func:`import_weights`):
    ``canonical_key`` renames the file's keys first (e.g. another naming of the same modules);
    ``skip_reason(key)`` names why a tensor is deliberately not imported; ``optional_group(path)`` names the
    group of parameters a leaf belongs to that a checkpoint may leave out as a whole (e.g. a decoder missing
    from an encoder checkpoint): then those leaves keep their ``template`` values, which must be arrays.
    """
    if canonical_key is not None:
        renamed: dict[str, Any] = {}
        for key, value in state_dict.items():
            new = canonical_key(key)
            if new in renamed:
                raise ValueError(f"Two state-dict tensors map to {new} (one of them is {key}).")
            renamed[new] = value
        state_dict = renamed
    skipped = {k: skip_reason(k) for k in state_dict} if skip_reason is not None else {}
    skipped = {k: why for k, why in skipped.items() if why}
    for key, why in sorted(skipped.items()):
        logging.info("Weight import: skipping %s %s: %s.", key, tuple(np.shape(state_dict[key])), why)
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = [_leaf_path(key_path) for key_path, _ in flat]
    groups = [optional_group(p) if optional_group is not None else None for p in paths]
    present = {g for g, p in zip(groups, paths) if g is not None and torch_key(p) in state_dict}
    leaves, used, missing, bad, kept = [], set(), [], [], {}
    for path, (_, leaf), group in zip(paths, flat, groups):
        key = torch_key(path)
        if key not in state_dict:
            if group is not None and group not in present and not isinstance(leaf, jax.ShapeDtypeStruct):
                kept.setdefault(group, []).append(key)
                leaves.append(leaf)
                continue
            missing.append(f"{key} (for {'/'.join(path)})")
            leaves.append(None)
            continue
        used.add(key)
        w = to_flax_layout(path, np.asarray(state_dict[key], dtype=np.float32))
        if w.shape != tuple(leaf.shape):
            bad.append(
                f"{key}: the file has {tuple(np.shape(state_dict[key]))}, the model needs "
                f"{_torch_shape(path, tuple(leaf.shape))}"
            )
        leaves.append(jnp.asarray(w, dtype=leaf.dtype))
    unused = sorted(k for k in set(state_dict) - used - set(skipped) if not k.endswith(IGNORED_SUFFIXES))
    problems = []
    if not used and unused:
        problems.append(
            f"none of its {len(unused)} tensors is named as a parameter of this model (e.g. {unused[:3]}, where the "
            f"model expects e.g. {[m.split(' ')[0] for m in missing[:3]]}): it is not a checkpoint of this architecture"
        )
    if missing:
        problems.append(f"{len(missing)} tensors missing from the state dict: {missing[:8]}")
    if bad:
        problems.append(f"{len(bad)} tensors of the wrong shape: {bad[:8]}")
    if unused:
        problems.append(f"{len(unused)} state-dict tensors not mapped to any parameter: {unused[:8]}")
    if problems:
        raise ValueError("Cannot import the state dict: " + "; ".join(problems) + ". " + hint)
    for group, keys in kept.items():
        logging.warning(
            "Weight import: the checkpoint has no %s.* tensors: those %d tensors keep their initialisation.",
            group,
            len(keys),
        )
    logging.info("Weight import: %d tensors imported, %d skipped.", len(used), len(skipped))
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
        # Contiguous: safetensors' save_file writes a transposed view's buffer as if it were C-ordered.
        out[key] = np.ascontiguousarray(to_torch_layout(path, np.asarray(leaf)))
    return out


def _not_weights(path: str, expected: str, problem: str) -> Exception:
    """The ``DatasetFileError`` for a weights file that is not what its name claims."""
    from diffseg_jax.data import files  # noqa: PLC0415 — the data stack is not needed to convert arrays

    return files.DatasetFileError(
        f"{path} is not {expected}: {problem}. Pass the state dict of the official code, saved as .pt/.pth/.bin "
        "(torch.save), .safetensors or .npz (np.savez(path, **{k: v.numpy() for k, v in sd.items()}))."
    )


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.npz`` of named arrays, a ``.safetensors`` file (needs the ``safetensors`` package), or a
    PyTorch ``.pt``/``.pth``/``.bin`` (needs torch installed).

    A file that is not what its suffix claims (e.g. a text or HTML page saved as ``.npz``, on which numpy's own
    message speaks of "pickled data"), or one without a single array, is a ``DatasetFileError`` naming it.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path}")
    if path.endswith(".npz"):
        expected = "an .npz of named arrays"
        try:
            loaded = np.load(path)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise _not_weights(path, expected, f"numpy cannot read it as one ({e})") from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise _not_weights(path, expected, "it holds a single unnamed .npy array")
        try:
            with loaded as f:
                sd = {k: f[k] for k in f.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:  # object arrays, a truncated member
            raise _not_weights(path, expected, f"reading its arrays failed ({e})") from None
    elif path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file  # noqa: PLC0415 — optional dependency.
        except ImportError as e:
            raise ImportError(f"Reading {path} needs the safetensors package: pip install safetensors") from e
        try:
            sd = {k.removeprefix("module."): v for k, v in load_file(path).items()}
        except Exception as e:  # safetensors' own error type, for a file of another format
            raise _not_weights(path, "a .safetensors file", f"safetensors cannot read it ({e})") from None
    else:
        sd = _load_torch(path)
    if not sd:
        raise _not_weights(path, "a state dict", "it holds no arrays")
    return sd


def _load_torch(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict file (``torch.save``; a ``{'state_dict': ...}`` checkpoint too) as NumPy arrays,
    read by :mod:`diffseg_jax.torchfile`'s allowlist unpickler: nothing in the file is executed, and a pickle
    naming anything but tensors is refused."""
    from diffseg_jax import torchfile  # noqa: PLC0415 — only for PyTorch files

    expected = "a PyTorch state dict"
    try:
        if torchfile.is_zip_checkpoint(path):
            sd = torchfile.load_zip_checkpoint(path)
        elif zipfile.is_zipfile(path):
            raise _not_weights(path, expected, "it is a zip archive without a data.pkl")
        else:
            sd = torchfile.load_legacy_checkpoint(path)
    except torchfile.UnsafeCheckpointError as e:
        raise _not_weights(path, expected, str(e)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, zipfile.BadZipFile, OSError) as e:
        raise _not_weights(path, expected, f"it cannot be read as one ({type(e).__name__}: {e})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") and hasattr(v, "dtype") for v in sd.values()):
        raise _not_weights(path, expected, f"it holds a {type(sd).__name__}, not named tensors")
    return {k.removeprefix("module."): _as_float_array(v) for k, v in sd.items()}


def _as_float_array(value: Any) -> np.ndarray:
    """A NumPy array of a NumPy array or a torch tensor (of torch.load), float32 for floating types."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
    value = np.asarray(value)
    return (
        value.astype(np.float32)
        if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"
        else value
    )


def torch_key_for(model) -> TorchKey:
    """The ``torch_key`` function exported by the module that defines ``model``'s class."""
    module = importlib.import_module(type(model).__module__)
    if not hasattr(module, "torch_key"):
        raise NotImplementedError(f"{type(model).__name__} has no official-weight mapping (torch_key).")
    return module.torch_key


def import_rules(model) -> dict[str, Any]:
    """The optional import rules of ``model``'s module: ``canonical_key``, ``skip_reason``,
    ``optional_group`` functions and an ``IMPORT_HINT`` string (see :func:`import_state_dict`)."""
    module = importlib.import_module(type(model).__module__)
    return {
        **{k: getattr(module, k, None) for k in ("canonical_key", "skip_reason", "optional_group")},
        "hint": getattr(module, "IMPORT_HINT", DEFAULT_HINT),
    }


def import_weights(model, template: Any, state_dict: Mapping[str, Any]) -> Any:
    """Imports ``state_dict`` into variables shaped like ``template`` for ``model``, with its module's rules."""
    return import_state_dict(state_dict, template, torch_key_for(model), **import_rules(model))
