"""Each Citrus-V task over real HTTP: result JSON, label file geometry, mask on the asked slice."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from .helpers import check_result, decode_rle, split_multipart, zyx


def _params(**kw) -> dict:
    return {"params": json.dumps(kw)}


@pytest.fixture(scope="module")
def ct_affine(citrusv_server) -> np.ndarray:
    return nib.load(citrusv_server.studies / "chest_ct.nii.gz").affine


def test_segment_label_in_volume_geometry_on_asked_slice(citrusv_server, ct_affine, tmp_path):
    r = citrusv_server.post("/infer/citrusv_segment?image=chest_ct",
                            data=_params(prompt="Please segment the liver in this scan.", slice=60,
                                         window="abdomen"))
    result, label = split_multipart(r, tmp_path)
    check_result(result, "segment")
    assert result["image"] == {**result["image"], "id": "chest_ct", "shape": [133, 512, 512],
                               "axis": "axial", "slices": [60]}
    # geometry: same affine (origin, spacing, direction) and grid as the CT
    assert label.shape == (512, 512, 133)
    np.testing.assert_allclose(label.affine, ct_affine, atol=1e-4)
    np.testing.assert_allclose(label.header.get_zooms()[:3], (0.703125, 0.703125, 2.5), atol=1e-5)
    data = zyx(label)
    assert result["masks"], result["text"]
    assert set(np.flatnonzero(data.reshape(133, -1).any(axis=1))) == {60}
    for mask in result["masks"]:
        assert mask["slice"] == 60
        plane = decode_rle(mask["rle"])
        assert plane.shape == (512, 512)
        assert np.array_equal(plane, data[60] == mask["label_index"])
        assert mask["area_mm2"] == pytest.approx(mask["area_px"] * 0.703125**2, rel=1e-3)


def test_segment_coronal_fills_only_that_plane(citrusv_server, tmp_path):
    r = citrusv_server.post("/infer/citrusv_segment?image=chest_ct",
                            data=_params(prompt="Segment the liver.", slice=250, axis="coronal"))
    result, label = split_multipart(r, tmp_path)
    data = zyx(label)
    assert result["image"]["axis"] == "coronal"
    assert result["masks"] and result["masks"][0]["rle"]["size"] == [133, 512]
    assert set(np.flatnonzero(data.any(axis=(0, 2)))) == {250}


def test_segment_slice_range_gives_3d_mask_on_those_slices(citrusv_server, tmp_path):
    r = citrusv_server.post("/infer/citrusv_segment?image=chest_ct",
                            data=_params(prompt="Segment the liver.", slice=[59, 61]))
    result, label = split_multipart(r, tmp_path)
    check_result(result, "segment")
    assert result["image"]["slices"] == [59, 60, 61]
    assert result["image"]["window"] == "abdomen"  # the CT default, as for one slice (was null)
    assert sorted({m["slice"] for m in result["masks"]}) == [59, 60, 61]
    touched = set(np.flatnonzero(zyx(label).reshape(133, -1).any(axis=1)))
    assert touched and touched <= {59, 60, 61}
    assert result["answer"].startswith("Over slices 59-61 (3 slices): "), result["answer"]
    # each structure's volume over the range: its voxels in the label file, in mL
    voxel_ml = float(np.prod(result["image"]["spacing"])) / 1000
    assert result["volumes_ml"] == {
        name: round(int((zyx(label) == index).sum()) * voxel_ml, 2)
        for name, index in result["label_names"].items()}


@pytest.mark.parametrize("task", ["detect", "report"])
def test_detect_and_report_as_json(citrusv_server, task):
    r = citrusv_server.post(f"/infer/citrusv_{task}?image=chest_ct&output=json",
                            data=_params(prompt="Where is the liver? Think step by step.",
                                         slice=60))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    result = r.json()
    check_result(result, task)
    for box in result["boxes"]:
        x1, y1, x2, y2 = box["xyxy"]
        assert 0 <= x1 <= x2 <= 512 and 0 <= y1 <= y2 <= 512
        assert box["slice"] == 60


def test_closer_look_keeps_mask_inside_roi(citrusv_server, tmp_path):
    roi = [180, 200, 300, 330]
    r = citrusv_server.post("/infer/citrusv_closer_look?image=chest_ct",
                            data=_params(prompt="Segment the liver.", slice=60, roi=roi,
                                         label="liver"))
    result, label = split_multipart(r, tmp_path)
    check_result(result, "closer_look")
    assert result["closer_look"]["roi"] == roi
    assert result["closer_look"]["answer_given"] is False  # the tiny model has no segment_answer
    cx1, cy1, cx2, cy2 = result["closer_look"]["crop"]  # the square the model saw: ROI + margin
    assert cx1 <= roi[0] and cy1 <= roi[1] and cx2 >= roi[2] and cy2 >= roi[3]
    assert cx2 - cx1 == cy2 - cy1
    data = zyx(label)
    ys, xs = np.nonzero(data[60])
    assert len(ys), "closer look returned an empty mask"
    assert xs.min() >= roi[0] and xs.max() < roi[2] and ys.min() >= roi[1] and ys.max() < roi[3]
    assert set(np.flatnonzero(data.reshape(133, -1).any(axis=1))) == {60}
    assert [m["label"] for m in result["masks"]] == ["liver"]


def test_closer_look_at_two_boxes_keeps_each_mask_inside_its_box(citrusv_server, tmp_path):
    """A list of boxes (the Slicer module sends one per part of a segment): a square each,
    masks kept inside the boxes, `roi` the box around them."""
    rois = [[180, 200, 260, 280], [300, 120, 350, 170]]
    r = citrusv_server.post("/infer/citrusv_closer_look?image=chest_ct",
                            data=_params(prompt="Segment the liver.", slice=60, roi=rois,
                                         label="liver"))
    result, label = split_multipart(r, tmp_path)
    check_result(result, "closer_look")
    look = result["closer_look"]
    assert look["roi"] == [180, 120, 350, 280]
    assert len(look["crops"]) == 2
    for (x1, y1, x2, y2), (rx1, ry1, rx2, ry2) in zip(look["crops"], rois):
        assert x1 <= rx1 and y1 <= ry1 and x2 >= rx2 and y2 >= ry2 and x2 - x1 == y2 - y1
    assert look["crop"] == [min(c[0] for c in look["crops"]), min(c[1] for c in look["crops"]),
                            max(c[2] for c in look["crops"]), max(c[3] for c in look["crops"])]
    inside = np.zeros((512, 512), dtype=bool)
    for x1, y1, x2, y2 in rois:
        inside[y1:y2, x1:x2] = True
    plane = zyx(label)[60] > 0
    assert plane.any() and not (plane & ~inside).any()
    assert [m["label"] for m in result["masks"]] == ["liver"]


def test_xray_dicom_2d_without_slice(citrusv_server, tmp_path):
    """The sample CR's PixelSpacing is 0\\0: no pixel size. Its label is placed with 1 mm pixels,
    but nothing is measured in mm (its lungs' boxes came back 1026 x 1222 mm), and a sentence
    says so."""
    r = citrusv_server.post("/infer/citrusv_segment?image=chest_xray",
                            data=_params(prompt="Segment the lungs."))
    result, label = split_multipart(r, tmp_path)
    check_result(result, "segment")
    assert result["image"]["shape"] == [1, 1955, 1841]
    assert result["image"]["slices"] == []
    assert result["image"]["spacing"] is None
    assert np.allclose(np.abs(np.diag(label.affine)[:2]), 1.0)
    assert result["masks"] and all(m["area_mm2"] is None for m in result["masks"])
    assert result["warnings"] == [
        "this DICOM image gives no pixel size (no PixelSpacing or ImagerPixelSpacing above zero), "
        "so its masks and boxes are measured in pixels only: no size in mm is given or checked, "
        "and sizes in mm the answer writes are the model's own, unchecked against the image."]
    assert label.shape[:2] == (1841, 1955)
    for mask in result["masks"]:
        assert mask["slice"] is None
        assert mask["rle"]["size"] == [1955, 1841]


def _segment_upload(server, path, slice_index: int, tmp_path):
    """Ask for the liver on an image uploaded in the `file` field (session use)."""
    with open(path, "rb") as f:
        r = server.post("/infer/citrusv_segment",
                        files={"file": (path.name, f, "application/octet-stream")},
                        data=_params(prompt="Segment the liver.", slice=slice_index))
    return split_multipart(r, tmp_path)


def test_uploaded_image_file(citrusv_server, tmp_path):
    ct = nib.load(citrusv_server.studies / "chest_ct.nii.gz")
    small = nib.Nifti1Image(np.asarray(ct.dataobj[::4, ::4, 58:62]), ct.affine @ np.diag([4, 4, 1, 1]))
    path = tmp_path / "upload.nii.gz"
    nib.save(small, path)
    result, label = _segment_upload(citrusv_server, path, 2, tmp_path)
    assert result["image"]["shape"] == [4, 128, 128]
    np.testing.assert_allclose(label.affine, small.affine, atol=1e-4)


def test_closer_look_without_roi_uses_first_pass_region(citrusv_server, tmp_path):
    r = citrusv_server.post("/infer/citrusv_closer_look?image=chest_ct",
                            data=_params(prompt="Segment the liver.", slice=60))
    result, label = split_multipart(r, tmp_path)
    check_result(result, "closer_look")
    x1, y1, x2, y2 = result["closer_look"]["roi"]
    ys, xs = np.nonzero(zyx(label)[60])
    if len(ys):
        assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2


def test_uploaded_nrrd_label_keeps_its_geometry(citrusv_server, tmp_path):
    import nrrd

    ct = nib.load(citrusv_server.studies / "chest_ct.nii.gz")
    data = np.asarray(ct.dataobj[::8, ::8, 50:53])  # [i, j, k]
    ras = ct.affine @ np.diag([8, 8, 1, 1])
    ras[:3, 3] = ct.affine[:3, :3] @ [0, 0, 50] + ct.affine[:3, 3]
    lps = np.diag([-1, -1, 1, 1]) @ ras
    path = tmp_path / "upload.nrrd"
    nrrd.write(str(path), data, {"space": "left-posterior-superior",
                                 "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})
    result, label = _segment_upload(citrusv_server, path, 1, tmp_path)
    assert result["image"]["shape"] == [3, 64, 64]
    np.testing.assert_allclose(label.affine, ras, atol=1e-4)
    np.testing.assert_allclose(result["image"]["ijk_to_ras"], ras, atol=1e-4)  # LPS file -> RAS
    assert set(np.flatnonzero(zyx(label).reshape(3, -1).any(axis=1))) <= {1}
