"""diffseg_jax.batch_store: the resumable store of finished batches that evaluation and prediction share."""

import numpy as np
import pytest

from diffseg_jax import batch_store, writers


def test_a_rerun_of_the_same_work_reads_its_leading_batches_and_another_work_starts_afresh(tmp_path):
    run_id = {"sampling": ("ddim", 5), "weights": "3:1.5", "inputs": [1, 2]}
    store = batch_store.BatchStore(str(tmp_path / "partial"), run_id)
    assert store.open() == 0
    batches = [np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(3)]
    for i, b in enumerate(batches):
        store.save(i, mean=b, std=-b)
    # The identity compares as it reads back from JSON (the tuple as a list): the same work resumes.
    again = batch_store.BatchStore(str(tmp_path / "partial"), {**run_id, "sampling": ["ddim", 5]})
    assert again.open() == 3
    for i, b in enumerate(batches):
        saved = again.load(i)
        np.testing.assert_array_equal(saved["mean"], b)
        np.testing.assert_array_equal(saved["std"], -b)
    # Only the leading run of batches counts: a missing one ends it.
    (tmp_path / "partial" / "batch_00001.npz").unlink()
    assert batch_store.BatchStore(str(tmp_path / "partial"), run_id).open() == 1
    # Other weights: another work, whose files are cleared.
    other = batch_store.BatchStore(str(tmp_path / "partial"), {**run_id, "weights": "3:1.6"})
    assert other.open() == 0
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == ["meta.json"]
    assert batch_store.BatchStore(str(tmp_path / "partial"), run_id).open() == 0  # and it is recorded


def test_a_batch_cut_short_by_a_crash_is_not_counted(tmp_path, monkeypatch):
    store = batch_store.BatchStore(str(tmp_path), {"id": 1})
    store.open()
    store.save(0, mean=np.zeros(2))

    def full_disk(path, **arrays):
        with open(path + ".tmp.npz", "wb") as f:
            f.write(b"PK half")  # what a crash leaves: a temporary file, never a half batch file
        raise OSError("No space left on device")

    monkeypatch.setattr(writers, "save_npz_whole", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.save(1, mean=np.ones(2))
    assert batch_store.BatchStore(str(tmp_path), {"id": 1}).open() == 1
