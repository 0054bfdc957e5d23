"""Reading, checking, resizing and encoding the image and mask files of user-supplied datasets.

Pure NumPy/PIL, no tfds: the builders call these, and every failure is a :class:`DatasetFileError` that names the
file, what is wrong with it and how to fix it, so that a bad file stops a build before anything is registered.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DatasetFileError(ValueError):
    """A dataset file (or folder) that cannot be used; the message names the path and the fix."""


# Pillow refuses images of more than twice Image.MAX_IMAGE_PIXELS (89.5 M) pixels as possible decompression
# bombs; this environment variable sets the limit for trusted data (0: none), e.g. whole-slide tiles.
MAX_PIXELS_ENV = "DIFFSEG_JAX_MAX_IMAGE_PIXELS"


def _max_image_pixels() -> int | None:
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return Image.MAX_IMAGE_PIXELS
    try:
        return int(value) or None
    except ValueError:
        raise DatasetFileError(
            f"{MAX_PIXELS_ENV}={value!r} is not a whole number of pixels; set e.g. {MAX_PIXELS_ENV}=400000000, "
            "or 0 for no limit."
        ) from None


def open_array(path: str | os.PathLike, what: str = "image") -> tuple[np.ndarray, str]:
    """Decodes `path` fully (a truncated file fails here, not later) into (array, PIL mode)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, _max_image_pixels()
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L"):
                array = np.asarray(img, dtype=np.uint16)
            else:
                array = np.asarray(img)
    except Image.DecompressionBombError as e:
        raise DatasetFileError(
            f"The {what} file {path} is too large to open safely: {e} If you trust the file, raise the limit with "
            f"the environment variable {MAX_PIXELS_ENV} (a number of pixels above the one shown, or 0 for no "
            "limit); else shrink the image."
        ) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for damaged files
        raise DatasetFileError(
            f"Cannot read {what} file {path}: {e}. Replace it with an intact copy from the original release "
            "(a truncated download or a non-image file with an image suffix causes this)."
        ) from e
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return array, mode


# How images of more than 8 bits (and, on request, every image) become the 8-bit RGB that datasets store.
IMAGE_SCALINGS = ("auto", "high_byte", "percentile")
# Per-image percentiles mapped to 0 and 255 (CSBDeep's / StarDist's default normalisation of microscopy images).
PERCENTILES = (1.0, 99.8)


def percentile_stretch(array: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """uint8 of `array` with its `percentiles` (over all pixels and channels, so colours keep their balance)
    mapped to 0 and 255 and clipped; a constant image gives zeros, NaN the low end."""
    values = np.asarray(array, np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8)
    lo, hi = np.percentile(finite, percentiles)
    if hi <= lo:  # few distinct values: the full range instead
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    return np.round(np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def read_image(path: str | os.PathLike, scaling: str = "auto") -> np.ndarray:
    """An RGB uint8 (H, W, 3) image; grayscale is replicated, an alpha channel dropped.

    `scaling` says how intensities become 8 bits (`config.data.image_scaling`):

    - ``auto``: 8-bit images as stored; 16-bit, 32-bit integer and float images (microscopy, X-ray: their
      bit depth in use, e.g. 12 of 16, is not recorded in the file) by :func:`percentile_stretch` per image.
    - ``high_byte``: 8-bit as stored, 16-bit by their high byte (value // 256), the same mapping for every image;
      right only for images that use the whole 16-bit range (a 12-bit image becomes 0..15).
    - ``percentile``: every image, 8-bit too, by :func:`percentile_stretch`.
    """
    if scaling not in IMAGE_SCALINGS:
        raise ValueError(f"Unknown image scaling {scaling!r}; choose one of {IMAGE_SCALINGS}.")
    array, mode = open_array(path, "image")
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # palette and other colour spaces: PIL's RGB
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # drop alpha before scaling: it is not intensity
        array = array[..., : array.shape[-1] - 1]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype.kind not in "uif":
        raise DatasetFileError(
            f"Image {path} has shape {array.shape} and dtype {array.dtype} (mode {mode}); expected an RGB or "
            "grayscale image. Convert it to an RGB or grayscale PNG."
        )
    if array.dtype == np.uint8 and scaling != "percentile":
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16 and scaling == "high_byte":
        return (array >> 8).astype(np.uint8)
    if scaling == "high_byte":
        raise DatasetFileError(
            f"Image {path} is {array.dtype} (mode {mode}): config.data.image_scaling='high_byte' maps only 16-bit "
            "images. Use image_scaling='auto' (per-image percentiles) or convert the images to 8 or 16 bits."
        )
    return percentile_stretch(array)


def binarise_mask(array: np.ndarray, path: str | os.PathLike, threshold: float | None = None) -> np.ndarray:
    """A bool (H, W) foreground map from a decoded mask file.

    With `threshold` None the mask must hold at most two values (0/255, 0/1, or any two levels); the higher one is
    foreground, and a single level is foreground only if it is non-zero. With a `threshold`, foreground is
    `value > threshold`, for masks with intermediate levels (JPEG masks, soft labels). A colour mask whose three
    channels are equal is read as gray; other colour masks are rejected (their classes are ambiguous).
    """
    if array.ndim == 3:
        if array.shape[-1] == 4:
            array = array[..., :3]
        if array.shape[-1] == 1 or np.all(array == array[..., :1]):
            array = array[..., 0]
        else:
            raise DatasetFileError(
                f"Mask {path} is a colour image with differing channels; save the mask as a single-channel "
                "(grayscale or palette) image with one value for background and one for foreground."
            )
    if threshold is not None:
        return array > threshold
    levels = np.unique(array)
    if len(levels) > 2:
        shown = ", ".join(str(v) for v in levels[:6]) + (", ..." if len(levels) > 6 else "")
        raise DatasetFileError(
            f"Mask {path} has {len(levels)} distinct values ({shown}); a binary mask has at most two. "
            "Masks saved as JPEG or resized with interpolation have intermediate values: re-export the mask as "
            "a 0/255 PNG, or set config.data.mask_threshold (foreground = value > threshold)."
        )
    if len(levels) == 2:
        return array == levels[1]
    return np.full(array.shape, bool(levels.size and levels[0] != 0))


def read_mask(path: str | os.PathLike, threshold: float | None = None) -> np.ndarray:
    """A bool (H, W) mask from an image file (see :func:`binarise_mask` for the rules)."""
    array, mode = open_array(path, "mask")
    del mode  # palette masks keep their indices, which is what their classes are
    return binarise_mask(array, path, threshold)


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path, mask_path) -> None:
    """Raises if mask and image differ in height or width."""
    if image.shape[:2] != mask.shape[:2]:
        raise DatasetFileError(
            f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (W x H) but its image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]}; a mask must have its image's size. Replace the mask with the one "
            "from the same release, or resize it (nearest neighbour) to the image's size."
        )


