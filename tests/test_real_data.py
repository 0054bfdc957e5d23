"""The real-data builders (ISIC 2016, MoNuSeg 2018, image/mask folders) on small files the tests write, their
validation errors, the derived splits, crops and tiles, and (where ../shared/data exists) the genuine files."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import pathlib
import shutil
import socket
import threading
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import ROOT
from PIL import Image

from diffseg_jax import data, validation
from diffseg_jax.data import files, isic2016, manual, monuseg2018, pipeline, segmentation_folder
from diffseg_jax.data.monuseg2018 import annotations

SHARED = pathlib.Path(ROOT).parent / "shared" / "data"


def _save(path: pathlib.Path, array: np.ndarray, **kwargs) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _square_mask(size: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[:side, :side] = 255
    return mask


def _not_complete(data_dir: pathlib.Path) -> bool:
    """No dataset was registered as complete under data_dir (tfds writes dataset_info.json last)."""
    return not list(data_dir.rglob("dataset_info.json"))


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking files.


def test_mask_rules(tmp_path):
    two = np.array([[7, 7], [7, 200]], np.uint8)  # any two levels: the higher is foreground
    np.testing.assert_array_equal(files.binarise_mask(two, "m"), two == 200)
    np.testing.assert_array_equal(
        files.binarise_mask(np.zeros((2, 2), np.uint8), "m"), np.zeros((2, 2), bool)
    )
    np.testing.assert_array_equal(files.binarise_mask(np.ones((2, 2), np.uint8), "m"), np.ones((2, 2), bool))
    three = np.array([[0, 128], [255, 255]], np.uint8)
    with pytest.raises(files.DatasetFileError, match=r"m\.png has 3 distinct values.*mask_threshold"):
        files.binarise_mask(three, "m.png")
    np.testing.assert_array_equal(files.binarise_mask(three, "m", threshold=127), three > 127)
    gray_rgb = np.repeat(two[..., None], 3, -1)  # a gray mask saved as RGB
    np.testing.assert_array_equal(files.binarise_mask(gray_rgb, "m"), two == 200)
    with pytest.raises(files.DatasetFileError, match="colour image"):
        files.binarise_mask(np.stack([two, two[::-1], two], -1), "m")
    palette = _save(tmp_path / "p.png", (two == 200).astype(np.uint8))
    Image.open(palette).convert("P").save(palette)
    np.testing.assert_array_equal(files.read_mask(palette), two == 200)


def test_images_of_every_common_mode_read_as_8bit_rgb(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14
    gray = rgb[..., 0]

    def saved(name, img):
        img.save(tmp_path / name)
        return files.read_image(tmp_path / name)

    np.testing.assert_array_equal(saved("rgb.png", Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(saved("gray.png", Image.fromarray(gray)), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(saved("rgba.png", Image.fromarray(np.dstack([rgb, gray]))), rgb)
    palette = Image.new("P", (3, 2))
    palette.putdata(list(range(6)))
    palette.putpalette(rgb.reshape(-1).tolist())  # index i -> the i-th pixel's colour
    np.testing.assert_array_equal(saved("p.png", palette), rgb)
    sixteen = gray.astype(np.uint16) * 256 + 255  # 16-bit over its whole range: the high byte
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(
        files.read_image(tmp_path / "g16.png", "high_byte"), np.repeat(gray[..., None], 3, -1)
    )
    bits = gray > 100  # 1-bit: 0 / 255
    got = saved("bits.png", Image.fromarray(bits).convert("1"))
    np.testing.assert_array_equal(got, np.repeat(bits[..., None], 3, -1).astype(np.uint8) * 255)
    # Grayscale + alpha reads as the grayscale; CMYK through PIL's RGB (before, its C, M, Y were taken as R, G, B).
    np.testing.assert_array_equal(
        saved("la.png", Image.fromarray(np.dstack([gray, gray + 1]), "LA")), np.repeat(gray[..., None], 3, -1)
    )
    np.testing.assert_array_equal(saved("cmyk.tif", Image.fromarray(rgb).convert("CMYK")), rgb)


def test_images_of_more_than_8_bits_are_stretched_per_image(tmp_path):
    """'auto' maps 16-bit and float images by their own 1st-99.8th percentiles: the result does not depend on how
    many of the 16 bits the scanner used, and a two-level image becomes exactly 0 / 255."""
    rng = np.random.default_rng(0)
    twelve = rng.integers(0, 4096, (20, 30)).astype(np.uint16)  # a 12-bit image in a 16-bit file
    paths = {}
    for name, array in (
        ("12bit.png", twelve),
        ("16bit.png", twelve * 16),
        ("float.tif", twelve.astype(np.float32)),
    ):
        paths[name] = tmp_path / name
        Image.fromarray(array).save(paths[name])
    auto = files.read_image(paths["12bit.png"])
    for name in ("16bit.png", "float.tif"):
        np.testing.assert_array_equal(files.read_image(paths[name]), auto)
    lo, hi = np.percentile(twelve, files.PERCENTILES)
    assert auto.dtype == np.uint8 and auto.shape == (20, 30, 3)
    assert np.all(auto[twelve <= lo] == 0) and np.all(auto[twelve >= hi] == 255)
    order = np.argsort(twelve, axis=None, kind="stable")
    assert np.all(np.diff(auto[..., 0].reshape(-1)[order].astype(int)) >= 0)  # monotone in the stored value
    assert 100 < auto.mean() < 155  # uniform values stay spread over the 8-bit range
    assert files.read_image(paths["12bit.png"], "high_byte").max() == 15  # what the old mapping left of it
    two = np.where(np.arange(600).reshape(20, 30) % 3 == 0, 100, 3000).astype(np.uint16)
    Image.fromarray(two).save(tmp_path / "two.png")
    np.testing.assert_array_equal(
        files.read_image(tmp_path / "two.png")[..., 0], np.where(two == 100, 0, 255)
    )
    Image.fromarray(np.full((4, 4), 7, np.uint16)).save(tmp_path / "flat.png")
    assert not files.read_image(tmp_path / "flat.png").any()
    # 8-bit images stay as stored unless 'percentile' asks for every image to be stretched.
    dim = (rng.integers(0, 64, (20, 30, 3))).astype(np.uint8)
    Image.fromarray(dim).save(tmp_path / "dim.png")
    np.testing.assert_array_equal(files.read_image(tmp_path / "dim.png"), dim)
    stretched = files.read_image(tmp_path / "dim.png", "percentile")
    assert stretched.max() == 255 and stretched.min() == 0
    with pytest.raises(files.DatasetFileError, match=r"float\.tif is float32.*image_scaling='high_byte'"):
        files.read_image(paths["float.tif"], "high_byte")


def test_a_folder_of_16bit_images_is_stored_stretched_and_named_by_its_scaling(tmp_path):
    root = tmp_path / "xray"
    rng = np.random.default_rng(2)
    for k in range(3):
        _save(root / "images" / f"x{k}.png", (rng.integers(0, 4096, (32, 32)) * (k + 1)).astype(np.uint16))
        _save(root / "masks" / f"x{k}.png", _square_mask(32, 5 + k))
    builds = {
        scaling: segmentation_folder.make_builder(
            root, 32, data_dir=str(tmp_path / "tfds"), image_scaling=scaling
        )
        for scaling in ("auto", "high_byte")
    }
    assert builds["auto"].builder_config.name != builds["high_byte"].builder_config.name  # no stale reuse
    stored = manual.prepare(builds["auto"], root)
    for example in stored["train"]:
        source = root / "images" / f"{example['id'].decode()}.png"
        np.testing.assert_array_equal(example["image"], files.read_image(source))
        assert example["image"].max() == 255


def test_unreadable_and_truncated_files_name_the_file(tmp_path):
    jpg = _save(tmp_path / "a.jpg", np.full((64, 64, 3), 90, np.uint8), quality=90)
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(jpg.read_bytes()[:300])
    with pytest.raises(files.DatasetFileError, match=r"Cannot read image file .*t\.jpg"):
        files.read_image(truncated)
    junk = tmp_path / "j.png"
    junk.write_text("not an image")
    with pytest.raises(files.DatasetFileError, match=r"Cannot read mask file .*j\.png"):
        files.read_mask(junk)


def test_resizing_keeps_masks_binary_and_labels_exact():
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    np.testing.assert_array_equal(files.resize_mask(mask, 32), np.arange(32)[None, :].repeat(32, 0) < 16)
    labels = np.kron(np.arange(16, dtype=np.int32).reshape(4, 4) * 1000, np.ones((8, 8), np.int32))
    np.testing.assert_array_equal(files.resize_labels(labels, 16)[::4, ::4], labels[::8, ::8])


def test_split_of_uses_the_innermost_named_folder(tmp_path):
    assert files.split_of(tmp_path / "MoNuSeg 2018 Training Data" / "x" / "a.tif", tmp_path) == "train"
    assert files.split_of(tmp_path / "MoNuSegTestData" / "a.tif", tmp_path) == "test"
    assert files.split_of(tmp_path / "test_runs" / "Training" / "a.tif", tmp_path) == "train"
    assert files.split_of(tmp_path / "other" / "a.tif", tmp_path) is None
    # Folders above manual_dir do not count.
    assert files.split_of(tmp_path / "train" / "a.tif", tmp_path / "train") is None


# ---------------------------------------------------------------------------------------------------------------
# MoNuSeg XML rasterisation.


def test_rasterise_hand_worked_polygons():
    # A 3 x 2 rectangle with integer corners: 4 x 3 pixel centres including its outline, 3 x 2 without.
    rect = np.array([[1, 1], [4, 1], [4, 3], [1, 3]], float)
    assert annotations.rasterise([rect], (7, 7)).sum() == 12
    assert annotations.rasterise([rect], (7, 7), boundary="half_open").sum() == 6
    # The right triangle (1,1), (5,1), (1,5): the centres with x, y >= 1 and x + y <= 6, outline included.
    tri = annotations.rasterise([np.array([[1, 1], [5, 1], [1, 5]], float)], (7, 7))
    yy, xx = np.mgrid[:7, :7]
    np.testing.assert_array_equal(tri > 0, (xx >= 1) & (yy >= 1) & (xx + yy <= 6))
    # Half-integer corners contain exactly the centres strictly inside; clipping at the image border.
    half = annotations.rasterise([np.array([[1.5, 1.5], [4.5, 1.5], [4.5, 3.5], [1.5, 3.5]])], (7, 7))
    np.testing.assert_array_equal(np.argwhere(half).min(0), [2, 2])
    np.testing.assert_array_equal(np.argwhere(half).max(0), [3, 4])
    big = annotations.rasterise([np.array([[-3, -3], [10, -3], [10, 10], [-3, 10]], float)], (5, 5))
    assert (big == 1).all()


def test_rasterise_labels_overlaps_and_degenerate_regions():
    a = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    b = a + 2
    line = np.array([[0, 6], [3, 6]], float)  # two vertices: no area, its pixels are its outline only
    outside = np.array([[20, 20], [25, 20], [25, 25]], float)
    labels = annotations.rasterise([a, b, outside, line], (8, 8))
    assert labels.max() == 3  # the polygon outside the image gets no label
    assert labels[0, 0] == 1 and labels[3, 3] == 2 and labels[6, 6] == 2  # b overwrites a where they overlap
    assert (labels == 3).sum() == 4 and (labels[6, :4] == 3).all()


def test_rasterised_pixel_count_matches_polygon_area():
    rng = np.random.default_rng(0)
    for _ in range(20):  # random convex-ish polygons: star-shaped about their centre
        n = int(rng.integers(5, 30))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(8, 20, n)
        poly = np.stack([40 + radii * np.cos(angles), 40 + radii * np.sin(angles)], -1)
        x, y = poly[:, 0], poly[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        count = annotations.rasterise([poly], (80, 80), boundary="half_open").sum()
        perimeter = np.linalg.norm(poly - np.roll(poly, -1, 0), axis=1).sum()
        assert abs(count - area) < 0.5 * perimeter  # within half a pixel along the outline (usually far less)
        assert abs(count - area) / area < 0.1


def _xml(regions: list[list[tuple[float, float]]]) -> str:
    body = "".join(
        f'<Region Id="{i + 1}" Type="0"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in region)
        + "</Vertices></Region>"
        for i, region in enumerate(regions)
    )
    return (
        '<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Attributes/><Regions>'
        '<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>'
        f"{body}</Regions></Annotation></Annotations>"
    )


def test_parse_regions_reads_vertices_by_tag_and_rejects_bad_files(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_xml([[(1.5, 2), (3, 2), (3, 4)], [(0, 0), (1, 0), (1, 1), (0, 1)]]))
    polys = annotations.parse_regions(path)
    assert len(polys) == 2
    np.testing.assert_array_equal(polys[0], [[1.5, 2], [3, 2], [3, 4]])  # (X = column, Y = row)
    path.write_text(_xml([]))
    with pytest.raises(files.DatasetFileError, match=r"a\.xml has no <Region>"):
        annotations.parse_regions(path)
    path.write_text(_xml([[(1, 2), (3, 2), (3, 4)]])[:-30])
    with pytest.raises(files.DatasetFileError, match=r"Cannot parse annotation file .*a\.xml"):
        annotations.parse_regions(path)
    for value in ("nan", "inf", "-inf"):  # float() reads them; the rasteriser then failed with a traceback
        path.write_text(_xml([[(1, 2), (3, 2), (3, 4)]]).replace('Y="4"', f'Y="{value}"'))
        with pytest.raises(
            files.DatasetFileError, match=rf"a\.xml: Region Id='1' has a Vertex at X=3.0, Y={value}"
        ):
            annotations.parse_regions(path)


def test_an_image_over_the_decompression_bomb_limit_is_named_with_the_way_to_allow_it(tmp_path, monkeypatch):
    from PIL import Image as PILImage  # noqa: PLC0415

    path = _save(tmp_path / "big.png", np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000: Pillow refuses
    with pytest.raises(
        files.DatasetFileError, match=r"big\.png is too large.*4096 pixels.*DIFFSEG_JAX_MAX_IMAGE_PIXELS"
    ):
        files.read_image(path)
    monkeypatch.setenv("DIFFSEG_JAX_MAX_IMAGE_PIXELS", "0")  # trusted: no limit
    assert files.read_image(path).shape == (64, 64, 3)
    assert PILImage.MAX_IMAGE_PIXELS == 1000  # Pillow's own limit is left as it was


# ---------------------------------------------------------------------------------------------------------------
# ISIC 2016.

ISIC_TRAIN = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
ISIC_TEST = ["ISIC_0000003", "ISIC_0000012"]
SIDES = {"ISIC_0000000": 4, "ISIC_0000001": 8, "ISIC_0000002": 12, "ISIC_0000003": 16, "ISIC_0000012": 20}


def _isic_part1(root: pathlib.Path, size: int = 32) -> pathlib.Path:
    """A tiny ISIC 2016 in the Part 1 layout; each id's mask is a square of its own side."""
    for split, ids in (("Training", ISIC_TRAIN), ("Test", ISIC_TEST)):
        for k, image_id in enumerate(ids):
            _save(
                root / f"ISBI2016_ISIC_Part1_{split}_Data" / f"{image_id}.jpg",
                np.full((size, size, 3), 40 * k + 20, np.uint8),
                quality=95,
            )
            _save(
                root / f"ISBI2016_ISIC_Part1_{split}_GroundTruth" / f"{image_id}_Segmentation.png",
                _square_mask(size, SIDES[image_id]),
            )
    return root


