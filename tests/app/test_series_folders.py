"""A DICOM series as a hospital exports it, one file per slice, in a folder of the studies
folder: served as one volume under the folder's name (MONAI Label lists files only, so it was
not served at all), on the same grid as the same CT as NIfTI; a folder mixing series gets a 400
that says so, and slices of one series left loose in the studies folder are named in the log."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from tests.app.helpers import put_label, reference_label, run_training, split_multipart, zyx
from tests.server import APP_DIR, start_citrusv_server

LIVER = 5  # the reference label map's liver


@pytest.fixture(scope="module")
def series_server(tmp_path_factory, tiny_model_dir, sample_root):
    root = tmp_path_factory.mktemp("series_server")
    studies = root / "studies"
    series = sample_root / "dicom" / "chest_ct"
    slices = sorted(series.glob("*.dcm"))
    (studies / "ct_series").mkdir(parents=True)
    for f in slices:  # the 133 slices, as an export writes them (linked: 68 MB)
        os.symlink(f, studies / "ct_series" / f.name)
    (studies / "ct_series" / "README.txt").write_text("exported from the scanner\n")
    (studies / "mixed").mkdir()
    for f in slices[:3]:
        os.symlink(f, studies / "mixed" / f.name)
    shutil.copy(sample_root / "studies" / "chest_xray.dcm", studies / "mixed")
    for f in slices[:2]:  # slices left loose in the studies folder itself
        shutil.copy(f, studies / f"loose_{f.name}")
    # CD exports, written by pydicom's DICOMDIR writer: two series, one series, and one series
    # whose files lie in two folders (as some exporters split long series)
    _cd_export(studies / "cd_export", [slices[30:33], slices[40:42]])
    _cd_export(studies / "cd_one", [slices[50:54]])
    for part, files in (("A", slices[60:62]), ("B", slices[62:64])):
        (studies / "cd_split" / "DICOM" / part).mkdir(parents=True)
        for i, f in enumerate(files):
            os.symlink(f, studies / "cd_split" / "DICOM" / part / f"IM{i}")
    (studies / "two_views").mkdir()
    for name in ("pa.dcm", "lateral.dcm"):  # radiographs of one series: no volume
        shutil.copy(sample_root / "studies" / "chest_xray.dcm", studies / "two_views" / name)
        shutil.copy(sample_root / "studies" / "chest_xray.dcm", studies / f"cr_{name}")
    shutil.copy(sample_root / "studies" / "chest_ct.nii.gz", studies)
    (studies / "ct_gap").mkdir()
    for f in slices[20:30]:  # slices 20-29 with slice 25 lost on the way
        if f.name != "IM0025.dcm":
            os.symlink(f, studies / "ct_gap" / f.name)
    _enhanced(slices[40:50], studies / "ct_enhanced.dcm")
    (studies / "ct_jpeg").mkdir()
    for f in slices[24:27]:  # slices 24-26 as a PACS or CD export often stores them
        _jpeg_lossless(f, studies / "ct_jpeg" / f.name)
    model_dir = shutil.copytree(tiny_model_dir, root / "model")
    with start_citrusv_server(studies, model_dir) as server:
        yield server


def _cd_export(dst, series) -> None:
    """The slices as a CD export writes them (DICOMDIR beside PT000000/ST000000/SE00000n/
    IM00000k, files without an extension), each list of slices a series of its own."""
    import pydicom
    from pydicom.fileset import FileSet
    from pydicom.uid import generate_uid

    fs = FileSet()
    for number, files in enumerate(series, start=2):
        uid = generate_uid()
        for f in files:
            ds = pydicom.dcmread(str(f))
            ds.SeriesInstanceUID, ds.SeriesNumber = uid, number
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            for key, value in (("StudyDate", "20240101"), ("StudyTime", "120000"),
                               ("StudyID", "1"), ("PatientID", "sample"),
                               ("PatientName", "sample")):
                if not ds.get(key):
                    setattr(ds, key, value)
            fs.add(ds)
    fs.write(str(dst))


def _jpeg_lossless(src, dst) -> None:
    """A copy of a DICOM slice with its pixels compressed as JPEG Lossless (process 14, SV1),
    by GDCM through SimpleITK; everything else as it was."""
    import pydicom
    import SimpleITK as sitk

    ds = pydicom.dcmread(str(src))
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(dst))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(ds.pixel_array[None]))
    packed = pydicom.dcmread(str(dst))
    assert packed.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    ds.file_meta.TransferSyntaxUID = packed.file_meta.TransferSyntaxUID
    ds.PixelData = packed.PixelData
    ds["PixelData"].is_undefined_length = True
    ds.is_implicit_VR, ds.is_little_endian = False, True
    ds.save_as(str(dst), write_like_original=False)


def _enhanced(files, dst) -> None:
    """Slices as one enhanced multi-frame CT file, as newer scanners write a series: frames in
    reverse order, stored as HU + 2048 (unsigned) with the rescale, pixel size, orientation and
    each frame's position in the functional groups only, none of them at the top level."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    slices = [pydicom.dcmread(str(f)) for f in reversed(files)]
    ds = slices[0].copy()
    hu = np.stack([s.pixel_array.astype(np.int32) * float(s.RescaleSlope)
                   + float(s.RescaleIntercept) for s in slices])
    assert hu.min() >= -2048  # outside the scanned circle: -2048
    ds.PixelData = (hu + 2048).astype(np.uint16).tobytes()
    ds.PixelRepresentation, ds.NumberOfFrames = 0, len(slices)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"

    def item(**groups) -> Dataset:
        out = Dataset()
        for group, values in groups.items():
            inner = Dataset()
            for key, value in values.items():
                setattr(inner, key, value)
            setattr(out, group, Sequence([inner]))
        return out

    ds.SharedFunctionalGroupsSequence = Sequence([item(
        PixelMeasuresSequence={"PixelSpacing": slices[0].PixelSpacing,
                               "SliceThickness": slices[0].SliceThickness},
        PlaneOrientationSequence={"ImageOrientationPatient": slices[0].ImageOrientationPatient},
        PixelValueTransformationSequence={"RescaleSlope": 1, "RescaleIntercept": -2048,
                                          "RescaleType": "HU"})])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        item(PlanePositionSequence={"ImagePositionPatient": s.ImagePositionPatient})
        for s in slices])
    for key in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
                "SliceThickness", "RescaleSlope", "RescaleIntercept"):
        if key in ds:
            delattr(ds, key)
    ds.save_as(str(dst), write_like_original=False)


