"""Shared fixtures: one tfds data dir and one XLA compilation cache per test session."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

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
