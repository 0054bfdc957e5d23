"""Orbax checkpointing of the train state: keep the last N (and, optionally, every K-th step for good), resume from
the latest, wait on exit; evaluation reads the weights alone (:meth:`Checkpointer.restore_fields`)."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec


class CheckpointMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the state the config builds (other settings, or an older version)."""


class CheckpointWriteError(OSError):
    """Writing into the workdir failed (disk full, quota, read-only); the message names the last complete
    checkpoint, from which a rerun resumes."""


# Write failures that stop training at once with the last complete checkpoint named (not a traceback).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


# How the write errors read when orbax or tensorstore report them as another exception (tensorstore raises
# ValueError('RESOURCE_EXHAUSTED: ... Failed to write ...: No space left on device')).
_WRITE_MESSAGES = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                   errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}  # fmt: skip


def write_errno(error: BaseException) -> int | None:
    """The errno of a failed write behind ``error`` (an OSError, or the message of another exception in its
    chain), or None if it is not one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return error.errno
        for code, text in _WRITE_MESSAGES.items():
            if text in str(error):
                return code
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def _writing(directory: str) -> Iterator[None]:
    """Turns a failed write inside (however orbax wraps it) into an ``OSError`` with its errno."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_ERRNOS or write_errno(e) is None:
            raise
        code = write_errno(e)
        raise OSError(code, os.strerror(code), directory) from e
    except Exception as e:
        code = write_errno(e)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), directory) from e


def write_failed(error: OSError, directory: str, step: int) -> CheckpointWriteError:
    """The :class:`CheckpointWriteError` for ``error`` at training step ``step``, naming the newest complete
    checkpoint in ``directory`` (orbax renames a checkpoint into place only when it is whole)."""
    try:
        good = latest_step(directory)
    except Exception:  # noqa: BLE001 — the folder may be unreadable too; the message still says what happened
        good = None
    kept = (
        "no checkpoint is complete, so a rerun starts from scratch"
        if good is None
        else f"the last complete checkpoint is step {good} in {directory}; a rerun resumes from it"
    )
    return CheckpointWriteError(
        error.errno,
        f"Writing the run failed at step {step}: {os.strerror(error.errno)}"
        + (f" ({error.filename})" if error.filename else "")
        + f". Stopped at once; {kept}. Free space (or fix the folder's permissions), then rerun the same command.",
    )


def latest_step(directory: str) -> int | None:
    """The newest complete checkpoint's step in ``directory``, or None; unlike a :class:`Checkpointer`, a
    folder that does not exist is not created (a probe before anything is written)."""
    if not os.path.isdir(directory):
        return None
    probe = Checkpointer(directory)
    try:
        return probe.latest_step()
    finally:
        probe.close()


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` saving ``{'state': pytree, 'meta': json}`` per step.

    Orbax writes each step to a temporary folder and renames it when complete, so a run killed mid-save
    (even with SIGKILL) leaves the previous checkpoint as the latest one.
    """

    def __init__(
        self, directory: str, max_to_keep: int = 3, keep_every: int = 0, keep_steps: tuple[int, ...] = ()
    ):
        """Saves keep the newest ``max_to_keep`` checkpoints and, with ``keep_every`` > 0, every checkpoint whose
        step is a multiple of it; and those at ``keep_steps`` (e.g. the paper's model after 75 % of training,
        for Fig. 3)."""
        self.directory = os.path.abspath(directory)
        policies = [ocp.checkpoint_managers.LatestN(max_to_keep)]
        if keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        if keep_steps:
            policies.append(ocp.checkpoint_managers.CustomSteps(list(keep_steps)))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies), create=True
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of every complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving ``state`` at ``step`` (asynchronously; :meth:`wait` to finish). A failed write (this
        one's or a background one's) is an ``OSError`` with its errno (ENOSPC: the disk is full)."""
        with _writing(self.directory):
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the state at ``step`` with the structure, dtypes and shardings of ``target``.

        Leaves without a sharding (e.g. ``jax.eval_shape`` output) are restored replicated over every
        device, so a checkpoint written on one topology (8 GPUs, two hosts) reads on another (one CPU).
        Raises :class:`CheckpointMismatchError`, naming the checkpoint and orbax's first difference, when
        its tree or shapes differ from ``target``'s.
        """
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()
                ),
            )
        except ValueError as e:  # orbax: "tree structures do not match" or "shape ... is not compatible"
            raise self._mismatch(step, e) from e
        return out["state"], out["meta"]

    def restore_fields(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
        """Restores only the saved state's top-level fields that ``target`` names (``{'params': tree, ...}``).

        What evaluation needs, the weights, then reads whatever optimizer or timestep sampler wrote the rest
        of the checkpoint (another optimizer's state does not fit, and need not). Shardings as :meth:`restore`.
        """
        abstract = _abstract(target)
        manager = ocp.CheckpointManager(
            self.directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()}
        )
        try:
            out = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        abstract,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                        partial_restore=True,
                    )
                ),
            )
        except ValueError as e:
            raise self._mismatch(step, e) from e
        finally:
            manager.close()
        return dict(out["state"])

    def _mismatch(self, step: int, error: ValueError) -> CheckpointMismatchError:
        detail = " ".join(line.strip() for line in str(error).splitlines()[:4])
        return CheckpointMismatchError(
            f"The checkpoint {os.path.join(self.directory, str(step))} does not fit the state this config "
            f"builds ({detail}). It was written with other settings (model, optimizer, diffusion or timestep "
            "sampling: compare the run's config.json with this command's config and overrides) or by an older "
            "diffseg-jax. Run with the settings it was trained with, or train into a new --workdir."
        )

    def check_for_errors(self) -> None:
        """Raises the error of a background save that has failed (e.g. the disk is full), without waiting."""
        with _writing(self.directory):
            self._manager.check_for_errors()

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        with _writing(self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (released also when a save failed)."""
        try:
            with _writing(self.directory):
                self._manager.wait_until_finished()
        finally:
            self._manager.close()


def _abstract(target: Any) -> Any:
    """``target``'s leaves as ShapeDtypeStructs; a leaf without a sharding is replicated over every device."""
    replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec())
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or replicated),
        target,
    )


def params_finite(state: Any) -> bool:
    """Whether every parameter of ``state`` is finite (one reduction on the device, one value read back)."""
    leaves = jax.tree_util.tree_leaves(state.params)
    return bool(jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))) if leaves else True


def host_copy(state: Any) -> Any:
    """``state`` as NumPy arrays in host memory: a checkpoint that waits a step for its check survives the
    donation of the device buffers to that step. The state is replicated, so one device's copy is all of it."""
    local = jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, state)
    for x in jax.tree_util.tree_leaves(local):
        if isinstance(x, jax.Array):
            x.copy_to_host_async()  # every leaf's transfer at once, then each waited on below
    # np.array copies: the device buffers are donated to the next step, and a view of them would change with it
    return jax.tree.map(lambda x: np.array(x) if isinstance(x, jax.Array) else x, local)


class TrainingDivergedError(FloatingPointError):
    """Training stopped on a non-finite loss, gradient or parameter; the message names the checkpoint kept."""