def _ask(server, image: str, tmp_path, **params):
    r = server.post(f"/infer/citrusv_segment?image={image}",
                    data={"params": json.dumps({"prompt": "Segment the liver.", **params})})
    assert r.status_code == 200, r.text
    folder = tmp_path / f"{image}_{params.get('slice', '')}"
    folder.mkdir()
    return split_multipart(r, folder)


def test_a_series_folder_is_one_volume_on_the_ct_grid(series_server, tmp_path):
    listed = series_server.get("/datastore/?output=all").json()["objects"]
    assert {"ct_series", "mixed", "chest_ct", "loose_IM0000", "loose_IM0001"} <= set(listed)
    assert "README" not in listed and "labels" not in listed
    result, label = _ask(series_server, "ct_series", tmp_path, slice=60)
    nifti, nifti_label = _ask(series_server, "chest_ct", tmp_path, slice=60)
    assert result["image"]["shape"] == nifti["image"]["shape"] == [133, 512, 512]
    assert result["image"]["spacing"] == pytest.approx(nifti["image"]["spacing"], abs=1e-4)
    assert np.allclose(result["image"]["ijk_to_ras"], nifti["image"]["ijk_to_ras"], atol=1e-3)
    assert np.allclose(label.affine, nifti_label.affine, atol=1e-3)
    # the same voxels, so the same answer, on the same slice of the label file
    assert [m["rle"] for m in result["masks"]] == [m["rle"] for m in nifti["masks"]]
    np.testing.assert_array_equal(zyx(label), zyx(nifti_label))
    assert set(np.flatnonzero(zyx(label).reshape(133, -1).any(axis=1))) <= {60}


def test_a_jpeg_lossless_series_reads_as_stored_uncompressed(series_server, tmp_path):
    """JPEG Lossless, the transfer syntax many scanners and PACS store CT in, needs a decoder
    pydicom lacks alone (pylibjpeg-libjpeg): such a series was a 400 ("could not be
    decoded")."""
    result, label = _ask(series_server, "ct_jpeg", tmp_path, slice=1)
    plain, _ = _ask(series_server, "ct_series", tmp_path, slice=25)
    assert result["image"]["shape"] == [3, 512, 512]
    assert [m["rle"] for m in result["masks"]] == [m["rle"] for m in plain["masks"]]
    assert result["image"]["ijk_to_ras"][2][3] == pytest.approx(
        plain["image"]["ijk_to_ras"][2][3] + 24 * 2.5, abs=1e-3)


