"""Image files -> grayscale arrays: colour/alpha/palette images, 16-bit PNGs, damaged files and the
decompression-bomb limit, each against values computed here from the pixels written."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from cxrjax.data import images


def _luma(rgb):
    """ITU-R BT.601 luma (what a grayscale conversion of an sRGB image means), in 0..255."""
    rgb = np.asarray(rgb, np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def _one_line_error(path, match):
    with pytest.raises(images.ImageError) as e:
        images.load_image(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    assert match in message, message
    return message


# ----------------------------------------------------------------------------------------------
# Colour, alpha, palette


def test_rgb_is_luma(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    out = images.load_image(_save(tmp_path, "rgb.png", Image.fromarray(rgb, "RGB")))
    assert out.shape == (16, 24) and out.dtype == np.uint8
    assert np.abs(out.astype(float) - _luma(rgb)).max() <= 1.0


def test_rgba_is_composited_on_black(tmp_path):
    """Transparent pixels become black (the background of a radiograph), opaque ones their luma,
    half-transparent ones their luma x alpha -- not the colour hidden under alpha 0."""
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:, :4] = (255, 255, 255, 0)  # white, fully transparent
    rgba[:, 4:8] = (200, 100, 50, 255)  # opaque
    rgba[:, 8:] = (200, 100, 50, 128)  # half transparent
    out = images.load_image(_save(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA")))
    assert out.shape == (8, 12)
    assert (out[:, :4] == 0).all()
    assert np.abs(out[:, 4:8] - _luma((200, 100, 50))).max() <= 1.0
    assert np.abs(out[:, 8:] - _luma((200, 100, 50)) * 128 / 255).max() <= 1.5
    la = np.stack([np.full((8, 8), 180, np.uint8), np.r_[np.zeros((4, 8)), np.full((4, 8), 255)].astype(np.uint8)], -1)
    out = images.load_image(_save(tmp_path, "la.png", Image.fromarray(la, "LA")))  # grey + alpha
    assert (out[:4] == 0).all() and (out[4:] == 180).all()


def test_palette_images(tmp_path):
    colours = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 255), (30, 60, 90)]
    index = np.arange(8 * 10).reshape(8, 10) % len(colours)
    im = Image.fromarray(index.astype(np.uint8), "P")
    im.putpalette([c for rgb in colours for c in rgb])
    out = images.load_image(_save(tmp_path, "p.png", im))
    want = _luma(np.array(colours)[index])
    assert out.dtype == np.uint8 and np.abs(out - want).max() <= 1.0
    # a palette with a transparent entry: that entry is black, the others unchanged
    transparent = images.load_image(_save(tmp_path, "pt.png", im, transparency=3))
    assert (transparent[index == 3] == 0).all()
    assert np.abs(transparent[index != 3] - want[index != 3]).max() <= 1.0
    out16 = images.load_image(tmp_path / "p.png", bit_depth=16)  # 8-bit content at 16 bits: x 257
    assert out16.dtype == np.uint16 and (out16 == out.astype(np.uint16) * 257).all()


# ----------------------------------------------------------------------------------------------
# 16-bit PNGs


def test_16bit_png_full_range(tmp_path):
    v = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    path = _save(tmp_path, "full.png", Image.fromarray(v))
    assert Image.open(path).mode.startswith("I;16")  # really a 16-bit PNG
    out8 = images.load_image(path)
    assert out8.dtype == np.uint8 and (out8 == (v.astype(np.int64) * 255 // 65535)).all()
    assert out8[0, 0] == 0 and out8[-1, -1] == 255
    out16 = images.load_image(path, bit_depth=16)
    assert out16.dtype == np.uint16 and (out16 == v).all()  # lossless at 16 bits


def test_16bit_png_holding_12bit_data_is_scaled_by_4095(tmp_path):
    """12-bit detector data in a 16-bit container (max <= 4095): 4095 is white, not 65535."""
    v = np.linspace(0, 4095, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    path = _save(tmp_path, "12bit.png", Image.fromarray(v))
    out8, out16 = images.load_image(path), images.load_image(path, bit_depth=16)
    assert out8[-1, -1] == 255 and (out8 == (v.astype(np.int64) * 255 // 4095)).all()
    assert out16[-1, -1] == 65535 and (out16 == (v.astype(np.int64) * 65535 // 4095)).all()


def test_png_encode_decode_round_trip():
    for a in (np.arange(256, dtype=np.uint8).reshape(16, 16), (np.arange(256) * 257).astype(np.uint16).reshape(16, 16)):
        back = images.decode_png(images.encode_png(a))
        assert back.dtype == a.dtype and (back == a).all()


# ----------------------------------------------------------------------------------------------
# Damaged files


def test_truncated_jpeg_is_a_one_line_error(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    full = _save(tmp_path, "full.jpg", Image.fromarray(rgb), quality=90)
    assert images.load_image(full).shape == (96, 96)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # a download or copy that stopped half-way
    _one_line_error(cut, "cannot decode image")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    _one_line_error(junk, "cannot decode image")
    _one_line_error(tmp_path / "missing.png", "file not found")
    tiny = _save(tmp_path, "tiny.png", Image.fromarray(np.zeros((4, 40), np.uint8)))
    _one_line_error(tiny, "not a usable 2-D image (shape (4, 40))")


def _png_header_only(path, width, height, bit_depth=8):
    """A PNG that declares width x height but holds almost no data (what a decompression bomb does)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width,height", [(9000, 8000), (60000, 60000)])  # below / above Pillow's own limit
