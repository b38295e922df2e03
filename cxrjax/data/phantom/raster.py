"""Drawing primitives of the phantom renderer: soft shapes, lung markings, noise, tiles, line splats.

Shapes are analytic in normalised anatomy coordinates ([-1, 1], y down, the patient's right on the
image left), so an image at any size shows the same anatomy. Costly functions are avoided on the full
grid (no atan2 / pow / where); local shapes are evaluated in a window of the image only (`Ctx.win`).
Images are rendered in tiles of rows so temporaries stay small and cache-resident.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

def ramp(d, w):
    """Soft step: 0 for d << 0, 1 for d >> 0, linear over width w."""
    return np.clip(d * (1.0 / w) + 0.5, 0.0, 1.0)


def bump(d, w):
    """Triangular profile: 1 at d=0 falling to 0 at |d|=w."""
    return np.clip(1.0 - np.abs(d) * (1.0 / w), 0.0, 1.0)


def gauss2(dx, dy, sx, sy):
    return np.exp(-(dx * dx * (1.0 / (sx * sx)) + dy * dy * (1.0 / (sy * sy))))


VES_A, VES_R, VES_RMAX = 384, 48, 1.4


def vessel_table(noise: np.ndarray) -> np.ndarray:
    """(2, A, R) lung-marking intensity over (pseudo-angle, radius) around each hilum, from coarse noise."""
    f = ndimage.zoom(noise, (1, VES_A / noise.shape[1], VES_R / noise.shape[2]), order=1, mode="nearest")
    rr = np.linspace(0, VES_RMAX, VES_R, dtype=np.float32)[None, None, :]
    w = 0.4 * (1.15 - np.minimum(rr, 1.0))
    ridge = np.clip(1.0 - np.abs(f) / w, 0, 1) ** 2
    fade = np.clip((rr - 0.04) / 0.15, 0, 1) * np.exp(-2.0 * rr)   # no starburst at the hilum itself
    return (ridge * fade).astype(np.float32).ravel()


def vessel_lookup(table, ax, ya, hu, hy, side_index):
    """Markings radiating from hila at (+-hu, hy); `side_index` 0/1 picks each lung's own pattern."""
    dx = ax - hu
    dy = ya - hy
    adx = np.abs(dx)
    l1 = adx + np.abs(dy) + 1e-3
    a = (dy / l1 + 1.0) * (0.5 * (VES_A - 1))            # pseudo-angle in [-1, 1] -> bins
    b = np.minimum(np.sqrt(dx * dx + dy * dy) * ((VES_R - 1) / VES_RMAX), VES_R - 1)
    idx = (a.astype(np.int32) * VES_R + b.astype(np.int32)) + side_index
    return table.take(idx)


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Stop glibc from returning freed heap to the OS after every image (set CXRJAX_PHANTOM_MALLOPT=0 to skip).

    Process-wide, so it is only called where a process exists to render (prepare's shard workers,
    the benchmark), never as a side effect of rendering in a user's process.

    Rendering makes a few hundred short-lived arrays per image. With glibc's defaults the large ones
    are mmap-ed and the heap top is trimmed back on free, so every temporary page-faults again: that
    alone halves the throughput. Raising the trim/mmap thresholds (64 MiB / 4 MiB) keeps the pages.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("CXRJAX_PHANTOM_MALLOPT", "1") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 64 << 20)   # M_TRIM_THRESHOLD
        libc.mallopt(-3, 4 << 20)    # M_MMAP_THRESHOLD
    except (OSError, AttributeError):   # not glibc: nothing to tune
        pass


_NOISE_BANK = None


