"""Shared fixtures: one tfds data dir and one XLA compilation cache per test session."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from diffseg_jax import state_dicts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # configs/ is imported as a package from the repository root.
    sys.path.insert(0, ROOT)

# Tests run tiny programs a few times: cheap XLA compilation matters more than fast code. Subprocesses
# inherit this (and the tests that set XLA_FLAGS append to it).
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

# Subprocesses inherit these: identical programs compile once per session. The pytest-xdist workers inherit the
# directory from the process that made it, which removes it at exit (a user's own cache directory is kept).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="diffseg_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A tfds data_dir shared by all tests (synthetic builds are cached in it)."""
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(config_file: str = "e2_synthetic", arg: str = "tiny", data_dir: str | None = None):
    """Loads ``configs/<config_file>.py:<arg>`` as the CLI would, with the test data dir."""
    import importlib

    module = importlib.import_module(f"configs.{config_file}")
    config = module.get_config(arg)
    if data_dir is not None:
        config.data.data_dir = data_dir
    return config


def run_module(module: str, *args: str, timeout: int = 900, cwd=ROOT) -> str:
    """``python -m <module> <args>`` from the repository root (or ``cwd``), as a user runs it; asserts it
    succeeds and returns its stdout and stderr (absl logs to stderr)."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def pytest_collection_modifyitems(config, items):
    """The slow tests first (the order is otherwise kept): the two xdist workers share out the long runs at the
    start and end on short tests, instead of one worker starting a two-minute run while the other has finished."""
    del config
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# ---------------------------------------------------------------- official-output fixtures (tests/data)
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _tuples(value):
    """JSON lists back to the tuples that model attributes take."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def official_fixture(name: str):
    """``(state_path, io, config)`` of ``tests/data/<name>_official*.npz`` (``make_official_fixtures.py``): the
    official state dict file, the inputs and official outputs, and our model's kwargs."""
    import json

    import numpy as np

    with np.load(os.path.join(DATA, f"{name}_official_io.npz")) as f:
        io = {k: f[k] for k in f.files}
    return os.path.join(DATA, f"{name}_official.npz"), io, _tuples(json.loads(str(io.pop("config"))))


def swap_two_tensors(state_path: str, out_dir) -> tuple[str, tuple[str, str]]:
    """A copy of the state dict file with two different conv kernels of the same shape swapped (of the largest
    such shape, the first pair in key order): a weight mapping that confuses two blocks. Returns the path and
    the two keys."""
    import numpy as np

    with np.load(state_path) as f:
        state = {k: f[k] for k in f.files}
    by_shape: dict = {}
    for key in sorted(state):
        if state[key].ndim == 4:
            by_shape.setdefault(state[key].shape, []).append(key)
    for shape in sorted(by_shape, key=lambda s: -int(np.prod(s))):
        keys = by_shape[shape]
        pairs = [
            (a, b)
            for i, a in enumerate(keys)
            for b in keys[i + 1 :]
            if not np.array_equal(state[a], state[b])
        ]
        if pairs:
            a, b = pairs[0]
            va, vb = state[a], state[b]
            for key in state:  # aliases of a tensor under other keys (nnU-Net's state dict has them) too
                if state[key].shape == shape and np.array_equal(state[key], va):
                    state[key] = vb
                elif state[key].shape == shape and np.array_equal(state[key], vb):
                    state[key] = va
            path = os.path.join(str(out_dir), "swapped.npz")
            np.savez(path, **state)
            return path, (a, b)
    raise AssertionError(f"{state_path} has no two different conv kernels of the same shape")


def rel_l2(ours, theirs) -> float:
    """||ours - theirs|| / ||theirs|| over all elements."""
    import numpy as np

    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def assert_matches_official(outputs: dict, io: dict, tol: float = 1e-5) -> None:
    """Every named output within ``tol`` relative L2 of the official one."""
    errors = {k: rel_l2(v, io[k]) for k, v in outputs.items()}
    assert all(e <= tol for e in errors.values()), f"relative L2 errors {errors} (tolerance {tol})"


def import_official(name: str, state_path: str, config: dict, io: dict):
    """``(model, variables)``: model ``name`` built from ``config``, the state dict file read and mapped in by
    ``diffseg_jax.convert`` as a user's import does (``load_state_dict`` + ``import_weights``, strict)."""
    import jax

    from diffseg_jax import models

    model = models.get_model(name, **config)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), io["x_t"], io["t"], io["image"]))
    return model, state_dicts.import_weights(model, dict(template), state_dicts.load_state_dict(state_path))


OFFICIAL_CASES = pytest.mark.parametrize(
    "corrupt", [False, True], ids=["official_weights", "two_tensors_swapped"]
)


def check_official(corrupt: bool, outputs_fn, name: str, tmp_path) -> None:
    """Our outputs (``outputs_fn(model, variables, io) -> {name: array}``) match the official ones in
    ``tests/data/<name>_official_io.npz`` to 1e-5 relative L2; with two same-shape tensors of the state dict
    swapped (``corrupt``) that check fails."""
    state_path, io, config = official_fixture(name)
    if corrupt:
        state_path, _ = swap_two_tensors(state_path, tmp_path)
    model, variables = import_official(name, state_path, config, io)
    outputs = outputs_fn(model, variables, io)
    if not corrupt:
        assert_matches_official(outputs, io)
    else:
        with pytest.raises(AssertionError, match="relative L2"):
            assert_matches_official(outputs, io)


def assert_metrics_are_the_ensembles(eval_dir) -> dict:
    """``metrics.json`` in ``eval_dir`` holds the pooled IoU and the all-foreground baseline of the ensembles in
    its ``ensemble.npz`` (mean at 0.5 against the masks), counted here; returns the metrics."""
    import json

    import numpy as np

    with np.load(os.path.join(str(eval_dir), "ensemble.npz")) as ensemble:
        pred, truth = ensemble["mean"] > 0.5, ensemble["mask"] > 0.5
    with open(os.path.join(str(eval_dir), "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics["iou_pooled"] == pytest.approx(
        (pred & truth).sum() / max((pred | truth).sum(), 1), abs=1e-6
    )
    assert metrics["num_images"] == len(truth)
    # An all-foreground mask's IoU with a truth is its foreground fraction (0 for an empty truth), per image.
    fractions = truth.reshape(len(truth), -1).mean(1)
    assert metrics["baseline_iou_all_foreground"] == pytest.approx(np.mean(fractions), abs=1e-6)
    return metrics


def write_metrics(root, name, dataset, model, experiment, iou, ece, pooling="pooled", **more):
    """A run folder ``root/name`` whose ``eval/metrics.json`` holds these scores (report and comparison tests)."""
    folder = root / name / "eval"
    folder.mkdir(parents=True)
    m = dict(dataset=dataset, model=model, experiment=experiment, iou=iou, ece=ece, pooling=pooling, **more)
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder.parent
