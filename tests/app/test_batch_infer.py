"""MONAI Label's batch inference, scoring and training endpoints on the real server: a batch
asks each image the same question and saves each answer's label map under "original"; names
the server does not offer and a batch without a question get a 4xx sentence, and no run
starts. MONAI Label 0.8.5 answered a batch on a server without CUDA with a 500
(ZeroDivisionError), and an unknown scoring method or training task with 200 "SUBMITTED",
then "ERROR" with a traceback. A batch without `run_sync` runs on a thread of the server's
process; while the model answers or a correction is merged, the server answers other
requests."""

from __future__ import annotations

import json
import re
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from tests.app.helpers import (decode_rle, put_label, reference_label, wait_for_task,
                               wait_until_listed_running, zyx)
from tests.server import private_citrusv_server

LIVER = 5  # the reference label map's liver


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, citrusv_sample_studies):
    with private_citrusv_server(tmp_path_factory.mktemp("batch"), tiny_model_dir,
                                citrusv_sample_studies) as running:
        yield running


def _batch(server, model: str, params: dict, images: str = "all"):
    return server.post(f"/batch/infer/{model}", params={"images": images, "run_sync": "true"},
                       json=params)


def test_a_batch_saves_each_images_answer_as_its_original_label(server):
    r = _batch(server, "citrusv_segment", {"prompt": "Segment the liver.", "slice": "all"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert sorted(out) == ["chest_ct", "chest_xray"]
    for image, shape in (("chest_ct", (133, 512, 512)), ("chest_xray", None)):
        answer = out[image]
        assert answer["tag"] == "original" and answer["label"] == image
        result = answer["params"]
        assert result["task"] == "segment" and result["prompt"] == "Segment the liver."
        saved = zyx(nib.load(next((server.studies / "labels" / "original").glob(
            f"{image}.nii*"))))
        if shape:  # every slice asked: the saved label holds each slice's mask
            assert saved.shape == shape and len(result["masks"]) == 133
            assert [m["slice"] for m in result["masks"]] == list(range(133))
            for m in result["masks"][::33]:
                assert np.array_equal(saved[m["slice"]] == m["label_index"],
                                      decode_rle(m["rle"]).astype(bool))
        else:  # the radiograph's one plane ("all" of a 2D image)
            assert len(result["masks"]) == 1 and result["masks"][0]["slice"] is None
            assert np.array_equal(saved[0] == 1, decode_rle(result["masks"][0]["rle"]).astype(bool))
    listed = server.get("/datastore/?output=all").json()["objects"]
    assert {k: sorted(v["labels"]) for k, v in listed.items()} == {
        "chest_ct": ["original"], "chest_xray": ["original"]}
    assert not any((server.studies / "labels" / "final").glob("*.nii*"))  # radiologists' only


def test_an_image_the_question_does_not_fit_is_reported_and_the_others_are_asked(server):
    r = _batch(server, "citrusv_detect", {"prompt": "Locate the liver, output its bbox "
                                          "coordinates using JSON format.", "slice": 60})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["chest_xray"] == {"error": "slice 60 does not apply to a 2D image; leave slice out."}
    assert out["chest_ct"]["params"]["image"]["slices"] == [60]


NO_CORRECTION = ("There is no correction to learn from yet: save a corrected label first "
                 "(Submit in Slicer's Citrus-V module, or PUT /datastore/label?tag=final); no "
                 "run was started.")


@pytest.mark.parametrize("path, body, status, sentence", [
    ("/batch/infer/citrusv_segmentt", {"prompt": "Segment the liver."}, 404,
     "task 'citrusv_segmentt' is unknown; use one of citrusv_closer_look, citrusv_detect, "
     "citrusv_report, citrusv_segment."),
    ("/batch/infer/citrusv_segment", {"slice": "all"}, 400,
     'prompt is missing or empty; send a question such as "Segment the liver." in params.prompt.'),
    ("/batch/infer/citrusv_detect", {"prompt": "Find the liver.", "roi": [1, 2, 30, 40]}, 400,
     "roi is used only by a closer look; send the request to /infer/citrusv_closer_look, or "
     "leave roi out to ask about the whole slice."),
    ("/scoring/dice", {}, 404, "scoring method 'dice' is unknown; this server offers none."),
    ("/train/citrusv_finetun", {}, 404, "training task 'citrusv_finetun' is unknown; use one "
     "of citrusv_finetune (or leave the name out: POST /train/)."),
    # POST /train/ runs every trainer, each with params[its name] and the top-level options
    ("/train/", {"citrusv_finetune": {"steps": 0}}, 400,
     "steps must be a whole number from 1 to 100000, not 0."),
    ("/train/", {"citrusv_finetune": {"steps": 2}, "step": 5}, 400,
     "Unknown training option 'step'; the options are steps, learning_rate, batch_images, "
     "val_every, negatives_per_positive, max_per_structure, seed, publish_if_worse."),
    ("/train/", {"citrusv_finetune": 3}, 400,
     "params.citrusv_finetune must be a JSON object of citrusv_finetune's options, e.g. "
     '{"citrusv_finetune": {"steps": 200}}, not 3.'),
    # this server holds no final label (the batches save theirs under other tags)
    ("/train/citrusv_finetune", {"steps": 2}, 409, NO_CORRECTION),
    ("/train/", {"citrusv_finetune": {"steps": 2}}, 409, NO_CORRECTION),
])
def test_a_name_the_server_lacks_or_a_batch_without_a_question_starts_nothing(
        server, path, body, status, sentence):
    before = {kind: server.get(f"{kind}/", params={"all": "true"}).json()
              for kind in ("/batch/infer", "/scoring", "/train")}
    r = server.post(path, json=body)
    assert (r.status_code, r.json()) == (status, {"detail": sentence})
    after = {kind: server.get(f"{kind}/", params={"all": "true"}).json()
             for kind in ("/batch/infer", "/scoring", "/train")}
    assert after == before  # no run was started
    assert server.get("/info/").status_code == 200


def _wait_for_batch(server) -> dict:
    return wait_for_task(server, "/batch/infer", timeout_s=180, every_s=0.5)


def _wait_for_progress(server) -> dict:
    """The batch's task once it tells how far it is in a volume's slices (or has ended)."""
    return wait_for_task(server, "/batch/infer", timeout_s=120, every_s=0.05,
                         until=lambda task: task.get("progress"))


def _slices_asked(line: str, image: str, total: int) -> int:
    """How many of the volume's slices a progress or stop line says were asked."""
    m = re.fullmatch(rf"{image}: (?:stopped after )?(\d+) of {total} slices"
                     r"(?: asked|; its label is not saved)", line)
    assert m, line
    return int(m.group(1))


def test_a_batch_without_run_sync_runs_in_the_servers_process_and_stops_between_slices(server):
    """MONAI Label started a process that loaded the model a second time (on a GPU, a second
    copy of the weights); here the batch asks the served engine on a thread, one run at a
    time. The engine takes a volume 8 slices at a time, so a radiologist's question is
    answered between two of them (before, it waited for the whole volume), and a stop ends
    the batch there, the volume's label not saved."""
    question = {"prompt": "Segment the liver.", "slice": "all", "label_tag": "async_a"}
    r = server.post("/batch/infer/citrusv_segment", params={"images": "all"}, json=question)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "RUNNING" and r.json()["request"]["label_tag"] == "async_a"
    busy = ("a batch inference is already running; GET /batch/infer shows its progress, and "
            "DELETE /batch/infer stops it after the slices it is asking.")
    for run_sync in ("false", "true"):  # one batch at a time
        again = server.post("/batch/infer/citrusv_segment",
                            params={"images": "all", "run_sync": run_sync}, json=question)
        assert (again.status_code, again.json()) == (429, {"detail": busy})
    assert server.get("/info/").status_code == 200  # the server answers meanwhile
    # chest_ct (133 slices) is asked first
    before = _slices_asked(_wait_for_progress(server)["progress"], "chest_ct", 133)
    asked = server.post("/infer/citrusv_segment", params={"image": "chest_ct"}, data={
        "params": '{"prompt": "Segment the spleen.", "slice": 70}'})
    during = server.get("/batch/infer").json()
    assert asked.status_code == 200, asked.text
    assert during["status"] == "RUNNING"  # answered while the batch is in chest_ct's slices
    assert before <= _slices_asked(during["progress"], "chest_ct", 133) < 133
    stopping = server.delete("/batch/infer")
    assert stopping.status_code == 200 and stopping.json()["status"] == "STOPPING"
    task = _wait_for_batch(server)
    assert task["status"] == "STOPPED" and task["end_ts"] and task["progress"] is None
    assert task["details"][0] == "stop asked: the slices being asked are finished first"
    assert len(task["details"]) == 2
    stopped_after = _slices_asked(task["details"][1], "chest_ct", 133)
    assert 8 <= stopped_after < 133 and stopped_after % 8 == 0
    assert not list((server.studies / "labels" / "async_a").glob("*.nii*"))

    detect = {"prompt": "Locate the liver, output its bbox coordinates using JSON format.",
              "slice": 60, "label_tag": "async_b"}
    r = server.post("/batch/infer/citrusv_detect", params={"images": "all"}, json=detect)
    assert r.status_code == 200, r.text
    task = _wait_for_batch(server)
    assert task["status"] == "DONE" and task["id"] == r.json()["id"]
    assert task["details"] == [
        "chest_ct: answered; its label is saved under 'async_b'",
        "chest_xray: not asked: slice 60 does not apply to a 2D image; leave slice out.",
        "done: 1 of 2 images answered"]
    assert server.get("/batch/infer", params={"check_if_running": "true"}).status_code == 404
    assert len(server.get("/batch/infer", params={"all": "true"}).json()) >= 2
    log = server.log(tail=10**7)
    assert "-m batch_infer" not in log  # MONAI Label's command for a process of its own
    assert log.count("Loading Citrus-V engine version") == 1  # the model was loaded once


def test_a_run_sync_batch_is_a_task_that_blocks_others_and_can_be_stopped(server):
    """MONAI Label ran a `run_sync` batch on the request's own thread, outside the task table:
    `DELETE /batch/infer` could not stop it and two sent at once both ran."""
    question = {"prompt": "Segment the liver.", "slice": [0, 59], "label_tag": "sync_s"}
    answered = {}
    sending = threading.Thread(target=lambda: answered.update(
        r=_batch(server, "citrusv_segment", question)))
    sending.start()
    try:
        running = wait_until_listed_running(server, "/batch/infer", sending)
        progress = _wait_for_progress(server).get("progress") or ""
        again = _batch(server, "citrusv_segment", question)
        stopping = server.delete("/batch/infer")
    finally:
        sending.join(timeout=300)
    assert running.status_code == 200, running.text
    assert running.json()["status"] == "RUNNING"
    assert running.json()["request"]["label_tag"] == "sync_s"
    assert again.status_code == 429, again.text
    assert stopping.status_code == 200 and stopping.json()["status"] == "STOPPING"
    assert _slices_asked(progress, "chest_ct", 60) < 60
    r = answered["r"]  # chest_ct (60 slices) is asked first; the stop came while it was
    assert r.status_code == 409, r.text
    n = int(re.search(r"in chest_ct after (\d+) of", r.json()["detail"]).group(1))
    assert 8 <= n < 60 and r.json() == {"detail": (
        f"the batch was stopped (DELETE /batch/infer) in chest_ct after {n} of 60 slices (its "
        "label is not saved), before any other image had been answered; the other images were "
        "not asked.")}
    task = _wait_for_batch(server)
    assert task["status"] == "STOPPED" and task["id"] == running.json()["id"]
    assert not list((server.studies / "labels" / "sync_s").glob("*.nii*"))


def test_a_question_over_slices_stops_once_its_client_has_gone(server):
    """A question over a CT's slices went on to its last slice after its client had gone (a
    script's time limit, Slicer's Cancel, a closed laptop), taking its turns at the model for
    no one. Now the server notices the connection close and stops before the next slices."""
    question = {"prompt": "Write a report, think step by step.", "slice": "all"}
    before = server.log_size()
    with pytest.raises(requests.exceptions.ReadTimeout):
        server.post("/infer/citrusv_report", params={"image": "chest_ct"},
                    data={"params": json.dumps(question)}, timeout=(5, 1.5))
    m = server.wait_for_log(r"The question about chest_ct was stopped after (\d+) of 133 "
                            r"slices: its client closed the connection before the answer came\.",
                            since=before)
    assert 0 < int(m.group(1)) < 133
    # the model is free for the next question
    r = server.post("/infer/citrusv_segment", params={"image": "chest_ct"},
                    data={"params": '{"prompt": "Segment the liver.", "slice": 60}'})
    assert r.status_code == 200, r.text


def _correction(server, tmp_path):
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, server.studies / "chest_ct.nii.gz")
    return put_label(server, "chest_ct", liver, {"label_info": [{"name": "liver", "idx": 1}]})


@pytest.mark.parametrize("send", [
    lambda server, _: server.post("/infer/citrusv_segment", params={"image": "chest_ct"}, data={
        "params": '{"prompt": "Segment the liver.", "slice": [0, 59]}'}),
    lambda server, _: server.post("/batch/infer/citrusv_segment", params={
        "images": "all", "run_sync": "true"}, json={
        "prompt": "Segment the liver.", "slice": [0, 59], "label_tag": "sync_c"}),
    _correction,
], ids=["question", "run_sync batch", "correction"])
def test_while_the_model_answers_the_server_answers_other_requests(server, send, tmp_path):
    """MONAI Label's endpoints ran on the server's one event loop: while one question over 60
    slices was answered (about 3 s here) or a correction of the CT's liver was merged (3.5 to
    4.8 s), a connection test or an image download of anyone's waited for it."""
    answered = {}
    asking = threading.Thread(target=lambda: answered.update(r=send(server, tmp_path)))
    asking.start()
    try:
        time.sleep(0.5)  # the request is being answered
        assert server.get("/info/").status_code == 200
        download = server.get("/datastore/image", params={"image": "chest_xray"})
        still_asking = asking.is_alive()
    finally:
        asking.join(timeout=300)
    assert download.status_code == 200 and len(download.content) > 100_000
    assert still_asking  # both were answered while the request was still being answered
    assert answered["r"].status_code == 200, answered["r"].text
