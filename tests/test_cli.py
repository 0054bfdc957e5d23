"""The README commands at a tiny scale: quickstart end to end, and --mode summary."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import ROOT, assert_metrics_are_the_ensembles, run_module, tiny_config

from diffseg_jax import build, validation
from diffseg_jax import metrics as metrics_lib


def _run(args, timeout=900):
    return run_module("diffseg_jax.main", *args, timeout=timeout)


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
    assert_metrics_are_the_ensembles(workdir / "eval")  # the IoU counted from the saved ensembles
    assert metrics["baseline_iou_all_background"] == 0.0
    # The default pooling (eval.pooling=pooled) names the pooled values iou / ece.
    assert metrics["iou"] == metrics["iou_pooled"] and metrics["ece"] == metrics["ece_pooled"]
    assert 0.0 <= metrics["ece_per_image"] <= 1.0 and len(metrics["reliability"]["count"]) == 11
    with open(workdir / "eval" / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and set(rows[0]) >= {"id", "iou", "dice", "ece", "mean_std"}
    assert np.mean([float(r["iou"]) for r in rows]) == pytest.approx(metrics["iou_per_image"], abs=1e-5)
    assert (workdir / "eval" / "ensemble.png").stat().st_size > 1000
    assert (workdir / "eval" / "reliability.png").stat().st_size > 1000
    assert (workdir / "checkpoints" / "4").is_dir()
    assert (
        workdir / "checkpoints" / "3"
    ).is_dir()  # train.keep_at: 75 % of 4 steps, saved and kept for Fig. 3
    assert os.listdir(workdir / "tensorboard")
    # The uncertainty block and the Brier column: the metric functions on the arrays written beside them.
    arrays = np.load(workdir / "eval" / "ensemble.npz")
    unc = metrics_lib.uncertainty_report(arrays["mean"], arrays["std"], arrays["mask"])
    assert metrics["uncertainty"]["error_fraction"] == pytest.approx(float(unc["error_fraction"]))
    for name in ("std", "entropy"):
        for key in ("error_auroc", "ueo", "image_spearman"):
            value = float(unc[f"{name}_{key}"])
            assert metrics["uncertainty"][name][key] == (pytest.approx(value) if np.isfinite(value) else None)
    assert [float(r["brier"]) for r in rows] == pytest.approx(np.asarray(unc["brier_per_image"]), abs=1e-6)
    # --mode evaluate on the trained run with the config it recorded (configs/from_run.py: nothing retyped),
    # drawing Fig. 1 next to another evaluated run (here: itself).
    log = _run(
        [
            "--config",
            f"configs/from_run.py:{workdir}",
            "--workdir",
            str(workdir),
            "--mode",
            "evaluate",
            f"--compare_workdir={workdir}",
            f"--eval_dir={workdir / 'eval_again'}",
            "--config.eval.num_figure_images=2",
        ]
    )
    assert "Training" not in log and "at step 4 with the EMA weights" in log
    assert "images/s" in log and (workdir / "eval_again" / "figure1.png").stat().st_size > 1000
    # Written to --eval_dir, the run's eval/ kept: the same checkpoint and keys give the same ensembles.
    again = json.loads((workdir / "eval_again" / "metrics.json").read_text())
    assert json.loads((workdir / "eval" / "metrics.json").read_text()) == metrics
    assert again["iou"] == metrics["iou"] and again["ece"] == metrics["ece"]
    compared = json.loads((workdir / "eval_again" / "comparison.json").read_text())
    assert compared["num_images"] == 4 and compared["runs"][1]["mean_std_over_first"] == pytest.approx(1.0)
    # Its reliability bins, recomputed from ensemble.npz, are those metrics.json has: the same images and means.
    for key in ("count", "confidence", "accuracy"):
        assert compared["runs"][0]["reliability"][key] == pytest.approx(metrics["reliability"][key], abs=1e-6)
    assert compared["runs"][1]["uncertainty"] == metrics["uncertainty"]
    # The comparison's diagram beside the run's own, which it does not replace.
    for name in ("reliability.png", "comparison_reliability.png"):
        assert (workdir / "eval_again" / name).stat().st_size > 1000
    # The programmatic API: the run loaded from its folder segments the test images as --mode evaluate did
    # (same weights, settings and key), and another key or member count gives other maps.
    import diffseg_jax
    from diffseg_jax import data as data_lib

    run = diffseg_jax.load_run(str(workdir))
    assert run.step == 4 and run.config.eval.use_ema
    n = run.config.eval.num_images
    test = data_lib.eval_arrays(run.config.data, split="test", max_examples=None if n < 0 else n)
    mean, std = run.segment(test["image"])
    np.testing.assert_allclose(mean, arrays["mean"], atol=1e-6)
    np.testing.assert_allclose(std, arrays["std"], atol=1e-6)
    other, _ = run.segment(test["image"], members=3, key=1)
    assert other.shape == mean.shape and not np.allclose(other, mean)


def test_from_run_reads_back_every_config_file_as_it_was_recorded(tmp_path, monkeypatch):
    # configs/from_run.py:<run> rebuilds the config a run recorded: every value, with the declared types
    # (tuples, typed placeholders), for every experiment, dataset and architecture.
    import glob
    import importlib

    from configs import from_run
    from diffseg_jax import configlib

    def leaves(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: (type(v), v)})
        return out

    count = 0
    for path in sorted(glob.glob("configs/e[1-4]_*.py")) + ["configs/quickstart.py"]:
        module = importlib.import_module("configs." + os.path.basename(path)[:-3])
        for arg in (None, "tiny", "segdiff", "medsegdiff_new,tiny", "nnunet", "segformer,tiny"):
            if arg and arg.split(",")[0] in ("nnunet", "segformer") and "/e1_" not in path:
                continue  # the feed-forward references are E1 models
            config = module.get_config(arg)
            config.train.lr = 2.5e-4  # an override made at training time
            run = tmp_path / f"{count}"
            configlib.save(config, str(run / "config.json"))
            assert leaves(from_run.get_config(str(run)).to_dict()) == leaves(config.to_dict()), (path, arg)
            count += 1
    assert count == 4 * 4 * 6 - 3 * 4 * 2 + 4
    # A run recorded before a key existed gets that key's default; a folder without a record is named.
    record = json.loads((tmp_path / "0" / "config.json").read_text())
    del record["data"]["image_scaling"]
    (tmp_path / "0" / "config.json").write_text(json.dumps(record))
    assert from_run.get_config(str(tmp_path / "0")).data.image_scaling == "auto"
    with pytest.raises(FileNotFoundError, match="not a trained run's folder"):
        from_run.get_config(str(tmp_path / "missing"))
    # Paths given relative to where training ran are recorded absolute: the run reads back from anywhere.
    (tmp_path / "started_here").mkdir()
    monkeypatch.chdir(tmp_path / "started_here")
    config = importlib.import_module("configs.e2_folder").get_config("tiny")
    config.data.manual_dir, config.train.init_weights = "../my_data", "~/weights.safetensors"
    configlib.save(config, "run/config.json")
    assert config.data.manual_dir == "../my_data"  # the live config is not changed
    monkeypatch.chdir(tmp_path)
    recorded = from_run.get_config(str(tmp_path / "started_here" / "run"))
    assert recorded.data.manual_dir == str(tmp_path / "my_data")
    assert recorded.train.init_weights == os.path.join(os.path.expanduser("~"), "weights.safetensors")
    assert recorded.data.data_dir is None  # unset stays unset
    # The folder's label for tables (and the check that evaluation reads the data trained on) is the same
    # for the path as given and as recorded, "." included.
    from diffseg_jax import evaluate

    for given in ("../my_data", ".", "./", "my_data/"):
        assert evaluate.folder_label(given) == evaluate.folder_label(os.path.abspath(given)) != ""


def _run_elsewhere(args, cwd, timeout=900):
    return run_module("diffseg_jax.main", *args, timeout=timeout, cwd=cwd)


def test_summary_prints_published_ensemdiff_param_count(tmp_path):
    # The published scheme learns the variance (2 output channels); the plain ε loss has one.
    log = _run(["--config", "configs/e2_isic.py:ensemdiff", "--mode", "summary"], timeout=300)
    assert "params: 113673218" in log
    # From another working directory, with the config's full path: the config's `from configs import base`
    # resolves through the installed package (pyproject's packages), not the current directory.
    config = os.path.join(ROOT, "configs", "e2_isic.py")
    args = ["--config", f"{config}:ensemdiff", "--mode", "summary", "--config.objective.loss=eps_mse"]
    log = _run_elsewhere(args, cwd=tmp_path, timeout=300)
    assert "params: 113672065" in log


def _write_folder_dataset(root, counts=(("train", 6), ("test", 2)), size=64):
    """A tiny dataset in the segmentation_folder layout: bright disks (the masks) on a noisy dark background."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for split, count in counts:
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True)
        for i in range(count):
            cy, cx, r = rng.uniform(16, size - 16, 2).tolist() + [rng.uniform(6, 14)]
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.uint8)
            image = np.clip(60 + 140 * mask[..., None] + rng.normal(0, 20, (size, size, 3)), 0, 255)
            Image.fromarray(image.astype(np.uint8)).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(mask * 255).save(root / split / "masks" / f"{split}{i}.png")


