"""The PyTorch checkpoint reader: torch.save's zip format read without torch, and pickles of anything but tensors
refused before they run."""

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from diffseg_jax import state_dicts, torchfile
from diffseg_jax.data import files


def _body(obj) -> bytes:
    """The opcodes of a primitive (str, int, tuple of ints) without the protocol header and STOP."""
    data = pickle.dumps(obj, protocol=2)
    return data[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
_STORAGE_NAMES = {v: k for k, v in torchfile.STORAGE_DTYPES.items() if k != "UntypedStorage"}


def _torch_save_like(path, tensors, storages, wrap=False):
    """A file in torch.save's zip format (torch/serialization.py ``_save``, pickle protocol 2), written opcode by
    opcode: ``tensors`` {name: (storage key, offset, size, stride)} over ``storages`` {key: 1-D array}; the
    OrderedDict carries ``_metadata`` (set by BUILD) as ``Module.state_dict()``'s does; ``wrap`` puts it under
    ``{'state_dict': ...}`` as training checkpoints do."""
    out = b"\x80\x02"
    if wrap:
        out += b"}" + _body("state_dict")
    out += _ORDERED_DICT + b"("
    for name, (key, offset, size, stride) in tensors.items():
        storage = storages[key]
        out += _body(name) + _global("torch._utils", "_rebuild_tensor_v2") + b"("
        out += b"(" + _body("storage") + _global("torch", _STORAGE_NAMES[storage.dtype])
        out += _body(key) + _body("cpu") + _body(len(storage)) + b"tQ"  # persistent id -> BINPERSID
        out += _body(offset) + _body(tuple(size)) + _body(tuple(stride)) + b"\x89" + _ORDERED_DICT + b"tR"
    out += b"u"  # SETITEMS
    out += b"}" + _body("_metadata") + _ORDERED_DICT + b"sb"  # BUILD: state_dict._metadata
    if wrap:
        out += b"s"
    out += b"."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", out)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3")
        for key, storage in storages.items():
            z.writestr(f"archive/data/{key}", storage.astype(storage.dtype.newbyteorder("<")).tobytes())
    return path


def test_zip_checkpoints_read_views_dtypes_and_wrappers_without_torch(tmp_path):
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(30).astype(np.float32)
    half = rng.standard_normal(6).astype(np.float16)
    bf16 = rng.standard_normal(4).astype(ml_dtypes.bfloat16)
    storages = {"0": shared, "1": half, "2": bf16, "3": np.array([7], np.int64)}
    tensors = {
        "w": ("0", 0, (4, 5), (5, 1)),  # row-major
        "w_t": ("0", 0, (5, 4), (1, 5)),  # its transpose, sharing the storage
        "tail": ("0", 20, (2, 3), (3, 1)),  # a view at an offset
        "h": ("1", 0, (2, 3), (3, 1)),
        "b": ("2", 0, (4,), (1,)),
        "num_batches_tracked": ("3", 0, (), ()),
    }
    for wrap in (False, True):
        path = _torch_save_like(tmp_path / f"sd{wrap}.bin", tensors, storages, wrap=wrap)
        sd = state_dicts.load_state_dict(str(path))
        assert list(sd) == list(tensors)
        w = shared[:20].reshape(4, 5)
        np.testing.assert_array_equal(sd["w"], w)
        np.testing.assert_array_equal(sd["w_t"], w.T)
        np.testing.assert_array_equal(sd["tail"], shared[20:26].reshape(2, 3))
        np.testing.assert_array_equal(sd["h"], half.reshape(2, 3).astype(np.float32))
        np.testing.assert_array_equal(sd["b"], bf16.astype(np.float32))
        assert sd["num_batches_tracked"] == 7 and sd["w"].dtype == np.float32


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_pickle_naming_anything_but_tensors_is_refused_before_it_runs(tmp_path, container):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"weight": _Exploit(marker)}, protocol=2)
    path = tmp_path / "model.bin"
    if container == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
            z.writestr("archive/byteorder", "little")
    else:
        path.write_bytes(payload)
    torch_safe = False
    try:
        import torch

        torch_safe = torchfile.torch_version_is_safe(torch.__version__)
    except ImportError:
        pass
    expected = (
        r"model\.bin is not a PyTorch state dict: it asks to run (os|posix)\.system.*refused"
        if container == "zip"
        else (r"model\.bin is not a PyTorch state dict" if torch_safe else r"legacy .*torch>=2\.6")
    )
    with pytest.raises(files.DatasetFileError, match=expected):
        state_dicts.load_state_dict(str(path))
    assert not marker.exists()  # nothing in the file ran


def test_malformed_storages_and_views_are_refused(tmp_path):
    storages = {"0": np.arange(6, dtype=np.float32)}
    path = _torch_save_like(tmp_path / "past.bin", {"w": ("0", 2, (2, 3), (3, 1))}, storages)
    with pytest.raises(files.DatasetFileError, match="reaches past its storage of 6 elements"):
        state_dicts.load_state_dict(str(path))
    # A rebuild call whose storage is no storage (here a string): refused, not an AttributeError.
    pickled = b"\x80\x02" + _ORDERED_DICT + b"(" + _body("w") + _global("torch._utils", "_rebuild_tensor_v2")
    pickled += b"(" + _body("abc") + _body(0) + _body((1,)) + _body((1,)) + b"tRu."
    with zipfile.ZipFile(tmp_path / "str.bin", "w") as z:
        z.writestr("archive/data.pkl", pickled)
    with pytest.raises(files.DatasetFileError, match="rebuilt from str, not a tensor storage"):
        state_dicts.load_state_dict(str(tmp_path / "str.bin"))
    with zipfile.ZipFile(tmp_path / "nopickle.bin", "w") as z:
        z.writestr("weights/other.txt", "x")
    with pytest.raises(files.DatasetFileError, match="zip archive without a data.pkl"):
        state_dicts.load_state_dict(str(tmp_path / "nopickle.bin"))


def test_only_torch_versions_with_a_real_weights_only_restriction_are_used():
    assert not torchfile.torch_version_is_safe("1.13.1")
    assert not torchfile.torch_version_is_safe("2.5.1+cu124")
    assert torchfile.torch_version_is_safe("2.6.0+cpu")
    assert torchfile.torch_version_is_safe("2.10.0")
