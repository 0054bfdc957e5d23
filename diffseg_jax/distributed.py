"""Multi-host runs: one process per host, started from the environment, feeding global arrays.

The same command runs on every host; three variables say where it stands::

  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m diffseg_jax.main ...
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python -m diffseg_jax.main ...

On clusters whose scheduler JAX recognises (SLURM, TPU pods, Open MPI), ``DIFFSEG_DISTRIBUTED=auto`` calls
``jax.distributed.initialize()`` with no arguments instead. After initialisation ``jax.devices()`` lists every
host's devices; the train step's mesh spans them all, each host reads only its rows of every batch
(:func:`host_shard` → :func:`global_array`), orbax writes each checkpoint once, and only process 0
writes logs, metrics and evaluation files (:func:`is_primary`). On CPU the collectives go over gloo.
"""

from __future__ import annotations

import collections
import os
from typing import Iterator, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Starts ``jax.distributed`` when the environment asks for it; returns whether it did.

    Must run before anything touches a device. Raises ``ValueError`` naming the variable when the set is
    incomplete or not a number.
    """
    if environ.get("DIFFSEG_DISTRIBUTED", "") == "auto":
        jax.distributed.initialize()
        return True
    given = [name for name in ENV_VARS if environ.get(name)]
    if not given:
        return False
    missing = [name for name in ENV_VARS if name not in given]
    if missing:
        raise ValueError(
            f"Multi-host run: {', '.join(given)} set but {', '.join(missing)} missing. Set all of "
            f"{', '.join(ENV_VARS)} on every host (process ids 0..N-1), or none for a single host."
        )
    try:
        num, pid = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
    except ValueError as e:
        raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers: {e}") from None
    if not 0 <= pid < num:
        raise ValueError(f"JAX_PROCESS_ID={pid} is outside 0..{num - 1} (JAX_NUM_PROCESSES={num}).")
    # Only the CPU backend reads this (GPUs and TPUs use their own collectives): CPU hosts talk over gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=environ["JAX_COORDINATOR_ADDRESS"], num_processes=num, process_id=pid
    )
    logging.info("jax.distributed: process %d of %d, %d global devices.", pid, num, jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this process writes files (process 0)."""
    return jax.process_index() == 0


def primary_count(count: int) -> int:
    """Process 0's ``count`` on every process (e.g. how many finished parts a resumed run found on disk)."""
    if jax.process_count() == 1:
        return count
    return int(multihost_utils.broadcast_one_to_all(np.int32(count)))


def host_shard() -> tuple[int, int]:
    """(this host's index, host count): which rows of every global batch this host reads
    (:func:`diffseg_jax.data.train_dataset`'s ``shard``, which checks that the batch splits evenly)."""
    return jax.process_index(), jax.process_count()


def global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array whose rows on this host's devices are ``local`` (this host's rows, in order)."""
    return jax.make_array_from_process_local_data(sharding, local)


def from_global(full: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Puts a host array that every process holds in full onto a (possibly multi-host) sharding."""
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array on every host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh named ``data`` over every device.

    Axis type Auto: XLA propagates shardings through the model (with JAX's newer default, Explicit, every
    op must agree on shardings by hand, e.g. concatenating the sharded image with unsharded noise fails).
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Puts this host's rows of a batch on the devices as one global array split along the batch axis.

    On a single host the rows are the whole batch; on several, each host passes its own rows (see
    :func:`diffseg_jax.data.train_dataset`'s ``shard``) and the global batch is their concatenation.
    """
    sharding = NamedSharding(mesh, P("data"))
    return {k: global_array(v, sharding) for k, v in batch.items() if k != "id"}


def device_batches(batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh, ahead: int = 2):
    """Yields device batches with ``ahead`` more already transferred: the copy of step s+1's batch overlaps
    step s's compute (``device_put`` is asynchronous)."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(shard_batch(batch, mesh))
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