def test_isic_pairs_by_id_in_both_layouts(tmp_path):
    root = _isic_part1(tmp_path / "isic")
    # Part 3B: the training pairs again, side by side (users may unpack both): read once.
    for image_id in ISIC_TRAIN:
        folder = root / "ISBI2016_ISIC_Part3B_Training_Data"
        _save(folder / f"{image_id}.jpg", np.zeros((32, 32, 3), np.uint8))
        _save(folder / f"{image_id}_Segmentation.png", _square_mask(32, SIDES[image_id]))
    pairs = isic2016.find_pairs(root)
    assert [p.id for p in pairs["train"]] == ISIC_TRAIN and [p.id for p in pairs["test"]] == ISIC_TEST
    for split in pairs.values():
        for p in split:
            assert p.mask.name == f"{p.id}_Segmentation.png"


def test_isic_builder_round_trip(tmp_path):
    root = _isic_part1(tmp_path / "isic", size=32)
    sources = manual.prepare(isic2016.make_builder(root, resize=16, data_dir=str(tmp_path / "tfds")), root)
    assert {k: len(v) for k, v in sources.items()} == {"train": 3, "test": 2}
    for split, ids in (("train", ISIC_TRAIN), ("test", ISIC_TEST)):
        for i in range(len(ids)):
            example = sources[split][i]
            image_id = example["id"].decode()
            assert example["image"].shape == (16, 16, 3) and example["mask"].shape == (16, 16, 1)
            assert set(np.unique(example["mask"])) <= {0, 255}  # re-thresholded after the bilinear resize
            side = SIDES[image_id] // 2  # the square halves with the image
            np.testing.assert_array_equal(example["mask"][..., 0] > 0, _square_mask(16, side) > 0)
            np.testing.assert_array_equal(example["original_size"], [32, 32])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_mask", r"No mask ISIC_0000012_Segmentation\.png for image .*ISIC_0000012\.jpg"),
        ("wrong_size", r"ISIC_0000003_Segmentation\.png is 16x16 .* image .* is 32x32"),
        ("three_values", r"ISIC_0000003_Segmentation\.png has 3 distinct values"),
        ("truncated", r"Cannot read image file .*ISIC_0000012\.jpg"),
    ],
)
def test_isic_bad_files_fail_the_build_and_leave_nothing_complete(tmp_path, damage, message):
    root = _isic_part1(tmp_path / "isic")
    truth = root / "ISBI2016_ISIC_Part1_Test_GroundTruth"
    if damage == "missing_mask":
        (truth / "ISIC_0000012_Segmentation.png").unlink()
    elif damage == "wrong_size":
        _save(truth / "ISIC_0000003_Segmentation.png", _square_mask(16, 4))
    elif damage == "three_values":
        mask = _square_mask(32, 10)
        mask[20:, 20:] = 128
        _save(truth / "ISIC_0000003_Segmentation.png", mask)
    else:
        image = root / "ISBI2016_ISIC_Part1_Test_Data" / "ISIC_0000012.jpg"
        image.write_bytes(image.read_bytes()[:200])
    data_dir = tmp_path / "tfds"
    with pytest.raises(files.DatasetFileError, match=message):
        manual.prepare(isic2016.make_builder(root, resize=16, data_dir=str(data_dir)), root)
    assert _not_complete(data_dir)