def test_a_series_with_a_slice_missing_says_so_with_each_answer(series_server, tmp_path):
    """Slices 20-29 without slice 25, 2.5 mm apart but one gap of 5 mm: stacked as 9 even
    slices (2.81 mm), which an answer alone would not show."""
    result, _ = _ask(series_server, "ct_gap", tmp_path, slice=4)
    assert result["image"]["shape"] == [9, 512, 512]
    assert result["warnings"][0] == (
        "this series' slices are not evenly spaced: the gaps between its slices run from 2.5 to "
        "5 mm (a slice may be missing); it was read as evenly spaced, so positions, lengths and "
        "volumes along the slice axis are off: send the complete series.")
    whole, _ = _ask(series_server, "ct_series", tmp_path, slice=25)
    assert not [w for w in whole["warnings"] if "not evenly spaced" in w]


def test_an_enhanced_multi_frame_ct_reads_as_its_slices(series_server, tmp_path):
    """Slices 40-49 as one enhanced multi-frame file: its geometry and rescale are in its
    functional groups, where the reader did not look (it read 1 mm pixels and a 1 mm slice
    gap, and values 2048 above HU, so no window fitted)."""
    result, _ = _ask(series_server, "ct_enhanced", tmp_path, slice=5)
    whole, _ = _ask(series_server, "ct_series", tmp_path, slice=45)
    assert result["image"]["shape"] == [10, 512, 512]
    assert result["image"]["spacing"] == pytest.approx(whole["image"]["spacing"], abs=1e-4)
    expected = np.asarray(whole["image"]["ijk_to_ras"])
    expected[:3, 3] += expected[:3, 2] * 40  # slice 40 of the whole series is frame 0 here
    assert np.allclose(result["image"]["ijk_to_ras"], expected, atol=1e-3)
    assert [m["rle"] for m in result["masks"]] == [m["rle"] for m in whole["masks"]]
    assert not [w for w in result["warnings"] if "pixel size" in w or "evenly" in w]


def test_a_correction_of_a_series_folder_is_kept(series_server, tmp_path):
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER,
                            series_server.studies / "chest_ct.nii.gz")
    r = put_label(series_server, "ct_series", liver,
                  {"label_info": [{"name": "liver", "idx": 1}], "prompt": "Segment the liver."})
    assert r.status_code == 200, r.text
    stored = series_server.studies / "labels" / "final" / "ct_series.nii.gz"
    expected = np.asarray(nib.load(liver).dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(stored).dataobj) > 0, expected > 0)


def test_a_folder_of_two_series_and_loose_slices_are_said(series_server):
    r = series_server.post("/infer/citrusv_segment?image=mixed",
                           data={"params": json.dumps({"prompt": "Segment the liver."})})
    assert r.status_code == 400
    assert r.json()["detail"] == ("The folder 'mixed' holds 2 DICOM series; put each series in "
                                  "a folder of its own in the studies folder (`citrusv "
                                  "sort-dicom FOLDER STUDIES` does so).")
    r = series_server.post("/infer/citrusv_segment?image=two_views",
                           data={"params": json.dumps({"prompt": "Segment the lungs."})})
    assert r.status_code == 400
    assert r.json()["detail"] == (
        "The folder 'two_views' holds 2 DICOM images without a slice position (radiographs have "
        "none), which make no volume; put each image in the studies folder as a file of its "
        "own (`citrusv sort-dicom FOLDER STUDIES` does so).")
    assert series_server.get("/info/").status_code == 200  # the server is up
    # the two loose CT slices are named; the two radiographs of one series beside them are not
    log = series_server.log(tail=10 ** 7)
    assert log.count("DICOM files directly in ") == 1
    assert ("cd_split holds DICOM files in folders below it (a CD or DICOMDIR export?): served "
            "as cd_split (DICOM/A + DICOM/B: one series in 2 folders)." in log)
    assert ("2 DICOM files directly in the studies folder are slices of one series (" in log
            and "each is served as an image of its own; move them into a folder of their own"
            in log), log[-3000:]


