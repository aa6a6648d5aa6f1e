"""`citrusv sort-dicom`: an export as hospitals make them (series mixed in one folder, one
series split over two folders, two radiographs in one series, a DICOMDIR and a text file
beside them) sorted into what the server serves: a folder per series of slices, a file per
radiograph. Real files: the sample CT's slices and the sample chest radiograph."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from citrusv.cli import main
from citrusv.io import read_study


def _copy(src, dst, **changes) -> None:
    ds = pydicom.dcmread(str(src))
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(str(dst))


def _export(root, sample_root):
    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))
    xray = sample_root / "studies" / "chest_xray.dcm"
    export = root / "export"
    (export / "DICOM" / "A").mkdir(parents=True)
    (export / "DICOM" / "B").mkdir()
    for i, f in enumerate(slices[10:16]):  # the CT series, split over two folders, names clash
        shutil.copy(f, export / "DICOM" / ("A" if i % 2 else "B") / f"IM{i // 2}")
    coronal = generate_uid()
    for i, f in enumerate(slices[40:42]):  # a second series, in folder A with the CT's files
        _copy(f, export / "DICOM" / "A" / f"X{i}", SeriesInstanceUID=coronal, SeriesNumber=7)
    views = generate_uid()
    for i, view in enumerate(("PA", "LL")):  # two radiographs of one series
        _copy(xray, export / f"view{i}.dcm", SeriesInstanceUID=views, SeriesNumber=9,
              ViewPosition=view, InstanceNumber=i + 1)
    _copy(xray, export / "DICOM" / "B" / "CR1", SeriesInstanceUID=generate_uid(), SeriesNumber=10)
    (export / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (export / "README.txt").write_text("burnt by the PACS\n")
    return export, slices


def test_an_export_is_sorted_into_what_the_server_serves(tmp_path, sample_root, capsys):
    export, slices = _export(tmp_path, sample_root)
    studies = tmp_path / "studies"
    assert main(["sort-dicom", str(export), str(studies), "--name", "pat12"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in studies.iterdir()) == [
        "pat12_1", "pat12_10.dcm", "pat12_7", "pat12_9_1.dcm", "pat12_9_2.dcm"]
    assert "2 file(s) left out: not DICOM images" in out  # DICOMDIR and README.txt
    assert "pat12_1: 6 file(s), CT" in out
    # the split series is one volume again, slices in body order, as read from the source
    ct = read_study(studies / "pat12_1")
    assert ct.array.shape == (6, 512, 512)
    expected = np.stack([pydicom.dcmread(str(f)).pixel_array for f in slices[10:16]])
    order = np.argsort([float(pydicom.dcmread(str(f)).ImagePositionPatient[2])
                        for f in slices[10:16]])
    stored = np.stack([pydicom.dcmread(str(f)).pixel_array
                       for f in sorted((studies / "pat12_1").iterdir())])
    np.testing.assert_array_equal(stored, expected[order])
    assert read_study(studies / "pat12_7").array.shape == (2, 512, 512)
    views = [pydicom.dcmread(str(studies / f"pat12_9_{k}.dcm")).ViewPosition for k in (1, 2)]
    assert views == ["PA", "LL"]  # in instance order
    assert read_study(studies / "pat12_10.dcm").modality == "CR"
    assert not [p for p in studies.iterdir() if p.name.startswith(".")]  # no part left

    # run again: every target exists, so it stops before writing anything
    before = {p: p.stat().st_mtime_ns for p in studies.rglob("*")}
    assert main(["sort-dicom", str(export), str(studies), "--name", "pat12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {studies / 'pat12_1'} already exists (the server's image "
                          "'pat12_1'); nothing was written")
    assert {p: p.stat().st_mtime_ns for p in studies.rglob("*")} == before


def test_one_series_takes_the_name_alone_and_links_when_asked(tmp_path, sample_root, capsys):
    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))
    cd = tmp_path / "cd" / "DICOM" / "ST0" / "SE0"
    cd.mkdir(parents=True)
    for i, f in enumerate(slices[:3]):
        shutil.copy(f, cd / f"IM{i}")
    studies = tmp_path / "studies"
    assert main(["sort-dicom", str(tmp_path / "cd"), str(studies), "--link"]) == 0
    (folder,) = studies.iterdir()
    assert folder.name == "cd"  # the source folder's name
    first = sorted(folder.iterdir())[0]
    assert os.stat(first).st_nlink == 2  # a hard link, not a copy


def test_a_folder_without_dicom_says_so(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main(["sort-dicom", str(tmp_path / "notes"), str(tmp_path / "studies")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'notes'} holds no DICOM image (1 other file); give the folder the "
        "DICOM files are in.\n")
    assert main(["sort-dicom", str(tmp_path / "nowhere"), str(tmp_path / "studies")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # into itself or a folder in it: what it writes it would read again
    for dest in (tmp_path / "notes", tmp_path / "notes" / "sorted"):
        assert main(["sort-dicom", str(tmp_path / "notes"), str(dest)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {dest} lies in {tmp_path / 'notes'}, ")
    assert not (tmp_path / "notes" / "sorted").exists()
