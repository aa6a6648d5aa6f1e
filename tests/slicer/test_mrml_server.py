"""End to end without Qt: a volume in a real MRML scene, CitrusVLogic, the real MONAI Label
server. The volume is uploaded from the scene, the Red view's slice is asked about, the answer
lands on that slice of the segmentation, and the edited segment arrives in labels/final."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from CitrusVLib import geometry
from CitrusVLib.label_io import read_label_volume


@pytest.fixture
def ct_volume(mrml, citrusv_server):
    """chest_ct loaded into the scene the way Slicer loads a NIfTI (IJK-to-RAS = affine)."""
    mrml.fresh()
    img = nib.load(str(citrusv_server.studies / "chest_ct.nii.gz"))
    array = np.ascontiguousarray(np.asanyarray(img.dataobj).transpose(2, 1, 0)).astype(np.int16)
    return mrml.slicer.util.addVolumeFromArray(array, ijkToRAS=img.affine, name="chest ct")


def test_upload_ask_apply_and_correct_over_http(citrusv_module, ct_volume, citrusv_server, mrml):
    import CitrusVMRML

    su = mrml.slicer.util
    logic = citrusv_module.CitrusVLogic()
    url = citrusv_server.url
    client = logic.client(url)

    # the Red view sits on slice 60 of the volume
    k = 60
    CitrusVMRML.jump_to_slice(ct_volume, "axial", k)
    view = CitrusVMRML.current_slice(ct_volume, "Red")
    assert (view.axis, view.slice_index) == ("axial", k)

    upload = logic.prepareImage(ct_volume, url)
    assert "path" in upload  # not from the datastore: it is uploaded once
    params = {"prompt": "Segment the liver.", "slice": view.slice_index, "axis": view.axis}
    response = logic.infer(client, upload, "segment", params)
    logic.rememberImage(ct_volume, url, upload)
    assert logic.prepareImage(ct_volume, url) == {"image_id": upload["image_id"]}

    label = response.label_volume()
    assert np.allclose(label.ijk_to_ras, CitrusVMRML.ijk_to_ras(ct_volume, world=False), atol=1e-3)
    applied = logic.applyResult(response, ct_volume)
    seg = applied.segmentation_node
    assert applied.segment_ids
    name, segment_id = next(iter(applied.segment_ids.items()))
    mask = su.arrayFromSegmentBinaryLabelmap(seg, segment_id, ct_volume)
    assert mask.shape == CitrusVMRML.volume_shape(ct_volume)
    assert set(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))) <= {k}
    index = response.result.labels()[name]
    assert np.array_equal(mask[k] > 0, label.array[k] == index)

    # the user paints a square into the slice and submits it as a correction
    edited = (mask > 0).astype(np.uint8)
    edited[k, 100:140, 200:260] = 1
    su.updateSegmentBinaryLabelmapFromArray(edited, seg, segment_id, ct_volume)
    path, info = logic.exportCorrection(ct_volume, segment_id)
    # who sends it: the name in Slicer's Application Settings > User (no sign-in here)
    person = mrml.slicer.vtkPersonInformation()
    person.SetName("  Dr. Ada\tLee ")
    person.SetLogin("alee")
    sender = logic.senderName(person)
    assert sender == "Dr. Ada Lee"
    unnamed = mrml.slicer.vtkPersonInformation()
    unnamed.SetLogin("alee")
    assert logic.senderName(unnamed) == "alee"
    assert logic.senderName(mrml.slicer.vtkPersonInformation()) is None
    odd = mrml.slicer.vtkPersonInformation()
    odd.SetName("\u200b" + "Dr. " + "x" * 130)  # a zero-width space, too long: what the server takes
    assert logic.senderName(odd) == ("Dr. " + "x" * 130)[:128]
    answer = logic.submitCorrection(
        client, logic.prepareImage(ct_volume, url), path, info, "Segment the liver.", sender
    )
    assert answer["image"] == upload["image_id"]
    final = citrusv_server.studies / "labels" / "final"
    saved = [p for p in final.iterdir() if p.name.startswith(upload["image_id"])]
    assert saved
    # the server keeps the name as claimed (not as a signed-in user), on the structure and in
    # the copy kept as sent
    stored = citrusv_server.get("/datastore/?output=all").json()["objects"][upload["image_id"]]
    entries = stored["labels"]["final"]["info"]["label_info"]
    assert [(e["name"], e.get("claimed_by"), e.get("user")) for e in entries] == [
        (info[0]["name"], "Dr. Ada Lee", None)]
    kept = sorted((final / ".history" / upload["image_id"]).glob("*.json"))
    assert [json.loads(p.read_text()).get("claimed_by") for p in kept] == ["Dr. Ada Lee"]
    back = read_label_volume(saved[0])
    assert np.array_equal(back.array > 0, edited > 0)
    assert np.allclose(back.ijk_to_ras, CitrusVMRML.ijk_to_ras(ct_volume, world=False), atol=1e-3)
    assert geometry.slice_shape(back.array.shape, "axial") == mask[k].shape
    logic.cleanup()


def test_a_volume_whose_server_image_was_replaced_goes_as_its_own_image(
        citrusv_module, mrml, tiny_model_dir, citrusv_sample_studies, tmp_path):
    """A volume downloaded from the server (Next sample) is asked about by its datastore id.
    Once the server's image under that id is replaced on disk by another scan, nothing drawn on
    the volume goes to that id: the question and the correction are refused with a sentence
    before anything is sent, the next download is not answered with the old volume, and the
    widget sends the correction and the question again with the volume uploaded as its own
    image, saying so."""
    import shutil
    from types import SimpleNamespace

    import CitrusVMRML
    from CitrusVLib.errors import ImageReplacedError

    from tests.server import copy_studies, start_citrusv_server

    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    su = mrml.slicer.util
    mrml.fresh()
    with start_citrusv_server(studies, tmp_path / "model") as server:
        url = server.url
        logic = citrusv_module.CitrusVLogic()
        client = logic.client(url)
        # Next sample as the widget does it: the image's info first, then the download
        stamp = client.image_stamp("chest_ct")
        img = nib.load(client.download_image("chest_ct", str(tmp_path)))
        array = np.ascontiguousarray(np.asanyarray(img.dataobj).transpose(2, 1, 0))
        volume = su.addVolumeFromArray(array.astype(np.int16), ijkToRAS=img.affine, name="chest_ct")
        logic.rememberImage(volume, url, "chest_ct", stamp)
        assert logic.volumeForImage("chest_ct", url, stamp) is volume
        upload = logic.prepareImage(volume, url)
        assert upload == {"image_id": "chest_ct", "image_stat": stamp, "name": "chest_ct"}
        params = {"prompt": "Segment the liver.", "slice": 60, "axis": "axial"}
        applied = logic.applyResult(logic.infer(client, upload, "segment", params), volume)
        logic.rememberImage(volume, url, upload)
        segment_id = next(iter(applied.segment_ids.values()))
        path, info = logic.exportCorrection(volume, segment_id)
        assert sorted(server.get("/datastore/?output=all").json()["objects"]) == [
            "chest_ct", "chest_xray"]  # asked by its id: nothing uploaded

        # the same bytes written over the image again (a backup put back): its files' times
        # change, its content does not, so the volume is still taken for chest_ct
        ct = studies / "chest_ct.nii.gz"
        before = client.image_info("chest_ct")
        ct.write_bytes(ct.read_bytes())
        os.utime(ct, ns=(ct.stat().st_atime_ns, ct.stat().st_mtime_ns + 2_000_000_000))
        after = client.image_info("chest_ct")
        assert after["image_stat"] != before["image_stat"]
        assert after["image_sha256"] == before["image_sha256"] == stamp
        assert logic.ensureUploaded(client, logic.prepareImage(volume, url)) == "chest_ct"
        assert logic.volumeForImage("chest_ct", url, client.image_stamp("chest_ct")) is volume

        # another scan put in its place on the server, same grid, same file name
        other = np.flip(np.asarray(nib.load(ct).dataobj), axis=0).copy()
        nib.save(nib.Nifti1Image(other, img.affine, img.header), ct)
        sentence = ("The server's image 'chest_ct' holds other content than when 'chest_ct' was "
                    "downloaded from it (another scan may have replaced it there), so the volume "
                    "is no longer taken for it.")
        with pytest.raises(ImageReplacedError) as refused:
            logic.infer(client, logic.prepareImage(volume, url), "segment", params)
        assert str(refused.value) == sentence
        with pytest.raises(ImageReplacedError):
            logic.submitCorrection(client, logic.prepareImage(volume, url), path, info, "liver")
        assert not (studies / "labels" / "final" / "chest_ct.nii.gz").exists()

        # Next sample names chest_ct again: the old volume is not shown for it (and unlinked)
        assert logic.volumeForImage("chest_ct", url, client.image_stamp("chest_ct")) is None
        assert volume.GetAttribute(CitrusVMRML.IMAGE_ID_ATTR) is None

        # the widget's own steps (its Qt parts stood in for; the server call made in place):
        # the correction, then a question, each sent with the volume uploaded as its own image
        logic.rememberImage(volume, url, "chest_ct", stamp)  # as downloaded before the swap
        shown, reported = [], []
        ui = SimpleNamespace(
            volumeSelector=SimpleNamespace(currentNode=lambda: volume),
            promptComboBox=SimpleNamespace(currentText="Segment the liver."),
            tokenLineEdit=SimpleNamespace(text="signed in"), trainStatusLabel=SimpleNamespace(),
            statusLabel=SimpleNamespace(text=""))
        widget = SimpleNamespace(
            logic=logic, ui=ui, _busy=False, client=lambda: client, serverUrl=lambda: url,
            callServer=lambda _label, function, *args: function(*args),
            _currentSegmentId=lambda: segment_id, _report=lambda e, what: reported.append(e),
            _rememberServer=lambda _url: None, _segmentEditorUndo=lambda _volume: None,
            _showResult=lambda result, _volume: shown.append(result))
        citrusv_module.CitrusVWidget.onSubmitCorrection(widget)
        assert reported == [] and volume.GetAttribute(CitrusVMRML.IMAGE_ID_ATTR) is None
        upload = logic.prepareImage(volume, url)
        assert upload == {"image_id": upload["image_id"]}  # uploaded: known by its id now
        assert upload["image_id"].startswith("slicer_chest_ct_")
        assert ui.trainStatusLabel.text.endswith(
            f"press Train to learn from it. {sentence} The correction went with the volume, "
            "uploaded as its own image.")
        logic.rememberImage(volume, url, "chest_ct", stamp)
        citrusv_module.CitrusVWidget._ask(widget, volume, "segment", params, "Asking")
        assert shown[0].warnings[-1] == f"{sentence} It was uploaded and asked about as its own image."
        assert shown[0].image.id == upload["image_id"]
        assert logic.prepareImage(volume, url) == {"image_id": upload["image_id"]}
        saved = read_label_volume(next((studies / "labels" / "final").glob(
            f"{upload['image_id']}.*")))
        assert np.array_equal(saved.array, read_label_volume(path).array)  # as exported
        assert not (studies / "labels" / "final" / "chest_ct.nii.gz").exists()
        logic.cleanup()