def test_the_series_of_a_cd_export_are_served(series_server, tmp_path):
    """A CD or DICOMDIR export copied into the studies folder as it is: each series folder
    below it is an image (its files were not served at all, the log only named the folder),
    and a series whose files lie in two folders is one image (it was not served)."""
    listed = series_server.get("/datastore/?output=all").json()["objects"]
    assert {"cd_export_SE000000", "cd_export_SE000001", "cd_one", "cd_split"} <= set(listed)
    assert not {"cd_export", "cd_split_A", "cd_split_B"} & set(listed)
    log = series_server.log(tail=10 ** 7)
    assert ("cd_export holds DICOM files in folders below it (a CD or DICOMDIR export?): served "
            "as cd_export_SE000000 (PT000000/ST000000/SE000000), cd_export_SE000001 "
            "(PT000000/ST000000/SE000001)." in log)
    assert "cd_one holds DICOM files in folders below it" in log
    # and in /info/, for an admin who does not read the log
    notes = series_server.get("/info/").json()["datastore"]["notes"]
    assert [n for n in notes if n.startswith("cd_export holds DICOM files in folders below")]
    a, b = os.path.join("DICOM", "A"), os.path.join("DICOM", "B")
    assert ("cd_split holds DICOM files in folders below it (a CD or DICOMDIR export?): served "
            f"as cd_split ({a} + {b}: one series in 2 folders)." in notes), notes
    assert [n for n in notes if n.startswith("2 DICOM files directly in the studies folder are "
                                             "slices of one series (")]
    # each answers as the whole CT does on the same slice, on the grid of its own slices
    for image_id, first, slices, k in (("cd_export_SE000000", 30, 3, 1), ("cd_split", 60, 4, 2)):
        part, _ = _ask(series_server, image_id, tmp_path, slice=k)
        whole, _ = _ask(series_server, "ct_series", tmp_path, slice=first + k)
        assert part["image"]["shape"] == [slices, 512, 512]
        assert [m["rle"] for m in part["masks"]] == [m["rle"] for m in whole["masks"]]
        expected = np.asarray(whole["image"]["ijk_to_ras"])
        expected[:3, 3] += expected[:3, 2] * first
        assert np.allclose(part["image"]["ijk_to_ras"], expected, atol=1e-3)
    second, _ = _ask(series_server, "cd_export_SE000001", tmp_path, slice=0)
    assert second["image"]["shape"] == [2, 512, 512]
    # the volume downloads as one NIfTI; a correction is stored under the id
    image = series_server.get("/datastore/image?image=cd_one")
    assert image.status_code == 200, image.text
    (tmp_path / "cd_one.nii.gz").write_bytes(image.content)
    assert nib.load(tmp_path / "cd_one.nii.gz").shape == (512, 512, 4)
    image_id = "cd_export_SE000000"  # slices 30-32, in cd_export/PT000000/ST000000/SE000000
    image = series_server.get(f"/datastore/image?image={image_id}")
    (tmp_path / f"{image_id}.nii.gz").write_bytes(image.content)
    grid = nib.load(tmp_path / f"{image_id}.nii.gz")
    reference = reference_label(tmp_path / "ref.nii.gz", LIVER,
                                series_server.studies / "chest_ct.nii.gz")
    mask = (np.asarray(nib.load(reference).dataobj)[:, :, 30:33] > 0).astype(np.uint8)
    liver = tmp_path / "liver.nii.gz"
    nib.save(nib.Nifti1Image(mask, grid.affine), liver)
    r = put_label(series_server, image_id, liver,
                  {"label_info": [{"name": "liver", "idx": 1}], "prompt": "Segment the liver."})
    assert r.status_code == 200, r.text
    stored = series_server.studies / "labels" / "final" / f"{image_id}.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(stored).dataobj) > 0, mask > 0)
    assert mask.sum() > 1000
    # a training run (its own process, its own look at the studies folder) trains on it by
    # name, and leaves the server's record of the correction as it was (its first look
    # dropped the image, whose id names no file or folder, and listed it again without its
    # correction's names: "label 1")
    task = run_training(series_server, steps=2, batch_images=2, max_per_structure=4,
                        publish_if_worse=True)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    last = series_server.get("/info/").json()["train_stats"]["citrusv_finetune"]["last_run"]
    assert last["samples"]["structures"] == ["liver"], last
    final = series_server.get("/datastore/?output=all").json()["objects"][image_id]["labels"]
    assert [e["name"] for e in final["final"]["info"]["label_info"]] == ["liver"]


