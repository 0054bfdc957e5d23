"""model.pretrained through huggingface_hub: a repo id read from the library's cache under HF_HUB_OFFLINE=1
(revision pinning, safetensors before pytorch_model.bin), local files as they are, and the no-network message."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from diffseg_jax import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex commit, as the Hub's
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def populate_hf_cache(
    cache: pathlib.Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, ref="main"
):
    """Writes ``files`` into a huggingface_hub cache in the library's layout: ``models--<owner>--<name>/`` with
    ``blobs/<sha256>``, ``refs/<ref>`` holding the commit and ``snapshots/<commit>/<file>`` linking to the blob."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    if ref is not None:
        (repo / "refs" / ref).write_text(commit)
    for name, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        (repo / "blobs" / digest).write_bytes(content)
        (repo / "snapshots" / commit / name).symlink_to(os.path.join("..", "..", "blobs", digest))
    return repo


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


_CHILD = """
import json, sys
from diffseg_jax import convert, hub, state_dicts
out = {}
for name, spec, revision in json.loads(sys.argv[1]):
    try:
        path = hub.resolve(spec, revision)
        out[name] = {"file": path.rsplit("/", 3)[-3:], "sum": float(sum(v.sum() for v in state_dicts.load_state_dict(path).values()))}
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""


def test_repo_ids_load_offline_from_the_hub_cache_pinned_and_safetensors_first(tmp_path):
    cache = tmp_path / "hub"
    new = {"w": np.full((2, 3), 2.0, np.float32)}
    old = {"w": np.full((2, 3), 1.0, np.float32)}
    populate_hf_cache(cache, "acme/mit-tiny", {"model.safetensors": _safetensors(new)}, COMMIT)
    populate_hf_cache(cache, "acme/mit-tiny", {"model.safetensors": _safetensors(old)}, OLD_COMMIT, ref=None)
    # A repo with only a PyTorch file (as some Hub repos): the restricted reader of test_torchfile reads it.
    from test_torchfile import _torch_save_like

    bin_path = _torch_save_like(
        tmp_path / "pytorch_model.bin", {"w": ("0", 0, (3,), (1,))}, {"0": np.full(3, 5.0, np.float32)}
    )
    populate_hf_cache(cache, "acme/bin-only", {"pytorch_model.bin": bin_path.read_bytes()})
    local = tmp_path / "local.safetensors"
    local.write_bytes(_safetensors({"w": np.full(4, 3.0, np.float32)}))
    cases = [
        ("main", "acme/mit-tiny", None),
        ("pinned", "acme/mit-tiny", OLD_COMMIT),
        ("bin", "acme/bin-only", None),
        ("local", str(local), None),
        ("absent", "nvidia/mit-b3", None),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["main"] == {"file": ["snapshots", COMMIT, "model.safetensors"], "sum": 12.0}
    assert out["pinned"] == {"file": ["snapshots", OLD_COMMIT, "model.safetensors"], "sum": 6.0}
    assert out["bin"] == {"file": ["snapshots", COMMIT, "pytorch_model.bin"], "sum": 15.0}
    assert out["local"]["sum"] == 12.0
    error = out["absent"]["error"]
    assert error.startswith("HubUnavailableError: model.pretrained='nvidia/mit-b3': HF_HUB_OFFLINE is set")
    assert (
        "--config.model.pretrained=/path/to/model.safetensors" in error
        and "hf download nvidia/mit-b3" in error
    )


def test_a_spec_that_is_neither_file_nor_repo_id_is_named(tmp_path):
    assert hub.is_repo_id("nvidia/mit-b3") and not hub.is_repo_id(str(tmp_path / "no" / "such.bin"))
    with pytest.raises(
        FileNotFoundError, match=r"model.pretrained='.*such\.bin' is neither an existing file"
    ):
        hub.resolve(str(tmp_path / "no" / "such.bin"))
