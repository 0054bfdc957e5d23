"""Scalar logging to TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL file."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any


class MetricWriter:
    """Writes ``{name: scalar}`` per step to ``workdir/tensorboard`` and appends to ``workdir/metrics.jsonl``."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter  # Imported here: only training needs it.

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        """Logs float scalars at ``step`` to both sinks and flushes, so a crash loses nothing written."""
        scalars = {k: float(v) for k, v in scalars.items()}
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes both sinks."""
        self._tb.close()
        self._jsonl.close()


def save_npz_whole(path: str, compress: bool = False, **arrays: Any) -> None:
    """``np.savez(path, **arrays)`` (``np.savez_compressed`` with ``compress``) through a temporary file renamed
    into place: a crash never leaves half a file."""
    import numpy as np  # noqa: PLC0415 — the scalar writers do not need it

    (np.savez_compressed if compress else np.savez)(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def save_json_whole(path: str, obj: Any, indent: int | None = None) -> None:
    """``json.dump(obj)`` to ``path`` through a temporary file renamed into place, as :func:`save_npz_whole`."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


class NullWriter:
    """A writer that drops everything: processes other than the first in a multi-host run."""

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        del step, scalars

    def close(self) -> None:
        pass


def format_duration(seconds: float) -> str:
    """Human-readable duration, e.g. ``1h02m``, ``3m05s``, ``42s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _QuietLibraries(logging.Filter):
    """Drops INFO records of orbax, tfds and JAX internals (dozens per checkpoint); warnings still pass."""

    NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(part in record.pathname for part in self.NOISY)


def quiet_libraries() -> None:
    """Keeps the console to this package's progress lines (call once at the start of a command or notebook).

    The filter sits on absl's handler (the command line's console) and on absl's logger, whose records reach
    other handlers in a notebook, where absl's handler is not installed.
    """
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
    absl_logging.get_absl_logger().addFilter(_QuietLibraries())
