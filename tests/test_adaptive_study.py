"""analysis.adaptive_study: paired runs across variants, whole result files, resuming, and the report cache."""

import argparse
import json

import numpy as np
import pytest

from diffseg_jax.analysis import adaptive_study, adaptive_summary


@pytest.mark.slow
def test_variants_of_a_seed_are_paired_and_a_rerun_resumes(tmp_path, tfds_dir, monkeypatch):
    study_config = adaptive_study.study_config

    def with_test_data(*args, **kwargs):
        config = study_config(*args, **kwargs)
        config.data.update(data_dir=tfds_dir, num_train=64)
        return config

    monkeypatch.setattr(adaptive_study, "study_config", with_test_data)
    # A variant that changes nothing: the study promises the same data order, initialisation and evaluation
    # noise for every variant of a seed, so it must reproduce the baseline exactly.
    monkeypatch.setitem(adaptive_summary.VARIANTS, "same_as_uniform", {})
    out = tmp_path / "study"
    argv = [
        "--out",
        str(out),
        "--datasets",
        "lesion",
        "--variants",
        "uniform,same_as_uniform",
        "--seeds",
        "0",
    ]
    argv += ["--steps", "4", "--eval_every", "2", "--eval_images", "4"]
    paths = adaptive_study.main(argv)

    base = dict(np.load(out / "runs" / "lesion_uniform_s0.npz"))
    same = dict(np.load(out / "runs" / "lesion_same_as_uniform_s0.npz"))
    assert list(base["steps"]) == [2, 4] and base["loss"].shape == (4,)
    for key in ("loss", "iou", "ece", "iou_per_image", "ece_per_image"):
        np.testing.assert_array_equal(same[key], base[key], err_msg=key)
    assert 0 <= base["iou"].min() and base["iou"].max() <= 1 and np.isfinite(base["loss"]).all()
    assert not list((out / "runs").glob("*.tmp*"))  # only whole result files remain

    md = open(paths["md"], encoding="utf-8").read()
    assert "| lesion | same_as_uniform | 1 |" in md and "| 0.0000 ± 0.0000 | 0.0000 ± 0.0000 |" in md
    assert "| adapted |" not in md  # not asked for, so no row says it equals the baseline
    csv_rows = open(paths["csv"], encoding="utf-8").read().strip().splitlines()[1:]
    assert len(csv_rows) == 2 * 2  # two variants x two evaluations

    # A rerun finds every result and the fingerprint report on disk: nothing is trained or measured again.
    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(adaptive_study.build, "setup", fail)
    monkeypatch.setattr(adaptive_study, "fingerprint_reports", fail)
    again = adaptive_study.main(argv)
    assert open(again["md"], encoding="utf-8").read() == md


def test_report_cache_computes_only_what_it_lacks(tmp_path, monkeypatch):
    calls = []

    def reports(datasets, args):
        calls.append(list(datasets))
        return {d: {"image_size": args.image_size, "alpha_bar_T": 0.1} for d in datasets}

    monkeypatch.setattr(adaptive_study, "fingerprint_reports", reports)
    path = str(tmp_path / "fingerprints.json")
    at32, at64 = argparse.Namespace(image_size=32), argparse.Namespace(image_size=64)
    assert set(adaptive_study.cached_reports(path, ["lesion"], at32)) == {"lesion"}
    assert set(adaptive_study.cached_reports(path, ["lesion", "nuclei"], at32)) == {"lesion", "nuclei"}
    assert adaptive_study.cached_reports(path, ["nuclei"], at64)["nuclei"]["image_size"] == 64
    assert calls == [["lesion"], ["nuclei"], ["nuclei"]]  # a new dataset, then a new size: never stale
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["lesion"]["image_size"] == 32  # the other entries are kept


