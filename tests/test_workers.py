"""Several runs at a time: shares, worker command lines and failure messages (diffseg_jax.workers); the
two-worker grid end to end is tests/test_cli.py::test_table1_two_workers_write_the_same_table_as_one."""

from __future__ import annotations

import pytest

from diffseg_jax import workers


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_worker_shares_cover_every_run_exactly_once(count):
    """workers.shard_runs (--workers N): for grids of 0 to 13 runs, the N shares hold every run exactly once, in
    the grid's order, and differ in size by at most one; the worker's command line is the parent's with its own
    --shard (and --workers=1) in place of the parent's --workers, in either spelling."""
    for size in range(14):
        runs = [("lesion", "ensemdiff", f"e{i % 2 + 1}", i // 2) for i in range(size)]
        shares = [workers.shard_runs(runs, i, count) for i in range(count)]
        together = [r for share in shares for r in share]
        assert sorted(together) == sorted(runs) and len(set(together)) == len(runs)
        assert all(share == [r for r in runs if r in share] for share in shares)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert workers.parse_shard(f"{count - 1}/{count}") == (count - 1, count)
    argv = ["--config=c.py", "--workers", str(count), "--workdir=w", f"--workers={count}", "--shard=0/1"]
    assert workers.worker_argv(argv, 1, count) == [
        "--config=c.py",
        "--workdir=w",
        "--workers=1",
        f"--shard=1/{count}",
    ]
    for bad in (f"{count}/{count}", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError, match=r"--shard=.*give i/n with 0 <= i < n"):
            workers.parse_shard(bad)


def test_worker_failures_name_the_failed_runs_and_logs(tmp_path):
    """A worker that exits non-zero: the parent's message names the runs its JSON lists (or, when it died before
    writing one, all its runs), its exit status and its log; workers that exited 0 are not named."""
    runs = ["lesion ensemdiff e1", "lesion ensemdiff e2", "nuclei ensemdiff e2"]
    shares = [workers.shard_runs(runs, i, 2) for i in range(2)]
    assert workers.failures(str(tmp_path), [0, 0], shares) == ""
    (tmp_path / workers.WORKER_DIR).mkdir()
    workers.record_failures(str(tmp_path), 1, 2, ["lesion ensemdiff e2"])  # what a failed worker writes
    message = workers.failures(str(tmp_path), [0, 1], shares)
    assert "worker 1/2 (exit status 1) failed on lesion ensemdiff e2; log: " in message
    assert "worker 0/2" not in message and str(tmp_path / "workers" / "worker1of2.log") in message
    message = workers.failures(str(tmp_path), [-9, 0], shares)  # killed: no JSON of its own
    assert "worker 0/2 (exit status -9) failed on lesion ensemdiff e1, nuclei ensemdiff e2;" in message
    assert "rerun the same command" in message
