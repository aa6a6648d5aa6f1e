"""Every route the real server lists in its OpenAPI schema, called with ids it does not hold,
junk query values and a junk body, answers below 500 (a 4xx sentence or an answer), and
starts no training or batch run (a training request on this server, which holds no final
label yet, is a 409 or 400). MONAI Label 0.8.5 answered 500 to, among others, `PUT
/datastore/image/info` and `PUT /datastore/label/info` of an unknown id and `POST
/infer/wsi_v2/{model}` without an image."""

from __future__ import annotations

import itertools
import json

import pytest
import requests

from tests.app.helpers import put_label, reference_label
from tests.server import private_citrusv_server

LIVER = 5  # the reference label map's liver
NAMES = {"model": ["citrusv_segment", "nosuch"], "strategy": ["citrusv_uncertainty", "nosuch"],
         "method": ["nosuch"], "session_id": ["nosuch"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, citrusv_sample_studies):
    with private_citrusv_server(tmp_path_factory.mktemp("sweep"), tiny_model_dir,
                                citrusv_sample_studies) as running:
        yield running


def test_no_route_answers_junk_with_a_server_error(server):
    spec = server.get("/openapi.json").json()
    failures, calls = [], 0
    for path, operations in spec["paths"].items():
        names = [part.strip("{}") for part in path.split("/") if part.startswith("{")]
        for method, operation in operations.items():
            junk = {p["name"]: "junk" for p in operation.get("parameters", []) if p["in"] == "query"}
            for values in itertools.product(*[NAMES.get(n, ["x"]) for n in names]):
                url = path
                for name, value in zip(names, values):
                    url = url.replace("{" + name + "}", value)
                for query, body in itertools.product(({}, junk), (None, {"junk": 1})):
                    r = requests.request(method.upper(), server.url + url, params=query,
                                         json=body, timeout=120)
                    calls += 1
                    if r.status_code >= 500:
                        failures.append(f"{method.upper()} {url} {query} {body}: "
                                        f"{r.status_code} {r.text[:120]}")
    assert calls > 100 and failures == []
    for kind, none in (("/train/", "No Train Tasks Found"),
                       ("/batch/infer", "No Batch_infer Tasks Found")):
        assert server.get(kind, params={"all": "true"}).json() == {"detail": none}


def test_info_of_an_unknown_id_or_not_an_object_is_a_sentence(server):
    r = server.put("/datastore/image/info", params={"image": "nosuch"}, data={"info": "{}"})
    assert (r.status_code, r.json()["detail"]) == (404, (
        "image 'nosuch' is not in the datastore; use an id from GET /datastore/?output=all or "
        "upload the file."))
    r = server.put("/datastore/label/info", params={"label": "nosuch", "tag": "final"},
                   data={"info": "{}"})
    assert (r.status_code, r.json()["detail"]) == (404, (
        "there is no label 'nosuch' tagged 'final' in the datastore; GET /datastore/?output=all "
        "lists each image's labels and their tags."))
    r = server.put("/datastore/image/info", params={"image": "chest_ct"}, data={"info": "[1"})
    assert (r.status_code, r.json()["detail"]) == (400, 'info must be a JSON object, e.g. '
                                                        '{"note": "..."}.')
    r = server.post("/infer/wsi_v2/citrusv_segment", params={"image": "chest_ct"}, json={})
    assert (r.status_code, r.json()["detail"]) == (404, (
        "whole-slide (pathology) inference is not offered: Citrus-V answers about CT, MR and "
        "X-ray images; ask with POST /infer/{task}?image=ID."))


def test_label_info_sent_by_a_client_cannot_name_who_sent_the_label(server, tmp_path):
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, server.studies / "chest_ct.nii.gz")
    r = put_label(server, "chest_ct", liver, {"label_info": [{"name": "liver", "idx": 1}],
                                               "claimed_by": "Dr. A. Lee"})
    assert r.status_code == 200, r.text
    r = server.put("/datastore/label/info", params={"label": "chest_ct", "tag": "final"},
                   data={"info": json.dumps({"note": "checked", "user": "Dr. Forged",
                                             "claimed_by": "Dr. Forged", "pacs_error": "x"})})
    assert r.status_code == 200, r.text
    info = server.get("/datastore/label/info", params={"label": "chest_ct", "tag": "final"}).json()
    assert info["note"] == "checked" and not {"user", "claimed_by", "pacs_error"} & set(info)
    assert [(e["name"], e["claimed_by"]) for e in info["label_info"]] == [("liver", "Dr. A. Lee")]
    r = server.put("/datastore/label/info", params={"label": "chest_ct", "tag": "final"},
                   data={"info": json.dumps({"label_info": [{"name": "spleen", "idx": 1}]})})
    assert (r.status_code, r.json()["detail"]) == (400, (
        "info.label_info (the label's structures, with who sent each) is set by sending the "
        "label (PUT /datastore/label?tag=final); leave it out here."))
    info = server.get("/datastore/label/info", params={"label": "chest_ct", "tag": "final"}).json()
    assert [e["name"] for e in info["label_info"]] == ["liver"]