def read_pair(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    threshold: float | None = None,
    scaling: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), mask bool (H, W)) at the files' size; the mask must have the image's size;
    `scaling` as :func:`read_image`."""
    image = read_image(image_path, scaling)
    mask = read_mask(mask_path, threshold)
    check_same_size(image, mask, image_path, mask_path)
    return image, mask


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(size, size) RGB uint8 by PIL bilinear with antialiasing, the aspect ratio ignored (torchvision `Resize`)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """(size, size) bool: 'bilinear' interpolates the 0/255 mask and re-thresholds at half (> 127), 'nearest' picks."""
    if mask.shape[:2] == (size, size):
        return mask
    filters = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    if method not in filters:
        raise ValueError(f"Unknown mask resize method {method!r}; use 'bilinear' or 'nearest'.")
    return (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), filters[method])) > 127
    )


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """(size, size) int32 instance labels by nearest-neighbour resizing (labels must not be interpolated)."""
    if labels.shape[:2] == (size, size):
        return labels.astype(np.int32)
    return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((size, size), Image.NEAREST)).astype(
        np.int32
    )


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W), (H, W, 1) or (H, W, 3) array (tfds would need TensorFlow for numpy)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """A bool mask as a 0/255 single-channel PNG."""
    return png_bytes(mask.astype(np.uint8) * 255)


def require_dir(path: str | os.PathLike | None, dataset: str, layout: str) -> pathlib.Path:
    """The existing, non-empty folder `path`, or an error that says what to download and how to lay it out."""
    if path is None or str(path) == "":
        raise DatasetFileError(
            f"config.data.manual_dir is not set, but dataset {dataset!r} is read from a folder on disk. Pass "
            f"--config.data.manual_dir=/path/to/folder, with this layout:\n{layout}"
        )
    folder = pathlib.Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        raise DatasetFileError(
            f"config.data.manual_dir={str(path)!r} is not a folder (for dataset {dataset!r}). Expected layout:\n"
            f"{layout}"
        )
    if not any(folder.iterdir()):
        raise DatasetFileError(f"config.data.manual_dir={str(path)!r} is empty. Expected layout:\n{layout}")
    return folder


def find_files(root: pathlib.Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[pathlib.Path]:
    """All files under `root` (recursively, hidden entries and macOS `__MACOSX` debris skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(tuple(suffixes)):
                found.append(pathlib.Path(dirpath) / name)
    return sorted(found)


def split_of(path: pathlib.Path, root: pathlib.Path) -> str | None:
    """'train' or 'test' from the folder names between `root` and `path` (case-insensitive), None if neither.

    The innermost folder that says 'train' (or 'training') or 'test' wins, so `data/test/train_x/...` is train.
    """
    for part in reversed(path.relative_to(root).parts[:-1]):
        lower = part.lower()
        if "train" in lower:
            return "train"
        if "test" in lower:
            return "test"
    return None


# The bytes at each end of a file that its identity hashes (see file_identity).
IDENTITY_BLOCK = 64 * 1024


def file_identity(path: pathlib.Path) -> str:
    """A fast content identity of one file: its size, modification time (ns) and a BLAKE2 hash of its first and
    last IDENTITY_BLOCK bytes (the whole file up to twice that, which covers masks of 256 x 256 px uncompressed).

    A file edited in place has a new modification time (editors, PIL, ``cp`` without ``-p``), and a small file's
    new bytes are hashed even when its time was kept; reading two blocks keeps this fast for a folder of large
    images. Copying the folder without keeping times (``cp -r``) makes a new identity: one rebuild.
    """
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(IDENTITY_BLOCK))
        if stat.st_size > IDENTITY_BLOCK:
            f.seek(max(IDENTITY_BLOCK, stat.st_size - IDENTITY_BLOCK))
            digest.update(f.read(IDENTITY_BLOCK))
    return f"{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}"


def fingerprint(paths: Iterable[pathlib.Path], root: pathlib.Path, *extra) -> str:
    """8 hex digits identifying the file set (relative names and :func:`file_identity`, i.e. the content) and
    `extra` settings.

    Part of a builder config's name: a changed folder, or a file changed in place at the same size (a corrected
    mask), builds a new dataset instead of reusing a stale one.
    """
    h = hashlib.sha1()
    for p in sorted(paths):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_identity(p)}\n".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()[:8]