def test_isic_without_split_folders_is_a_clear_error(tmp_path):
    _save(tmp_path / "isic" / "images" / "ISIC_0000000.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(files.DatasetFileError, match="'Training' or 'Test'"):
        isic2016.find_pairs(tmp_path / "isic")


# The download path: the four official zips served by a local HTTP server, built through tfds' download manager.


class _ZipServer:
    """Serves {name: bytes} over HTTP from a thread; names in `truncate` are cut off after half their bytes once
    (with the full Content-Length announced), as a dropped connection does."""

    def __init__(self):
        self.archives: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                body = server.archives.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.truncate:
                    server.truncate.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/2016"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip(files_by_name: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in files_by_name.items():
            z.writestr(name, content)
    return buf.getvalue()


def _isic_zips(tmp_path: pathlib.Path) -> tuple[dict[str, bytes], dict[str, dict[str, np.ndarray]]]:
    """The four Part 1 zips (official names and inner folders) holding 3 training and 2 test pairs: genuine
    ISIC files from ../shared/data where present, else images the test writes; and {split: {id: mask > 0}}."""
    shared = SHARED / "isic2016_test_224"
    if shared.is_dir():
        ids = sorted(p.stem for p in (shared / "images").glob("ISIC_*.jpg"))[:5]
        image_files = {i: (shared / "images" / f"{i}.jpg").read_bytes() for i in ids}
        mask_files = {i: (shared / "masks" / f"{i}_Segmentation.png").read_bytes() for i in ids}
    else:
        root = _isic_part1(tmp_path / "written", size=32)
        ids = ISIC_TRAIN + ISIC_TEST
        found = {p.stem: p for p in root.rglob("ISIC_*.*")}
        image_files = {i: found[i].read_bytes() for i in ids}
        mask_files = {i: found[f"{i}_Segmentation"].read_bytes() for i in ids}
    splits = {"train": ids[:3], "test": ids[3:]}
    zips, masks = {}, {}
    for split, split_ids in splits.items():
        (_, images_zip), (_, masks_zip) = [
            (key, name) for key, name in isic2016.ARCHIVES.items() if key[0] == split
        ]
        folder = images_zip.removesuffix(".zip")
        zips[images_zip] = _zip({f"{folder}/{i}.jpg": image_files[i] for i in split_ids})
        folder = masks_zip.removesuffix(".zip")
        zips[masks_zip] = _zip({f"{folder}/{i}_Segmentation.png": mask_files[i] for i in split_ids})
        masks[split] = {i: np.asarray(Image.open(io.BytesIO(mask_files[i]))) > 127 for i in split_ids}
    return zips, masks


@pytest.fixture
def isic_server(tmp_path):
    server = _ZipServer()
    server.archives, server.expected = _isic_zips(tmp_path)
    yield server
    server.close()


def _download_config(server: _ZipServer, data_dir: pathlib.Path) -> ml_collections.ConfigDict:
    """configs/e1_isic.py as a user runs it (no manual_dir), its data from the local server, stored at 32 px."""
    from configs import e1_isic  # noqa: PLC0415

    config = e1_isic.get_config("tiny")
    config.data.download_base_url = server.base_url
    config.data.data_dir = str(data_dir)
    return config


def test_isic_downloads_through_tfds_records_then_verifies_checksums(isic_server, tmp_path):

    config = _download_config(isic_server, tmp_path / "tfds")
    validation.validate(config)  # no manual_dir: ISIC downloads itself
    assert config.data.get("manual_dir") is None
    sources = pipeline.load_isic2016(config.data)
    assert sorted(isic_server.requests) == sorted(isic2016.ARCHIVES.values())  # each zip fetched once
    for split, expected in isic_server.expected.items():
        got = {}
        for i in range(len(sources[split])):
            example = sources[split][i]
            got[example["id"].decode()] = example["mask"][..., 0] > 0
        assert set(got) == set(expected), split
        for image_id, mask in expected.items():  # each stored mask is its own image's, resized
            np.testing.assert_array_equal(got[image_id], files.resize_mask(mask, 32))
    fit, held_out = data.load_split(config.data, "fit"), data.load_split(config.data, "validation")
    assert len(fit) + len(held_out) == 3
    # The first download recorded every archive's size and sha256, in tfds' format.
    builder = isic2016.make_download_builder(isic_server.base_url, 32, str(tmp_path / "tfds"))
    record = tfds.download.checksums.load_url_infos(builder.checksums_record)
    urls = isic2016.archive_urls(isic_server.base_url)
    assert set(record) == set(urls.values())
    for key, url in urls.items():
        body = isic_server.archives[isic2016.ARCHIVES[key]]
        assert (record[url].size, record[url].checksum) == (len(body), hashlib.sha256(body).hexdigest())
    info = builder.info
    assert "arXiv:1605.01397" in info.citation and "CC0" in info.redistribution_info.license
    assert info.homepage == isic2016.isic2016.HOMEPAGE

    # Downloads and the built dataset deleted, the record kept; the test masks' archive changed on the server:
    # the re-download is verified against the record and refused.
    changed = "ISBI2016_ISIC_Part1_Test_GroundTruth.zip"
    isic_server.archives[changed] = isic_server.archives[changed] + b"x"
    shutil.rmtree(tmp_path / "tfds" / "downloads")
    shutil.rmtree(pathlib.Path(builder.data_dir).parent)
    again = isic2016.make_download_builder(isic_server.base_url, 32, str(tmp_path / "tfds"))
    with pytest.raises(
        files.DatasetFileError, match=f"(?s)differs from the one recorded.*{changed}.*delete its line"
    ):
        isic2016.prepare(again)
    assert _not_complete(tmp_path / "tfds")


def test_isic_interrupted_download_restarts_cleanly(isic_server, tmp_path):
    data_dir = tmp_path / "tfds"
    isic_server.truncate = {"ISBI2016_ISIC_Part1_Training_Data.zip"}
    builder = isic2016.make_download_builder(isic_server.base_url, 32, str(data_dir))
    with pytest.raises(files.DatasetFileError, match="Downloading ISIC 2016 failed.*Building again resumes"):
        isic2016.prepare(builder)
    assert _not_complete(data_dir)
    record = tfds.download.checksums.load_url_infos(builder.checksums_record)
    url = isic2016.archive_urls(isic_server.base_url)[("train", "images")]
    assert url not in record  # the broken transfer's checksum was not recorded
    sources = isic2016.prepare(isic2016.make_download_builder(isic_server.base_url, 32, str(data_dir)))
    assert {k: len(v) for k, v in sources.items()} == {"train": 3, "test": 2}
    record = tfds.download.checksums.load_url_infos(builder.checksums_record)
    body = isic_server.archives["ISBI2016_ISIC_Part1_Training_Data.zip"]
    assert record[url].checksum == hashlib.sha256(body).hexdigest()


def test_isic_without_network_names_the_urls_and_manual_dir(tmp_path, monkeypatch):
    from tensorflow_datasets.core.download import downloader  # noqa: PLC0415

    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # tfds retries a refused connection 10 times (minutes)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/2016"
    builder = isic2016.make_download_builder(base_url, 32, str(tmp_path / "tfds"))
    with pytest.raises(files.DatasetFileError) as e:
        isic2016.prepare(builder)
    message = str(e.value)
    for name in isic2016.ARCHIVES.values():
        assert f"{base_url}/{name}" in message
    assert "--config.data.manual_dir" in message and "ISBI2016_ISIC_Part1_Training_GroundTruth/" in message


# ---------------------------------------------------------------------------------------------------------------
# MoNuSeg 2018.

EXTRA_TRAIN_ID = "TCGA-50-5931-01Z-00-DX2"  # not one of the classic 30


def _monuseg(root: pathlib.Path, size: int = 40) -> dict[str, list[list[tuple[float, float]]]]:
    """A tiny MoNuSeg in the official layout: 2 classic + 1 extra training tile, 1 test tile."""
    rng = np.random.default_rng(0)
    layout = {
        ("train", monuseg2018.CLASSIC_TRAIN_IDS[0]): 3,
        ("train", monuseg2018.CLASSIC_TRAIN_IDS[1]): 5,
        ("train", EXTRA_TRAIN_ID): 2,
        ("test", monuseg2018.TEST_IDS[0]): 4,
    }
    regions = {}
    for (split, tile_id), n in layout.items():
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        polys = [
            [(x, y), (x + 6, y), (x + 6, y + 4), (x, y + 4)] for x, y in zip(range(2, 40, 9), range(1, 40, 8))
        ]
        regions[tile_id] = polys[:n]
        if split == "train":
            _save(root / "MoNuSeg 2018 Training Data" / "Tissue Images" / f"{tile_id}.tif", image)
            xml = root / "MoNuSeg 2018 Training Data" / "Annotations" / f"{tile_id}.xml"
        else:
            _save(root / "MoNuSegTestData" / f"{tile_id}.tif", image)
            xml = root / "MoNuSegTestData" / f"{tile_id}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(_xml(polys[:n]))
    return regions


def test_monuseg_builder_rasterises_and_keeps_classic_tiles(tmp_path):
    root = tmp_path / "monuseg"
    regions = _monuseg(root)
    tiles = monuseg2018.find_tiles(root)
    assert [t.id for t in tiles["train"]] == sorted(monuseg2018.CLASSIC_TRAIN_IDS[:2])
    assert [t.id for t in tiles["test"]] == [monuseg2018.TEST_IDS[0]]
    assert len(monuseg2018.find_tiles(root, "all")["train"]) == 3
    sources = manual.prepare(monuseg2018.make_builder(root, resize=20, data_dir=str(tmp_path / "tfds")), root)
    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "test": 1}
    for split in ("train", "test"):
        for i in range(len(sources[split])):
            example = sources[split][i]
            polys = regions[example["id"].decode()]
            assert example["num_regions"] == example["num_nuclei"] == len(polys)
            full = annotations.rasterise([np.asarray(p, float) for p in polys], (40, 40))
            np.testing.assert_array_equal(example["instances"], full[1::2, 1::2])  # PIL nearest, 40 -> 20
            np.testing.assert_array_equal(example["mask"][..., 0] > 0, full[1::2, 1::2] > 0)
            assert len(np.unique(example["instances"])) == len(polys) + 1