def test_table1_folder_cells_read_the_folder_and_names_must_differ(tmp_path):
    from configs import table1_synthetic
    from diffseg_jax import table1

    grid = table1_synthetic.get_config()
    grid.table.kinds, grid.table.models = ("nuclei",), ("segdiff",)
    folder = tmp_path / "her2"
    _write_folder_dataset(folder, counts=(("train", 1), ("test", 1)))
    grid.table.folders = (str(folder) + "/",)
    grid.data.resize, grid.data.mask_threshold = 128, 100.0
    assert table1.cells(grid) == [
        (d, "segdiff", e) for d in ("nuclei", str(folder) + "/") for e in ("e1", "e2")
    ]
    assert table1.dataset_name(str(folder) + "/") == "her2"
    cell = table1.cell_config(grid, str(folder) + "/", "segdiff", "e2")
    assert (cell.data.name, cell.data.manual_dir, cell.data.resize) == (
        "segmentation_folder",
        str(folder) + "/",
        128,
    )
    assert cell.data.mask_threshold == 100.0 and cell.data.image_size == 32 and cell.train.lr == grid.train.lr
    validation.validate(cell, check_data=False)
    synthetic_cell = table1.cell_config(grid, "nuclei", "segdiff", "e2")
    assert synthetic_cell.data.name == "synthetic" and synthetic_cell.data.resize is None
    # The grid's mask range and T reach the cell; '' and 0 keep the cell's own (SegDiff's {-1, 1}, tiny T = 100).
    assert (synthetic_cell.diffusion.mask_range, synthetic_cell.diffusion.num_timesteps) == ("symmetric", 100)
    grid.table.mask_range, grid.table.num_timesteps = "binary", 1000
    synthetic_cell = table1.cell_config(grid, "nuclei", "segdiff", "e2")
    assert (synthetic_cell.diffusion.mask_range, synthetic_cell.diffusion.num_timesteps) == ("binary", 1000)
    validation.validate(synthetic_cell, check_data=False)
    grid.table.mask_range, grid.table.num_timesteps = "", 0
    # A folder in the working directory named like a synthetic kind is that folder, not the kind.
    grid.table.kinds = ("lesion",)
    grid.table.folders = ("nuclei",)
    assert table1.datasets(grid) == ["lesion", os.path.join(".", "nuclei")]
    cell = table1.cell_config(grid, table1.datasets(grid)[1], "segdiff", "e2")
    assert (cell.data.name, os.path.normpath(cell.data.manual_dir)) == ("segmentation_folder", "nuclei")
    grid.table.kinds = ("nuclei",)
    grid.table.folders = (str(tmp_path / "nuclei"),)  # would share <workdir>/nuclei with the synthetic kind
    with pytest.raises(ValueError, match="would share the folder <workdir>/nuclei"):
        table1.cells(grid)