def test_oversized_image_is_refused_before_decoding(tmp_path, width, height):
    path = _png_header_only(tmp_path / "bomb.png", width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either: one error, ours
        message = _one_line_error(path, "MP limit for one radiograph")
    assert images.MAX_PIXELS == 8192 * 8192
    if width == 9000:
        assert "9000 x 8000 pixels (72 MP) is more than the 67 MP limit" in message


def test_the_limit_itself_is_allowed(tmp_path):
    """8192 x 8192 passes the size check (and then fails as the truncated file it is); one pixel more does not."""
    _one_line_error(_png_header_only(tmp_path / "edge.png", 8192, 8192), "cannot decode image")
    _one_line_error(_png_header_only(tmp_path / "over.png", 8192, 8193), "MP limit")


def test_oversized_dicom_is_refused_before_decoding(tmp_path):
    import pydicom
    from test_dicom import write_dicom

    path = write_dicom(tmp_path / "big.dcm", np.zeros((16, 16), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 20000, 20000  # the pixel data is tiny: decoding it would fail differently
    ds.save_as(path)
    _one_line_error(path, "20000 x 20000 pixels (400 MP) is more than the 67 MP limit")


def test_a_bad_image_is_listed_and_the_prepare_run_goes_on(tmp_path):
    """Through prepare: the truncated JPEG and the bomb are listed in the manifest with their reason."""
    import pandas as pd

    from cxrjax import prepare

    root = tmp_path / "ds"
    root.mkdir()
    good = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    for i in range(3):
        Image.fromarray(good).save(root / f"ok{i}.jpg", quality=90)
    data = (root / "ok0.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    _png_header_only(root / "bomb.png", 9000, 8000)
    files = ["ok0.jpg", "ok1.jpg", "ok2.jpg", "cut.jpg", "bomb.png"]
    pd.DataFrame({"File": files, "PID": [f"P{i}" for i in range(5)]}).to_csv(root / "list.csv", index=False)
    m = prepare.prepare_dataset("csv", tmp_path / "out", src=root / "list.csv", csv_mapping="path=File,patient_id=PID",
                                size=32, workers=1, strategies=["instance"])
    reasons = {b["path"]: b["reason"] for b in m["bad_inputs"]["items"]}
    assert sorted(reasons) == ["bomb.png", "cut.jpg"] and m["counts"]["images"] == 3
    assert "cannot decode image" in reasons["cut.jpg"] and "67 MP limit" in reasons["bomb.png"]