def test_monuseg_and_folder_missing_folders_print_the_manual_steps(tmp_path):
    for builder, make, steps in (
        (
            monuseg2018.DiffsegMonuseg2018,
            monuseg2018.make_builder,
            "https://monuseg.grand-challenge.org/Data/",
        ),
        (segmentation_folder.DiffsegSegmentationFolder, segmentation_folder.make_builder, "HER2"),
    ):
        assert steps in builder.MANUAL_DOWNLOAD_INSTRUCTIONS
        for folder in (tmp_path / "nowhere", None):
            with pytest.raises(files.DatasetFileError) as e:
                make(folder)
            assert builder.MANUAL_DOWNLOAD_INSTRUCTIONS in str(e.value)


def test_monuseg_split_from_official_ids_when_folders_do_not_say(tmp_path):
    root = tmp_path / "flat"
    for tile_id in (monuseg2018.CLASSIC_TRAIN_IDS[0], monuseg2018.TEST_IDS[0]):
        _save(root / f"{tile_id}.tif", np.zeros((8, 8, 3), np.uint8))
        (root / f"{tile_id}.xml").write_text(_xml([[(1, 1), (4, 1), (4, 4)]]))
    tiles = monuseg2018.find_tiles(root)
    assert [t.id for t in tiles["train"]] == [monuseg2018.CLASSIC_TRAIN_IDS[0]]
    _save(root / "TCGA-XX-0000.tif", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(files.DatasetFileError, match="TCGA-XX-0000.*not an official tile id"):
        monuseg2018.find_tiles(root)


def test_monuseg_bad_annotations_fail_the_build(tmp_path):
    root = tmp_path / "monuseg"
    _monuseg(root)
    xml = root / "MoNuSegTestData" / f"{monuseg2018.TEST_IDS[0]}.xml"
    xml.write_text(_xml([]))
    data_dir = tmp_path / "tfds"
    with pytest.raises(files.DatasetFileError, match=r"has no <Region> elements"):
        manual.prepare(monuseg2018.make_builder(root, resize=20, data_dir=str(data_dir)), root)
    assert _not_complete(data_dir)
    xml.unlink()
    with pytest.raises(files.DatasetFileError, match=r"No annotation TCGA-2Z-A9J9-01A-01-TS1\.xml for image"):
        monuseg2018.find_tiles(root)


# ---------------------------------------------------------------------------------------------------------------
# Image/mask folders.


def test_folder_layouts_pairing_and_threshold(tmp_path):
    flat = tmp_path / "flat"
    for k, name in enumerate(["a", "b", "sub/c"]):
        _save(flat / "images" / f"{name}.jpg", np.full((16, 16, 3), 50 * k, np.uint8))
        suffix = ["", "_mask", "_Segmentation"][k]
        _save(flat / "masks" / f"{name}{suffix}.png", (_square_mask(16, 4 + 2 * k) > 0).astype(np.uint8))
    pairs = segmentation_folder.find_pairs(flat)
    assert list(pairs) == ["train"] and [p.id for p in pairs["train"]] == ["a", "b", "sub/c"]
    image, mask = segmentation_folder.load_pair(pairs["train"][1])  # a 0/1 mask
    np.testing.assert_array_equal(mask, _square_mask(16, 6) > 0)
    soft = (tmp_path / "flat" / "masks" / "a.png").resolve()
    _save(soft, np.linspace(0, 255, 256).astype(np.uint8).reshape(16, 16))
    with pytest.raises(files.DatasetFileError, match="256 distinct values"):
        segmentation_folder.load_pair(pairs["train"][0])
    _, mask = segmentation_folder.load_pair(pairs["train"][0], mask_threshold=127)
    assert mask.sum() == 128
    (flat / "masks" / "sub" / "c_Segmentation.png").unlink()
    with pytest.raises(files.DatasetFileError, match=r"No mask for image .*c\.jpg"):
        segmentation_folder.find_pairs(flat)

    split = tmp_path / "split"
    for s, names in (("train", ["x", "y"]), ("Test", ["z"])):
        for name in names:
            _save(split / s / "Images" / f"{name}.png", np.zeros((8, 8, 3), np.uint8))
            _save(split / s / "masks" / f"{name}.png", _square_mask(8, 2))
    pairs = segmentation_folder.find_pairs(split)
    assert {k: [p.id for p in v] for k, v in pairs.items()} == {"train": ["x", "y"], "test": ["z"]}


# ---------------------------------------------------------------------------------------------------------------
# Pipeline: derived splits, crops, tiles.


def test_a_training_split_of_empty_masks_fails_the_build(tmp_path):
    # 0/1 masks read with a threshold of 127 (set for another folder's 0/255 JPEG masks) come out empty: every
    # training mask background, which trains a model to predict nothing. A test split of them is fine.
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for k in range(3):
            _save(root / split / "images" / f"{split}{k}.png", np.full((16, 16, 3), 40 * k, np.uint8))
            _save(root / split / "masks" / f"{split}{k}.png", (_square_mask(16, 4 + k) > 0).astype(np.uint8))
    builder = segmentation_folder.make_builder(root, 16, data_dir=str(tmp_path / "tfds"), mask_threshold=127)
    with pytest.raises(files.DatasetFileError, match=r"All 3 training masks .* are empty.*mask_threshold"):
        manual.prepare(builder, root)
    assert _not_complete(tmp_path / "tfds")
    stored = manual.prepare(segmentation_folder.make_builder(root, 16, data_dir=str(tmp_path / "tfds")), root)
    assert all(example["mask"].any() for example in stored["train"])  # read as 0/1 without the threshold
    for k in range(3):  # images without findings in the test split only
        _save(root / "test" / "masks" / f"test{k}.png", np.zeros((16, 16), np.uint8))
    stored = manual.prepare(
        segmentation_folder.make_builder(root, 16, data_dir=str(tmp_path / "tfds2")), root
    )
    assert not any(example["mask"].any() for example in stored["test"])


def test_training_without_a_test_split_stops_before_the_first_step(tmp_path):
    # A flat folder with test_fraction=0 has no test split: evaluation after training would fail, so training
    # does not start (nothing trained, no checkpoint, no record).
    from conftest import tiny_config  # noqa: PLC0415

    from diffseg_jax import checkpoints, train  # noqa: PLC0415

    root = tmp_path / "flat"
    for k in range(4):
        _save(root / "images" / f"i{k}.png", np.full((32, 32, 3), 50 * k, np.uint8))
        _save(root / "masks" / f"i{k}.png", _square_mask(32, 6 + k))
    config = tiny_config("e2_folder", data_dir=str(tmp_path / "tfds"))
    config.data.manual_dir, config.data.test_fraction, config.train.batch_size = str(root), 0.0, 2
    with pytest.raises(ValueError, match="no 'test' split.*test_fraction > 0"):
        train.train(config, str(tmp_path / "run"))
    assert checkpoints.Checkpointer(str(tmp_path / "run" / "checkpoints")).latest_step() is None
    assert not (tmp_path / "run" / "config.json").exists()
    config.eval.enabled = False  # training alone needs no test split
    assert int(train.train(config, str(tmp_path / "run")).step) == config.train.num_steps


def test_holdout_is_a_deterministic_partition():
    kept, held = pipeline.holdout(50, 0.2, 0)
    assert len(held) == 10 and len(kept) == 40
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(50))
    again = pipeline.holdout(50, 0.2, 0)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(pipeline.holdout(50, 0.2, 1)[1], held)
    assert len(pipeline.holdout(3, 0.01, 0)[1]) == 1 and len(pipeline.holdout(3, 0.99, 0)[0]) == 1


