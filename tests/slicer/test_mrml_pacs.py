"""A volume that Slicer loaded from the PACS, a server on the same PACS: no upload.

Slicer's DICOM module records the SeriesInstanceUID on the volume's subject hierarchy item.
CitrusVLogic asks the server about that series by UID, and keeps the answer only when the
server read the series onto the same voxel grid as the volume in Slicer; the correction then
goes to the PACS as a DICOM SEG of that series. A volume on another grid (here: the same
voxels with the slices in the other order) is uploaded and asked about instead, with a warning.
Real Orthanc + DICOMweb, real MONAI Label server (tiny model: geometry, not quality), real
MRML nodes.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from tests.app.helpers import read_as_slicer, slicer_spacing
from tests.pacs import start_orthanc
from tests.server import REPO, start_citrusv_server

SLICE = 25
PROMPT = "Please segment the liver in this scan."


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with start_orthanc(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def pacs_server(pacs, tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("slicer_pacs_server")
    model_dir = shutil.copytree(tiny_model_dir, work / "model")
    # the series list cached 1 s (default 180 s): a series stored during the tests is seen
    with start_citrusv_server(pacs.dicomweb, model_dir, workdir=work,
                              env={"MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "1"}) as server:
        yield server


def _dicom_volume(mrml, series_uid: str, flip_slices: bool = False):
    """The sample CT as Slicer's DICOM module leaves it: a volume on the series' grid whose
    subject hierarchy item carries the SeriesInstanceUID (UID name "DICOM")."""
    img = nib.load(REPO / "sample_data" / "studies" / "chest_ct.nii.gz")
    array = np.asanyarray(img.dataobj).transpose(2, 1, 0).astype(np.int16)  # [k, j, i]
    ijk_to_ras = img.affine.copy()
    if flip_slices:  # the same voxels in RAS, the slices stored in the other order
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1, array.shape[0] - 1
        array, ijk_to_ras = array[::-1], ijk_to_ras @ flip
    su = mrml.slicer.util
    volume = su.addVolumeFromArray(np.ascontiguousarray(array), ijkToRAS=ijk_to_ras, name="CT")
    sh = mrml.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.slicer.mrmlScene)
    item = sh.CreateItem(sh.GetSceneItemID(), volume)
    sh.SetItemUID(item, mrml.slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMUIDName(), series_uid)
    return volume


def _segment_ras_voxels(mrml, volume, applied) -> set[tuple[float, float, float]]:
    """Where the answer's segment lies, as RAS points of its voxels (grid-independent)."""
    import CitrusVMRML

    (segment_id,) = applied.segment_ids.values()
    mask = mrml.slicer.util.arrayFromSegmentBinaryLabelmap(
        applied.segmentation_node, segment_id, volume)
    kji = np.argwhere(mask > 0)
    ras = kji[:, ::-1] @ CitrusVMRML.ijk_to_ras(volume)[:3, :3].T + CitrusVMRML.ijk_to_ras(volume)[:3, 3]
    return {tuple(p) for p in np.round(ras, 1)}


def _ask(module, server, volume, slice_index: int):
    logic = module.CitrusVLogic()
    client = logic.client(server.url)
    upload = logic.prepareImage(volume, server.url)
    response = logic.infer(client, upload, "segment", {"prompt": PROMPT, "slice": slice_index})
    logic.rememberImage(volume, server.url, upload)
    return logic, client, upload, response


def test_pacs_volume_is_asked_about_by_series_uid_and_corrected_on_the_pacs(
        pacs, pacs_server, citrusv_module, mrml):
    import CitrusVMRML

    mrml.fresh()
    volume = _dicom_volume(mrml, pacs.series_uid)
    assert CitrusVMRML.dicom_series_uid(volume) == pacs.series_uid
    logic, client, upload, response = _ask(citrusv_module, pacs_server, volume, SLICE)
    assert upload["image_id"] == pacs.series_uid
    assert response.result.image.id == pacs.series_uid
    assert response.result.warnings == []
    # nothing was uploaded: the server's datastore has the PACS series and no Slicer copy
    objects = client.datastore()["objects"]
    assert pacs.series_uid in objects
    assert not [i for i in objects if i.startswith("slicer_")], list(objects)
    assert logic.prepareImage(volume, pacs_server.url) == {"image_id": pacs.series_uid}

    # the answer lands on the asked slice, as the label file says
    applied = logic.applyResult(response, volume)
    label = response.label_volume()
    assert np.allclose(label.ijk_to_ras, CitrusVMRML.ijk_to_ras(volume), atol=1e-3)
    (segment_id,) = applied.segment_ids.values()
    mask = mrml.slicer.util.arrayFromSegmentBinaryLabelmap(
        applied.segmentation_node, segment_id, volume) > 0
    assert set(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))) == {SLICE}
    assert np.array_equal(mask[SLICE], label.array[SLICE] > 0)

    # the correction goes to that series: kept by the server, and on the PACS as a DICOM SEG
    before = len(pacs.series(Modality="SEG"))
    path, info = logic.exportCorrection(volume, segment_id)
    answer = logic.submitCorrection(
        client, logic.prepareImage(volume, pacs_server.url), path, info, PROMPT)
    assert answer["image"] == pacs.series_uid
    saved = client.datastore()["objects"][pacs.series_uid]["labels"]["final"]
    assert "pacs_error" not in saved["info"], saved["info"]
    assert len(pacs.series(Modality="SEG")) == before + 1
    logic.cleanup()


