"""Version 3's per-image nuisance: what changes between two films of one patient taken minutes apart.

Real films differ per image in how the patient stood and breathed, how the film was exposed, processed
and windowed, what the collimator cut off, what was burnt in, and what lay on the patient; the findings
do not. Each knob below is drawn per image from the image's own stream (`rng(seed, "acquisition-v3",
image_id)`), so the frontal and the lateral of one study differ in all of them while showing the same
findings. `benchmarks/film_nuisance.py` measures the resulting spread beside NIH's real 64 px films and
docs/phantom.md lists every knob with its range and the measured table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from .raster import Ctx, Splat, noise, pixel_grid, ramp
from .scene import Scene
from .streams import rng

# Every per-image knob and its range (docs/phantom.md repeats this table). u ~ U(0, 1), n ~ N(0, 1) clipped.
KNOBS = {
    "habitus": "soft tissue beyond the ribs x exp(0.2 n) (weight, arms, breasts, positioning of the shoulders)",
    "inspiration": "diaphragm shift + 0.05 n (normalised units; the hemithorax is ~1.1 high) on the study's own",
    "exposure": "attenuation gain 0.7 + 0.7 u (under- to over-penetrated)",
    "scatter": "a veil of the image blurred by 12 % of the width, weight 0.45 u (no grid / thick patient)",
    "heel": "uneven field: a linear ramp of +-0.05 across and +-0.05 down",
    "tone": "gamma exp(0.35 n) then an S-curve of strength 0.8 (u - 0.5)",
    "window": "black level |N(0, 0.09)|, white level 1 - |N(0, 0.14)| (the display window of the stored film)",
    "grid": "anti-scatter grid lines in 35 % of films: a sinusoid of 0.3-0.48 cycles per pixel, amplitude 0.002-0.008",
    "noise": "quantum noise SD (0.002 + 0.007 u) x size / 64 (the same photons per film area at every size)",
    "collimation": "each side collimated with probability 0.25, 2-14 % of the width, edge tilted up to 3 degrees, "
                   "unexposed (white, 0.85-1) or masked (black, 0-0.08) at 60 / 40",
    "marker": "an L / R lead marker at a random place along the top or outer edges, 4-8 % of the width",
    "text": "0-3 burnt-in text lines (dates, institution) of 4-12 glyphs, 1.5-3 % of the width high, in the "
            "corners, bright or dark",
    "electrodes": "ECG electrodes with their leads: 3-5 per film in 55 % of AP, 15 % of PA, 30 % of lateral films, "
                  "placed anew on every film (not a labelled support device)",
}


def per_image_scene(sc: Scene, image_id: str) -> Scene:
    """The scene with this image's habitus and inspiration (the patient's anatomy and findings unchanged)."""
    n = rng(sc.seed, "anatomy-v3", image_id).standard_normal(2)
    an = dataclasses.replace(sc.an, margin=float(np.clip(sc.an.margin * math.exp(0.2 * np.clip(n[0], -2, 2)), 0.02, 0.3)))
    st = dataclasses.replace(sc.st, inspiration=float(sc.st.inspiration + 0.05 * np.clip(n[1], -2.5, 2.5)))
    return dataclasses.replace(sc, an=an, st=st, patches={})


def draw_electrodes(sc: Scene, ctx: Ctx, splat: Splat, A: np.ndarray, r: np.random.Generator) -> None:
    """ECG electrodes (bright discs with a snap) and their leads running off the film, placed per film."""
    p = {"LATERAL": 0.30, "PA": 0.15}.get(sc.view, 0.55)
    u = r.random(2)
    if u[0] >= p:
        return
    k = 3 + int(3 * u[1])
    for _ in range(k):
        ex, ey = float(r.uniform(-0.85, 0.85)), float(r.uniform(-0.75, 0.55))
        rad = float(r.uniform(0.025, 0.04))
        w = ctx.win(ex, ey, rad + 0.02, rad + 0.02)
        if w:
            d = np.sqrt((ctx.x[w] - ex) ** 2 + (ctx.y[w] - ey) ** 2)
            A[w] += 0.25 * ramp(rad - d, 0.01) + 0.6 * ramp(0.35 * rad - d, 0.006)
        # the lead: a gentle curve from the electrode to a film edge
        ang = float(r.uniform(0, 2 * math.pi))
        bend = float(r.uniform(-0.4, 0.4))
        pts = [(ex + t * math.cos(ang + bend * t), ey + t * math.sin(ang + bend * t)) for t in np.linspace(0, 2.2, 8)]
        splat.line(pts, 0.35)


def _glyph_rows(r: np.random.Generator, n: int) -> np.ndarray:
    """(5, 4 n) bitmap of n random 3x5 glyphs with one blank column between them."""
    g = r.random((n, 5, 3)) < 0.55
    g[:, :, 1] |= r.random((n, 5)) < 0.3
    out = np.zeros((5, 4 * n), bool)
    for i in range(n):
        out[:, 4 * i:4 * i + 3] = g[i]
    return out


def _text_box(bitmap: np.ndarray, height: float) -> tuple[int, int]:
    """(h, w) in pixels of a glyph bitmap drawn as a line `height` pixels high."""
    return max(1, int(round(height))), max(1, int(round(bitmap.shape[1] * height / bitmap.shape[0])))


def _stamp(B: np.ndarray, bitmap: np.ndarray, top: int, left: int, h: int, w: int, level: float) -> None:
    """Blend a glyph bitmap into B as an (h, w) box (area-resized: at 64 px a text line is a speckled
    1-2 px band, as a real film's burnt-in text is after downscaling)."""
    import cv2

    size = B.shape[0]
    m = cv2.resize(bitmap.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    top, left = max(0, min(size - h, top)), max(0, min(size - w, left))
    region = B[top:top + h, left:left + w]
    m = m[:region.shape[0], :region.shape[1]]
    region[...] = region * (1.0 - m) + level * m


def burn_in(B: np.ndarray, r: np.random.Generator) -> None:
    """The lead marker and burnt-in text lines, drawn into the film B ([0, 1], bright = dense)."""
    size = B.shape[0]
    # marker: a bright square with a dark L (or R) glyph
    m = max(4, int(r.uniform(0.04, 0.08) * size))
    edge = r.integers(3)   # top, left, right
    pos = r.uniform(0.05, 0.95)
    if edge == 0:
        top, left = int(r.uniform(0.02, 0.15) * size), int(pos * (size - m))
    else:
        top = int(r.uniform(0.05, 0.6) * size)
        left = int(r.uniform(0.02, 0.1) * size) if edge == 1 else size - m - int(r.uniform(0.02, 0.1) * size)
    B[top:top + m, left:left + m] = 1.0
    t = max(1, m // 5)
    g0, g1 = top + t, top + m - t
    c = left + t if r.random() < 0.5 else left + m - 2 * t
    B[g0:g1, c:c + t] = 0.15
    B[g1 - t:g1, left + t:left + m - t] = 0.15
    # text lines in the corners
    for _ in range(int(r.integers(0, 4))):
        bitmap = _glyph_rows(r, int(r.integers(4, 13)))
        height = max(1.5, float(r.uniform(0.015, 0.03)) * size)
        h, w = _text_box(bitmap, height)
        corner = r.integers(4)
        top = int(r.uniform(0.01, 0.08) * size) if corner < 2 else size - h - int(r.uniform(0.01, 0.08) * size)
        left = int(r.uniform(0.01, 0.1) * size) if corner % 2 == 0 else size - w - int(r.uniform(0.01, 0.1) * size)
        _stamp(B, bitmap, top, left, h, w, 0.95 if r.random() < 0.7 else 0.05)


def collimate(B: np.ndarray, r: np.random.Generator) -> None:
    """Collimated or masked borders: each side with probability 0.25, its edge slightly tilted."""
    size = B.shape[0]
    xi, yi = pixel_grid(size)
    for side in range(4):
        u = r.random(4)
        if u[0] >= 0.25:
            continue
        width = 2 * (0.02 + 0.12 * u[1])                    # normalised units: the image spans 2
        tilt = math.tan(math.radians(3.0 * (2 * u[2] - 1)))
        level = float(r.uniform(0.85, 1.0)) if u[3] < 0.6 else float(r.uniform(0.0, 0.08))
        along, across = (xi, yi) if side in (0, 1) else (yi, xi)
        d = (across + 1.0 if side in (0, 2) else 1.0 - across) - tilt * along
        B[d < width] = level


def acquire(A: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """The stored film ([0, 1]) of an attenuation map A: exposure, scatter, heel effect, window, tone,
    grid, noise, collimation and burn-in, each drawn from the image's acquisition stream r."""
    size = A.shape[0]
    a = r.random(16).tolist()
    n = np.clip(r.standard_normal(4), -2.5, 2.5).tolist()
    xi, yi = pixel_grid(size)
    B = 1.0 - np.exp(-(0.7 + 0.7 * a[0]) * np.maximum(A, 0.0))
    s = 0.45 * a[1]
    if s > 0:
        B = (1.0 - s) * B + s * ndimage.gaussian_filter(B, 0.12 * size, truncate=2.0)
    B = B + (0.1 * (a[2] - 0.5)) * xi + (0.1 * (a[3] - 0.5)) * yi
    step = max(1, size // 64)
    lo, hi = (float(v) for v in np.percentile(B[::step, ::step], (0.5, 99.7)))
    B = np.clip((B - lo) * (1.0 / max(hi - lo, 1e-3)), 0, 1)
    B = B ** math.exp(0.35 * n[0])
    c = 0.8 * (a[4] - 0.5)
    B = B + c * B * (1.0 - B)
    black, white = min(0.35, abs(0.09 * n[1])), max(0.6, 1.0 - abs(0.14 * n[2]))
    B = black + (white - black) * B
    if a[5] < 0.35:   # anti-scatter grid lines
        f, amp, phase = 0.3 + 0.18 * a[6], 0.002 + 0.006 * a[7], 2 * math.pi * a[8]
        coord = xi if a[9] < 0.8 else yi
        B = B + amp * np.sin(math.pi * size * f * coord + phase)
    B = B + ((0.002 + 0.007 * a[10]) * size / 64) * noise(r, size)
    B = np.clip(B, 0.0, 1.0)
    collimate(B, r)
    burn_in(B, r)
    return B