def _listed(server, ids: set[str], seconds: float = 60) -> set[str]:
    """The datastore's image ids once they include `ids`, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        listed = set(server.get("/datastore/?output=all").json()["objects"])
        if ids <= listed or time.monotonic() > deadline:
            return listed
        time.sleep(0.5)


def _put_square(server, image_id: str, tmp_path, name: str, corner: int, k: int,
                prompt: str = ""):
    """A correction naming `name`: a 60 px square from (corner, corner) on slice k, on the grid
    of the image as the server sends it now. Returns (the response, the mask sent)."""
    image = server.get(f"/datastore/image?image={image_id}")
    assert image.status_code == 200, image.text
    (tmp_path / f"{image_id}.nii.gz").write_bytes(image.content)
    grid = nib.load(tmp_path / f"{image_id}.nii.gz")
    mask = np.zeros(grid.shape, np.uint8)
    mask[corner:corner + 60, corner:corner + 60, k] = 1
    nib.save(nib.Nifti1Image(mask, grid.affine), tmp_path / "mark.nii.gz")
    params = {"label_info": [{"name": name, "idx": 1}], **({"prompt": prompt} if prompt else {})}
    return put_label(server, image_id, tmp_path / "mark.nii.gz", params), mask


def _series_copy(files, folder) -> None:
    """The slices as a series of their own (new UIDs), written into `folder` as a CD does."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    uid = generate_uid()
    for f in files:
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(str(folder / f.stem))


def test_a_cd_keeps_its_ids_when_series_are_added_or_removed(series_server, sample_root,
                                                              tmp_path):
    """A CD folder of one series is served under its own name; a second series copied into it
    made the first `<cd>_<folder>`, and the correction stored under the first id lost its
    image. An id once given is kept while its folder is there, also by a new process; an id
    whose folder is gone is given to no other series."""
    sys.path.insert(0, str(APP_DIR))
    from lib.datastore import EXTENSIONS, CorrectionsDatastore

    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))
    cd = series_server.studies / "grow_cd"
    _series_copy(slices[70:73], cd / "DICOM" / "S1")
    assert "grow_cd" in _listed(series_server, {"grow_cd"})
    r, _ = _put_square(series_server, "grow_cd", tmp_path, "liver", 200, 1, "Segment the liver.")
    assert r.status_code == 200, r.text

    _series_copy(slices[80:82], cd / "DICOM" / "S2")
    listed = _listed(series_server, {"grow_cd_S2"})
    assert {"grow_cd", "grow_cd_S2"} <= listed, sorted(listed)
    objects = series_server.get("/datastore/?output=all").json()["objects"]
    labels = objects["grow_cd"]["labels"]["final"]["info"]["label_info"]
    assert [e["name"] for e in labels] == ["liver"]
    result, _ = _ask(series_server, "grow_cd", tmp_path, slice=1)
    assert result["image"]["shape"] == [3, 512, 512]
    notes = series_server.get("/info/").json()["datastore"]["notes"]
    assert ("grow_cd holds DICOM files in folders below it (a CD or DICOMDIR export?): served "
            f"as grow_cd ({os.path.join('DICOM', 'S1')}), grow_cd_S2 "
            f"({os.path.join('DICOM', 'S2')})." in notes), notes
    # a new process (a restart, a training run) gives the same ids
    fresh = CorrectionsDatastore(str(series_server.studies), extensions=EXTENSIONS)
    assert {"grow_cd", "grow_cd_S2"} <= set(fresh.list_images())
    assert fresh.get_label_uri("grow_cd", "final").endswith("grow_cd.nii.gz")

    # the first series removed: its id goes, and is not given to the series left
    shutil.rmtree(cd / "DICOM" / "S1")
    deadline = time.monotonic() + 60
    while "grow_cd" in _listed(series_server, set()) and time.monotonic() < deadline:
        time.sleep(0.5)
    listed = _listed(series_server, {"grow_cd_S2"})
    assert "grow_cd" not in listed and "grow_cd_S2" in listed, sorted(listed)
    second, _ = _ask(series_server, "grow_cd_S2", tmp_path, slice=0)
    assert second["image"]["shape"] == [2, 512, 512]
    # the correction stays on disk
    assert (series_server.studies / "labels" / "final" / "grow_cd.nii.gz").is_file()


