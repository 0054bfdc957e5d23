"""The images per sampling call chosen from the device's memory (``eval.batch_size=0``, issue 31).

The official codes sample one image at a time; a fixed small batch leaves an accelerator mostly idle. Here the
jitted ensemble is compiled for one image per device, XLA's memory analysis of that program gives one image's
cost, and as many images as a share of the free memory holds go into each call. Used by
``diffseg_jax.sampling.ensemble_maps`` and ``diffseg_jax.predict``."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffseg_jax import distributed

# eval.batch_size = AUTO_BATCH: the images per device call chosen from the device's memory (auto_batch_size).
AUTO_BATCH = 0
# The share of a device's free memory an automatic batch plans to fill (XLA's figure for one image, scaled up,
# leaves out convolution workspaces that grow with the batch), and of the host's available RAM taken as a CPU
# device's memory (the host runs the data pipeline and the scoring beside it).
MEMORY_MARGIN = 0.8
CPU_MEMORY_FRACTION = 0.5
_AUTO_CHOICES: dict = {}  # (id(ensemble), shapes, count) -> (ensemble, batch): one memory analysis per ensemble


def choose_batch_size(
    per_image_bytes: int,
    fixed_bytes: int,
    free_bytes: int,
    num_devices: int,
    num_inputs: int,
    margin: float = MEMORY_MARGIN,
) -> int:
    """Images per device call: as many per device as ``margin`` of a device's ``free_bytes`` holds beside the
    ``fixed_bytes`` (the weights) at ``per_image_bytes`` each (at least one), times ``num_devices``; never more
    than ``num_inputs`` rounded up to a multiple of ``num_devices`` (a batch that size is padded anyway)."""
    per_device = max(1, int((margin * free_bytes - fixed_bytes) // max(per_image_bytes, 1)))
    return min(per_device, -(-num_inputs // num_devices)) * num_devices


def free_device_memory() -> tuple[int, str]:
    """(bytes one local device can still take, where the figure comes from): the allocator's limit minus what is
    in use (GPU, TPU; the fullest device), or on a CPU ``CPU_MEMORY_FRACTION`` of the host's available RAM
    shared by its devices."""
    devices = jax.local_devices()
    stats = [d.memory_stats() or {} for d in devices]
    if all("bytes_limit" in s for s in stats):
        free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
        return int(free), f"{devices[0].device_kind}: allocator limit − bytes in use"
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return (
        int(CPU_MEMORY_FRACTION * available) // len(devices),
        f"{CPU_MEMORY_FRACTION:.0%} of the host's available RAM over {len(devices)} device(s)",
    )


def auto_batch_size(
    ensemble: Callable,
    variables: Any,
    image_shape: tuple[int, ...],
    x_shape: tuple[int, ...],
    num_inputs: int,
    what: str = "evaluate",
    image_dtype: Any = jnp.float32,
) -> int:
    """``eval.batch_size`` = ``AUTO_BATCH`` resolved: the jitted ``ensemble`` compiled for one image per device,
    XLA's memory analysis of that program (arguments + outputs + temporaries, per device) less the weights is
    one image's cost, and :func:`choose_batch_size` fits as many as :func:`free_device_memory` holds. Logs the
    choice and the figures; computed once per ensemble and shapes (the compilation is not the one sampling
    uses, so on a GPU it costs a compile time)."""
    mesh = distributed.data_mesh()
    n_dev = mesh.size
    cache_key = (id(ensemble), tuple(image_shape), tuple(x_shape), num_inputs, n_dev)
    if cache_key in _AUTO_CHOICES:
        return _AUTO_CHOICES[cache_key][1]
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    weights = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), variables)
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights))
    t0 = time.time()
    compiled = ensemble.lower(
        weights,
        jax.ShapeDtypeStruct((n_dev, *image_shape), image_dtype, sharding=sharded),
        jax.ShapeDtypeStruct((n_dev, *x_shape), jnp.float32, sharding=sharded),
        jax.random.PRNGKey(0),
    ).compile()
    mem = compiled.memory_analysis()
    one = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    per_image = max(one - weight_bytes, 1)
    free, source = free_device_memory()
    # Every host samples the same batches: process 0's choice holds for all.
    batch = distributed.primary_count(choose_batch_size(per_image, weight_bytes, free, n_dev, num_inputs))
    logging.info(
        "%s: eval.batch_size=0 (auto): %d images per call (%d device(s)): one image costs %.1f MiB per device "
        "(XLA's memory analysis, compiled in %.0f s; weights %.1f MiB apart), %.2f GiB free (%s), %.0f %% of it "
        "planned; %d inputs.",
        what,
        batch,
        n_dev,
        per_image / 2**20,
        time.time() - t0,
        weight_bytes / 2**20,
        free / 2**30,
        source,
        100 * MEMORY_MARGIN,
        num_inputs,
    )
    _AUTO_CHOICES[cache_key] = (ensemble, batch)
    return batch