@pytest.mark.slow
def test_table1_grid_trains_every_cell_writes_the_table_and_resumes(tmp_path, tfds_dir):
    """``python -m diffseg_jax.table1`` (README, Reproducing the paper) on a grid of one synthetic kind and one
    image/mask folder, one model, at the smallest scale."""
    workdir = tmp_path / "table1"
    folder = tmp_path / "my_set"  # a real dataset's layout (train/ and test/ images + masks), stored at 64 px
    _write_folder_dataset(folder)
    args = [
        "--config=configs/table1_synthetic.py",
        f"--workdir={workdir}",
        "--config.table.kinds=('lesion',)",
        f"--config.table.folders=('{folder}',)",
        "--config.data.resize=64",
        "--config.table.models=('ensemdiff',)",
        f"--config.data.data_dir={tfds_dir}",
        "--config.data.num_train=16",
        "--config.data.num_test=4",
        "--config.train.num_steps=2",
        "--config.train.ckpt_every=2",
        "--config.eval.num_images=4",
        "--config.eval.ensemble_size=2",
        "--config.eval.member_chunk=2",
        "--config.eval.ddim_steps=2",
    ]

    log = run_module("diffseg_jax.table1", *args)
    with open(workdir / "table1.csv", newline="") as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["my_set", "synthetic-lesion"]
    for dataset, cell_dir in (("synthetic-lesion", "lesion"), ("my_set", "my_set")):
        cells = {
            e: json.loads((workdir / cell_dir / f"ensemdiff_{e}" / "eval" / "metrics.json").read_text())
            for e in ("e1", "e2")
        }
        assert cells["e1"]["step"] == cells["e2"]["step"] == 2 and cells["e2"]["ensemble_size"] == 2
        assert cells["e1"]["dataset"] == cells["e2"]["dataset"] == dataset
        row = rows[dataset]
        ff, diff = (
            float(row["ff_iou"]),
            float(row["diff_iou"]),
        )  # the CSV keeps the fractions at full precision
        assert ff == pytest.approx(cells["e1"]["iou"]) and diff == pytest.approx(cells["e2"]["iou"])
        assert float(row["delta_iou"]) == pytest.approx(diff - ff)
        assert float(row["delta_ece"]) == pytest.approx(cells["e2"]["ece"] - cells["e1"]["ece"])
    # The folder's cells read its images, stored at data.resize and evaluated on the model's 32 px tiles.
    saved = json.loads((workdir / "my_set" / "ensemdiff_e2" / "config.json").read_text())
    assert saved["data"]["manual_dir"] == str(folder) and saved["data"]["resize"] == 64
    with np.load(workdir / "my_set" / "ensemdiff_e2" / "eval" / "ensemble.npz") as ev:
        assert ev["mean"].shape == (2, 64, 64, 1) and sorted(ev["ids"].tolist()) == ["test0", "test1"]
    assert (
        "cell 4/4" in log
        and "Training ensemdiff (e2)" in log
        and (workdir / "table1.md").exists()
        and (workdir / "table1.tex").exists()
        and (workdir / "reliability.png").stat().st_size > 1000  # a panel per cell, FF and Diff runs
    )
    # A rerun given a second seed (for the synthetic kind only) finds the seed-0 cells finished and trains a repeat
    # of each beside them; the table averages the two, and the folder's single runs keep their row as it was.
    with open(workdir / "table1.csv", newline="") as f:
        table = {r["dataset"]: r for r in csv.DictReader(f)}
    args[args.index(f"--config.table.folders=('{folder}',)")] = "--config.table.folders=()"
    log = run_module("diffseg_jax.table1", *args, "--config.table.seeds=(0,1)")
    assert log.count("Training ensemdiff") == 2 and "cell 4/4" in log
    with open(workdir / "table1.csv", newline="") as f:
        repeated = {r["dataset"]: r for r in csv.DictReader(f)}
    assert repeated["my_set"] == table["my_set"]
    assert json.loads((workdir / "lesion" / "ensemdiff_e2_seed1" / "config.json").read_text())["seed"] == 1
    for e, kind in (("e1", "ff"), ("e2", "diff")):
        ious = [
            json.loads((workdir / "lesion" / f"ensemdiff_{e}{s}" / "eval" / "metrics.json").read_text())[
                "iou"
            ]
            for s in ("", "_seed1")
        ]
        row = repeated["synthetic-lesion"]
        assert row[f"{kind}_n"] == "2" and float(row[f"{kind}_iou"]) == pytest.approx(np.mean(ious))
        assert float(row[f"{kind}_iou_std"]) == pytest.approx(np.std(ious, ddof=1))
    assert float(row["delta_iou_ci_low"]) <= float(row["delta_iou"]) <= float(row["delta_iou_ci_high"])
    assert repeated["my_set"]["diff_n"] == "1" and repeated["my_set"]["diff_iou_std"] == ""


