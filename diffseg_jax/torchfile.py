"""Reads PyTorch ``torch.save`` state dicts (``.pt``/``.pth``/``.bin``) without torch and without running their pickles.

A PyTorch checkpoint is a zip archive: ``<name>/data.pkl``, a pickle of the object with each tensor stored as a
call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` whose storage is a
persistent id ``('storage', torch.<Dtype>Storage, key, location, numel)`` naming the raw little-endian bytes in
``<name>/data/<key>`` (torch's ``serialization._save``; the zip format is the default since torch 1.6, 2020).
Unpickling runs whatever callable the pickle names, so an untrusted ``.bin`` is a program. This reader is an
allowlist, as ``torch.load(weights_only=True)`` is: :class:`TensorUnpickler` resolves only the names below,
each to a function of ours that builds a NumPy array (``OrderedDict`` for the container), and refuses every
other global by name before anything runs. What it returns is a dict of arrays.

The legacy (pre-1.6, non-zip) format is read only by ``torch.load(weights_only=True)`` with torch >= 2.6
installed: older torch's ``weights_only`` could be bypassed (CVE-2025-32434), so it is refused with a message.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch.<name>Storage -> element dtype (torch/storage.py's typed storages; byte order from <name>/byteorder).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
# The oldest torch whose torch.load(weights_only=True) has no known bypass (CVE-2025-32434 was fixed in 2.6.0).
MIN_SAFE_TORCH = (2, 6)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint whose pickle names something other than tensors and their containers."""


class _StorageType:
    """Stands for ``torch.<name>Storage`` inside the pickle (never instantiated by it)."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` (and ``_rebuild_tensor``): the strided view, copied."""
    del unused  # requires_grad, backward hooks, metadata
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise UnsafeCheckpointError(
            f"a tensor is rebuilt from {type(storage).__name__}, not a tensor storage"
        )
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if offset < 0 or len(size) != len(stride) or any(n < 0 for n in size + stride):
        raise UnsafeCheckpointError(
            f"a tensor of size {size}, stride {stride} at offset {offset} is malformed"
        )
    if not all(size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(storage):
        raise UnsafeCheckpointError(
            f"a tensor of size {size} and stride {stride} at offset {offset} reaches past its storage of "
            f"{len(storage)} elements"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
    """``torch._utils._rebuild_parameter``: a Parameter is its tensor here."""
    del unused
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class TensorUnpickler(pickle.Unpickler):
    """An unpickler that knows only tensors, their storages and ``OrderedDict`` (see the module docstring)."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"it asks to run {module}.{name}, which is not part of a tensor state dict; such a file can run "
                "arbitrary code when unpickled, so it is refused"
            ) from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unknown persistent id {pid!r:.80} (only tensor storages are read)")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise UnsafeCheckpointError(f"malformed storage id {pid!r:.80}")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise UnsafeCheckpointError(f"storage {key} is missing from the archive") from None
            dtype = (
                storage_type.dtype.newbyteorder(self._byteorder) if storage_type.dtype.itemsize > 1 else None
            )
            array = np.frombuffer(raw, dtype=dtype or storage_type.dtype)
            if len(array) < int(numel):
                raise UnsafeCheckpointError(f"storage {key} holds {len(array)} elements, not {numel}")
            self._storages[key] = array.astype(storage_type.dtype.newbyteorder("="), copy=False)
        return self._storages[key]


def is_zip_checkpoint(path: str) -> bool:
    """Whether ``path`` is a zip archive holding a ``*/data.pkl`` (torch.save's default format)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("data.pkl") for n in z.namelist())


def load_zip_checkpoint(path: str) -> Any:
    """The object of a zip-format ``torch.save`` file, its tensors as NumPy arrays; raises
    :class:`UnsafeCheckpointError` for any other content (nothing in the file is executed)."""
    with zipfile.ZipFile(path) as z:
        pickles = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeCheckpointError(f"expected one <name>/data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(z.namelist())
        byteorder = (
            z.read(f"{prefix}byteorder").decode().strip() if f"{prefix}byteorder" in names else "little"
        )
        if byteorder not in ("little", "big"):
            raise UnsafeCheckpointError(f"unknown byte order {byteorder!r}")
        return TensorUnpickler(io.BytesIO(z.read(pickles[0])), z, prefix, byteorder).load()


def torch_version_is_safe(version: str) -> bool:
    """Whether torch ``version`` (e.g. '2.6.0+cpu') has a ``weights_only`` load without known bypasses."""
    parts = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= MIN_SAFE_TORCH


def load_legacy_checkpoint(path: str) -> Any:
    """A pre-1.6 (non-zip) ``torch.save`` file, through ``torch.load(weights_only=True)`` of torch >= 2.6 only."""
    try:
        import torch  # noqa: PLC0415 — optional, and only for this old format
    except ImportError:
        torch = None
    if torch is None or not torch_version_is_safe(torch.__version__):
        have = "torch is not installed" if torch is None else f"torch {torch.__version__} is installed"
        raise UnsafeCheckpointError(
            "it is in PyTorch's legacy (pre-1.6) format, which only torch.load can read, and " + have + "; "
            "torch.load(weights_only=True) is a real restriction only from torch 2.6 (CVE-2025-32434). Install "
            "torch>=2.6, or convert the file where you trust it: "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'weights.safetensors')"
        )
    return torch.load(path, map_location="cpu", weights_only=True)
