"""The images per sampling call chosen from the device's memory (diffseg_jax.auto_batch)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from test_sampling import _tiny_sampling  # the tiny network and config the sampler's tests use

from diffseg_jax import auto_batch, sampling


def test_an_automatic_batch_fills_the_free_memory_in_whole_images_per_device():
    mib = 2**20
    # 80 % of 1000 MiB less 100 MiB of weights leaves 700 MiB: 7 images of 100 MiB on each device.
    assert auto_batch.choose_batch_size(100 * mib, 100 * mib, 1000 * mib, 1, 500) == 7
    assert (
        auto_batch.choose_batch_size(100 * mib, 100 * mib, 1000 * mib, 4, 500) == 28
    )  # 7 on each of 4 devices
    assert auto_batch.choose_batch_size(99 * mib, 100 * mib, 1000 * mib, 1, 500) == 7  # 700 / 99: whole images
    assert auto_batch.choose_batch_size(100 * mib, 100 * mib, 1000 * mib, 1, 500, margin=0.5) == 4
    # Never more than the inputs, rounded up to the device count; at least one image per device.
    assert auto_batch.choose_batch_size(100 * mib, 100 * mib, 1000 * mib, 1, 5) == 5
    assert auto_batch.choose_batch_size(100 * mib, 100 * mib, 1000 * mib, 4, 5) == 8
    assert auto_batch.choose_batch_size(100 * mib, 900 * mib, 1000 * mib, 2, 500) == 2


def test_an_automatic_batch_is_sized_from_the_compiled_ensembles_memory(monkeypatch):
    """``auto_batch_size`` divides the free memory by XLA's figure for one image of this very ensemble: with the
    free memory set to hold k images besides the weights, it picks k."""
    free, source = auto_batch.free_device_memory()  # on a CPU: a share of the host's RAM
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < free <= auto_batch.CPU_MEMORY_FRACTION * ram and "RAM" in source
    config, schedule, model, images, variables = _tiny_sampling("e2")
    ensemble = sampling.make_ensemble_fn(sampling.make_member_fn(model, schedule, config), 3, None)
    weights = sum(np.asarray(a).nbytes for a in jax.tree.leaves(variables))
    mem = (
        ensemble.lower(variables, images[:1], jnp.zeros((1, 8, 8, 1)), jax.random.PRNGKey(0))
        .compile()
        .memory_analysis()
    )
    one = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    assert one > weights + images[:1].nbytes  # the members' samples and their temporaries count too
    for k in (1, 3):
        free = (weights + k * (one - weights) + 1) / auto_batch.MEMORY_MARGIN
        monkeypatch.setattr(auto_batch, "free_device_memory", lambda free=free: (int(free), "test"))
        auto_batch._AUTO_CHOICES.clear()
        assert auto_batch.auto_batch_size(ensemble, variables, (8, 8, 3), (8, 8, 1), 100) == k
    assert auto_batch.auto_batch_size(ensemble, variables, (8, 8, 3), (8, 8, 1), 2) == 2  # 2 inputs
