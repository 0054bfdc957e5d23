"""Scalar logging to TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import IO, Any, Iterator


class MetricWriter:
    """Writes ``{name: scalar}`` per step to ``workdir/tensorboard`` and appends to ``workdir/metrics.jsonl``.

    ``resume_step``: the step a resumed run restarts from (its checkpoint's). The steps after it were logged
    before the run stopped and are logged again: metrics.jsonl drops their lines (rewritten whole), and
    TensorBoard hides their old events (tensorboardX's ``purge_step``), so each step appears once.
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter  # Imported here: only training needs it.

        path = os.path.join(workdir, "metrics.jsonl")
        purge = None
        if resume_step is not None:
            purge = resume_step + 1
            _drop_lines_after(path, resume_step)
        # The suffix: tensorboardX names files by the second, and a resume within the same second would
        # overwrite the earlier file; TensorBoard reads the files in name order, which the nanoseconds keep.
        self._tb = SummaryWriter(
            os.path.join(workdir, "tensorboard"), purge_step=purge, filename_suffix=f".{time.time_ns()}"
        )
        self._jsonl = open(path, "a", encoding="utf-8")

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


@contextlib.contextmanager
def open_whole(path: str, newline: str | None = None) -> Iterator[IO[str]]:
    """``open(path, 'w')`` for a small text file written whole: the text goes to ``path + '.tmp'``, which
    replaces ``path`` only when the block ends without an error, so a crash or a full disk leaves the old file
    (or none), never half a file. ``newline=''`` for the csv module."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _drop_lines_after(path: str, step: int) -> None:
    """Rewrites the JSONL file ``path`` (whole) without the lines of steps after ``step``; a line that does not
    parse (half written by a killed run) is dropped too."""
    if not os.path.isfile(path):
        return
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                keep = json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open_whole(path) as f:
            f.writelines(kept)


def save_npz_whole(path: str, compress: bool = False, **arrays: Any) -> None:
    """``np.savez(path, **arrays)`` (``np.savez_compressed`` with ``compress``) through a temporary file renamed
    into place: a crash never leaves half a file."""
    import numpy as np  # noqa: PLC0415 — the scalar writers do not need it

    (np.savez_compressed if compress else np.savez)(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def save_json_whole(path: str, obj: Any, indent: int | None = None, sort_keys: bool = False) -> None:
    """``json.dump(obj)`` to ``path`` through a temporary file renamed into place (:func:`open_whole`)."""
    with open_whole(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys)


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
