"""A resumable store of finished batches: whole ``.npz`` files in a folder, for one identified piece of work.

Long sampling keeps what it has finished here, so a crash loses at most the batch in progress: evaluation's
ensembles keep each batch (``sampling.sample_statistics``), prediction each chunk of images and, inside it, each
batch (``predict``). ``meta.json`` holds the work's identity (the sampling, the weights, the inputs, the
batching); a rerun with the same identity reads the leading finished batches back and does only the rest,
anything else starts afresh. Files are written whole (a temporary file renamed into place), so a file that exists
is complete. On several hosts the folder is shared and process 0 writes; every process uses process 0's count.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from diffseg_jax import distributed, writers


class BatchStore:
    """Batches ``batch_00000.npz``, ``batch_00001.npz``, ... in ``directory`` for the work ``run_id`` identifies
    (a JSON-able dict; compared as it reads back from JSON, tuples as lists and other values as their repr)."""

    def __init__(self, directory: str, run_id: dict):
        self.directory = directory
        self.run_id = json.loads(json.dumps(run_id, default=repr))

    def path(self, i: int) -> str:
        return os.path.join(self.directory, f"batch_{i:05d}.npz")

    def _finished(self) -> int:
        try:
            with open(os.path.join(self.directory, "meta.json"), encoding="utf-8") as f:
                if json.load(f) != self.run_id:
                    return 0
        except (OSError, ValueError):
            return 0
        done = 0
        while os.path.exists(self.path(done)):
            done += 1
        return done

    def open(self) -> int:
        """How many leading batches this work finished before (process 0's count, on every process); process 0
        then clears another work's files and records this one's identity."""
        done = distributed.primary_count(self._finished())
        if distributed.is_primary():
            if not done and os.path.isdir(self.directory):
                shutil.rmtree(self.directory)  # another work's batches
            os.makedirs(self.directory, exist_ok=True)
            writers.save_json_whole(os.path.join(self.directory, "meta.json"), self.run_id)
        return done

    def load(self, i: int) -> dict[str, np.ndarray]:
        """The arrays of finished batch ``i``."""
        with np.load(self.path(i)) as saved:
            return {name: saved[name] for name in saved.files}

    def save(self, i: int, **arrays: np.ndarray) -> None:
        """Keeps batch ``i`` (process 0 writes; the others do nothing)."""
        if distributed.is_primary():
            writers.save_npz_whole(self.path(i), **arrays)