def test_table1_refuses_a_misspelt_kind_before_training(tmp_path, monkeypatch):
    """A kind that is not synthetic ('lesions' for 'lesion') is refused with the kinds there are and where
    folders go, before any cell trains or the workdir is made (it was taken for a folder's path)."""
    from configs import table1_synthetic
    from diffseg_jax import protocol, table1, train

    def no_training(*args, **kwargs):
        raise AssertionError("a cell started training")

    monkeypatch.setattr(train, "train", no_training)
    monkeypatch.setattr(protocol, "run", no_training)
    grid = table1_synthetic.get_config()
    grid.table.kinds = ("lesions", "nuclei")
    with pytest.raises(
        ValueError, match=r"'lesions' is not a synthetic kind.*'lesion', 'nuclei', 'clusters'.*table\.folders"
    ):
        table1.run(grid, str(tmp_path / "grid"))
    assert not (tmp_path / "grid").exists()
    grid.table.kinds = ("lesion",)
    assert {d for d, _, _ in table1.cells(grid)} == {"lesion"}
    grid.table.seeds = (0, 1, 1)  # a seed twice would be one run counted as two repeats
    with pytest.raises(ValueError, match=r"table.seeds=\(0, 1, 1\): give distinct integers"):
        table1.run(grid, str(tmp_path / "grid"))
    assert not (tmp_path / "grid").exists()


