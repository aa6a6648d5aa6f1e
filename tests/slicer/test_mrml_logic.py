"""CitrusVLogic (CitrusV.py) on slicer-core MRML + a real HTTP server shaped like MONAI Label.

Slicer's Qt layer (``qt``, ``slicer.ScriptedLoadableModule``) does not exist outside Slicer;
the logic uses none of it, so only those two imports are given empty stand-ins here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from CitrusVLib import encode_rle, geometry
from CitrusVLib.label_io import read_label_volume
from CitrusVLib.multipart import parse_multipart

from .conftest import oblique_lps_ijk_to_ras

SHAPE = (6, 40, 60)


@pytest.fixture
def volume(mrml):
    mrml.fresh()
    array = np.zeros(SHAPE, np.int16)
    array[2, 10:20, 15:35] = 100
    return mrml.slicer.util.addVolumeFromArray(
        array, ijkToRAS=oblique_lps_ijk_to_ras(), name="CT 1"
    )


def segment_answer(slice_index=2):
    mask = np.zeros((40, 60), bool)
    mask[10:20, 15:35] = True
    return {
        "task": "segment",
        "prompt": "Segment the liver.",
        "boxes": [{"id": "b1", "label": "liver", "xyxy": [15, 10, 35, 20], "slice": slice_index}],
        "masks": [
            {"label": "liver", "label_index": 1, "slice": slice_index, "rle": encode_rle(mask)}
        ],
        "reasoning": [{"step": 1, "text": "The liver.", "box_ids": ["b1"]}],
        "image": {"axis": "axial", "slices": [slice_index]},
        "label_names": {"liver": 1},
    }


def test_upload_once_ask_apply_correct(citrusv_module, volume, http_server, mrml):
    su = mrml.slicer.util
    uploads = []

    def upload(handler):
        uploads.append(handler.path)
        return 200, "application/json", json.dumps({"image": "slicer_CT_1"})

    r = http_server.routes
    r[("PUT", "/datastore/image")] = upload
    r[("POST", "/infer/citrusv_segment")] = lambda h: (
        200,
        "application/json",
        json.dumps(segment_answer()),
    )
    r[("PUT", "/datastore/label")] = lambda h: (
        200,
        "application/json",
        '{"image": "slicer_CT_1", "label": "slicer_CT_1"}',
    )
    logic = citrusv_module.CitrusVLogic()
    client = logic.client(http_server.url)
    url = http_server.url
    for _ in range(2):  # the second question reuses the uploaded image
        upload_spec = logic.prepareImage(volume, url)
        response = logic.infer(client, upload_spec, "segment", {"prompt": "liver", "slice": 2})
        logic.rememberImage(volume, url, upload_spec)
        steps = []
        applied = logic.applyResult(response, volume, lambda: steps.append(1))
        assert steps == [1]
    assert len(uploads) == 1
    seg = applied.segmentation_node
    back = su.arrayFromSegmentBinaryLabelmap(seg, applied.segment_ids["liver"], volume)
    assert back[2].sum() == 200 and back.sum() == 200
    # the uploaded file is the volume with its own geometry
    put = next(s for s in http_server.seen if s["path"].startswith("/datastore/image"))
    file_part = parse_multipart(put["body"], put["headers"]["Content-Type"])["file"]
    uploaded = read_label_volume(file_part.data, file_part.filename)
    assert np.array_equal(uploaded.array, su.arrayFromVolume(volume))
    assert np.allclose(uploaded.ijk_to_ras, oblique_lps_ijk_to_ras())

    # closer look: around the selected box, else the segment on the slice
    view = geometry.ViewSlice("axial", 2, 2.0, True)
    roi, label = logic.closerLookRegion(volume, view, ["b1"], None)
    # 20 × 10 px box: side max(20 × 1.5, 32) = 32, centred, shifted down to stay in the image
    assert label == "liver" and roi == [9, 0, 41, 32]
    roi2, label2 = logic.closerLookRegion(volume, view, [], "liver")
    assert (roi2, label2) == (roi, "liver")
    with pytest.raises(Exception, match="empty on this slice"):
        logic.closerLookRegion(volume, geometry.ViewSlice("axial", 4, 4.0, True), [], "liver")
    # a segment with a second part apart (ascending and descending aorta): a square each
    two = back.copy()
    ys, xs = np.nonzero(back[2])
    two[2, ys.max() + 10 : ys.max() + 20, xs.min() : xs.min() + 20] = 1  # 200 px, 10 rows below
    su.updateSegmentBinaryLabelmapFromArray(two, seg, applied.segment_ids["liver"], volume)
    rois, _ = logic.closerLookRegion(volume, view, [], "liver")
    assert len(rois) == 2 and rois[0] == roi
    x1, y1, x2, y2 = rois[1]
    assert x1 <= xs.min() and x2 >= xs.min() + 20 and y1 <= ys.max() + 10 and y2 >= ys.max() + 20
    su.updateSegmentBinaryLabelmapFromArray(back, seg, applied.segment_ids["liver"], volume)

    # correction: the edited segment goes back as a label file with label_info and prompt
    edited = back.copy()
    edited[2, 10:12, :] = 1
    su.updateSegmentBinaryLabelmapFromArray(edited, seg, applied.segment_ids["liver"], volume)
    path, info = logic.exportCorrection(volume, applied.segment_ids["liver"])
    answer = logic.submitCorrection(
        client, logic.prepareImage(volume, url), path, info, "Segment the liver."
    )
    assert answer["label"] == "slicer_CT_1"
    put = http_server.seen[-1]
    assert put["path"] == "/datastore/label?image=slicer_CT_1&tag=final"
    parts = parse_multipart(put["body"], put["headers"]["Content-Type"])
    assert json.loads(parts["params"].text()) == {
        "label_info": [{"name": "liver", "idx": 1}],
        "prompt": "Segment the liver.",
    }
    label = read_label_volume(parts["label"].data, parts["label"].filename)
    assert np.array_equal(label.array, edited)
    assert np.allclose(label.ijk_to_ras, oblique_lps_ijk_to_ras())
    logic.cleanup()


def test_datastore_volume_is_not_uploaded(citrusv_module, volume, http_server):
    logic = citrusv_module.CitrusVLogic()
    logic.rememberImage(volume, http_server.url, "chest_ct")
    assert volume.GetAttribute("CitrusV.ImageID") == "chest_ct"
    assert logic.prepareImage(volume, http_server.url) == {"image_id": "chest_ct"}
    assert logic.volumeForImage("chest_ct", http_server.url) is volume
    assert logic.volumeForImage("other", http_server.url) is None


def test_status_sentences(citrusv_module):
    logic = citrusv_module.CitrusVLogic
    text, done = logic.describeTraining({"status": "RUNNING", "details": ["epoch 1", "epoch 2"]})
    assert (text, done) == ("Training: running (epoch 2).", False)
    assert logic.describeTraining({"status": "DONE", "details": []}) == ("Training: done.", True)
    assert logic.describeTraining(None) == ("No training has run yet.", True)
    info = {
        "name": "Citrus-V",
        "models": {"citrusv_segment": {}, "citrusv_detect": {}},
        "citrusv": {"status": "model not installed yet"},
    }
    assert logic.describeServer(info) == (
        "Connected: Citrus-V with 2 Citrus-V task(s); model model not installed yet."
    )
    info["citrusv"] = {"status": "ready", "serving_version": "3"}
    assert logic.describeServer(info) == (
        "Connected: Citrus-V with 2 Citrus-V task(s); serving model version 3."
    )
    info["citrusv"]["intended_use"] = "Research use only; not for diagnosis."
    assert logic.describeServer(info) == (
        "Connected: Citrus-V with 2 Citrus-V task(s); serving model version 3. "
        "Intended use: Research use only; not for diagnosis."
    )
    info["citrusv"]["structures"] = ["liver", "spleen"]  # nano lists its ten
    assert logic.describeServer(info).endswith(
        "not for diagnosis. It was taught to find only: liver, spleen.")
    info["citrusv"]["languages"] = ["en"]  # nano's questions: English
    assert logic.describeServer(info).endswith(
        "only: liver, spleen. Ask in English: it was taught questions in no other language.")
    info["citrusv"]["languages"] = ["zh", "en", "xx"]
    assert logic.describeServer(info).endswith(
        "Ask in Chinese or English or xx: it was taught questions in no other language.")


def test_example_questions_follow_the_served_model(citrusv_module):
    """The module's example questions are the served model's (`examples` in /info/) where it
    names some, else the module's general ones; what is not a question is dropped."""
    logic = citrusv_module.CitrusVLogic
    general = citrusv_module.EXAMPLE_PROMPTS
    info = {"models": {
        "citrusv_segment": {"examples": ["Please segment the liver in this scan.", "", 3]},
        "citrusv_detect": {"examples": []},
        "citrusv_report": {},
    }}
    assert logic.examplePrompts(info) == {
        "Segment": ["Please segment the liver in this scan."],
        "Detect": general["Detect"],
        "Report": general["Report"],
    }
    assert logic.examplePrompts({}) == general
