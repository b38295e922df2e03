"""DICOM pixels -> a display-ready 2-D array (what a radiologist's viewer would show).

Raw DICOM pixel values are not intensities: they must go through the Modality LUT (rescale to
physical units), the VOI LUT (the window the scanner/radiologist chose) and, for MONOCHROME1, an
inversion (MONOCHROME1 stores bone dark). Skipping any of these gives images whose contrast differs
by scanner, a shortcut a self-supervised model will happily learn. Headers-only reading for the
metadata table lives in `cxrjax.data.metadata.load_dicom_folder`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut


def _first(value):
    """First element of a multi-valued DICOM element (WindowCenter may hold several presets)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return float(value[0]) if len(value) else None
    return float(value)


def _voi_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window -> values in [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    # LINEAR (the default): the standard's -0.5 / -1 offsets, defined for width >= 1.
    if width <= 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def read_dicom(path: str | Path, bit_depth: int = 8) -> np.ndarray:
    """Read one DICOM image as a 2-D array where bright = dense (bone), like a chest film.

    Steps: stored bits masked to BitsStored (12-bit data in 16-bit words), Modality LUT
    (RescaleSlope/Intercept or a LUT sequence), VOI window (first WindowCenter/WindowWidth when
    present, VOILUTFunction honoured; otherwise the full range of the data), MONOCHROME1 inverted,
    then scaled to uint8 (bit_depth=8) or uint16 (bit_depth=16). Multi-frame files give their first
    frame; colour files are averaged to grey.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    ds = pydicom.dcmread(str(path))
    from cxrjax.data.images import check_size  # images imports this module lazily: no import cycle

    check_size(path, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))  # before decoding
    arr = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) > 1:  # colour (rare for CXR): (..., 3) -> grey
        arr = arr.mean(axis=-1)
    if arr.ndim == 3:  # multi-frame: first frame
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D image, got pixel array of shape {arr.shape}")
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    if (
        np.issubdtype(arr.dtype, np.unsignedinteger)
        and 0 < bits_stored < arr.dtype.itemsize * 8
    ):
        arr = arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)  # drop overlay/garbage high bits
    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)

    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        y = _voi_window(x, center, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    else:
        lo, hi = float(x.min()), float(x.max())
        y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        y = 1.0 - y
    top = 255 if bit_depth == 8 else 65535
    return np.rint(y * top).astype(np.uint8 if bit_depth == 8 else np.uint16)
