"""The Colab notebooks (colab/*.ipynb): stored without outputs, using the package's API only, and run top to bottom
at the test suite's scale: the cell after the one tagged ``parameters`` sets ``TINY = True`` (as papermill injects
parameters) and nbclient executes every cell in a fresh python3 kernel, in a temporary working directory."""

import ast
import csv
import glob
import json
import os
import sys

import nbformat
import numpy as np
import pytest
from conftest import ROOT

COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB, "*.ipynb")))
# What a notebook may import: the package, its configs, and what the package itself depends on or a notebook shows
# results with (plus the standard library).
ALLOWED_IMPORTS = {"diffseg_jax", "configs", "jax", "numpy", "matplotlib", "absl", "IPython", "google"}


def _code(cell) -> str:
    """A code cell's source as Python: IPython magics (``%matplotlib inline``) dropped."""
    return "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))


def test_the_three_notebooks_exist():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert names >= {"quickstart.ipynb", "reproduce_table1.ipynb", "fingerprints.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_clean_and_uses_the_public_api(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:  # outputs cleared in the repository
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and nb.cells[tagged[0]].cell_type == "code"
    assert "TINY = False" in nb.cells[tagged[0]].source
    stdlib = set(sys.stdlib_module_names)
    for cell in code:
        tree = ast.parse(_code(cell))
        for node in ast.walk(tree):
            # No function or class of its own: a notebook calls the package, it does not copy it.
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), (
                f"{os.path.basename(path)} defines code of its own: {ast.unparse(node)[:80]}"
            )
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in ALLOWED_IMPORTS or top in stdlib, f"{os.path.basename(path)} imports {name}"


def run_notebook(name: str, cwd, monkeypatch, **parameters):
    """Executes ``colab/<name>`` in ``cwd`` with ``TINY = True`` and ``parameters`` set after its parameters cell;
    returns the executed notebook. The kernel imports diffseg_jax and configs from this checkout."""
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    values = {"TINY": True, **parameters}
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def _outputs(nb, output_type: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == output_type]


def _text(nb) -> str:
    parts = [o.get("text", "") for o in _outputs(nb, "stream")]
    parts += [o.get("data", {}).get("text/plain", "") for o in _outputs(nb, "execute_result")]
    parts += [o.get("data", {}).get("text/markdown", "") for o in _outputs(nb, "display_data")]
    return "\n".join(parts)


def _images(nb) -> int:
    return sum(
        "image/png" in o.get("data", {}) for t in ("display_data", "execute_result") for o in _outputs(nb, t)
    )


@pytest.mark.slow
def test_quickstart_notebook_trains_samples_and_scores(tmp_path, tfds_dir, monkeypatch):
    nb = run_notebook("quickstart.ipynb", tmp_path, monkeypatch, DATA_DIR=tfds_dir)
    workdir = tmp_path / "runs" / "quickstart"
    text = _text(nb)
    assert "CpuDevice" in text and "step 4 after" in text
    ours = json.loads((workdir / "notebook" / "metrics.json").read_text())
    for key in ("iou", "iou_per_image", "dice", "ece", "ece_per_image", "mean_std"):
        assert 0.0 <= ours[key] <= 1.0, (key, ours[key])
    # The notebook's own sampling and the one-call evaluation draw the same ensembles.
    theirs = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert theirs["step"] == 4 and theirs["ensemble_size"] == 2
    assert ours["iou"] == pytest.approx(theirs["iou"], abs=1e-6)
    assert ours["ece"] == pytest.approx(theirs["ece"], abs=1e-6)
    assert (workdir / "notebook" / "ensemble.png").stat().st_size > 1000
    # Two test images segmented as image files: masks and maps at their size, the rows printed.
    with np.load(workdir / "predict" / "predictions.npz") as pred:
        assert pred["mean"].shape == (2, 32, 32) and pred["original_size"].tolist() == [[32, 32]] * 2
    assert text.count("32x32 px, foreground") == 2
    assert _images(nb) >= 5  # examples, loss curve, Fig. 1, reliability diagram, the predictions


