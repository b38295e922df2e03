"""Render a table row to a radiograph: the view's attenuation map, then acquisition drawn per image, so two
images of one study differ: version 2 a narrow exposure / tone / noise range, collimation and a side marker;
version 3 real films' spread of positioning and acquisition (acquisition.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import acquisition
from .frontal import frontal
from .lateral import lateral
from .raster import NO_SPLAT, Ctx, Splat, noise, pixel_grid
from .scene import Scene, image_geom, scene
from .streams import rng


def _marker(B, size, u):
    """A small bright square with a dark 'L' glyph (or its mirror, 'R'-side) near a top corner."""
    m = max(4, int(0.06 * size))
    top = int((0.05 + 0.08 * u[0]) * size)
    left = int(0.06 * size) if u[1] < 0.5 else size - int(0.06 * size) - m
    t = max(1, m // 5)
    B[top:top + m, left:left + m] = 1.0
    g0, g1 = top + t, top + m - t
    c = left + t if u[2] < 0.5 else left + m - 2 * t
    B[g0:g1, c:c + t] = 0.15
    B[g1 - t:g1, left + t:left + m - t] = 0.15


def render_image(row, size: int = 256) -> np.ndarray:
    """The (size, size) uint8 radiograph of one table row (bright = dense); deterministic."""
    version = str(row.get("extra_phantom_version", "2") or "2")   # tables without the column are version 2's
    return render_scene(scene(row), str(row["image_id"]), size, version)


def render_scene(sc: Scene, image_id: str, size: int = 256, version: str = "2") -> np.ndarray:
    """The radiograph of a scene as image `image_id` (its positioning and acquisition) would show it."""
    geom, r_img = image_geom(sc.seed, image_id, version)
    if version != "2":
        sc = acquisition.per_image_scene(sc, image_id)
    draw = lateral if sc.view == "LATERAL" else frontal
    A = np.empty((size, size), np.float32)
    splat = Splat(Ctx(size, geom, 0, 1))
    rows = max(1, 65536 // size)
    for t0 in range(0, size, rows):   # tiles of rows; lines are drawn once, by the first tile
        ctx = Ctx(size, geom, t0, min(size, t0 + rows))
        A[ctx.t0:ctx.t1] = draw(sc, ctx, splat if t0 == 0 else NO_SPLAT)
    if version != "2":
        r_acq = rng(sc.seed, "acquisition-v3", image_id)
        acquisition.draw_electrodes(sc, Ctx(size, geom), splat, A, r_acq)
        splat.render(A)
        return (acquisition.acquire(A, r_acq) * 255.0 + 0.5).astype(np.uint8)
    splat.render(A)
    return _acquire_v2(A, r_img)


def _acquire_v2(A: np.ndarray, r_img) -> np.ndarray:
    """Version 2's acquisition: a narrow exposure / tone / noise range, white collimation, a corner marker."""
    size = A.shape[0]
    acq = r_img.random(20).tolist()   # python floats: keep the arrays float32
    xi, yi = pixel_grid(size)
    # acquisition: exposure, uneven field, window to the full range, gamma, quantum noise
    B = 1.0 - np.exp(-(0.85 + 0.35 * acq[0]) * np.maximum(A, 0.0))
    B += (0.04 * (acq[1] - 0.5)) * xi + (0.04 * (acq[2] - 0.5)) * yi
    step = max(1, size // 64)
    lo, hi = (float(v) for v in np.percentile(B[::step, ::step], (0.5, 99.7)))
    B = np.clip((B - lo) * (1.0 / max(hi - lo, 1e-3)), 0, 1)
    c = 0.6 * (acq[3] - 0.5)   # gamma-like tone curve, monotonic
    B = B + c * B * (1.0 - B)
    B = B * (0.94 + 0.06 * acq[4]) + (0.012 + 0.025 * acq[5]) * noise(r_img, size)
    # collimation: unexposed (white) borders, each side with probability 0.3
    widths = [int((0.02 + 0.07 * a) * size) for a in acq[10:14]]
    level = 0.9 + 0.1 * acq[14]
    if acq[6] < 0.3:
        B[: widths[0]] = level
    if acq[7] < 0.3:
        B[size - widths[1]:] = level
    if acq[8] < 0.3:
        B[:, : widths[2]] = level
    if acq[9] < 0.3:
        B[:, size - widths[3]:] = level
    _marker(B, size, acq[15:18])
    return (np.clip(B, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def render_images(table: pd.DataFrame, size: int = 256) -> np.ndarray:
    """(n, size, size) uint8 images of every row of a phantom table."""
    out = np.empty((len(table), size, size), np.uint8)
    for i, (_, row) in enumerate(table.iterrows()):
        out[i] = render_image(row, size)
    return out