def test_a_series_folder_refilled_with_another_series_drops_its_correction(
        series_server, sample_root, tmp_path):
    """A series folder emptied and filled with another scan while the server runs: the
    correction saved for the first scan was listed with the second, shown and trained on it.
    It is taken out of the listing (its file stays, /info/ says so), and the next correction
    sets it aside instead of merging into it."""
    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))
    folder = series_server.studies / "refilled"
    folder.mkdir()
    for f in slices[70:73]:
        shutil.copy(f, folder / f.name)
    assert "refilled" in _listed(series_server, {"refilled"})
    r, _ = _put_square(series_server, "refilled", tmp_path, "liver", 200, 1, "Segment the liver.")
    assert r.status_code == 200, r.text
    stored = series_server.studies / "labels" / "final" / "refilled.nii.gz"
    first = stored.read_bytes()

    def labels() -> dict:
        objects = series_server.get("/datastore/?output=all").json()["objects"]
        return objects.get("refilled", {}).get("labels", {})

    assert set(labels()) == {"final"}
    for f in folder.iterdir():  # another scan of the same size into the same folder
        f.unlink()
    for f in slices[90:93]:
        shutil.copy(f, folder / f.name)
    deadline = time.monotonic() + 60
    while labels() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert labels() == {} and "refilled" in _listed(series_server, {"refilled"})
    assert stored.read_bytes() == first
    notes = series_server.get("/info/").json()["datastore"]["notes"]
    label = os.path.join("labels", "final", "refilled.nii.gz")
    assert (f"The label {label} was saved for another image than the refilled there now (it "
            "was replaced); it is kept on disk and not listed with it.") in notes, notes

    r, mask = _put_square(series_server, "refilled", tmp_path, "spleen", 100, 2)  # the new grid
    assert r.status_code == 200, r.text
    assert [e["name"] for e in labels()["final"]["info"]["label_info"]] == ["spleen"]
    np.testing.assert_array_equal(np.asarray(nib.load(stored).dataobj), mask)
    aside = [p for p in (stored.parent / ".set_aside").iterdir() if p.name.endswith(
        "-refilled.nii.gz")]
    assert len(aside) == 1 and aside[0].read_bytes() == first
    notes = series_server.get("/info/").json()["datastore"]["notes"]
    assert not any("refilled" in n for n in notes), notes


def test_a_cd_series_swapped_while_the_server_is_down_gets_a_new_id(tmp_path, sample_root):
    """The one series of `cd` replaced by another while no server ran: the id `cd`, and the
    correction stored under it, are not handed to the other series."""
    sys.path.insert(0, str(APP_DIR))
    from lib.datastore import EXTENSIONS, CorrectionsDatastore

    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))
    studies = tmp_path / "studies"
    _series_copy(slices[70:72], studies / "cd" / "DICOM" / "S1")
    assert "cd" in CorrectionsDatastore(str(studies), extensions=EXTENSIONS).list_images()
    shutil.rmtree(studies / "cd" / "DICOM" / "S1")
    _series_copy(slices[90:91], studies / "cd" / "DICOM" / "S2")
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert store.list_images() == ["cd_DICOM_S2"]
    # and the next look keeps that id (the index no longer holds `cd`)
    assert CorrectionsDatastore(str(studies), extensions=EXTENSIONS).list_images() == [
        "cd_DICOM_S2"]


def test_an_image_overwritten_in_place_loses_its_correction_from_the_listing(
        series_server, sample_root, tmp_path):
    """A scan overwritten in place by another (`cp other.nii.gz ct.nii.gz`): MONAI Label
    refreshes on files created and deleted only, so the first scan's correction stayed listed
    with the second until something else changed."""
    ct = series_server.studies / "overwritten.nii.gz"
    shutil.copy(sample_root / "studies" / "chest_ct.nii.gz", ct)
    assert "overwritten" in _listed(series_server, {"overwritten"})
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, ct)
    r = put_label(series_server, "overwritten", liver, {"label_info": [{"name": "liver", "idx": 1}]})
    assert r.status_code == 200, r.text

    def labels() -> dict:
        objects = series_server.get("/datastore/?output=all").json()["objects"]
        return objects.get("overwritten", {}).get("labels", {})

    assert set(labels()) == {"final"}
    image = nib.load(ct)
    nib.save(nib.Nifti1Image(np.flip(np.asarray(image.dataobj), axis=0).copy(), image.affine,
                             image.header), tmp_path / "other.nii.gz")
    with open(ct, "r+b") as f:  # in place: the file is modified, not created
        f.write((tmp_path / "other.nii.gz").read_bytes())
        f.truncate()
    deadline = time.monotonic() + 60
    while labels() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert labels() == {}
    notes = series_server.get("/info/").json()["datastore"]["notes"]
    label = os.path.join("labels", "final", "overwritten.nii.gz")
    assert (f"The label {label} was saved for another image than the overwritten.nii.gz there "
            "now (it was replaced); it is kept on disk and not listed with it.") in notes, notes


