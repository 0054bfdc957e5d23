"""One writer per workdir, one build per dataset: refusals name the holder, a killed holder blocks nothing."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT

from diffseg_jax import checkpoints, locks

_HOLD = textwrap.dedent("""
    import sys, time
    from diffseg_jax import locks
    with locks.workdir_lock(sys.argv[1], "train"):
        print("held", flush=True)
        time.sleep(600)
""")


def _holder(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_workdir_is_refused_naming_the_holder_and_freed_when_it_is_killed(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(locks.LockedError) as refused:
            with locks.workdir_lock(str(tmp_path), "evaluate"):
                pass
        message = str(refused.value)
        assert f"in use by process {proc.pid} on host {socket.gethostname()} (train" in message
        assert "another --workdir" in message
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays behind with its record
        proc.wait()
    assert json.loads((tmp_path / locks.LOCK_NAME).read_text())["pid"] == proc.pid
    with locks.workdir_lock(str(tmp_path), "train"):  # the kernel released the flock: a resume goes on
        with locks.workdir_lock(str(tmp_path), "train"):  # re-entrant within a process (main, then train)
            assert json.loads((tmp_path / locks.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_an_unwritable_workdir_is_one_message(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(locks.os, "makedirs", read_only)  # (as root, a chmod'ed folder is still writable)
    with pytest.raises(
        locks.WorkdirError, match=r"Cannot write in the workdir .*run \(Read-only file system"
    ):
        with locks.workdir_lock(str(tmp_path / "run"), "train"):
            pass


@pytest.mark.slow
def test_a_second_run_on_a_training_workdir_is_refused_and_the_first_is_intact(tmp_path, tfds_dir):
    """Two `--mode train` on one workdir: the second is refused at once, naming the first's PID and host; the
    first's config, metrics and checkpoints are its own. (Before: both trained into the same files, or one died
    on orbax's temporary folders.)"""
    common = [
        "--config",
        "configs/e2_synthetic.py:tiny",
        "--workdir",
        str(tmp_path),
        f"--config.data.data_dir={tfds_dir}",
        "--config.train.num_steps=100000",
        "--config.train.ckpt_every=100000",
        "--config.train.log_every=1",
        "--config.eval.enabled=False",
    ]
    run = [sys.executable, "-m", "diffseg_jax.main", *common]
    first = subprocess.Popen(
        [*run, "--config.seed=7"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (tmp_path / "metrics.jsonl").is_file():
            time.sleep(0.1)
        second = subprocess.run(
            [*run, "--config.seed=8"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        out = second.stdout + second.stderr
        assert second.returncode == 1 and "Traceback" not in out, out[-3000:]
        assert f"is in use by process {first.pid} on host {socket.gethostname()} (train" in out
    finally:
        first.send_signal(signal.SIGTERM)  # saves its step and exits 0
        first_out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, first_out[-3000:]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))
    assert checkpoints.latest_step(str(tmp_path / "checkpoints")) == steps[-1]
    assert json.load(open(tmp_path / "config.json"))["seed"] == 7
