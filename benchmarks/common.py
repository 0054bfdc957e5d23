"""What every benchmark shares: the device line, compile-vs-steady timing, XLA's cost and memory figures."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def device_line() -> str:
    """Backend, device kind and count, JAX version and the date: printed first by every benchmark."""
    dev = jax.devices()[0]
    return (
        f"backend: {jax.default_backend()}  device: {dev.device_kind}  count: {jax.device_count()}  "
        f"jax {jax.__version__}  {datetime.date.today().isoformat()}"
    )


# Dense (no sparsity) peak TFLOP/s of the devices the benchmarks ran on, from NVIDIA's data sheets: bf16 on
# the tensor cores, and TF32, what XLA runs float32 convolutions and matmuls in on these GPUs at JAX's
# default precision. Matched against ``device_kind`` in order (the PCIe card's name also contains 'H100').
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 495.0}),  # SXM
    ("H200", {"bfloat16": 989.0, "float32": 495.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for the compute ``dtype`` ('bfloat16' or 'float32'); None where not known."""
    for name, peaks in PEAK_TFLOPS:
        if name in device_kind:
            return peaks.get(dtype)
    return None


def comparison_parser(doc: str, images: int) -> argparse.ArgumentParser:
    """The flags of the structure-against-loop benchmarks (sampling.py, curves.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ensemdiff")
    parser.add_argument("--size", default="tiny", choices=("tiny", "published"))
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    return parser


def block(tree: Any) -> Any:
    """Waits for every array in ``tree``."""
    return jax.block_until_ready(tree)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call s — compilation included, median s of ``repeats`` further calls), each call waited on."""
    t0 = time.perf_counter()
    block(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def hlo_flops(lowered) -> float:
    """XLA's FLOP count of a lowered (not yet compiled) program.

    Taken before compilation on purpose: on GPU the compiled program's convolutions are cuDNN custom calls,
    which the compiled cost analysis does not count (it reports ~1 % of the real FLOPs for a UNet). Backends
    reached through a PJRT plugin (CUDA from jax 0.11) analyse only compiled programs; there the same
    uncompiled HLO is counted by the CPU's cost analysis (``cpu_hlo_flops``).
    """
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost:
        return cpu_hlo_flops(lowered)
    return float(cost.get("flops", float("nan")))


def cpu_hlo_flops(lowered) -> float:
    """The uncompiled HLO of ``lowered`` counted by XLA:CPU's cost analysis (NaN where JAX lacks the hook).

    Before compilation the HLO has no backend's kernels in it, so the count is the platform's own. Uses a
    private JAX function (the one ``Lowered.cost_analysis`` calls), hence the guard.
    """
    try:
        from jax._src.lib import _jax

        module = lowered._lowering.hlo().as_hlo_module()
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
        return float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 — a JAX without it: the row says nan rather than failing
        return float("nan")


def memory_gib(compiled) -> float | None:
    """XLA's memory analysis of a compiled program: arguments + outputs + temporaries − aliased, in GiB."""
    try:
        mem = compiled.memory_analysis()
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        return (total - mem.alias_size_in_bytes) / 2**30
    except Exception:  # noqa: BLE001 — not every backend reports it
        return None


def device_memory() -> tuple[float, float] | None:
    """(GiB in use now, the allocator's peak so far) on GPU/TPU; None where the backend does not expose them."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return None
    return stats.get("bytes_in_use", 0) / 2**30, stats["peak_bytes_in_use"] / 2**30


def step_memory(before: tuple[float, float] | None, after: tuple[float, float] | None) -> dict:
    """A row's own memory figures from ``device_memory()`` taken before and after its steps.

    JAX's peak counter cannot be reset and runs over the whole process, so a row is credited with a peak only
    when its steps raised it: ``device_peak_gib`` (the process's peak, reached in this row), and
    ``step_transient_gib`` = that peak − the memory in use before the steps (the states then resident), i.e.
    what the step itself added (activations, gradients, workspace). A row that stayed under an earlier row's
    peak gets ``device_peak_below_gib`` (that earlier peak) instead: its own is not known, only bounded.
    """
    if before is None or after is None:
        return {}
    in_use, peak_before = before
    peak = after[1]
    if peak > peak_before:
        return {"device_peak_gib": peak, "step_transient_gib": peak - in_use, "device_resident_gib": in_use}
    return {"device_peak_below_gib": peak_before, "device_resident_gib": in_use}


def abstract_variables(model, size: int, channels: int) -> dict:
    """The shapes and dtypes of ``model``'s variables for one ``size``² image of ``channels`` (nothing computed)."""
    x, cond = jnp.zeros((1, size, size, 1)), jnp.zeros((1, size, size, channels))
    t = jnp.zeros((1,), jnp.int32)
    return dict(jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"), x, t, cond)))


def host_variables(abstract: dict, seed: int = 0) -> dict:
    """Variables of ``abstract``'s shapes and dtypes made on the host: parameters ~ N(0, 0.02²), other
    collections (normalisation statistics) ones.

    What a step costs does not depend on the weights' values, and the model's own initialisation is slow to
    compile on a GPU (34 s for published EnsemDiff on the H200, 2026-11-28), which is not what the
    benchmarks measure (``models.py --model-init`` times the model's own initialisation).
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path[:1]) == "['params']":
            return np.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype)
        return np.ones(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, dict(abstract))


def write_json(path: str | None, rows: list[dict], **extra: Any) -> None:
    """Writes the rows with the device line, if a path was given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"device": device_line(), **extra, "rows": rows}, f, indent=2)