def _no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(adaptive_study.build, "setup", fail)
    monkeypatch.setattr(adaptive_study, "fingerprint_reports", fail)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--datasets", "lesion,nucleii"], r"--datasets='lesion,nucleii': unknown \['nucleii'\]"),
        (["--steps", "0"], r"--steps=0: use a positive integer"),
        (["--eval_every", "0"], r"--eval_every=0: use a positive integer"),
        (["--seeds", "0,,1"], r"--seeds='0,,1': give integers separated by commas"),
        (["--image_size", "30"], r"--image_size=30.*data\.image_size=30.*multiple of 4"),
        (
            ["--datasets", "monuseg", "--monuseg_dir", "/nonexistent"],
            r"no dataset left to study.*--monuseg_dir",
        ),
    ],
)
def test_arguments_are_checked_before_any_work(tmp_path, monkeypatch, args, match):
    _no_work(monkeypatch)
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match=match):
        adaptive_study.main(["--out", str(out), "--datasets", "lesion", "--seeds", "0", *args])
    assert not out.exists()  # no empty report files


def test_results_of_other_settings_are_refused_not_reused(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    out = tmp_path / "study"
    (out / "runs").mkdir(parents=True)
    settings = dict(steps=4, eval_every=2, image_size=32, eval_images=4)
    argv = ["--out", str(out), "--datasets", "lesion", "--variants", "uniform", "--seeds", "0"]
    argv += ["--steps", "4", "--eval_every", "2", "--eval_images", "4"]
    np.savez(out / "runs" / "lesion_uniform_s0.npz", steps=np.array([2, 4]), settings=json.dumps(settings))
    for change, match in (
        (["--steps", "8"], r"lesion_uniform_s0\.npz \(--steps=4 there, 8 now\)"),
        (["--eval_images", "16"], r"--eval_images=4 there, 16 now"),
        (["--image_size", "64"], r"--image_size=32 there, 64 now"),
    ):
        with pytest.raises(SystemExit, match=match):
            adaptive_study.main(argv + change)
    # A result of an older version, without the record: what its evaluation steps tell is checked.
    np.savez(out / "runs" / "lesion_uniform_s0.npz", steps=np.array([3, 4]))
    with pytest.raises(SystemExit, match=r"--eval_every=3 there, 2 now"):
        adaptive_study.main(argv)
    assert adaptive_study.stored_settings(str(out / "runs" / "lesion_uniform_s0.npz")) == dict(
        steps=4, eval_every=3
    )


def test_workers_share_the_variants_and_name_the_failed_ones(tmp_path, monkeypatch):
    """--workers 2 goes through diffseg_jax.workers (pinned processes, their logs and failed-runs files): the parent
    starts each share's command line, a worker records the variants that failed and goes on with the others, and
    the parent's message names them."""
    from diffseg_jax import workers  # noqa: PLC0415 — only this test reads the workers' files

    reports = {
        d: {"alpha_bar_T": 0.1, "base_alpha_bar_T": 0.1, "image_size": 32} for d in ("lesion", "nuclei")
    }
    monkeypatch.setattr(adaptive_study, "cached_reports", lambda path, datasets, args: reports)
    out = str(tmp_path / "study")
    argv = ["--out", out, "--datasets", "lesion,nuclei", "--variants", "uniform,weights", "--seeds", "0"]
    done = []

    def run_variant(dataset, variant, seeds, args, out_dir):
        done.append((dataset, variant))
        if (dataset, variant) == ("nuclei", "uniform"):
            raise RuntimeError("out of memory")

    monkeypatch.setattr(adaptive_study, "run_variant", run_variant)
    # worker 0 of 2: every other (dataset, variant) from the first; one fails, the other still runs
    with pytest.raises(SystemExit, match=r"worker 0/2: 1 failed: \['nuclei uniform'\]"):
        adaptive_study.main([*argv, "--workers=1", "--shard=0/2"])
    assert done == [("lesion", "uniform"), ("nuclei", "uniform")]
    with open(workers.worker_files(out, 0, 2)[1], encoding="utf-8") as f:
        assert json.load(f) == ["nuclei uniform"]

    started = []

    def run_processes(module, command_line, workdir, share_sizes):
        started.append((module, command_line, workdir, list(share_sizes)))
        return [1, 0]  # worker 0 failed as above

    monkeypatch.setattr(workers, "run_processes", run_processes)
    with pytest.raises(
        SystemExit, match=r"adaptive_study: worker 0/2 \(exit status 1\) failed on nuclei uniform"
    ):
        adaptive_study.main([*argv, "--workers", "2"])
    assert started == [("diffseg_jax.analysis.adaptive_study", [*argv, "--workers", "2"], out, [2, 2])]