def test_a_cd_whose_id_a_file_takes_is_served_under_its_long_id(tmp_path, sample_root):
    """A file `cd.nii.gz` beside a CD folder `cd/` takes the id `cd`: the CD's series was not
    served at all ("rename cd"). It is served under the long form of its id, as a series whose
    id was retired is; the correction stored under `cd` for the CD stays apart from the file
    that took the id (and is said)."""
    sys.path.insert(0, str(APP_DIR))
    from lib.datastore import EXTENSIONS, CorrectionsDatastore

    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))
    studies = tmp_path / "studies"
    _series_copy(slices[70:72], studies / "cd" / "DICOM" / "S1")
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert store.list_images() == ["cd"]
    from lib.images import read_study, write_label

    study = read_study(store.get_image_uri("cd"))
    mask = np.zeros(study.array.shape, np.uint8)
    mask[1, 200:260, 200:260] = 1
    store.save_label("cd", write_label(study, mask, str(tmp_path)), "final",
                     {"label_info": [{"name": "liver", "idx": 1}]})

    shutil.copy(sample_root / "studies" / "chest_ct.nii.gz", studies / "cd.nii.gz")
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert sorted(store.list_images()) == ["cd", "cd_DICOM_S1"]
    assert store.get_image_uri("cd").endswith("cd.nii.gz")
    assert read_study(store.get_image_uri("cd_DICOM_S1")).array.shape[0] == 2
    assert store.get_labels_by_image_id("cd") == {}
    label = os.path.join("labels", "final", "cd.nii.gz")
    assert store.status()["notes"] == [
        f"cd holds DICOM files in folders below it (a CD or DICOMDIR export?): served as "
        f"cd_DICOM_S1 ({os.path.join('DICOM', 'S1')}).",
        f"The label {label} was saved for the image {os.path.join('cd', 'DICOM', 'S1')}, not "
        "cd.nii.gz, which its id names now; it is kept on disk and not listed with it."]
    # the next look keeps the long id
    assert sorted(CorrectionsDatastore(str(studies), extensions=EXTENSIONS).list_images()) == [
        "cd", "cd_DICOM_S1"]


def test_a_series_split_over_folders_is_read_through_links_kept_in_step(tmp_path, sample_root):
    """The links that join a split series follow its folders: a slice added to one folder is
    in the next look's volume, and the links go with the series."""
    sys.path.insert(0, str(APP_DIR))
    from lib.datastore import EXTENSIONS, CorrectionsDatastore
    from lib.images import read_study

    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))
    studies = tmp_path / "studies"
    for part, files in (("A", slices[60:62]), ("B", slices[62:64])):
        (studies / "cd" / "DICOM" / part).mkdir(parents=True)
        for f in files:  # the same names in both folders, as exporters number each folder
            shutil.copy(f, studies / "cd" / "DICOM" / part / f"IM{files.index(f)}")
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert store.list_images() == ["cd"]
    first = read_study(store.get_image_uri("cd"))
    assert first.array.shape == (4, 512, 512)
    shutil.copy(slices[64], studies / "cd" / "DICOM" / "B" / "IM2")
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    grown = read_study(store.get_image_uri("cd"))
    assert grown.array.shape == (5, 512, 512)
    np.testing.assert_array_equal(grown.array[:4], first.array)
    assert np.allclose(grown.affine, first.affine)
    # one folder left: read from it, under the same id, also at the look after
    shutil.rmtree(studies / "cd" / "DICOM" / "B")
    for _ in range(2):
        store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
        assert store.list_images() == ["cd"]
        assert store.get_image_uri("cd") == str(studies / "cd" / "DICOM" / "A")
    shutil.rmtree(studies / "cd")
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert store.list_images() == [] and os.listdir(studies / ".joined") == []


def test_a_split_series_whose_files_cannot_be_linked_says_so(tmp_path, sample_root):
    """Where the links cannot be made (here a file takes the name of their folder), the split
    series is not served and /info/ says why and what to do."""
    sys.path.insert(0, str(APP_DIR))
    from lib.datastore import EXTENSIONS, CorrectionsDatastore

    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))
    studies = tmp_path / "studies"
    for part, files in (("A", slices[60:62]), ("B", slices[62:64])):
        (studies / "cd" / part).mkdir(parents=True)
        for f in files:
            shutil.copy(f, studies / "cd" / part / f.name)
    (studies / ".joined").write_text("not a folder\n")
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert store.list_images() == []
    (note,) = store.status()["notes"]
    assert note.startswith("cd: the files of one series lie in 2 folders (A, B) and could not be "
                           "linked into one ([Errno 20] Not a directory: "), note
    assert note.endswith("so it is not served; `citrusv sort-dicom cd <the studies folder>` puts "
                         "each series of cd in one folder."), note