def test_volume_on_another_grid_is_uploaded_and_answers_at_the_same_place(
        pacs, pacs_server, citrusv_module, mrml):
    mrml.fresh()
    same = _dicom_volume(mrml, pacs.series_uid)
    *_, response = _ask(citrusv_module, pacs_server, same, SLICE)
    expected = _segment_ras_voxels(mrml, same, citrusv_module.CitrusVLogic().applyResult(
        response, same))
    assert expected

    # the same CT with its slices stored in the other order: its slice 107 is the series'
    # slice 25, and the series' answer for "slice 107" would be another part of the body
    flipped = _dicom_volume(mrml, pacs.series_uid, flip_slices=True)
    flipped_slice = flipped.GetImageData().GetDimensions()[2] - 1 - SLICE
    logic, _, upload, response = _ask(citrusv_module, pacs_server, flipped, flipped_slice)
    assert upload["image_id"].startswith("slicer_") and upload["uploaded"]
    (warning,) = response.result.warnings
    assert pacs.series_uid in warning and "not on the voxel grid" in warning
    # the same pixels were asked about, so the segment covers the same RAS voxels
    assert _segment_ras_voxels(mrml, flipped, logic.applyResult(response, flipped)) == expected
    logic.cleanup()


def test_series_the_server_does_not_have_is_uploaded_without_a_warning(
        pacs_server, citrusv_module, mrml):
    mrml.fresh()
    volume = _dicom_volume(mrml, "1.2.826.0.1.3680043.99.1")
    logic, _, upload, response = _ask(citrusv_module, pacs_server, volume, SLICE)
    assert upload["image_id"].startswith("slicer_") and upload["uploaded"]
    assert response.result.warnings == []
    logic.cleanup()


class _FilesDatabase:
    """What the module asks of Slicer's DICOM database (ctkDICOMDatabase, which needs Qt and
    cannot run here): `instanceValue(sopInstanceUID, "gggg,eeee")`, as text the way it gives
    it ("" for an instance or tag it does not hold, several values joined by "\\"), read
    from real DICOM files by pydicom."""

    def __init__(self, files):
        import pydicom

        self._datasets = {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            self._datasets[str(ds.SOPInstanceUID)] = ds

    def instanceValue(self, uid: str, tag: str) -> str:  # noqa: N802 (Slicer's name)
        from pydicom.multival import MultiValue

        ds = self._datasets.get(uid)
        element = ds.get(tuple(int(x, 16) for x in tag.split(","))) if ds else None
        if element is None or element.value is None:
            return ""
        value = element.value
        return "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)


def test_a_series_of_two_radiographs_is_refused_and_the_view_uploaded(
        pacs, pacs_server, citrusv_module, mrml, tmp_path, monkeypatch):
    """A PA and a lateral view stored as one series on the PACS: MONAI Label's copy stacked them
    as two slices of a volume (the server answered "slice 1", the lateral view, read as a CT
    slice). The server now says why it reads no volume from them, and Slicer uploads the view
    it shows and asks about that, saying so."""
    import io
    import json
    import time

    import pydicom
    import requests
    from pydicom.uid import generate_uid

    series_uid = generate_uid()
    views = []
    for view in ("PA", "LL"):
        ds = pydicom.dcmread(REPO / "sample_data" / "studies" / "chest_xray.dcm")
        ds.SeriesInstanceUID, ds.ViewPosition = series_uid, view
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        requests.post(pacs.url + "/instances", data=buffer.getvalue(),
                      timeout=30).raise_for_status()
        views.append(ds)
    params = {"params": json.dumps({"prompt": "Segment the right lung."})}
    deadline = time.monotonic() + 30
    while True:  # past the server's cached series list
        r = pacs_server.post(f"/infer/citrusv_segment?image={series_uid}&output=json", data=params)
        if r.status_code != 404 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == (
        f"The PACS series '{series_uid}' holds 2 DICOM images without a slice position "
        "(radiographs have none; a PA and a lateral view may share a series), which make no "
        "volume; upload the one image to ask about (the Slicer module does so itself).")
    download = pacs_server.get(f"/datastore/image?image={series_uid}")
    assert download.status_code == 400 and download.json() == r.json()

    mrml.fresh()
    su = mrml.slicer.util
    views[0].save_as(tmp_path / "pa.dcm")
    pixels = read_as_slicer(tmp_path / "pa.dcm")  # as Slicer loads it: one slice [k, j, i]
    volume = su.addVolumeFromArray(np.ascontiguousarray(pixels), name="PA")
    sh = mrml.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.slicer.mrmlScene)
    constants = mrml.slicer.vtkMRMLSubjectHierarchyConstants
    item = sh.CreateItem(sh.GetSceneItemID(), volume)
    sh.SetItemUID(item, constants.GetDICOMUIDName(), series_uid)
    sh.SetItemAttribute(item, constants.GetDICOMSeriesModalityAttributeName(), "CR")
    volume.SetAttribute("DICOM.instanceUIDs", str(views[0].SOPInstanceUID))  # as Slicer does
    monkeypatch.setattr(mrml.slicer, "dicomDatabase", _FilesDatabase([tmp_path / "pa.dcm"]),
                        raising=False)
    logic, _, upload, response = _ask(citrusv_module, pacs_server, volume, 0)
    # the upload says what Slicer recorded the image to be (NRRD has no Modality of its own),
    # and that its 1 mm pixels are no size (the CR's PixelSpacing is 0\0)
    (stored,) = [p for p in pacs_server.studies.rglob(f"{upload['image_id']}*") if p.is_file()]
    assert b"\nmodality:=CR\n" in stored.read_bytes()[:1000]
    assert b"\npixel_size:=unknown\n" in stored.read_bytes()[:1000]
    assert [w for w in response.result.warnings
            if w.startswith("this volume sent from Slicer does not have its DICOM image's "
                            "pixel size")], response.result.warnings
    assert upload["image_id"].startswith("slicer_") and upload["uploaded"]
    assert response.result.image.shape == [1, 1955, 1841]
    (warning,) = [w for w in response.result.warnings if series_uid in w]
    assert warning.startswith(f"The server could not read DICOM series {series_uid} as one "
                              f"image (The PACS series '{series_uid}' holds 2 DICOM images")
    assert warning.endswith("'PA' was uploaded and asked about instead.")
    logic.cleanup()


