"""MoNuSeg's Aperio ImageScope XML annotations: parsing the nucleus polygons and rasterising them.

The XML holds `Annotations/Annotation/Regions/Region/Vertices/Vertex` elements with float `X` (column) and `Y`
(row) attributes; `Regions` starts with a `RegionAttributeHeaders` element, so regions are found by tag, never by
position. Polygons may overlap, repeat vertices, and touch or cross the image border.

Rasterisation follows the even-odd rule on pixel centres at integer coordinates (pixel (r, c) is the point
x = c, y = r) and by default counts centres on the outline as inside: the result equals `skimage.draw.polygon`,
the rasteriser of the public MoNuSeg mask scripts (checked pixel for pixel against masks made with it). MoNuSeg's
vertices are integer outline pixels, so this adds the traced outline (about 10% of a nucleus's pixels) to the
area-faithful interior; `boundary='half_open'` gives the latter (MATLAB `poly2mask` is close to it).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from diffseg_jax.data.files import DatasetFileError


def parse_regions(path: str | os.PathLike) -> list[np.ndarray]:
    """The polygons of every `Region` in the file, each a float64 (n, 2) array of (x = column, y = row)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetFileError(
            f"Cannot parse annotation file {path}: {e}. Replace it with the intact XML from the MoNuSeg release."
        ) from e
    polygons = []
    for region in root.iter("Region"):
        try:
            points = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
        except (KeyError, ValueError) as e:
            raise DatasetFileError(
                f"Annotation file {path}: Region Id={region.attrib.get('Id')!r} has a Vertex without numeric X/Y "
                f"({e}). Replace the file with the one from the MoNuSeg release."
            ) from e
        polygon = np.asarray(points, np.float64).reshape(-1, 2)
        if not np.all(np.isfinite(polygon)):  # float() reads 'nan' and 'inf'; no pixel can be drawn from them
            bad = polygon[~np.all(np.isfinite(polygon), axis=1)][0]
            raise DatasetFileError(
                f"Annotation file {path}: Region Id={region.attrib.get('Id')!r} has a Vertex at X={bad[0]}, "
                f"Y={bad[1]}, not a finite coordinate. Replace the file with the one from the MoNuSeg release (or "
                "correct that vertex)."
            )
        polygons.append(polygon)
    if not polygons:
        raise DatasetFileError(
            f"Annotation file {path} has no <Region> elements, so it marks no nuclei. A MoNuSeg annotation holds "
            "hundreds; replace it with the file from the release (or remove its image if it really has none)."
        )
    return polygons


def polygon_mask(
    polygon: np.ndarray, shape: tuple[int, int], boundary: str = "include"
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """(window, bool mask in the window) of the pixels of `polygon` (x, y vertices), clipped to `shape`.

    `boundary='include'` (default) also takes every pixel centre lying exactly on an edge, as
    `skimage.draw.polygon` does (the rasteriser of the public MoNuSeg mask scripts): the annotators traced the
    nuclei through their outline pixels, which belong to the nucleus. `'half_open'` keeps only centres on left or
    top edges, so pixel counts equal polygon areas. None for a polygon that covers no pixel centre.
    """
    if boundary not in ("include", "half_open"):
        raise ValueError(f"Unknown boundary rule {boundary!r}; use 'include' or 'half_open'.")
    h, w = shape
    if len(polygon) < 2:
        return None
    x, y = polygon[:, 0], polygon[:, 1]
    # Rows r with ymin <= r <= ymax (and columns likewise), clipped to the image.
    r0, r1 = max(int(np.ceil(y.min())), 0), min(int(np.floor(y.max())) + 1, h)
    c0, c1 = max(int(np.ceil(x.min())), 0), min(int(np.floor(x.max())) + 1, w)
    if r0 >= r1 or c0 >= c1:
        return None
    rows = np.arange(r0, r1, dtype=np.float64)[:, None]  # (R, 1)
    xa, ya = x[None, :], y[None, :]
    xb, yb = np.roll(x, -1)[None, :], np.roll(y, -1)[None, :]  # the closing edge included
    # Interior, even-odd: an edge crosses row y if y lies in [min(ya, yb), max(ya, yb)) (horizontal edges never
    # do, and a vertex shared by two edges counts once); each crossing at x toggles inside/outside for the pixel
    # centres c >= x, so a centre is inside when the count of crossings at or left of it is odd.
    crosses = (np.minimum(ya, yb) <= rows) & (rows < np.maximum(ya, yb))
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, xa + (rows - ya) * (xb - xa) / (yb - ya), 0.0)
    start = np.clip(np.ceil(xs - c0), 0, c1 - c0).astype(np.int64)
    toggles = np.zeros((r1 - r0, c1 - c0 + 1), np.int32)
    rr = np.broadcast_to(np.arange(r1 - r0)[:, None], xs.shape)
    np.add.at(toggles, (rr[crosses], start[crosses]), 1)
    inside = (np.cumsum(toggles, axis=1)[:, :-1] % 2).astype(bool)
    if boundary == "include":
        _mark_edges(inside, x, y, r0, c0)
    if not inside.any():
        return None
    return (slice(r0, r1), slice(c0, c1)), inside


def _mark_edges(out: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, c0: int, eps: float = 1e-9) -> None:
    """Sets the pixels of `out` (a window at row r0, column c0) whose centres lie on an edge of the polygon."""
    n_rows, n_cols = out.shape
    xa, ya, xb, yb = x, y, np.roll(x, -1), np.roll(y, -1)
    rows = np.arange(r0, r0 + n_rows, dtype=np.float64)[:, None]
    slanted = ya != yb
    on_row = slanted & (np.minimum(ya, yb) <= rows) & (rows <= np.maximum(ya, yb))
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(on_row, xa + (rows - ya) * (xb - xa) / (yb - ya), 0.5)
    col = np.round(xs)
    hit = on_row & (np.abs(xs - col) < eps) & (col >= c0) & (col < c0 + n_cols)
    rr = np.broadcast_to(np.arange(n_rows)[:, None], xs.shape)
    out[rr[hit], col[hit].astype(np.int64) - c0] = True
    # Horizontal edges on an integer row: every integer column between their ends.
    flat = ~slanted & (np.abs(ya - np.round(ya)) < eps)
    flat &= (np.round(ya) >= r0) & (np.round(ya) < r0 + n_rows)
    if flat.any():
        cols = np.arange(c0, c0 + n_cols, dtype=np.float64)[None, :]
        lo, hi = np.minimum(xa, xb)[flat, None], np.maximum(xa, xb)[flat, None]
        spans = (cols >= lo - eps) & (cols <= hi + eps)
        np.logical_or.at(out, np.round(ya[flat]).astype(np.int64) - r0, spans)


def rasterise(polygons: list[np.ndarray], shape: tuple[int, int], boundary: str = "include") -> np.ndarray:
    """int32 instance labels 1..K for the polygons that cover pixels (later ones win where they overlap), 0 elsewhere.

    Labels are consecutive over the polygons that cover at least one pixel, so `labels.max()` is the number of
    rasterised nuclei; their union (`labels > 0`) is the binary mask.
    """
    labels = np.zeros(shape, np.int32)
    k = 0
    for polygon in polygons:
        found = polygon_mask(polygon, shape, boundary)
        if found is None:
            continue
        k += 1
        window, inside = found
        labels[window][inside] = k
    return labels
