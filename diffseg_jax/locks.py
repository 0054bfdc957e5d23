"""Exclusive file locks: one writer per workdir (a second run is refused, naming the holder), one build per
dataset and config in a tfds data folder (a second process waits for it, then reads the finished build).

Both are ``fcntl.flock`` on a small file that records the holder (PID, host, what it runs, since when). The kernel
releases a flock when its process dies, even by SIGKILL, so a stale lock file never blocks a resume. The library
``filelock`` holds the same kind of lock, but has no place for the holder's identity: the refusal could not say
which process to wait for or stop. Locks are re-entrant within a process (a ``--mode train`` run holds its workdir,
and :func:`diffseg_jax.train.train` takes it again). On a filesystem without flock (some Lustre mounts) the lock is
skipped with a warning. POSIX only, as the rest of the package (Linux, macOS, Colab).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Iterator

LOCK_NAME = ".lock"

_held: dict[str, int] = {}  # lock files this process holds -> how many times (re-entrant)
_held_guard = threading.Lock()


class WorkdirError(Exception):
    """A workdir that cannot be written, or that another process is writing; the message says what to do."""


class LockedError(WorkdirError):
    """The lock is held by another process, named in the message."""


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    """e.g. ``process 1234 on host node7 (train, since 2026-12-07 02:50:01 UTC)``."""
    if not holder.get("pid"):
        return "another process (it has just started)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"process {holder['pid']} on host {holder.get('host', '?')} ({holder.get('what', '?')}, since {since})"


@contextlib.contextmanager
def hold(path: str, what: str, on_busy: Callable[[dict], None] | None = None) -> Iterator[None]:
    """Holds an exclusive flock on ``path`` (made if missing) for the ``with`` block.

    When another process holds it: without ``on_busy``, :class:`LockedError` naming the holder; with it,
    ``on_busy(holder)`` is called (to show the wait) and the lock is waited for.
    """
    path = os.path.abspath(path)
    with _held_guard:
        if _held.get(path):
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's record is read on refusal
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if on_busy is None:
                raise LockedError(describe(holder)) from None
            on_busy(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logging.warning(
                "%s does not support file locks (%s): not locked; run one process at a time.", path, e
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        with _held_guard:
            _held[path] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[path]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def workdir_lock(workdir: str, what: str) -> Iterator[None]:
    """One writer per workdir: holds ``<workdir>/.lock`` (the workdir is made if missing) while ``what``
    (``train``, ``evaluate``, ...) writes into it. Another process writing there is a :class:`LockedError`
    naming it; a workdir that cannot be written is a :class:`WorkdirError`."""
    stack = contextlib.ExitStack()
    try:
        os.makedirs(workdir, exist_ok=True)
        stack.enter_context(hold(os.path.join(workdir, LOCK_NAME), what))
    except LockedError as e:
        raise LockedError(
            f"The workdir {os.path.abspath(workdir)} is in use by {e}: two runs in one workdir replace each "
            "other's config, checkpoints and results. Wait for it to finish or stop it, or pass another --workdir."
        ) from None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        raise WorkdirError(
            f"Cannot write in the workdir {os.path.abspath(workdir)} ({os.strerror(e.errno)}: {e.filename}). "
            "Pass a --workdir in a folder you can write to (and with free space)."
        ) from None
    with stack:
        yield


@contextlib.contextmanager
def build_lock(folder: str, name: str) -> Iterator[bool]:
    """One build of a dataset config at a time on this data folder: holds ``<folder>/<name>.lock``; a second
    process logs whom it waits for and waits. Yields whether it waited (the build is then usually complete)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.lock")
    waited = []

    def show_wait(holder: dict) -> None:
        waited.append(holder)
        logging.warning(
            "Waiting for %s, which is building the dataset %s in %s; this process then reads its build.",
            describe(holder),
            name,
            folder,
        )

    with hold(path, f"building {name}", on_busy=show_wait):
        if waited:
            logging.warning("The build of %s that this process waited for has ended.", name)
        yield bool(waited)