@pytest.fixture(scope="module")
def folder_config(tmp_path_factory) -> ml_collections.ConfigDict:
    """A flat 10-image folder stored at 32 px, model size 16."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for k in range(10):
        _save(root / "images" / f"img{k}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        _save(root / "masks" / f"img{k}.png", _square_mask(32, 3 + 2 * k))
    return ml_collections.ConfigDict(
        dict(
            name="segmentation_folder",
            manual_dir=str(root),
            data_dir=str(tmp_path_factory.mktemp("tfds")),
            image_size=16,
            resize=32,
            augment_flips=False,
            validation_fraction=0.2,
            test_fraction=0.3,
            split_seed=0,
            mask_threshold=None,
        )
    )


def test_derived_splits_partition_the_data(folder_config):
    ids = {
        s: sorted(
            data.load_split(folder_config, s)[i]["id"] for i in range(len(data.load_split(folder_config, s)))
        )
        for s in data.SPLITS
    }
    assert len(ids["test"]) == 3 and len(ids["train"]) == 7  # test held out of a flat folder
    assert sorted(ids["train"] + ids["test"]) == [f"img{k}" for k in range(10)]
    assert len(ids["validation"]) == 1 and sorted(ids["fit"] + ids["validation"]) == ids["train"]
    no_test = ml_collections.ConfigDict(folder_config.to_dict())
    no_test.test_fraction = 0.0
    with pytest.raises(ValueError, match="no 'test' split.*test_fraction"):
        data.load_split(no_test, "test")


def test_training_crops_are_windows_of_the_stored_image(folder_config):
    full = data.eval_arrays(folder_config, "train")
    assert full["image"].shape == (7, 32, 32, 3)
    ds = data.train_dataset(folder_config, batch_size=4, seed=0)
    offsets = set()
    for step in range(3):
        batch = ds[step]
        assert batch["image"].shape == (4, 16, 16, 3) and batch["mask"].shape == (4, 16, 16, 1)
        for image, mask in zip(batch["image"], batch["mask"]):
            found = [
                (n, y, x)
                for n in range(7)
                for y in range(17)
                for x in range(17)
                if np.array_equal(full["image"][n, y : y + 16, x : x + 16], image)
            ]
            assert len(found) == 1
            n, y, x = found[0]
            np.testing.assert_array_equal(full["mask"][n, y : y + 16, x : x + 16], mask)  # the same window
            offsets.add((y, x))
        np.testing.assert_array_equal(
            data.train_dataset(folder_config, 4, seed=0)[step]["image"], batch["image"]
        )
    assert len(offsets) > 3


def test_tiles_round_trip_in_row_major_order():
    images = np.arange(2 * 4 * 6 * 1, dtype=np.float32).reshape(2, 4, 6, 1)
    tiles, grid = data.to_tiles(images, 2)
    assert grid == (2, 3) and tiles.shape == (12, 2, 2, 1)
    np.testing.assert_array_equal(tiles[1], images[0, 0:2, 2:4])
    np.testing.assert_array_equal(tiles[3], images[0, 2:4, 0:2])
    np.testing.assert_array_equal(tiles[6], images[1, 0:2, 0:2])
    np.testing.assert_array_equal(data.from_tiles(tiles, grid), images)
    with pytest.raises(ValueError, match="cannot be cut into 4 px tiles"):
        data.to_tiles(images, 4)


# ---------------------------------------------------------------------------------------------------------------
# Configs.

REAL_CONFIGS = [f"e{e}_{d}" for e in range(1, 5) for d in ("isic", "monuseg", "folder")]


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_data_configs(name):
    import importlib

    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(None)
    dataset = name.split("_")[1]
    assert config.experiment == name[:2]
    assert config.eval.ensemble_size == {"isic": 10, "monuseg": 25, "folder": 5}[dataset]
    assert (
        config.data.name
        == {"isic": "isic2016", "monuseg": "monuseg2018", "folder": "segmentation_folder"}[dataset]
    )
    assert (config.data.image_size, data.stored_size(config.data)) == (
        (256, 512) if dataset == "monuseg" else (256, 256)
    )
    validation.validate(config, check_data=False)
    if dataset == "isic":  # downloads itself: the design card's command needs no data flag
        validation.validate(config)
        assert config.data.get("manual_dir") is None
        assert config.data.download_base_url == isic2016.DEFAULT_BASE_URL
    else:  # read from a folder: a missing one prints the steps that make it
        with pytest.raises(ValueError, match="data.manual_dir=None.*--config.data.manual_dir") as e:
            validation.validate(config)
        steps = {"monuseg": "unzip /path/to/MoNuSegTestData.zip", "folder": "<manual_dir>/train/images"}[
            dataset
        ]
        assert steps in str(e.value)
    tiny = module.get_config("tiny")
    assert tiny.data.image_size == 32 and data.stored_size(tiny.data) == (64 if dataset == "monuseg" else 32)


# ---------------------------------------------------------------------------------------------------------------
# The genuine files in ../shared/data (skipped where absent).


def _need(folder: pathlib.Path) -> pathlib.Path:
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (genuine MoNuSeg/ISIC files are not part of the repository)")
    return folder


def test_real_monuseg_test_xml_gives_6697_nuclei_and_the_public_masks(tmp_path):
    root = _need(SHARED / "monuseg2018_test_official")
    tiles = monuseg2018.find_tiles(root)
    assert list(tiles) == ["test"] and len(tiles["test"]) == 14
    sources = manual.prepare(monuseg2018.make_builder(root, resize=512, data_dir=str(tmp_path)), root)
    test = sources["test"]
    examples = [test[i] for i in range(len(test))]
    assert sum(int(e["num_regions"]) for e in examples) == 6697
    assert sum(int(e["num_nuclei"]) for e in examples) == 6697
    # The public 512 px masks (../shared/data/monuseg2018_512, made with skimage.draw.polygon at 1000 px and a
    # bilinear resize) agree with this rasteriser up to a handful of pixels; the builder's nearest resize keeps
    # IoU > 0.95 with them.
    masks = _need(SHARED / "monuseg2018_512") / "test" / "masks"
    for e in examples[:3]:
        tile_id = e["id"].decode()
        public = np.asarray(Image.open(masks / f"{tile_id}.png")) > 127
        _, labels, _ = monuseg2018.load_tile(next(t for t in tiles["test"] if t.id == tile_id))
        ours = files.resize_mask(labels > 0, 512, "bilinear")
        assert (ours != public).sum() <= 10, tile_id
        stored = e["mask"][..., 0] > 0
        assert (stored & public).sum() / (stored | public).sum() > 0.95


def test_real_isic_test_split_pairs_every_id(tmp_path):
    shared = _need(SHARED / "isic2016_test_224")
    root = tmp_path / "isic"  # the official Part 1 folder names, pointing at the shared files
    root.mkdir()
    (root / "ISBI2016_ISIC_Part1_Test_Data").symlink_to(shared / "images")
    (root / "ISBI2016_ISIC_Part1_Test_GroundTruth").symlink_to(shared / "masks")
    config = ml_collections.ConfigDict(
        dict(
            name="isic2016", manual_dir=str(root), data_dir=str(tmp_path / "tfds"), image_size=224, resize=224
        )
    )
    test = data.eval_arrays(config, "test")
    with open(shared / "mapping.csv", newline="") as f:
        expected = {row["official_id"]: float(row["mask_fg_fraction"]) for row in csv.DictReader(f)}
    assert len(test["id"]) == 379 and set(test["id"]) == set(expected)
    fractions = test["mask"].mean(axis=(1, 2, 3))
    for image_id, fraction in zip(test["id"], fractions):
        assert abs(fraction - expected[image_id]) < 1e-4, image_id  # each mask is its own image's
    with pytest.raises(ValueError, match="no 'train' split .*manual_dir"):
        data.load_split(config, "train")


def test_export_writes_a_folder_that_reads_back_as_the_same_dataset(tmp_path, capsys):
    """``python -m diffseg_jax.data.export``: a dataset as stored (here synthetic, with empty masks among them)
    written as train/ and test/ images + masks reads back through the folder builder into the same arrays."""
    from diffseg_jax.data import export

    source = ml_collections.ConfigDict(
        dict(name="synthetic", kind="clusters", image_size=32, num_train=16, num_test=4, seed=0,
             data_dir=str(tmp_path / "tfds"))
    )  # fmt: skip
    out = tmp_path / "as_folder"
    (tmp_path / "as_folder.partial" / "train").mkdir(parents=True)  # an export cut short before
    assert export.export(source, str(out), log=lambda *_: None) == {"train": 16, "test": 4}
    assert not (tmp_path / "as_folder.partial").exists()
    back = ml_collections.ConfigDict(
        dict(name="segmentation_folder", manual_dir=str(out), image_size=32, resize=None, mask_threshold=None,
             image_scaling="auto", data_dir=str(tmp_path / "tfds"), test_fraction=0.2)
    )  # fmt: skip
    empty = 0
    for split in ("train", "test"):
        a, b = pipeline.load_split(source, split), pipeline.load_split(back, split)
        ids_a = [str(a[i]["id"]) for i in range(len(a))]
        ids_b = [str(b[i]["id"]) for i in range(len(b))]
        assert sorted(ids_a) == sorted(ids_b) and len(ids_a) == len(a)
        for i in range(len(a)):
            j = ids_b.index(ids_a[i])
            x, y = pipeline.preprocess(a[i]), pipeline.preprocess(b[j])
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["mask"], y["mask"])
            empty += not x["mask"].any()
    assert empty > 0  # the empty masks went through too
    with pytest.raises(FileExistsError, match="as_folder exists; export into a new folder"):
        export.export(source, str(out))


def test_export_command_writes_once_and_names_a_used_folder(tmp_path):
    from conftest import run_module

    args = [
        "--config=configs/e2_synthetic.py:tiny",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--out={tmp_path / 'x'}",
    ]
    log = run_module("diffseg_jax.data.export", *args)
    assert f"Exported 32 train, 8 test images at 32 px to {tmp_path / 'x'}" in log
    assert len(list((tmp_path / "x" / "test" / "masks").iterdir())) == 8
    import subprocess
    import sys

    again = subprocess.run(
        [sys.executable, "-m", "diffseg_jax.data.export", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert again.returncode == 1 and f"Error: --out {tmp_path / 'x'} exists" in again.stderr


_BUILD = """
import pathlib, sys, time
from diffseg_jax.data import manual, segmentation_folder
root, data_dir, building, ready = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4])
first = sys.argv[5] == "first"
real = segmentation_folder.DiffsegSegmentationFolder.load_example

