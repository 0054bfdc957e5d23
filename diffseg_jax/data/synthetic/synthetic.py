"""Synthetic segmentation datasets with the fingerprints of the paper's three datasets (no download, no TensorFlow).

The generators are pure NumPy (`make_example`, `generate`), so the fingerprints can be tested without tfds; the
`DiffsegSynthetic` builder writes them to array_record files so that they flow through the same input pipeline as the
real datasets.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

KINDS = ("lesion", "nuclei", "clusters")
SPLITS = ("train", "test")
# Fixed codes (not hash()) so that the RNG stream of a split never changes between runs or Python versions.
_SPLIT_CODES = {"train": 0, "test": 1}


def check_kind(kind: str) -> str:
    """Returns `kind` if it names a synthetic fingerprint, else raises a ValueError that says how to fix it."""
    if kind not in KINDS:
        raise ValueError(
            f"Unknown synthetic dataset kind {kind!r}; set config.data.kind to one of {list(KINDS)} "
            "('lesion' ~ ISIC16, 'nuclei' ~ MoNuSeg, 'clusters' ~ HER2)."
        )
    return kind


def example_id(split: str, index: int) -> str:
    """The id of example `index` of `split`; zero-padded so that sorting ids sorts by index."""
    return f"{split}_{index:06d}"


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG that fully determines example (seed, split, index); splits use disjoint streams."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"Unknown split {split!r}; use one of {list(_SPLIT_CODES)}.")
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])


# ----------------------------------------------------------------------------------------------------------------
# Smooth noise and rasterisation helpers.


@functools.lru_cache(maxsize=64)
def _interp_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells + 1) matrix that upsamples a lattice of cells + 1 knots to `size` pixels with smoothstep weights."""
    x = (np.arange(size) + 0.5) / size * cells
    i0 = np.minimum(np.floor(x).astype(int), cells - 1)
    t = x - i0
    w = t * t * (3.0 - 2.0 * t)  # smoothstep: no visible creases at the knots, unlike plain bilinear
    m = np.zeros((size, cells + 1))
    m[np.arange(size), i0] = 1.0 - w
    m[np.arange(size), i0 + 1] = w
    m.setflags(write=False)
    return m


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise of unit std on a size x size grid with about `cells` oscillations across the image."""
    cells = int(np.clip(cells, 1, size))
    m = _interp_matrix(cells, size)
    field = m @ rng.standard_normal((cells + 1, cells + 1)) @ m.T
    return (field - field.mean()) / (field.std() + 1e-8)


def _fractal_noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Sum of `octaves` value-noise layers, each twice as fine and half as strong; unit std."""
    field = sum(0.5**o * _smooth_noise(rng, size, cells * 2**o) for o in range(octaves))
    return (field - field.mean()) / (field.std() + 1e-8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size), in pixels."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c, indexing="ij")


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of a 2-D array with edge padding (used for soft object borders in the image)."""
    if radius <= 0:
        return a
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis)
        a = (
            np.take(c, np.arange(k, c.shape[axis]), axis=axis)
            - np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
        ) / k
    return a


def _ellipses(rng: np.random.Generator, size: int, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of randomly oriented ellipses (axis ratio 0.6-1) with the given centres (n, 2) and radii (n,); bool."""
    mask = np.zeros((size, size), bool)
    n = len(radii)
    if n == 0:
        return mask
    theta = rng.uniform(0.0, np.pi, n)[:, None, None]
    ratio = rng.uniform(0.6, 1.0, n)[:, None, None]
    # Rasterise every ellipse in its own window (long axis <= r / sqrt(0.6)) instead of over the whole image.
    half = int(np.ceil(radii.max() / np.sqrt(0.6))) + 1
    offsets = np.arange(-half, half + 1)
    ys = np.floor(centres[:, 0]).astype(int)[:, None, None] + offsets[None, :, None]
    xs = np.floor(centres[:, 1]).astype(int)[:, None, None] + offsets[None, None, :]
    dy = ys + 0.5 - centres[:, 0, None, None]
    dx = xs + 0.5 - centres[:, 1, None, None]
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    # The long axis is r / sqrt(ratio) and the short one r * sqrt(ratio): the area stays pi r^2.
    r = radii[:, None, None]
    inside = (u * np.sqrt(ratio) / r) ** 2 + (v / (np.sqrt(ratio) * r)) ** 2 < 1.0
    inside &= (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    ys, xs = np.broadcast_arrays(ys, xs)
    mask[ys[inside], xs[inside]] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------
# The three mask fingerprints.


def _lesion_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One large, roughly central, smooth irregular blob; returns (mask, normalised radius map rho)."""
    area = rng.uniform(0.18, 0.40) * size * size
    ratio = rng.uniform(0.65, 1.0)
    a = np.sqrt(area / (np.pi * ratio))
    b = ratio * a
    cy, cx = size / 2 + np.clip(rng.normal(0.0, 0.06 * size, 2), -0.12 * size, 0.12 * size)
    theta = rng.uniform(0.0, np.pi)
    yy, xx = _grid(size)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    phi = np.arctan2(v / b, u / a)
    # Low-frequency radial perturbation: harmonics 2-5 with decaying amplitude keep the border smooth and the region
    # star-shaped about its centre (so it stays one connected component, also after clipping to the image).
    boundary = np.ones_like(rho)
    for k in range(2, 6):
        boundary += rng.uniform(0.0, 0.16 / (k - 1)) * np.cos(k * phi + rng.uniform(0.0, 2 * np.pi))
    rel = rho / boundary
    return rel < 1.0, rel


def _nuclei_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Many small round/elliptical objects (18-38, radius 2-4 px at 64 px), allowed to touch but not to pile up."""
    scale = size / 64.0
    n_target = int(rng.integers(18, 39))
    # Greedy rejection over a fixed pool of candidates: deterministic and bounded in time.
    pool = 4 * n_target
    cand_r = rng.uniform(2.0, 4.0, pool) * scale
    cand_c = rng.uniform(0.0, size, (pool, 2))
    dist = np.sqrt(((cand_c[:, None] - cand_c[None]) ** 2).sum(-1))
    accepted: list[int] = []
    for i in range(pool):
        if len(accepted) == n_target:
            break
        if not accepted or np.all(dist[i, accepted] >= 0.85 * (cand_r[i] + cand_r[accepted])):
            accepted.append(i)
    return _ellipses(rng, size, cand_c[accepted], cand_r[accepted])


def _clusters_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Tumour-like clusters of varying size: ~20% empty images, else a coverage of 3-85% (often a majority)."""
    if rng.uniform() < 0.2:
        return np.zeros((size, size), bool)
    coverage = rng.uniform(0.03, 0.85)
    # A low-frequency field gives a few large blobs; the finer octave makes lumpy, cell-cluster-like borders. The
    # quantile threshold sets the covered fraction exactly, so the superlevel set is a union of blobs of that area.
    field = _smooth_noise(rng, size, int(rng.integers(2, 5))) + 0.35 * _smooth_noise(rng, size, 10)
    return field > np.quantile(field, 1.0 - coverage)


# ----------------------------------------------------------------------------------------------------------------
# Rendering: colour, texture and noise, with inside/outside distributions that overlap.

_PALETTES = {  # (background RGB, foreground RGB) in [0, 1]
    "lesion": ((0.87, 0.68, 0.58), (0.48, 0.31, 0.24)),  # skin and pigmented lesion (dermoscopy)
    "nuclei": ((0.91, 0.68, 0.80), (0.42, 0.27, 0.58)),  # eosin-pink tissue and haematoxylin-purple nuclei
    "clusters": ((0.87, 0.87, 0.91), (0.64, 0.46, 0.32)),  # pale counterstain and brown DAB-stained tumour
}


def _render(kind: str, mask: np.ndarray, rng: np.random.Generator, rel: np.ndarray | None) -> np.ndarray:
    """Paints an RGB uint8 image for `mask`: per-image colours, shading, texture that differs inside, pixel noise."""
    size = mask.shape[0]
    bg0, fg0 = (np.asarray(c) for c in _PALETTES[kind])
    bg = np.clip(bg0 + rng.normal(0.0, 0.04, 3), 0.0, 1.0)
    fg = np.clip(fg0 + rng.normal(0.0, 0.05, 3), 0.0, 1.0)
    fg = bg + rng.uniform(0.45, 1.0) * (
        fg - bg
    )  # per-image contrast: weak images overlap the background strongly

    # Texture: the background is smooth at a coarse scale, the foreground granular at a fine scale (chromatin,
    # pigment network, stained membranes), so texture separates the classes where the colours overlap.
    coarse = _fractal_noise(rng, size, max(2, size // 8), octaves=2)
    fine = _fractal_noise(rng, size, max(2, size // 3), octaves=2)
    tex_out, tex_in = rng.uniform(0.03, 0.06), rng.uniform(0.10, 0.18)
    alpha = _box_blur(mask.astype(np.float64), max(1, size // 64))[..., None]
    fg_map = fg * (1.0 + tex_in * fine[..., None])
    if rel is not None:  # lesions are darker towards their centre and fade into the skin at the border
        fg_map = bg + (fg_map - bg) * (0.7 + 0.5 * np.clip(1.0 - rel, 0.0, 1.0))[..., None]
    bg_map = bg * (1.0 + tex_out * coarse[..., None])
    if kind == "clusters":  # scattered counterstained stroma nuclei outside the tumour: dark distractors
        n = int(rng.integers(5, 25))
        dots = _ellipses(rng, size, rng.uniform(0.0, size, (n, 2)), rng.uniform(1.0, 2.0, n) * size / 64.0)
        dots &= ~mask
        bg_map = np.where(dots[..., None], bg_map * np.array([0.6, 0.65, 0.85]), bg_map)
    img = alpha * fg_map + (1.0 - alpha) * bg_map

    shade = 1.0 + rng.uniform(0.04, 0.12) * _smooth_noise(rng, size, 2)  # uneven illumination / staining
    if kind == "lesion" and rng.uniform() < 0.5:  # dermoscope vignetting: dark corners
        yy, xx = _grid(size)
        r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 2) ** 2
        shade = shade * (1.0 - rng.uniform(0.1, 0.35) * np.clip(r2 - 0.8, 0.0, None))
    img = img * shade[..., None] + rng.normal(0.0, rng.uniform(0.02, 0.05), img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_example(kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic example: (image uint8 (size, size, 3), mask bool (size, size)), drawn from `rng`."""
    check_kind(kind)
    rel = None
    if kind == "lesion":
        mask, rel = _lesion_mask(rng, size)
    elif kind == "nuclei":
        mask = _nuclei_mask(rng, size)
    else:
        mask = _clusters_mask(rng, size)
    return _render(kind, mask, rng, rel), mask


def generate(kind: str, size: int, seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Example `index` of `split` for dataset `seed`: deterministic in (kind, size, seed, split, index)."""
    return make_example(kind, size, example_rng(seed, split, index))


# ----------------------------------------------------------------------------------------------------------------
# The tfds builder.


def _png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 HxW or HxWx3 array (tfds encodes numpy with TensorFlow, so we do it here)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """A synthetic dataset variant; the name is derived from the fields so that variants never share a cache."""

    kind: str = "lesion"
    image_size: int = 64
    num_train: int = 512
    num_test: int = 64
    seed: int = 0

    @classmethod
    def make(
        cls,
        kind: str = "lesion",
        image_size: int = 64,
        num_train: int = 512,
        num_test: int = 64,
        seed: int = 0,
    ) -> "SyntheticConfig":
        """The config for these field values, named e.g. `lesion_64_n512x64_s0`."""
        check_kind(kind)
        name = f"{kind}_{int(image_size)}_n{int(num_train)}x{int(num_test)}_s{int(seed)}"
        return cls(
            name=name,
            kind=kind,
            image_size=int(image_size),
            num_train=int(num_train),
            num_test=int(num_test),
            seed=int(seed),
            description=f"{kind} fingerprint, {image_size}px, {num_train} train / {num_test} test, seed {seed}",
        )


class DiffsegSynthetic(tfds.core.GeneratorBasedBuilder):
    """Synthetic segmentation data with the fingerprints of the paper's datasets (Öttl et al., sections 3.1 and 4.3).

    * `lesion` mimics ISIC16 (dermoscopy, lesion segmentation): exactly one large, roughly central, smooth irregular
      blob per image (a jittered ellipse with a low-frequency radial perturbation), 18-40% of the image area.
    * `nuclei` mimics MoNuSeg (H&E nuclei): 18-38 small round/elliptical objects of radius 2-4 px at 64 px (scaled
      with the image size), possibly touching, covering about 10-25% of the image.
    * `clusters` mimics the private HER2 dataset (tumour in HER2-stained biopsies): clusters of varying size; about
      20% of the images are empty, the others cover 3-85% of the image, often a majority.

    Images are RGB with per-image colours, smooth shading, a texture that is rougher inside the mask than outside,
    and pixel noise, so that masks are learnable but not recoverable by a single intensity threshold. Every example
    is a deterministic function of (seed, split, index); train and test use disjoint RNG streams. Masks are stored as
    0/255 single-channel PNGs. Build with `download_and_prepare(file_format='array_record')` and read back with
    `as_data_source()`.
    """

    name = "diffseg_synthetic"
    # tfds' default lookup of this file needs the `importlib_resources` backport (an etils[epath] extra that a plain
    # `pip install tensorflow-datasets` may lack); the file is known, so say it directly.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Lesion, nuclei and clusters fingerprints."}
    BUILDER_CONFIGS = [SyntheticConfig.make(kind) for kind in KINDS]

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=self.__class__.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), dtype=np.uint8, encoding_format="png"),
                    "mask": tfds.features.Image(shape=(s, s, 1), dtype=np.uint8, encoding_format="png"),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "mask"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # everything is generated
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        for index in range(num):
            image, mask = generate(cfg.kind, cfg.image_size, cfg.seed, split, index)
            key = example_id(split, index)
            yield key, {"image": _png(image), "mask": _png(mask.astype(np.uint8) * 255), "id": key}


def make_builder(
    kind: str = "lesion",
    image_size: int = 64,
    num_train: int = 512,
    num_test: int = 64,
    seed: int = 0,
    data_dir: str | None = None,
) -> DiffsegSynthetic:
    """The (not yet prepared) builder for arbitrary field values; `data_dir` None means tfds' default."""
    config = SyntheticConfig.make(kind, image_size, num_train, num_test, seed)
    # tfds refuses a fresh instance named like a predefined config: pass those by name.
    predefined = DiffsegSynthetic.builder_configs.get(config.name)
    return DiffsegSynthetic(config=config.name if predefined == config else config, data_dir=data_dir)