def test_a_series_folder_copied_in_while_serving_is_listed(series_server, sample_root):
    """MONAI Label watches the studies folder's own files: a series folder copied in while the
    server runs was listed only at its next start."""
    target = series_server.studies / "late_series"
    target.mkdir()
    for f in sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))[:4]:
        shutil.copy(f, target / f.name)
    assert "late_series" in _listed(series_server, {"late_series"})
    r = series_server.post("/infer/citrusv_segment?image=late_series&output=json",
                           data={"params": json.dumps({"prompt": "Segment the liver.",
                                                       "slice": 2})})
    assert r.status_code == 200, r.text
    assert r.json()["image"]["shape"] == [4, 512, 512]
    # a CD export copied in: its series folder lies two folders down
    target = series_server.studies / "late_cd" / "DICOM" / "S1"
    target.mkdir(parents=True)
    for f in sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))[:2]:
        shutil.copy(f, target / f.stem)
    assert "late_cd" in _listed(series_server, {"late_cd"})
    # `citrusv sort-dicom` into the studies folder: each series renamed into place whole
    from citrusv.dicom_sort import sort_dicom

    done = sort_dicom(series_server.studies / "mixed", series_server.studies, name="sorted")
    ids = [image_id for image_id, _ in done.series]
    assert ids == ["sorted_1", "sorted_2"]  # both series are number 1: numbered in turn
    assert set(ids) <= _listed(series_server, set(ids))
    # a radiograph alone: written as a hidden file, then renamed (no other file event)
    (series_server.studies / ".incoming").mkdir()
    shutil.copy(sample_root / "studies" / "chest_xray.dcm", series_server.studies / ".incoming")
    sort_dicom(series_server.studies / ".incoming", series_server.studies, name="late_cr")
    assert "late_cr" in _listed(series_server, {"late_cr"})
    (ct,) = [image_id for image_id, s in done.series if s.kind == "folder"]  # the CR: a file
    r = series_server.post(f"/infer/citrusv_segment?image={ct}&output=json",
                           data={"params": json.dumps({"prompt": "Segment the liver.",
                                                       "slice": 1})})
    assert r.status_code == 200, r.text
    assert r.json()["image"]["shape"] == [3, 512, 512]


def test_the_engine_reader_reads_the_enhanced_file_as_its_slices(series_server, sample_root):
    """`citrusv ask --model` reads files with citrusv.io, which shares the functional-group
    reading with the server (it read the file as 10 frames 1 mm apart, 2048 above HU)."""
    from citrusv.io import read_study

    enhanced = read_study(series_server.studies / "ct_enhanced.dcm")
    series = read_study(sample_root / "dicom" / "chest_ct")
    np.testing.assert_array_equal(enhanced.array, series.array[40:50])
    assert enhanced.spacing == pytest.approx(series.spacing, abs=1e-4)
    expected = series.affine.copy()
    expected[:3, 3] += expected[:3, 2] * 40
    assert np.allclose(enhanced.affine, expected, atol=1e-3)


def test_a_series_folder_is_downloaded_as_one_nifti(series_server, tmp_path):
    """`GET /datastore/image` (what the Slicer library's headless twin and MONAI Label clients
    fetch) of a folder image: the volume the server reads, as one NIfTI. MONAI Label sends
    files only, and the app's 404 then said the image was not in the datastore."""
    r = series_server.get("/datastore/image?image=ct_series")
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].endswith('filename="ct_series.nii.gz"')
    (tmp_path / "ct_series.nii.gz").write_bytes(r.content)
    got = nib.load(tmp_path / "ct_series.nii.gz")
    nifti = nib.load(series_server.studies / "chest_ct.nii.gz")
    assert got.shape == nifti.shape == (512, 512, 133)
    assert np.allclose(got.affine, nifti.affine, atol=1e-3)
    assert got.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(nifti.dataobj))
    # HEAD: whether it is there (MONAI Label's check), without reading the series
    assert requests.head(series_server.url + "/datastore/image?image=ct_series").status_code == 200
    r = series_server.get("/datastore/image?image=mixed")
    assert r.status_code == 400 and "holds 2 DICOM series" in r.json()["detail"]