def slow(self, record):  # the first build lasts until the second process has started its own
    building.touch()
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return real(self, record)

if first:
    segmentation_folder.DiffsegSegmentationFolder.load_example = slow
builder = segmentation_folder.make_builder(root, 16, data_dir=data_dir)
ready.touch()
stored = manual.prepare(builder, root)
print("masks", sum(int((x["mask"] > 0).sum()) for x in stored["train"]), len(stored["test"]))
"""


def test_two_processes_building_one_dataset_wait_for_each_other(tmp_path):
    """Two runs started together on a new folder: the second waits for the first's build (and says so), then
    reads it. (Before: both built, and the one that finished second died renaming tfds' temporary folder.)"""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    root = tmp_path / "folder"
    for split, n in (("train", 4), ("test", 2)):
        for k in range(n):
            _save(root / split / "images" / f"{split}{k}.png", np.full((16, 16, 3), 40 * k, np.uint8))
            _save(root / split / "masks" / f"{split}{k}.png", _square_mask(16, 4 + k))
    data_dir, building, ready = str(tmp_path / "tfds"), tmp_path / "building", tmp_path / "ready"

    def start(which):
        args = [sys.executable, "-c", _BUILD, str(root), data_dir, str(building), str(ready), which]
        return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("first")
    while not building.exists() and first.poll() is None:
        time.sleep(0.05)
    ready.unlink()  # the first process's own; the second makes it again when it starts building
    second = start("second")
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs[0][1][-2000:] + outs[1][1][-2000:]
    want = sum(int((_square_mask(16, 4 + k) > 0).sum()) for k in range(4))
    assert [o[0].splitlines()[-1] for o in outs] == [f"masks {want} 2"] * 2
    assert f"Waiting for process {first.pid} on host" in outs[1][1]


def test_a_mask_corrected_in_place_at_the_same_size_builds_anew(tmp_path):
    """An uncompressed TIFF mask inverted in place keeps its size (and here its modification time): the dataset
    identity hashes the files' content, so the next build reads the new mask. (Before: names and sizes only,
    and the stale build was reused.)"""
    import os  # noqa: PLC0415

    root = tmp_path / "folder"
    for split in ("train", "test"):
        for k in range(2):
            _save(root / split / "images" / f"{split}{k}.png", np.full((16, 16, 3), 60 * k, np.uint8))
            _save(root / split / "masks" / f"{split}{k}.tif", _square_mask(16, 6), compression="raw")
    data_dir = str(tmp_path / "tfds")
    before = manual.prepare(segmentation_folder.make_builder(root, 16, data_dir=data_dir), root)

    def areas(stored):
        return {
            str(x["id"], "utf-8") if isinstance(x["id"], bytes) else x["id"]: int((x["mask"] > 0).sum())
            for x in stored["train"]
        }

    assert areas(before) == {"train0": 36, "train1": 36}
    mask = root / "train" / "masks" / "train0.tif"
    size, stat = mask.stat().st_size, mask.stat()
    _save(mask, 255 - _square_mask(16, 6), compression="raw")
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert mask.stat().st_size == size and mask.stat().st_mtime_ns == stat.st_mtime_ns
    after = manual.prepare(segmentation_folder.make_builder(root, 16, data_dir=data_dir), root)
    assert areas(after) == {"train0": 16 * 16 - 36, "train1": 36}