def test_table1_evaluates_a_cell_again_whose_metrics_json_is_cut_short(tmp_path):
    """A grid rerun after a crash: an unreadable metrics.json marks its cell unfinished instead of stopping
    the grid; a whole one with the cell's step marks it finished."""
    from diffseg_jax import table1

    config = tiny_config()
    (tmp_path / "eval").mkdir()
    text = json.dumps({"step": config.train.num_steps, "iou": 0.5})
    (tmp_path / "eval" / "metrics.json").write_text(text[: len(text) // 2])
    assert not table1._finished(config, str(tmp_path))
    (tmp_path / "eval" / "metrics.json").write_text(text)
    assert table1._finished(config, str(tmp_path))


def _readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "From Python" section."""
    from conftest import ROOT

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n```", 1)[0] for block in section.split("```python\n")[1:]]


@pytest.mark.slow
def test_readme_from_python_example_runs_as_written(tmp_path, tfds_dir):
    """The README's Python example, run as a user pastes it (from a folder of their own, where `configs` comes
    from the install, at the tiny scale it loads, 2 steps instead of 200): every call exists with the arguments
    shown, and the table it ends with holds the run it evaluated."""
    import subprocess
    import sys

    from PIL import Image

    code = _readme_python_blocks()[0]
    for old, new in (
        ("config.train.num_steps = 200", f"config.train.num_steps = 2; config.data.data_dir = {tfds_dir!r}"),
        ('members=10, sampler="ddim", steps=50', 'members=2, sampler="ddim", steps=5'),
    ):
        assert old in code, old  # the README changed: update this test with it
        code = code.replace(old, new)
    code += "\nimport json; print('RESULT', json.dumps(dict(result=result, scores={k: float(v.mean()) for k, v in scores.items() if k.endswith('pooled')}, rows=rows)))\n"
    (tmp_path / "my_images").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)).save(
        tmp_path / "my_images" / "case1.png"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    printed = json.loads(out.stdout.split("RESULT ", 1)[1])
    result, scores, rows = printed["result"], printed["scores"], printed["rows"]
    assert result["step"] == 2 and (tmp_path / "runs" / "py" / "eval" / "metrics.json").exists()
    assert (tmp_path / "runs" / "py" / "analysis" / "curves.csv").exists()
    assert (tmp_path / "runs" / "py" / "predict" / "case1_mask.png").exists()
    assert (
        0.0 <= scores["iou_pooled"] <= 1.0 and 0.0 <= scores["ece_pooled"] <= 1.0
    )  # other noise: other values
    assert result == assert_metrics_are_the_ensembles(tmp_path / "runs" / "py" / "eval")
    # The table's diffusion cell is the evaluation the example ran (E2, no feed-forward run beside it).
    assert len(rows) == 1 and rows[0]["diff_iou"] == pytest.approx(result["iou"])
    assert rows[0]["ff_iou"] is None


def test_readme_building_blocks_exist_in_the_package():
    """The names the README's second Python example calls on ``diffseg_jax`` (``dj.``) are the package's."""
    import re

    import diffseg_jax

    code = _readme_python_blocks()[1]
    names = sorted(set(re.findall(r"\bdj\.([\w.]+)\(", code)))
    assert len(names) >= 8, names
    for name in names:
        obj = diffseg_jax
        for part in name.split("."):
            obj = getattr(obj, part, None)
        assert callable(obj), f"README calls dj.{name}, which diffseg_jax does not have"


def _main_fails(args, timeout=300):
    """``python -m diffseg_jax.main`` expected to fail: (return code, stdout + stderr)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "diffseg_jax.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out.returncode, out.stdout + out.stderr


@pytest.mark.slow
def test_fingerprint_mode_writes_the_report_of_the_configs_schedule(tmp_path, tfds_dir):
    """``--mode fingerprint`` with a command-line override: fingerprint.json is the library's report of the
    overridden config (T = 50), and its text is printed."""
    from diffseg_jax import adaptive, planning

    args = ["--config=configs/e2_synthetic.py:tiny", f"--config.data.data_dir={tfds_dir}"]
    log = _run([*args, f"--workdir={tmp_path}", "--mode=fingerprint", "--config.diffusion.num_timesteps=50"])
    written = json.loads((tmp_path / "fingerprint.json").read_text())
    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    config.diffusion.num_timesteps = 50
    expected = json.loads(json.dumps(adaptive.fingerprint_report(planning.resolve(config))))
    assert written == expected and written["num_timesteps"] == 50  # the override reached the report
    assert adaptive.report_text(written).splitlines()[0] in log


@pytest.mark.slow
def test_analyse_mode_writes_the_curves_of_the_runs_checkpoint(tmp_path, tfds_dir):
    """``--mode analyse`` on a run (a checkpoint at step 2): the curves of the trained network on the
    configured timestep grid, recorded at the checkpoint's step, and the forward process at the asked timesteps."""
    from diffseg_jax import checkpoints

    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    _, _, _, state = build.model_and_state(config, (32, 32, 3))
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(2, state.replace(step=state.step + 2), {})
    ckpt.close()
    args = [
        "--config=configs/e2_synthetic.py:tiny",
        f"--config.data.data_dir={tfds_dir}",
        f"--workdir={tmp_path}",
    ]
    _run([*args, "--mode=analyse", "--config.analysis.t_step=25", "--config.analysis.num_images=2"])
    rows = list(csv.DictReader(open(next((tmp_path / "analysis").glob("*.csv")))))
    curves = {}
    for r in rows:
        curves.setdefault(r["curve"], []).append(r)
    assert {"mask_error", "eps_loss"} <= set(curves)
    for name in ("mask_error", "eps_loss"):
        assert [int(r["t"]) for r in curves[name]] == [0, 25, 50, 75, 99] and {
            r["step"] for r in curves[name]
        } == {"2"}
    # A fresh network predicts ε = 0: its ε-loss is E[ε²] = 1 at every t (2 images x 1 draw of 32 x 32 pixels).
    np.testing.assert_allclose([float(r["value"]) for r in curves["eps_loss"]], 1.0, atol=0.1)


@pytest.mark.slow
def test_both_protocol_modes_run_through_main_and_refuse_the_other_experiment(tmp_path, tfds_dir):
    """``--mode e1_protocol`` / ``e2_protocol`` through ``diffseg_jax.main``, tiny: the selection's validations,
    the choice recorded and the retrained run; a protocol given the other experiment's config is refused
    before anything is trained, naming both."""
    common = [
        f"--config.data.data_dir={tfds_dir}",
        "--config.data.num_train=8",
        "--config.data.validation_fraction=0.5",  # fit 4 = 2 steps of 2
        "--config.train.batch_size=2",
        "--config.eval.enabled=false",
    ]
    e1, e2 = "--config=configs/e1_synthetic.py:tiny", "--config=configs/e2_synthetic.py:tiny"
    for config, mode in ((e1, "e2_protocol"), (e2, "e1_protocol")):
        code, out = _main_fails([config, *common, f"--workdir={tmp_path / 'refused'}", f"--mode={mode}"])
        other = "e1" if mode == "e2_protocol" else "e2"
        assert code == 1 and f"--mode {mode} needs an {mode[:2]} config; config.experiment='{other}'" in out
        assert f"--mode {other}_protocol" in out
    assert not (tmp_path / "refused" / "checkpoints").exists()
    _run(
        [e1, *common, f"--workdir={tmp_path / 'e1'}", "--mode=e1_protocol", "--config.protocol.max_epochs=2"]
    )
    _run(
        [e2, *common, f"--workdir={tmp_path / 'e2'}", "--mode=e2_protocol", "--config.train.num_steps=4",
         "--config.protocol.validate_every=2", "--config.protocol.ensemble_size=1", "--config.protocol.ddim_steps=1"]
    )  # fmt: skip
    for name, key in (("e1", "validation_loss"), ("e2", "validation_iou")):
        records = [json.loads(line) for line in open(tmp_path / name / "select" / "validation.jsonl")]
        assert [r["step"] for r in records] == [2, 4]
        scores = {r["step"]: r[key] for r in records}
        best = (min if name == "e1" else max)(sorted(scores), key=scores.get)
        summary = json.loads((tmp_path / name / f"{name}_protocol.json").read_text())
        assert summary["final_steps"] == best * 4 // 2  # as many epochs of all 8 images (4 steps an epoch)
        assert os.path.isdir(tmp_path / name / "checkpoints" / str(summary["final_steps"]))


def test_table1_eval_steps_evaluates_each_kept_step_with_each_sampler(tmp_path, monkeypatch):
    """table.eval_steps (issue 32): every listed step the run kept, with every sampler of table.eval_samplers,
    into learning_curve/step<S>_<sampler>/ with eval.step and the sampler set; a step beyond num_steps is left
    for a longer grid, one not kept is skipped, and evaluations already there are not redone."""
    import jax.numpy as jnp

    from configs import table1_synthetic
    from diffseg_jax import checkpoints, configlib, evaluate, table1
    from diffseg_jax.analysis import late_error

    folder = tmp_path / "cell"
    ckpt = checkpoints.Checkpointer(str(folder / "checkpoints"), max_to_keep=5)
    for step in (1000, 2000, 3000):
        ckpt.save(step, {"w": jnp.zeros(2)}, {"step": step})
    ckpt.wait()
    ckpt.close()
    grid = table1_synthetic.get_config()
    grid.table.eval_steps = (1000, 1500, 2000, 9000)
    grid.table.eval_samplers = ("ddpm", "ddim50")
    config = table1.cell_config(grid, "lesion", "ensemdiff", "e2")
    config.train.num_steps = 3000
    seen = []

    def fake_evaluate(c, workdir, out_dir=None, **kwargs):
        seen.append((c.eval.step, c.eval.sampler, c.eval.ddim_steps, os.path.relpath(out_dir, workdir)))
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            f.write("{}")

    def fake_point(c, workdir, step):  # the mask error at T - 1 of each evaluated step (E2/E3)
        seen.append((step, "mask_error", c.experiment))

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr(late_error, "write_point", fake_point)
    table1.evaluate_steps(grid, config, str(folder))
    assert seen == [
        (1000, "ddpm", 10, "learning_curve/step1000_ddpm"),
        (1000, "ddim", 50, "learning_curve/step1000_ddim50"),
        (1000, "mask_error", "e2"),
        (2000, "ddpm", 10, "learning_curve/step2000_ddpm"),
        (2000, "ddim", 50, "learning_curve/step2000_ddim50"),
        (2000, "mask_error", "e2"),
    ]
    assert config.eval.step == -1  # the cell's own config is not changed
    seen.clear()
    assert table1.evaluate_steps(grid, config, str(folder)) == [] and all(s[1] == "mask_error" for s in seen)
    grid.table.eval_samplers = ("euler",)
    with pytest.raises(configlib.ConfigError, match="'euler' is not a sampler.*ddim<K>"):
        table1.evaluate_steps(grid, config, str(folder))


@pytest.mark.slow
def test_table1_two_workers_write_the_same_table_as_one(tmp_path, tfds_dir):
    """``python -m diffseg_jax.table1 --workers 2`` on a 2-cell grid (E1 and E2 of one synthetic kind): each
    worker trains its cell (its log in workers/), and the parent's Table 1 and learning curves equal those of
    the same grid run by one process."""
    args = [
        "--config=configs/table1_synthetic.py",
        "--config.table.kinds=('lesion',)",
        "--config.table.models=('ensemdiff',)",
        f"--config.data.data_dir={tfds_dir}",
        "--config.data.num_train=16",
        "--config.data.num_test=4",
        "--config.train.num_steps=2",
        "--config.train.ckpt_every=2",
        "--config.eval.num_images=4",
        "--config.eval.ensemble_size=2",
        "--config.eval.member_chunk=2",
        "--config.eval.ddim_steps=2",
    ]
    tables = {}
    for workers in (2, 1):
        workdir = tmp_path / f"w{workers}"
        run_module("diffseg_jax.table1", *args, f"--workdir={workdir}", f"--workers={workers}")
        with open(workdir / "table1.csv", newline="") as f:
            tables[workers] = list(csv.DictReader(f))
    assert len(tables[1]) == 1 and tables[1][0]["ff_iou"] and tables[1][0]["diff_iou"]
    # Equal to float32 rounding: each process sums its own XLA:CPU reductions (one worker pinned to a core, the
    # single process threaded over both), so a bootstrap bound may differ in the 8th digit, never more.
    assert [r.keys() for r in tables[2]] == [r.keys() for r in tables[1]]
    for two, one in zip(tables[2], tables[1]):
        for key in one:
            if "time" in key:
                continue
            try:
                assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5, abs=1e-7), key
            except ValueError:  # a name, or '' where a cell has no value
                assert two[key] == one[key], key
    for i in range(2):
        text = (tmp_path / "w2" / "workers" / f"worker{i}of2.log").read_text()
        assert f"--shard={i}/2" in text and f"cell {i + 1}/2" in text and "Training ensemdiff" in text
    assert not (tmp_path / "w1" / "workers").exists()


