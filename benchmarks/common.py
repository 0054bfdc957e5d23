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


def device_line() -> str:
    """Backend, device kind and count, JAX version and the date: printed first by every benchmark."""
    dev = jax.devices()[0]
    return (
        f"backend: {jax.default_backend()}  device: {dev.device_kind}  count: {jax.device_count()}  "
        f"jax {jax.__version__}  {datetime.date.today().isoformat()}"
    )


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
    which the compiled cost analysis does not count (it reports ~1 % of the real FLOPs for a UNet).
    """
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def memory_gib(compiled) -> float | None:
    """XLA's memory analysis of a compiled program: arguments + outputs + temporaries − aliased, in GiB."""
    try:
        mem = compiled.memory_analysis()
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        return (total - mem.alias_size_in_bytes) / 2**30
    except Exception:  # noqa: BLE001 — not every backend reports it
        return None


def device_peak_gib() -> float | None:
    """The device allocator's peak so far (GPU/TPU), or None where the backend does not expose it (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def write_json(path: str | None, rows: list[dict], **extra: Any) -> None:
    """Writes the rows with the device line, if a path was given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"device": device_line(), **extra, "rows": rows}, f, indent=2)
