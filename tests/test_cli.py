"""The README commands at a tiny scale: quickstart end to end, and --mode summary."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def _run(args, timeout=900):
    out = subprocess.run(
        [sys.executable, "-m", "diffseg_jax.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_quickstart_tiny_trains_samples_and_writes_outputs(tmp_path, tfds_dir):
    workdir = tmp_path / "quickstart"
    log = _run(
        [
            "--config",
            "configs/quickstart.py:tiny",
            "--workdir",
            str(workdir),
            f"--config.data.data_dir={tfds_dir}",
        ]
    )
    assert "steps/s" in log and "ETA" in log  # progress is shown
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert metrics["ensemble_size"] == 2 and metrics["step"] == 4 and metrics["num_images"] == 4
    assert 0.0 <= metrics["iou"] <= 1.0 and metrics["baseline_iou_all_background"] == 0.0
    assert (workdir / "eval" / "ensemble.png").stat().st_size > 1000
    assert (workdir / "checkpoints" / "4").is_dir()
    assert os.listdir(workdir / "tensorboard")
    # Running again resumes at the end: no training, evaluation only.
    log = _run(
        [
            "--config",
            "configs/quickstart.py:tiny",
            "--workdir",
            str(workdir),
            f"--config.data.data_dir={tfds_dir}",
        ]
    )
    assert "Resumed" in log and "steps 4 → 4" in log


def test_summary_prints_published_ensemdiff_param_count():
    # The published scheme learns the variance (2 output channels); the plain ε loss has one.
    log = _run(["--config", "configs/e2_isic.py:ensemdiff", "--mode", "summary"], timeout=300)
    assert "params: 113673218" in log
    log = _run(
        ["--config", "configs/e2_isic.py:ensemdiff", "--mode", "summary", "--config.objective.loss=eps_mse"],
        timeout=300,
    )
    assert "params: 113672065" in log