def test_table1_stops_when_a_runs_training_stops_early(tmp_path, monkeypatch):
    """A cell whose training stops before train.num_steps (SIGTERM: the checkpoint is saved) is neither evaluated
    nor followed by its learning-curve points or the next runs: the grid exits naming the run and how to resume
    (before, it evaluated the half-trained model, went on, and a killed worker kept sampling)."""
    import types

    from configs import table1_synthetic
    from diffseg_jax import evaluate, table1, train

    grid = table1_synthetic.get_config()
    grid.table.kinds, grid.table.models, grid.table.experiments = ("lesion",), ("ensemdiff",), ("e2", "e1")
    calls = []
    monkeypatch.setattr(
        train, "train", lambda config, folder, **kw: calls.append("train") or types.SimpleNamespace(step=7)
    )
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: calls.append("evaluate"))
    monkeypatch.setattr(table1, "evaluate_steps", lambda *a, **kw: calls.append("evaluate_steps"))
    with pytest.raises(
        SystemExit, match=r"ensemdiff_e2 stopped before train.num_steps=\d+ .*Rerun the same command"
    ):
        table1.run(grid, str(tmp_path))
    assert calls == ["train"]  # no evaluation, no learning-curve points, no second run


def test_table1_worker_goes_on_after_a_failed_run_and_lists_it(tmp_path, monkeypatch):
    """A worker (run with shard (i, n), n > 1) whose run fails logs it, runs the rest of its share, lists the
    failed run in its JSON, exits non-zero and leaves the tables to the parent; one process (n = 1) stops at
    the failure as before."""
    import json as json_

    from configs import table1_synthetic
    from diffseg_jax import table1, workers

    grid = table1_synthetic.get_config()
    grid.table.kinds, grid.table.models, grid.table.seeds = ("lesion",), ("ensemdiff",), (0, 1)
    done = []

    def fake_cell(g, workdir, dataset, model, experiment, seed):
        if (experiment, seed) == ("e1", 0):
            raise RuntimeError("out of memory")
        done.append((experiment, seed))

    monkeypatch.setattr(table1, "run_cell", fake_cell)
    with pytest.raises(SystemExit, match=r"worker 0/2: 1 run\(s\) failed: \['lesion ensemdiff e1 seed 0'\]"):
        table1.run(grid, str(tmp_path), (0, 2))
    assert done == [("e2", 0)]  # its share: runs 0 and 2 of (e1 s0, e1 s1, e2 s0, e2 s1)
    _, failed = workers.worker_files(str(tmp_path), 0, 2)
    assert json_.loads(open(failed).read()) == ["lesion ensemdiff e1 seed 0"]
    assert table1.run(grid, str(tmp_path), (1, 2)) == [] and done[1:] == [("e1", 1), ("e2", 1)]
    assert json_.loads(open(workers.worker_files(str(tmp_path), 1, 2)[1]).read()) == []
    assert not (tmp_path / "table1.csv").exists()
    with pytest.raises(RuntimeError, match="out of memory"):
        table1.run(grid, str(tmp_path))


