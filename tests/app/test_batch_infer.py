"""MONAI Label's batch inference, scoring and training endpoints on the real server: a batch
asks each image the same question and saves each answer's label map under "original"; names
the server does not offer and a batch without a question get a 4xx sentence, and no run
starts. MONAI Label 0.8.5 answered a batch on a server without CUDA with a 500
(ZeroDivisionError), and an unknown scoring method or training task with 200 "SUBMITTED",
then "ERROR" with a traceback."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from tests.app.helpers import decode_rle, zyx
from tests.server import private_citrusv_server


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