def noise(r: np.random.Generator, size: int) -> np.ndarray:
    """Cheap deterministic unit Gaussian noise: a random window of a fixed bank, randomly flipped."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(20210223).standard_normal(2**21, dtype=np.float32)
    n = size * size
    if n > _NOISE_BANK.size // 2:
        return r.standard_normal((size, size), dtype=np.float32)
    k = r.integers(0, _NOISE_BANK.size - n, size=2)
    a = _NOISE_BANK[k[0]:k[0] + n].reshape(size, size)
    b = _NOISE_BANK[k[1]:k[1] + n].reshape(size, size)[::-1, ::-1]
    return (a + b) * np.float32(math.sqrt(0.5))


@functools.lru_cache(maxsize=16)
def pixel_grid(size: int):
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0)
    return np.ascontiguousarray(np.broadcast_to(c[None, :], (size, size))), np.ascontiguousarray(np.broadcast_to(c[:, None], (size, size)))


@dataclass
class Geom:
    """Image <-> anatomy coordinates of one image: anatomy = R(-rot) (image - shift) / scale."""
    rot: float
    tx: float
    ty: float
    scale: float

    def to_anatomy(self, xi, yi):
        c, s = math.cos(self.rot) / self.scale, math.sin(self.rot) / self.scale
        xs, ys = xi - self.tx, yi - self.ty
        return (c * xs + s * ys).astype(np.float32), (c * ys - s * xs).astype(np.float32)

    def to_image(self, xa, ya):
        c, s = math.cos(self.rot), math.sin(self.rot)
        return self.scale * (c * xa - s * ya) + self.tx, self.scale * (s * xa + c * ya) + self.ty


class Ctx:
    """Rows [t0, t1) of one image's pixel grid in anatomy coordinates, with windowing for local shapes.

    Images are rendered in tiles of a few rows: the temporaries stay small (cache-resident, and
    below the allocator's mmap threshold, which would otherwise page-fault on every array).
    """

    def __init__(self, size: int, geom: Geom, t0: int = 0, t1: int | None = None):
        self.size, self.geom = size, geom
        self.t0, self.t1 = t0, size if t1 is None else t1
        xi, yi = pixel_grid(size)
        self.xi, self.yi = xi[self.t0:self.t1], yi[self.t0:self.t1]
        self.x, self.y = geom.to_anatomy(self.xi, self.yi)
        self.px = 2.0 / size
        self.e1 = max(1.5 * self.px, 0.006)

    def win(self, cx, cy, rx, ry):
        """Pixel slices covering the anatomy rectangle [cx +- rx] x [cy +- ry] (None if off-image)."""
        xs = np.array([cx - rx, cx + rx, cx - rx, cx + rx])
        ys = np.array([cy - ry, cy - ry, cy + ry, cy + ry])
        xi, yi = self.geom.to_image(xs, ys)
        n = self.size
        c0, c1 = int(max(0, math.floor((xi.min() + 1) * 0.5 * n) - 1)), int(min(n, math.ceil((xi.max() + 1) * 0.5 * n) + 1))
        r0 = max(self.t0, math.floor((yi.min() + 1) * 0.5 * n) - 1) - self.t0
        r1 = min(self.t1, math.ceil((yi.max() + 1) * 0.5 * n) + 1) - self.t0
        if c1 <= c0 or r1 <= r0:
            return None
        return (slice(int(r0), int(r1)), slice(c0, c1))


def _smooth_curve(pts, n_iter=3):
    p = np.asarray(pts, np.float64)
    for _ in range(n_iter):   # Chaikin corner cutting
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r_ = 0.25 * p[:-1] + 0.75 * p[1:]
        p = np.concatenate([p[:1], np.stack([q, r_], 1).reshape(-1, 2), p[-1:]])
    return p


class Splat:
    """Radiopaque lines (wires, tubes) drawn as points along curves into pixel space, then blurred."""

    def __init__(self, ctx: Ctx):
        self.size, self.geom = ctx.size, ctx.geom
        self.acc = {}

    def line(self, pts, weight: float, width: float = 0.0, offset: float = 0.0):
        p = _smooth_curve(pts)
        if offset:
            d = np.gradient(p, axis=0)
            p = p + offset * np.stack([-d[:, 1], d[:, 0]], 1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
        L = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        s = np.arange(0, L[-1], 1.0 / self.size)   # every half pixel
        xi, yi = self.geom.to_image(np.interp(s, L, p[:, 0]), np.interp(s, L, p[:, 1]))
        col = (xi + 1) * 0.5 * self.size - 0.5
        row = (yi + 1) * 0.5 * self.size - 0.5
        sigma_px = round(max(0.7, width * 0.5 * self.size), 1)
        ok = (row >= 0) & (row < self.size - 1) & (col >= 0) & (col < self.size - 1)
        r0, c0 = row[ok].astype(int), col[ok].astype(int)
        fr, fc = row[ok] - r0, col[ok] - c0
        w = weight * 0.5 * math.sqrt(2 * math.pi) * sigma_px   # the blurred line peaks at ~weight
        acc = self.acc.setdefault(sigma_px, np.zeros(self.size * self.size, np.float64))
        n = self.size
        for dr, dc, ww in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
            acc += np.bincount((r0 + dr) * n + c0 + dc, weights=w * ww, minlength=n * n)

    def render(self, out: np.ndarray):
        """Add the blurred lines into `out` (size, size)."""
        for sigma, acc in self.acc.items():
            out += ndimage.gaussian_filter(acc.reshape(self.size, self.size), sigma, truncate=3.0).astype(np.float32)


class NoSplat:
    def line(self, *a, **k):
        pass


NO_SPLAT = NoSplat()