def test_the_grids_process_and_options_beyond_the_paper_reach_every_cell():
    """--config.diffusion.process=bernoulli, self-conditioning, recycling, Min-SNR, the DDIM η and the member
    output given to the grid are its cells' (they were dropped: a 'BerDiff' grid trained Gaussian x0 cells); each
    cell still takes its architecture's own scheme for the rest, and a BerDiff cell validates."""
    from configs import table1_synthetic

    from diffseg_jax import defaults, table1

    grid = table1_synthetic.get_config()
    grid.diffusion.process = "bernoulli"
    grid.objective.update(
        prediction="x0", self_condition=True, self_condition_prob=0.7, bernoulli_bce_weight=0.5
    )
    grid.eval.update(ddim_eta=0.0, member_output="hard")
    for model in ("ensemdiff", "segdiff", "medsegdiff"):
        cell = table1.cell_config(grid, "lesion", model, "e2")
        assert cell.diffusion.process == "bernoulli" and cell.objective.self_condition
        assert (cell.objective.self_condition_prob, cell.objective.bernoulli_bce_weight) == (0.7, 0.5)
        assert cell.eval.member_output == "hard"
        assert cell.diffusion.num_timesteps == defaults.get_config(f"{model},tiny").diffusion.num_timesteps
    validation.validate(table1.cell_config(grid, "lesion", "ensemdiff", "e2"))
    gaussian = table1_synthetic.get_config()
    gaussian.objective.update(recycle_prob=1.0, loss_weighting="min_snr", snr_gamma=3.0)
    gaussian.eval.ddim_eta = 1.0
    cell = table1.cell_config(gaussian, "lesion", "segdiff", "e2")
    assert (cell.objective.recycle_prob, cell.objective.loss_weighting, cell.objective.snr_gamma) == (
        1.0,
        "min_snr",
        3.0,
    )
    assert cell.eval.ddim_eta == 1.0 and cell.diffusion.process == "gaussian"
