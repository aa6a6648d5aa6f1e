"""CitrusVLib against the real MONAI Label server with the Citrus-V app on 127.0.0.1.

Server: tests/server.py `citrusv_server` (tiny deterministic checkpoint, a private copy of the
sample studies). Every call goes over HTTP through CitrusVClient exactly as Slicer makes it.
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
from CitrusVLib import CitrusVClient, CitrusVError
from CitrusVLib.errors import CitrusVCancelled
from CitrusVLib.geometry import get_slice, slice_shape
from CitrusVLib.headless import ask_server
from CitrusVLib.label_io import LabelVolume, read_label_volume, write_label_volume
from PIL import Image

IMAGE = "chest_ct"


@pytest.fixture(scope="module")
def server(citrusv_server):
    return citrusv_server


@pytest.fixture(scope="module")
def client(server):
    return CitrusVClient(server.url, read_timeout=300)


@pytest.fixture(scope="module")
def ct(client, tmp_path_factory):
    path = client.download_image(IMAGE, str(tmp_path_factory.mktemp("ct")))
    return read_label_volume(path)


def middle(ct) -> int:
    return ct.array.shape[0] // 2


def test_info_lists_the_citrusv_tasks(client):
    info = client.info()
    assert {"citrusv_segment", "citrusv_detect", "citrusv_report", "citrusv_closer_look"} <= set(
        info["models"]
    )
    assert "citrusv_finetune" in info["trainers"]
    assert "citrusv_uncertainty" in info["strategies"]


def test_segment_mask_sits_on_the_asked_slice_in_the_volume_geometry(client, ct):
    k = middle(ct)
    answer = client.infer(
        "segment", IMAGE, {"prompt": "Segment the liver.", "slice": k, "axis": "axial"}
    )
    result = answer.result
    assert result.task == "segment"
    assert result.image.slices == [k]
    assert result.masks and answer.label_volume() is not None
    h, w = slice_shape(ct.array.shape, "axial")
    for mask in result.masks:
        assert mask.slice == k
        assert mask.array().shape == (h, w)
        assert mask.area_px == int(mask.array().sum())
    label = answer.label_volume()
    if label is not None:
        assert label.array.shape == ct.array.shape
        assert np.allclose(label.ijk_to_ras, ct.ijk_to_ras, atol=1e-3)
        others = np.delete(label.array, k, axis=0)
        assert not others.any()  # a 2D request fills only the asked slice
        for mask in result.masks:
            assert np.array_equal(label.array[k] == mask.label_index, mask.array())


@pytest.fixture(scope="module")
def reasoning_client(citrusv_reasoning_server):
    return CitrusVClient(citrusv_reasoning_server.url, read_timeout=300)


def test_detect_boxes_are_inside_the_slice(reasoning_client, ct):
    k = middle(ct)
    result = reasoning_client.infer(
        "detect", IMAGE, {"prompt": "Where is the liver?", "slice": k}
    ).result
    h, w = slice_shape(ct.array.shape, "axial")
    assert result.boxes
    for box in result.boxes:
        x1, y1, x2, y2 = box.xyxy
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert box.slice == k and box.label == "liver"
        assert 0.0 < box.score <= 1.0  # the model's probability of the box's numbers
        assert box.name == f"{box.id} liver {box.score:.2f}"


def test_report_steps_reference_existing_boxes(reasoning_client, ct):
    k = middle(ct)
    result = reasoning_client.infer(
        "report", IMAGE, {"prompt": "Write a report, think step by step.", "slice": k}
    ).result
    assert result.answer == "No acute findings."
    assert len(result.boxes) == 2
    ids = {b.id for b in result.boxes}
    assert result.reasoning
    for step in result.reasoning:
        assert set(step.box_ids) <= ids
    assert [s.step for s in result.reasoning] == list(range(1, len(result.reasoning) + 1))


def test_closer_look_keeps_the_mask_inside_the_roi(client, ct):
    k = middle(ct)
    h, w = slice_shape(ct.array.shape, "axial")
    roi = [w // 4, h // 4, w // 4 + 64, h // 4 + 64]
    result = client.infer(
        "closer_look",
        IMAGE,
        {"slice": k, "roi": roi, "label": "liver", "prompt": "Segment the liver."},
    ).result
    assert result.closer_look is not None
    assert list(result.closer_look.roi) == roi
    if result.closer_look.crop is not None:
        cx1, cy1, cx2, cy2 = result.closer_look.crop
        assert cx1 <= roi[0] and cy1 <= roi[1] and cx2 >= roi[2] and cy2 >= roi[3]
    for mask in result.masks:
        ys, xs = np.nonzero(mask.array())
        if xs.size:
            assert xs.min() >= roi[0] and xs.max() < roi[2]
            assert ys.min() >= roi[1] and ys.max() < roi[3]


def test_bad_requests_are_one_sentence_and_the_server_keeps_serving(client, ct):
    with pytest.raises(CitrusVError) as err:
        client.infer("segment", IMAGE, {"prompt": "liver", "slice": 10_000})
    assert 400 <= err.value.status < 500
    assert "slice" in str(err.value).lower() and str(err.value).endswith(".")
    with pytest.raises(CitrusVError) as err:
        client.infer("citrusv_nonsense", IMAGE, {"prompt": "liver", "slice": 1})
    assert "nonsense" in str(err.value)
    assert client.info()["models"]


def test_a_cancelled_question_over_slices_stops_on_the_server(server):
    """Slicer's Cancel (`CitrusVClient.abandon`, from the UI thread) closes the question's
    connection: the waiting thread gets CitrusVCancelled at once, the question is not sent
    again, and the server stops its slices there. Before, Cancel only stopped waiting, and
    the server went on to the last slice."""
    client = CitrusVClient(server.url, read_timeout=300)
    question = {"prompt": "Write a report, think step by step.", "slice": "all"}
    outcome = {}

    def ask():
        try:
            outcome["answer"] = client.infer("citrusv_report", IMAGE, question)
        except CitrusVError as e:
            outcome["error"] = e

    before = server.log_size()
    asked = "Infer Request: {'model': 'citrusv_report', 'image': 'chest_ct', 'prompt': 'Write"
    asking = threading.Thread(target=ask)
    asking.start()
    server.wait_for_log(re.escape(asked), since=before, timeout_s=60)  # it is being answered
    cancelled = time.monotonic()
    client.abandon()
    asking.join(30)
    assert not asking.is_alive() and time.monotonic() - cancelled < 5
    assert isinstance(outcome.get("error"), CitrusVCancelled), outcome
    m = server.wait_for_log(r"The question about chest_ct was stopped after (\d+) of 133 "
                            "slices: its client", since=before)
    assert int(m.group(1)) < 133
    assert server.log(tail=10**9)[before:].count(asked) == 1  # not sent again
    assert "citrusv_report" in client.info()["models"]  # the client goes on


def test_correction_lands_in_the_datastore(client, server, ct, tmp_path):
    k = middle(ct)
    label = np.zeros(ct.array.shape, np.uint8)
    label[k, 20:40, 30:60] = 1
    path = write_label_volume(tmp_path / "liver.nii.gz", LabelVolume(label, ct.ijk_to_ras))
    answer = client.put_label(
        IMAGE, path, [{"name": "liver", "idx": 1}], prompt="Segment the liver."
    )
    assert answer.get("image") == IMAGE
    final = server.studies / "labels" / "final"
    saved = [p for p in final.iterdir() if p.name.startswith(IMAGE)]
    assert saved
    back = read_label_volume(saved[0])
    assert np.array_equal(back.array > 0, label > 0)


def test_next_sample_names_an_image(client):
    sample = client.next_sample()
    assert sample is not None
    assert sample.image_id in {"chest_ct", "chest_xray"}


def test_headless_twin_writes_the_overlay(server, ct, tmp_path):
    k = middle(ct)
    png = tmp_path / "ask.png"
    result = ask_server(server.url, IMAGE, k, "Segment the liver.", png)
    assert result.task == "segment"
    with Image.open(png) as img:
        h, w = slice_shape(ct.array.shape, "axial")
        assert img.width > w and img.height >= h
    assert get_slice(ct.array, "axial", k).shape == (h, w)


def test_training_status_before_any_run_is_none(reasoning_client):
    assert reasoning_client.train_status() is None


def test_next_sample_gives_a_slice_for_a_volume(reasoning_client):
    sample = reasoning_client.next_sample()
    assert sample is not None and sample.image_id in {"chest_ct", "chest_xray"}
    if sample.image_id == "chest_ct":
        assert sample.slice_index is None or 0 <= sample.slice_index < 133
    else:
        assert sample.slice_index is None
    assert sample.axis == "axial" and sample.raw.get("reason")


def test_headless_twin_on_the_2d_xray(server, tmp_path):
    png = tmp_path / "xray.png"
    result = ask_server(server.url, "chest_xray", None, "Segment the lungs.", png)
    assert result.image.slices == [] and result.image.shape[0] == 1
    assert all(m.slice is None for m in result.masks)
    with Image.open(png) as img:
        assert img.width > result.image.shape[2]