def test_an_upload_says_when_its_pixel_size_is_not_the_dicom_images(mrml, tmp_path):
    """Slicer's DICOM reader (ITK's GDCMImageIO, here through SimpleITK) gives a CR the size of
    its ImagerPixelSpacing only: a CR with PixelSpacing and no ImagerPixelSpacing is shown at
    1 mm, one with both at the ImagerPixelSpacing, while the server reads PixelSpacing first.
    Where the size in Slicer is not the DICOM image's by the server's rule, the upload says
    its pixel size is unknown."""
    import CitrusVMRML
    import pydicom
    from pydicom.uid import generate_uid

    cases = [({}, (1.0, 1.0), False),  # the sample CR: PixelSpacing 0\0
             ({"ImagerPixelSpacing": [0.15, 0.16]}, (0.16, 0.15), True),
             ({"PixelSpacing": [0.2, 0.21]}, (1.0, 1.0), False),
             ({"PixelSpacing": [0.2, 0.21], "ImagerPixelSpacing": [0.15, 0.16]}, (0.16, 0.15),
              False)]
    files = []
    for n, (tags, _, _) in enumerate(cases):
        ds = pydicom.dcmread(REPO / "sample_data" / "studies" / "chest_xray.dcm")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(tmp_path / f"cr{n}.dcm")
        files.append(tmp_path / f"cr{n}.dcm")
    ct = sorted((REPO / "sample_data" / "dicom" / "chest_ct").glob("*.dcm"))[0]
    database = _FilesDatabase([*files, ct])
    mrml.fresh()
    for path, (tags, spacing, known) in zip(files, cases):
        assert slicer_spacing(path)[:2] == pytest.approx(spacing), tags
        volume = mrml.slicer.util.addVolumeFromArray(np.zeros((1, 4, 4), np.uint16))
        volume.SetSpacing(*slicer_spacing(path))
        volume.SetAttribute("DICOM.instanceUIDs", str(pydicom.dcmread(path).SOPInstanceUID))
        assert CitrusVMRML.dicom_pixel_size_known(volume, database) is known, tags
    # a CT slice as Slicer places it; an instance the database does not hold: nothing said
    volume = mrml.slicer.util.addVolumeFromArray(np.zeros((1, 4, 4), np.int16))
    volume.SetSpacing(*slicer_spacing(ct))
    for uid in (str(pydicom.dcmread(ct).SOPInstanceUID), "1.2.3.4"):
        volume.SetAttribute("DICOM.instanceUIDs", uid)
        assert CitrusVMRML.dicom_pixel_size_known(volume, database) is True, uid
