"""read_dicom: Modality LUT, VOI window, MONOCHROME1 inversion, 12-bit data; load_dicom_folder headers."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrjax.data.dicom import read_dicom
from cxrjax.data.metadata import load_dicom_folder
from cxrjax.data.schema import MetadataError


def write_dicom(
    path,
    stored: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window=None,
    slope=None,
    intercept=None,
    **header,
):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sop = header.pop("SOPInstanceUID", generate_uid())
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop
    ds.Modality = "CR"
    for k, v in header.items():
        setattr(ds, k, v)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


RAMP = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)


def test_monochrome2_full_range_12bit(tmp_path):
    out = read_dicom(write_dicom(tmp_path / "a.dcm", RAMP))
    assert out.dtype == np.uint8 and out.shape == (2, 2)
    # no window: full data range 0..4095 -> 0..255
    np.testing.assert_array_equal(out, [[0, 64], [128, 255]])
    out16 = read_dicom(tmp_path / "a.dcm", bit_depth=16)
    assert out16.dtype == np.uint16
    np.testing.assert_array_equal(out16, [[0, 16388], [32776, 65535]])


def test_monochrome1_is_inverted(tmp_path):
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", RAMP, "MONOCHROME2"))
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", RAMP, "MONOCHROME1"))
    np.testing.assert_array_equal(m1, [[255, 191], [127, 0]])
    np.testing.assert_array_equal(m1.astype(int) + m2.astype(int), np.full((2, 2), 255))


def test_high_bits_beyond_bits_stored_are_ignored(tmp_path):
    stored = RAMP | np.uint16(0xF000)  # garbage in the 4 unused bits of 12-bit data
    out = read_dicom(write_dicom(tmp_path / "g.dcm", stored))
    np.testing.assert_array_equal(out, [[0, 64], [128, 255]])


def test_voi_window_linear(tmp_path):
    stored = np.array([[1000, 1536], [2048, 3000]], dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "w.dcm", stored, window=(2048, 1024)))
    # DICOM LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; 2048 -> 0.50049
    np.testing.assert_array_equal(out, [[0, 0], [128, 255]])
    out16 = read_dicom(tmp_path / "w.dcm", bit_depth=16)
    np.testing.assert_array_equal(out16, [[0, 0], [32800, 65535]])


def test_multi_valued_window_uses_first(tmp_path):
    stored = np.array([[1000, 1536], [2048, 3000]], dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "w2.dcm", stored, window=([2048, 100], [1024, 50])))
    np.testing.assert_array_equal(out, [[0, 0], [128, 255]])


def test_window_applies_after_rescale_and_before_inversion(tmp_path):
    # stored 512..2048, slope 2, intercept -1024 -> 0..3072; window centred on 1536 +- 1536
    stored = np.array([[512, 1024], [1536, 2048]], dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "r.dcm", stored, slope=2, intercept=-1024))
    np.testing.assert_array_equal(out, [[0, 85], [170, 255]])  # full range 0..3072
    out = read_dicom(write_dicom(tmp_path / "r1.dcm", stored, "MONOCHROME1", slope=2, intercept=-1024, window=(1024.5, 2048)))
    # y = (x - 1024) / 2047 + 0.5 clipped: 0 -> 0, 1024 -> 0.5, 2048 -> 1, 3072 -> 1; then inverted
    np.testing.assert_array_equal(out, [[255, 128], [0, 0]])


def test_16bit_and_constant_image(tmp_path):
    stored = np.array([[0, 65535], [32768, 0]], dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "s.dcm", stored, bits_stored=16))
    np.testing.assert_array_equal(out, [[0, 255], [128, 0]])
    flat = read_dicom(write_dicom(tmp_path / "f.dcm", np.full((3, 2), 7, np.uint16)))
    assert flat.shape == (3, 2) and (flat == 0).all()


def test_bad_bit_depth(tmp_path):
    with pytest.raises(ValueError, match="bit_depth"):
        read_dicom(write_dicom(tmp_path / "a.dcm", RAMP), bit_depth=12)


def test_load_dicom_folder(tmp_path):
    root = tmp_path / "dcm"
    (root / "p1" / "s1").mkdir(parents=True)
    (root / "p2").mkdir()
    write_dicom(root / "p1" / "s1" / "a.dcm", RAMP, PatientID="P1", StudyInstanceUID="1.2.3", StudyDate="20200102",
                StudyTime="101500", ViewPosition="PA", SOPInstanceUID="9.1")
    write_dicom(root / "p1" / "s1" / "b.dcm", RAMP, PatientID="P1", StudyInstanceUID="1.2.3", StudyDate="20200102",
                StudyTime="101500", ViewPosition="LL", SOPInstanceUID="9.2")
    write_dicom(root / "p1" / "c.dcm", RAMP, PatientID="P1", StudyInstanceUID="1.2.0", StudyDate="20191231",
                StudyTime="235959", ViewPosition="AP", SOPInstanceUID="9.3")
    write_dicom(root / "p2" / "d.dcm", RAMP, PatientID="", StudyInstanceUID="1.5", SOPInstanceUID="9.4")
    (root / "p2" / "junk.dcm").write_bytes(b"not a dicom file")
    r = load_dicom_folder(root)
    t = r.table.set_index("image_id")
    assert sorted(t.index) == ["9.1", "9.2", "9.3"]
    assert t.loc["9.1", "path"] == "p1/s1/a.dcm"
    assert t.loc["9.1", "study_id"] == "P1/1.2.3"
    assert t.loc[["9.1", "9.2", "9.3"], "view"].tolist() == ["PA", "LATERAL", "AP"]
    assert t.loc[["9.1", "9.2", "9.3"], "study_order"].tolist() == [1, 1, 0]
    assert t["split"].nunique() == 1 and t["source"].eq("dicom").all()
    bad = {b["path"]: b["reason"] for b in r.bad}
    assert set(bad) == {"p2/d.dcm", "p2/junk.dcm"}
    assert "no PatientID" in bad["p2/d.dcm"] and "unreadable DICOM" in bad["p2/junk.dcm"]


def test_load_dicom_folder_without_dicoms(tmp_path):
    with pytest.raises(MetadataError, match=r"no \*\.dcm"):
        load_dicom_folder(tmp_path)
