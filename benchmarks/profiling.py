"""The device ops a compiled step spends its time in: a ``jax.profiler`` trace of a few calls, ranked by op.

``trace_calls(fn, calls, log_dir)`` runs ``fn`` under ``jax.profiler.trace(..., create_perfetto_trace=True)``,
which writes ``perfetto_trace.json.gz`` (Chrome trace-event JSON) beside the ``.xplane.pb``, without
TensorBoard or xprof installed. ``top_ops(path)`` reads it and sums the durations of the events that carry an
``hlo_op`` argument (the XLA op each device kernel, or on the CPU each thunk, belongs to) by op, so a cuDNN
convolution that launches several kernels counts once with their summed time. Where the trace has a device
process (``/device:GPU:0``), only its events count (the host's launch events may carry op names too); on a
CPU only the host's. A thread named ``XLA Ops`` (a derived line of one event per op), where present, is used
instead of the kernels under it, so no op is counted twice. ``print_top_ops`` prints the ranking with each
op's share of the device's busy time, and the busy time against the wall time of the traced calls (a device
idle between ops points at launch or host overhead rather than at any op).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Any, Callable

import jax


def trace_calls(fn: Callable[[], Any], calls: int, log_dir: str) -> tuple[str, float]:
    """(the perfetto trace JSON of ``calls`` calls of ``fn``, each waited on; their wall seconds)."""
    os.makedirs(log_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn())
        wall = time.perf_counter() - t0
    new = sorted(
        set(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)) - before
    )
    if not new:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {log_dir}")
    return new[-1], wall


def op_kind(op: str) -> str:
    """``'fusion.12'`` → ``'fusion'``, ``'cudnn-conv-bw-filter.3'`` → ``'cudnn-conv-bw-filter'``: the op's
    name without XLA's instance number, for a ranking by kind."""
    return re.sub(r"(\.\d+)+$", "", op)


def top_ops(path: str, n: int = 10) -> dict[str, Any]:
    """The trace's device ops ranked by summed duration.

    Returns ``{'ops': [{'op', 'kind', 'ms', 'count', 'share', 'kernel'} × n], 'kinds': [{'kind', 'ms',
    'share'} × n], 'busy_ms': the summed duration of every op, 'process': which trace process was read}``;
    ``kernel`` is the name of an event of the op (the kernel's on a GPU) when it differs from the op's.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e.get("tid")): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if devices & {e["pid"] for e in ops}:
        ops = [e for e in ops if e["pid"] in devices]
    derived = {key for key, name in threads.items() if name == "XLA Ops"}
    if derived & {(e["pid"], e.get("tid")) for e in ops}:
        ops = [e for e in ops if (e["pid"], e.get("tid")) in derived]
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    kernels: dict[str, str] = {}
    for e in ops:
        op = e["args"]["hlo_op"]
        totals[op] += float(e.get("dur", 0.0)) / 1e3  # trace-event durations are in microseconds
        counts[op] += 1
        if e.get("name") and e["name"] != op:
            kernels.setdefault(op, e["name"])
    busy = sum(totals.values())
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, ms in totals.items():
        kinds[op_kind(op)] += ms
    share = lambda ms: ms / busy if busy else 0.0  # noqa: E731
    ranked = sorted(totals, key=totals.get, reverse=True)[:n]
    return {
        "ops": [
            {
                "op": op,
                "kind": op_kind(op),
                "ms": totals[op],
                "count": counts[op],
                "share": share(totals[op]),
                "kernel": kernels.get(op, ""),
            }
            for op in ranked
        ],
        "kinds": [
            {"kind": k, "ms": kinds[k], "share": share(kinds[k])}
            for k in sorted(kinds, key=kinds.get, reverse=True)[:n]
        ],
        "busy_ms": busy,
        "process": ", ".join(sorted({processes.get(e["pid"], str(e["pid"])) for e in ops})),
    }


def print_top_ops(profile: dict[str, Any], calls: int, wall_s: float, title: str = "") -> None:
    """The ranking of :func:`top_ops` as two tables (ops, then kinds of op), per traced call."""
    busy = profile["busy_ms"] / calls
    wall = 1e3 * wall_s / calls
    where = profile["process"] or "no op events"
    print(
        f"-- top ops{(' of ' + title) if title else ''} ({where}): device busy {busy:.2f} ms of {wall:.2f} ms"
        f" wall per step ({100 * busy / wall if wall else 0:.0f} %)",
        flush=True,
    )
    print(f"   {'ms/step':>8s} {'share':>6s} {'calls':>5s}  op  [kernel]")
    for r in profile["ops"]:
        kernel = f"  [{r['kernel'][:60]}]" if r["kernel"] else ""
        print(
            f"   {r['ms'] / calls:8.3f} {100 * r['share']:5.1f}% {r['count'] // calls:5d}  {r['op']}{kernel}"
        )
    print(f"   {'ms/step':>8s} {'share':>6s}  kind of op")
    for r in profile["kinds"]:
        print(f"   {r['ms'] / calls:8.3f} {100 * r['share']:5.1f}%  {r['kind']}")
