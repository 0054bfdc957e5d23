"""Several runs at a time: a list of runs dealt to worker processes, each pinned to one core (issue 32).

XLA:CPU runs one process's convolutions on about one core, so a grid of runs on an n-core machine goes n times
faster as n processes, each the same command line with ``--shard=i/n`` (:func:`worker_argv`) doing every n-th
run (:func:`shard_runs`). This module starts them (:func:`run_processes`: pinned with ``taskset`` or
``sched_setaffinity``, output in ``<workdir>/workers/worker<i>of<n>.log``), stops them when the parent is
stopped, and turns their exit statuses and the failed runs each lists in its JSON (:func:`record_failures`) into
one message (:func:`failures`). ``python -m diffseg_jax.table1 --workers N`` uses it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Sequence

from absl import logging

from diffseg_jax import configlib, writers

WORKER_DIR = "workers"  # <workdir>/workers/: each worker's log and its failed runs


def worker_files(workdir: str, index: int, count: int) -> tuple[str, str]:
    """(log, failed-runs JSON) of worker ``index`` of ``count``."""
    stem = os.path.join(workdir, WORKER_DIR, f"worker{index}of{count}")
    return stem + ".log", stem + ".failed.json"


def record_failures(workdir: str, index: int, count: int, failed: list[str]) -> None:
    """Worker ``index`` of ``count`` lists the runs it failed on (none: ``[]``) in its :func:`worker_files` JSON,
    which :func:`failures` reads."""
    _, path = worker_files(workdir, index, count)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writers.save_json_whole(path, failed)


def parse_shard(spec: str) -> tuple[int, int]:
    """``'i/n'`` (``--shard``) as (i, n), 0 <= i < n."""
    try:
        index, count = (int(x) for x in spec.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise configlib.ConfigError(
            f"--shard={spec!r}: give i/n with 0 <= i < n, e.g. --shard=0/2 (--workers sets it)."
        ) from None
    return index, count


def shard_runs(runs: list, index: int, count: int) -> list:
    """The runs worker ``index`` of ``count`` does: every ``count``-th from the ``index``-th, so a cell's seeds and
    its E1/E2 pair go to different workers and the shares differ by at most one run."""
    return runs[index::count]


def worker_argv(argv: list[str], index: int, count: int) -> list[str]:
    """``argv`` (this command line's arguments) without ``--workers`` / ``--shard``, plus worker ``index``'s."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--workers", "--shard", "-workers", "-shard"):
            skip = "=" not in a  # '--workers 2': drop its value too
            continue
        out.append(a)
    return [*out, "--workers=1", f"--shard={index}/{count}"]


def cores(count: int) -> list[int]:
    """The core each of ``count`` workers is pinned to: the cores this process may use, in turn."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return [allowed[i % len(allowed)] for i in range(count)] if allowed else []


def run_processes(module: str, argv: list[str], workdir: str, share_sizes: Sequence[int]) -> list[int]:
    """``python -m <module>`` once per share (``argv`` with ``--shard=i/N``), each pinned to one of the cores this
    process may use and logging to its :func:`worker_files` log (appended, each attempt headed by its time and
    command); waits for them all and returns their exit statuses. Stopped (Ctrl-C, SIGTERM), it stops them
    too; a rerun of the command resumes their runs."""
    count = len(share_sizes)
    os.makedirs(os.path.join(workdir, WORKER_DIR), exist_ok=True)
    pins = cores(count)
    procs = []
    try:
        for i in range(count):
            log_path, failed_path = worker_files(workdir, i, count)
            if os.path.exists(failed_path):
                os.remove(failed_path)  # an earlier attempt's
            pin = ["taskset", "-c", str(pins[i])] if pins and shutil.which("taskset") else []
            command = [*pin, sys.executable, "-m", module, *worker_argv(argv, i, count)]
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: {' '.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            if pins and not pin and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(proc.pid, {pins[i]})  # no taskset: pinned as soon as it starts
            procs.append(proc)
            logging.info(
                "%s: worker %d/%d (pid %d%s): %d runs, log %s",
                module,
                i,
                count,
                proc.pid,
                f", core {pins[i]}" if pins else "",
                share_sizes[i],
                log_path,
            )
        return [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()


def failures(workdir: str, codes: list[int], share_labels: Sequence[Sequence[str]], command: str = "table1") -> str:
    """'' when every worker exited 0, else a message naming each failed worker's failed runs (from its JSON, or
    all of ``share_labels[i]`` when it died before writing one), its exit status and its log, and how to
    resume."""
    count = len(codes)
    lines = []
    for i, code in enumerate(codes):
        if code == 0:
            continue
        log_path, failed_path = worker_files(workdir, i, count)
        try:
            with open(failed_path, encoding="utf-8") as f:
                failed = json.load(f)
        except (OSError, ValueError):  # killed before it got there: any of its runs may be unfinished
            failed = list(share_labels[i])
        lines.append(f"worker {i}/{count} (exit status {code}) failed on {', '.join(failed)}; log: {log_path}")
    if not lines:
        return ""
    return (
        f"{command}: "
        + "; ".join(lines)
        + ". The tables were not written; fix the cause and rerun the same command: "
        "finished runs are skipped, the others resume."
    )
