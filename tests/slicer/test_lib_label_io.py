"""Label files with geometry: our NRRD writer/reader vs pynrrd and nibabel."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
from CitrusVLib.label_io import LabelVolume, read_label_volume, write_label_volume

from .conftest import oblique_lps_ijk_to_ras


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_nrrd_round_trip_and_pynrrd_agrees(tmp_path, dtype):
    m = oblique_lps_ijk_to_ras()
    array = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 7).astype(dtype)
    path = write_label_volume(tmp_path / "x.nrrd", LabelVolume(array, m))
    back = read_label_volume(path)
    assert back.array.dtype == dtype and np.array_equal(back.array, array)
    assert np.allclose(back.ijk_to_ras, m)
    data, header = nrrd.read(path, index_order="C")
    assert np.array_equal(data, array)
    lps = np.diag([-1, -1, 1]) @ m[:3, :3]
    assert np.allclose(header["space directions"], lps.T)


def test_reads_pynrrd_raw_ras_files(tmp_path):
    array = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    header = {
        "space": "right-anterior-superior",
        "space directions": np.diag([0.5, 0.6, 2.0]),
        "space origin": np.array([1.0, 2.0, 3.0]),
        "encoding": "raw",
    }
    nrrd.write(str(tmp_path / "r.nrrd"), array, header, index_order="C")
    back = read_label_volume(tmp_path / "r.nrrd")
    assert np.array_equal(back.array, array)
    assert np.allclose(
        back.ijk_to_ras, [[0.5, 0, 0, 1], [0, 0.6, 0, 2], [0, 0, 2, 3], [0, 0, 0, 1]]
    )


def test_nifti_round_trip_matches_nibabel(tmp_path):
    m = oblique_lps_ijk_to_ras()
    array = np.zeros((4, 5, 6), np.uint8)
    array[1, 2, 3] = 1
    path = write_label_volume(tmp_path / "x.nii.gz", LabelVolume(array, m))
    img = nib.load(path)
    assert np.allclose(img.affine, m, atol=1e-5)
    assert np.asanyarray(img.dataobj)[3, 2, 1] == 1  # nibabel indexes [i, j, k]
    back = read_label_volume(path)
    assert np.array_equal(back.array, array) and np.allclose(back.ijk_to_ras, m, atol=1e-5)
    with pytest.raises(ValueError, match="expected .nrrd, .nii.gz or a single DICOM"):
        read_label_volume(b"hello", "x.png")


def test_single_dicom_file_reads_as_one_slice(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4) * 10
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImagerPixelSpacing = [0.2, 0.3]
    ds.RescaleSlope, ds.RescaleIntercept = 2, -5
    ds.PixelData = pixels.tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False  # pydicom 2.x
    ds.save_as(str(tmp_path / "x.dcm"), write_like_original=False)
    vol = read_label_volume(tmp_path / "x.dcm")
    assert vol.array.shape == (1, 3, 4)
    assert np.allclose(vol.array[0], pixels.astype(float) * 2 - 5)
    assert np.allclose(np.linalg.norm(vol.ijk_to_ras[:3, :2], axis=0), [0.3, 0.2])
    assert pydicom.__version__
    # no pixel size (the sample CR's PixelSpacing is 0\\0): 1 mm pixels, as the server places
    # it; the zeros made the IJK-to-RAS singular
    del ds.ImagerPixelSpacing
    ds.PixelSpacing = [0, 0]
    ds.save_as(str(tmp_path / "x.dcm"), write_like_original=False)
    vol = read_label_volume(tmp_path / "x.dcm")
    assert np.allclose(np.linalg.norm(vol.ijk_to_ras[:3, :2], axis=0), [1.0, 1.0])
    assert abs(np.linalg.det(vol.ijk_to_ras)) > 0


def test_upload_id_names_the_content_not_the_session():
    from CitrusVLib.label_io import upload_id

    a = LabelVolume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    same = LabelVolume(a.array.copy(), np.eye(4))
    other = LabelVolume(a.array + 1, np.eye(4))
    moved = LabelVolume(a.array.copy(), np.diag([1.0, 1.0, 2.0, 1.0]))
    ida = upload_id("CT chest (1)", a)
    assert ida.startswith("slicer_CT_chest__1__") and len(ida.rsplit("_", 1)[1]) == 12
    assert upload_id("CT chest (1)", same) == ida  # another Slicer session: the same id
    assert upload_id("CT chest (1)", other) != ida and upload_id("CT chest (1)", moved) != ida
    assert len(upload_id("x" * 300, a)) <= 128  # within the server's id rule
