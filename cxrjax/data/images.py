"""Image files -> grayscale arrays at the prepared size -> PNG bytes.

Radiographs arrive as JPEG/PNG (8- or 16-bit; grayscale, RGB, RGBA, palette) or DICOM. Everything
becomes one 2-D grayscale array (uint8, or uint16 when a 16-bit record set is asked for), is fitted
to a square of the prepared size, and stored as PNG (lossless, decodable without TensorFlow).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

FIT_MODES = ("pad", "crop", "shorter")
MAX_ASPECT = 1.25  # fit="shorter": the longer side is kept up to this many times the shorter one
DICOM_SUFFIXES = (".dcm", ".dicom")

# Decompression-bomb limit: the largest image a file may declare. The largest chest detectors are
# 43 x 43 cm at 100-70 um pixels, i.e. 4300-6100 px a side (18-37 megapixels); 8192 x 8192 leaves
# room above that and still caps what one decode may allocate (67 MP: 134 MB as 16-bit). The size
# is read from the header, before any pixel is decoded. Pillow's own check (a warning above 89 MP,
# an error above 179 MP) is replaced by this one.
MAX_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and says why, in one line."""


def check_size(path, width: int, height: int) -> None:
    """Refuse an image whose declared size is above MAX_PIXELS (before decoding it)."""
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{path}: {width} x {height} pixels ({width * height / 1e6:.0f} MP) is more than the "
            f"{MAX_PIXELS / 1e6:.0f} MP limit for one radiograph (a decompression bomb, or not a chest X-ray); "
            "if it is a real image, downscale it or raise cxrjax.data.images.MAX_PIXELS")


def _to_gray(im: Image.Image, bit_depth: int) -> np.ndarray:
    """Any PIL mode -> 2-D array of the requested depth (alpha composited on black)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im)
        if a.ndim != 2:
            raise ImageError(f"unexpected {im.mode} image with shape {a.shape}")
        # 16-bit PNGs from CXR datasets use the full 16-bit range or a 12-bit subset; rescale
        # by the container's range, not by the data (the data range would undo exposure).
        top = 65535 if a.max(initial=0) > 4095 else 4095
        a = np.clip(a, 0, top).astype(np.uint32)  # a * 65535 < 2**32: no overflow, half of int64's memory
        return (a * 65535 // top).astype(np.uint16) if bit_depth == 16 else (a * 255 // top).astype(np.uint8)
    if im.mode == "F":
        a = np.asarray(im, np.float64)
        lo, hi = np.nanmin(a), np.nanmax(a)
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return (a * (65535 if bit_depth == 16 else 255)).round().astype(np.uint16 if bit_depth == 16 else np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    a = np.asarray(im.convert("L"))
    return a.astype(np.uint16) * 257 if bit_depth == 16 else a


def load_image(path: str | Path, bit_depth: int = 8) -> np.ndarray:
    """Read an image file (JPEG/PNG/... or DICOM) as a 2-D uint8 (or uint16) grayscale array."""
    path = Path(path)
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    if path.suffix.lower() in DICOM_SUFFIXES:
        from cxrjax.data import dicom  # pydicom is only imported for DICOM sources

        return dicom.read_dicom(path, bit_depth=bit_depth)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides
            im = Image.open(path)
        with im:
            check_size(path, *im.size)  # from the header: nothing decoded yet
            im.draft("L", (1 << 30, 1 << 30))  # JPEG: decode straight to grayscale (no RGB pass)
            a = _to_gray(im, bit_depth)
    except Image.DecompressionBombError as e:  # Pillow's own limit (179 MP) is above ours: the same error
        raise ImageError(f"{path}: more than the {MAX_PIXELS / 1e6:.0f} MP limit for one radiograph "
                         f"(a decompression bomb, or not a chest X-ray): {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: cannot decode image: {e}") from e
    if a.ndim != 2 or min(a.shape) < 8:
        raise ImageError(f"{path}: not a usable 2-D image (shape {a.shape})")
    return a


def canvas_size(size: int, mode: str = "pad", max_aspect: float = MAX_ASPECT) -> int:
    """Side of the square a fitted image is stored in: `size`, or for fit="shorter" the room for a
    longer side of up to `max_aspect` x `size`."""
    return int(round(size * max_aspect)) if mode == "shorter" else size


def fit_image(image: np.ndarray, size: int, mode: str = "pad", max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """`fit_image_box` without the box."""
    return fit_image_box(image, size, mode, max_aspect)[0]


def fit_image_box(image: np.ndarray, size: int, mode: str = "pad",
                  max_aspect: float = MAX_ASPECT) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fit into a square keeping the aspect ratio; returns (square, content box (top, left, h, w)).

    pad: scale the longer side to `size` and pad the shorter one symmetrically with black (nothing
         of the anatomy is lost; the default). The box is the image without its bars.
    crop: scale the shorter side to `size` and cut the centre (what torchvision's Resize+CenterCrop does).
    shorter: scale the shorter side to `size` (MedAug's Resize(size), aspect kept), keep the longer
         side up to `max_aspect` x `size` (centre-cropped beyond), and store it centred in a square of
         `canvas_size` with black around it; the box says where, so augmentation crops the image
         itself (MedAug's RandomCrop(size) slides along the longer side) and never the black.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {FIT_MODES}, got {mode!r}")
    h, w = image.shape
    scale = size / max(h, w) if mode == "pad" else size / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    wide = image.dtype == np.uint16
    if (nh, nw) != (h, w):
        # Pillow resizes 16-bit data in 32-bit 'I' mode; go there and back.
        im = Image.fromarray(image.astype(np.int32)) if wide else Image.fromarray(image)
        im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0 if scale < 0.5 else None)
        resized = np.clip(np.asarray(im), 0, 65535).astype(np.uint16) if wide else np.asarray(im)
    else:
        resized = image
    side = canvas_size(size, mode, max_aspect)
    out = np.zeros((side, side), image.dtype)
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        out[:] = resized[top : top + size, left : left + size]
        return out, (0, 0, size, size)
    if mode == "shorter":  # cut the longer side to the canvas if it is longer still
        ch, cw = min(nh, side), min(nw, side)
        resized = resized[(nh - ch) // 2 : (nh - ch) // 2 + ch, (nw - cw) // 2 : (nw - cw) // 2 + cw]
        nh, nw = ch, cw
    top, left = (side - nh) // 2, (side - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out, (top, left, nh, nw)


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """Lossless PNG; level 1 encodes ~4x faster than the default 6 for ~15% more bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> 2-D array (uint8 or uint16)."""
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im)
    return a.astype(np.uint16) if a.dtype.kind in "iu" and a.dtype.itemsize > 1 else a