@pytest.mark.slow
def test_fingerprints_notebook_draws_the_curves(tmp_path, tfds_dir, monkeypatch):
    # One trained run (the quickstart's E2 model, compiled already when the quickstart test ran first).
    nb = run_notebook(
        "fingerprints.ipynb",
        tmp_path,
        monkeypatch,
        DATA_DIR=tfds_dir,
        TRAINED_KINDS=("lesion",),
        EXPERIMENTS=("e2",),
    )
    workdir = tmp_path / "runs" / "fingerprints"
    text = _text(nb)
    for kind in ("lesion", "nuclei", "clusters"):  # the model-free fingerprint of each dataset, in seconds
        assert f"{kind} " in text and "t_half" in text
    assert (workdir / "forward.png").stat().st_size > 1000
    analysis = workdir / "lesion" / "e2" / "analysis"
    with open(analysis / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["curve"] for r in rows} == {"mask_error", "eps_loss"}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["curve"] == "mask_error")
    assert (analysis / "model_free.csv").exists() and (workdir / "curves.png").stat().st_size > 1000
    table = (workdir / "fig4" / "fingerprints.md").read_text()
    assert (
        "| synthetic-lesion | ensemdiff | e2 |" in table
        and "| synthetic-lesion | model-free | none |" in table
    )
    assert (workdir / "fig4" / "fingerprints.png").stat().st_size > 1000
    # The adapted schedules: never less noise at T than the base schedule, converged, weights of mean 1.
    adapted = json.loads((workdir / "adapted_schedules.json").read_text())
    assert sorted(adapted) == ["clusters", "lesion", "nuclei"]
    for report in adapted.values():
        assert report["alpha_bar_T"] <= report["base_alpha_bar_T"] and report["converged"]
        assert report["weights_mean"] == pytest.approx(1.0) and report["weights_min"] > 0.0
    assert _images(nb) >= 5  # forward process, model-free curves, Fig. 3, Fig. 4, the adapted schedules


@pytest.mark.slow
def test_reproduce_table1_notebook_builds_the_table(tmp_path, tfds_dir, monkeypatch):
    # TINY substitutes the synthetic lesions for ISIC 2016; one architecture, both experiments: one row of Table 1.
    params = dict(DATA_DIR=tfds_dir, DATASETS=("isic",), MODELS=("ensemdiff",))
    nb = run_notebook("reproduce_table1.ipynb", tmp_path, monkeypatch, **params)
    runs = tmp_path / "runs" / "reproduce_table1" / "runs_tiny"
    text = _text(nb)
    assert (
        "ISBI2016_ISIC_Part1_Training_Data" in text and "substituting synthetic data: lesion for isic" in text
    )
    with open(runs / "table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["method"]) for r in rows] == [("synthetic-lesion", "ensemdiff")]
    row = rows[0]
    assert 0.0 <= float(row["ff_iou"]) <= 100.0 and 0.0 <= float(row["diff_iou"]) <= 100.0
    assert 0.0 <= float(row["ff_ece"]) <= 1.0 and 0.0 <= float(row["diff_ece"]) <= 1.0
    assert float(row["delta_iou"]) == pytest.approx(float(row["diff_iou"]) - float(row["ff_iou"]), abs=1e-6)
    assert (runs / "isic" / "ensemdiff_e1" / "e1_protocol.json").exists()  # E1 through the paper's protocol
    assert json.loads((runs / "isic" / "ensemdiff_e2" / "eval" / "metrics.json").read_text())["step"] == 4
    assert (runs / "table1.md").exists() and (runs / "table1.tex").exists()
    assert (runs / "reliability.png").stat().st_size > 1000
    assert _images(nb) == 2  # the reliability diagrams, then Fig. 1: E2 next to E1
    # Run all again, as after a runtime reset, with a second seed for E2: the finished cell is skipped, a repeat
    # trains beside it, and the table gives the mean and standard deviation of the two (E1 still one run).
    params.update(SEEDS=(0, 1), EXPERIMENTS=("e2",))
    nb = run_notebook("reproduce_table1.ipynb", tmp_path, monkeypatch, **params)
    assert _text(nb).count("done already") == 1 and "| synthetic-lesion | EnsemDiff |" in _text(nb)
    with open(runs / "table1.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    ious = [
        json.loads((runs / "isic" / f"ensemdiff_e2{s}" / "eval" / "metrics.json").read_text())["iou"]
        for s in ("", "_seed1")
    ]
    assert (
        row["diff_n"] == "2" and row["ff_n"] == "1" and float(row["diff_iou"]) == pytest.approx(np.mean(ious))
    )
    assert json.loads((runs / "isic" / "ensemdiff_e2_seed1" / "config.json").read_text())["seed"] == 1
