"""Orbax checkpointing of the train state: keep the last N, resume from the latest, wait on exit."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` saving ``{'state': pytree, 'meta': json}`` per step.

    Orbax writes each step to a temporary folder and renames it when complete, so a run killed mid-save
    (even with SIGKILL) leaves the previous checkpoint as the latest one.
    """

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving ``state`` at ``step`` (asynchronously; :meth:`wait` to finish)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the state at ``step`` with the structure, dtypes and shardings of ``target``.

        Leaves without a sharding (e.g. ``jax.eval_shape`` output) are restored replicated over every
        device, so a checkpoint written on one topology (8 GPUs, two hosts) reads on another (one CPU).
        """
        replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec())
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=getattr(x, "sharding", None) or replicated
            ),
            target,
        )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out["state"], out["meta"]

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
