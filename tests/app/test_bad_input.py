"""Bad requests get a 4xx with one sentence, and the server keeps serving the next good one."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

GOOD = {"prompt": "Segment the liver.", "slice": 60}


def _upload(tmp_path, name: str, content: bytes) -> dict:
    path = tmp_path / name
    path.write_bytes(content)
    return {"file": (name, path.read_bytes(), "application/octet-stream")}


def _oversized_nifti() -> bytes:
    img = nib.Nifti1Image(np.zeros((9000, 9000, 1), dtype=np.uint8), np.eye(4))
    return gzip.compress(img.to_bytes())


def _corrupt_dicom(studies) -> bytes:
    data = (studies / "chest_xray.dcm").read_bytes()
    return data[:2000]  # valid preamble and header start, the rest cut off


CASES = {
    "unknown task": ("citrusv_segmentt", "chest_ct", GOOD, None, 404, "unknown"),
    "unknown image": ("citrusv_segment", "no_such_image", GOOD, None, 404, "datastore"),
    "no image at all": ("citrusv_segment", "", GOOD, None, 400, "?image=ID"),
    "missing prompt": ("citrusv_segment", "chest_ct", {"slice": 60}, None, 400, "prompt"),
    "empty prompt": ("citrusv_segment", "chest_ct", {"prompt": "  ", "slice": 60}, None, 400,
                     "prompt"),
    # nano answered "???" with a zero-area left-lung box and "rephrase the prompt"
    "prompt with no words": ("citrusv_segment", "chest_ct", {"prompt": "???", "slice": 60}, None,
                             400, "prompt '???' has no words; type a question"),
    "slice out of range": ("citrusv_segment", "chest_ct", {**GOOD, "slice": 133}, None, 400,
                           "out of range"),
    "slice not a number": ("citrusv_segment", "chest_ct", {**GOOD, "slice": "middle"}, None, 400,
                           "slice"),
    "invalid axis": ("citrusv_segment", "chest_ct", {**GOOD, "axis": "oblique"}, None, 400, "axis"),
    "unknown window": ("citrusv_segment", "chest_ct", {**GOOD, "window": "brainz"}, None, 400,
                       "window"),
    "bad roi": ("citrusv_closer_look", "chest_ct", {**GOOD, "roi": [10, 10, 5]}, None, 400, "roi"),
    "bad box in a roi list": ("citrusv_closer_look", "chest_ct",
                              {**GOOD, "roi": [[10, 10, 50, 50], [10, 10, "x", 5]]}, None, 400,
                              "four numbers"),
    "too many roi boxes": ("citrusv_closer_look", "chest_ct",
                           {**GOOD, "roi": [[10, 10, 50, 50]] * 9}, None, 400, "at most 8"),
    "closer look at a segment named after nothing": (
        "citrusv_closer_look", "chest_ct", {"label": "Segment_1", "slice": 60}, None, 400,
        "'Segment_1' names no structure the model knows"),
    "closer look on a range": ("citrusv_closer_look", "chest_ct", {**GOOD, "slice": "all"},
                               None, 400, "one slice"),
    "non-image upload": ("citrusv_segment", "", {"prompt": "Segment the liver."},
                         ("notes.txt", b"this is not an image"), 400, "not an image"),
    "oversized image": ("citrusv_segment", "", {"prompt": "Segment the liver."},
                        ("huge.nii.gz", "oversized"), 413, "too large"),
    "corrupt DICOM": ("citrusv_segment", "", {"prompt": "Segment the lungs."},
                      ("broken.dcm", "corrupt"), 400, "DICOM"),
    "params a JSON list": ("citrusv_segment", "chest_ct", [1, 2], None, 400, "JSON object"),
    "params null": ("citrusv_segment", "chest_ct", None, None, 400, "JSON object"),
    # a region or a segment name sent to another task was dropped without a word before
    "roi on a segmentation": ("citrusv_segment", "chest_ct", {**GOOD, "roi": [80, 110, 300, 320]},
                              None, 400, "roi is used only by a closer look; send the request "
                              "to /infer/citrusv_closer_look"),
    "malformed roi on a report": ("citrusv_report", "chest_ct", {**GOOD, "roi": "x"}, None, 400,
                                  "roi is used only by a closer look"),
    "prompt misspelt": ("citrusv_segment", "chest_ct", {"Prompt": "Segment the liver.", "slice": 60},
                        None, 400, "prompt is missing (params.Prompt is not an option)"),
    "label on a detection": ("citrusv_detect", "chest_ct", {**GOOD, "label": "liver"}, None, 400,
                             "leave label out to ask about the whole slice"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_4xx_then_good_request_succeeds(citrusv_server, tmp_path, case):
    task, image, params, upload, status, words = CASES[case]
    files = None
    if upload is not None:
        name, content = upload
        if content == "oversized":
            content = _oversized_nifti()
        elif content == "corrupt":
            content = _corrupt_dicom(citrusv_server.studies)
        files = _upload(tmp_path, name, content)
    query = f"?image={image}" if image else ""
    r = citrusv_server.post(f"/infer/{task}{query}", data={"params": json.dumps(params)},
                            files=files)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words.lower() in detail.lower(), detail
    assert detail.count(". ") <= 1, f"more than one sentence: {detail}"

    ok = citrusv_server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                             data={"params": json.dumps(GOOD)})
    assert ok.status_code == 200, ok.text
    assert ok.json()["image"]["slices"] == [60]


def test_only_the_closer_look_offers_roi_and_label(citrusv_server):
    """/info/ lists each model's options (the stock MONAI Label module shows them): a region
    and a segment name only where they are used."""
    models = citrusv_server.get("/info/").json()["models"]
    assert {task: sorted(m["config"]) for task, m in models.items()} == {
        "citrusv_segment": ["axis", "prompt", "slice", "window"],
        "citrusv_detect": ["axis", "prompt", "slice", "window"],
        "citrusv_report": ["axis", "prompt", "slice", "window"],
        "citrusv_closer_look": ["axis", "label", "prompt", "roi", "slice", "window"]}
    # the options as the stock module sends them back, roi and label empty: answered
    empty = {"prompt": "Segment the liver.", "slice": 60, "axis": "axial", "window": "",
             "roi": "", "label": ""}
    r = citrusv_server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                            data={"params": json.dumps(empty)})
    assert r.status_code == 200, r.text


def test_a_misspelt_option_is_named_in_the_warnings(citrusv_server):
    """"slices" or "windw" were dropped without a word: the answer was about the middle slice
    in the default window. MONAI Label's own keys (and a client's) pass silently."""
    params = {"prompt": "Segment the liver.", "slices": [60, 62], "windw": "lung",
              "client_id": "slicer-1", "label_info": []}
    r = citrusv_server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                            data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text
    assert r.json()["image"]["slices"] == [66]
    assert r.json()["warnings"][:3] == [
        "params.slices is not an option, so it was left out; did you mean slice?",
        "params.windw is not an option, so it was left out; did you mean window?",
        "slice was not given; used the middle axial slice 66."]


def _label(kind: str) -> np.ndarray:
    """A correction on the sample CT's grid (x, y, z): the liver-ish box on slices 60-62."""
    m = np.zeros((512, 512, 133), np.uint8)
    m[200:260, 200:260, 60:63] = 1
    if kind == "two values":
        m[300:320, 300:320, 60] = 2
    if kind == "probabilities":
        return m.astype(np.float32) * 0.5
    if kind == "negative":
        return m.astype(np.int16) * -1
    return m


LIVER = [{"name": "liver", "idx": 1}]
BAD_CORRECTIONS = {  # label file, params, words of the 400 sentence
    "idx 0 (the background)": ("one value", {"label_info": [{"name": "liver", "idx": 0}]},
                               "idx 0 of 'liver' must be a whole number from 1 to 65535"),
    "idx not a number": ("one value", {"label_info": [{"name": "liver", "idx": "one"}]},
                         "idx 'one' of 'liver' must be a whole number"),
    "a name twice": ("two values", {"label_info": [{"name": "liver", "idx": 1},
                                                   {"name": "Liver", "idx": 2}]}, "twice"),
    "empty name": ("one value", {"label_info": [{"name": " ", "idx": 1}]},
                   "must be the structure's name"),
    "value not named": ("two values", {"label_info": LIVER},
                        "The label has value(s) 2 that params.label_info does not name"),
    "probability map": ("probabilities", {"label_info": LIVER}, "not whole numbers"),
    "negative values": ("negative", {"label_info": LIVER}, "label values must be 0"),
    "prompt not text": ("one value", {"label_info": LIVER, "prompt": 5},
                        "params.prompt must be the question as text"),
    "unknown window": ("one value", {"label_info": LIVER, "window": "brainz"},
                       "params.window: window 'brainz' is unknown"),
}


@pytest.mark.parametrize("case", list(BAD_CORRECTIONS))
def test_bad_correction_is_400_and_nothing_is_kept(citrusv_server, tmp_path, case):
    # each of these was stored before; some removed a structure (idx 0 made the background
    # "liver"), and a bad window made every later training run fail
    kind, params, words = BAD_CORRECTIONS[case]
    ct = nib.load(citrusv_server.studies / "chest_ct.nii.gz")
    path = tmp_path / "correction.nii.gz"
    nib.save(nib.Nifti1Image(_label(kind), ct.affine), path)
    final = citrusv_server.studies / "labels" / "final"
    before = sorted(p.name for p in final.rglob("*")) if final.exists() else []
    with open(path, "rb") as f:
        r = citrusv_server.put("/datastore/label?image=chest_ct&tag=final",
                               files={"label": (path.name, f, "application/gzip")},
                               data={"params": json.dumps(params)})
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"], r.json()["detail"]
    after = sorted(p.name for p in final.rglob("*")) if final.exists() else []
    assert after == before  # nothing stored, nothing kept as sent


def _put_image(server, image_id: str, name: str, content: bytes):
    return server.put(f"/datastore/image?image={image_id}", files={"file": (name, content)})


def test_uploads_that_would_misfile_or_are_no_image_are_refused(citrusv_server):
    studies = citrusv_server.studies
    outside = sorted(p.name for p in studies.parent.iterdir())
    ct = (studies / "chest_ct.nii.gz").read_bytes()
    # "../escaped" used to be written next to the studies folder (any path the caller chose)
    for image_id in ("../escaped", "a/b", "..", ".hidden"):
        r = _put_image(citrusv_server, image_id, "x.nii.gz", ct)
        assert r.status_code == 400 and "cannot name a file here" in r.json()["detail"], r.text
    assert sorted(p.name for p in studies.parent.iterdir()) == outside
    r = _put_image(citrusv_server, "empty", "empty.nii.gz", b"")
    assert r.status_code == 400 and r.json()["detail"].startswith("The uploaded file is empty")
    r = _put_image(citrusv_server, "notes", "notes.txt", b"not an image")
    assert r.status_code == 400 and "is not an image this server reads" in r.json()["detail"]
    objects = citrusv_server.get("/datastore/?output=all").json()["objects"]
    assert not {"empty", "notes", "a", "escaped", "..", ".hidden"} & set(objects)

    # another image under a taken id would inherit that image's corrections: 409
    labels_before = objects["chest_ct"].get("labels")
    xray = (studies / "chest_xray.dcm").read_bytes()
    r = _put_image(citrusv_server, "chest_ct", "other.dcm", xray)
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == ("image id 'chest_ct' is already in the datastore with another "
                                  "image (its corrections belong to that one); upload this image "
                                  "under another id.")
    # the same image again is a no-op that keeps its labels
    r = _put_image(citrusv_server, "chest_ct", "chest_ct.nii.gz", ct)
    assert r.status_code == 200 and r.json()["image"] == "chest_ct"
    after = citrusv_server.get("/datastore/?output=all").json()["objects"]["chest_ct"]
    assert after.get("labels") == labels_before

    r = citrusv_server.delete("/datastore/image?id=no_such_image")
    assert r.status_code == 404 and "nothing was removed" in r.json()["detail"]


def test_the_dicomweb_proxy_of_a_server_on_a_studies_folder_is_a_404_sentence(citrusv_server):
    # MONAI Label 0.8.5 asked requests for the URL "<folder>/series": 500 and a traceback
    for method, path in (("GET", "/proxy/dicom/qido/series"), ("POST", "/proxy/dicom/stow/")):
        r = citrusv_server.post(path) if method == "POST" else citrusv_server.get(path)
        assert (r.status_code, r.json()) == (404, {"detail": (
            "This server's studies are a folder, not a PACS: it has no DICOMweb to pass requests "
            "on to (start it with --studies the PACS's DICOMweb URL).")}), (method, path)
    assert citrusv_server.get("/info/").status_code == 200


def test_downloading_an_image_or_label_the_datastore_lacks_is_a_404_sentence(citrusv_server):
    """MONAI Label's GET /datastore/image and /datastore/label said "Image NOT Found" and
    "Label NOT Found"; the 404 now names the id and where the ids are listed, and the images
    it has still download."""
    r = citrusv_server.get("/datastore/image?image=no_such_image")
    assert r.status_code == 404
    assert r.json()["detail"] == ("image 'no_such_image' is not in the datastore; use an id "
                                  "from GET /datastore/?output=all or upload the file.")
    r = citrusv_server.get("/datastore/label?label=no_such_image&tag=final")
    assert r.status_code == 404
    assert r.json()["detail"] == ("there is no label 'no_such_image' tagged 'final' in the "
                                  "datastore; GET /datastore/?output=all lists each image's "
                                  "labels and their tags.")
    ok = citrusv_server.get("/datastore/image?image=chest_ct")
    assert ok.status_code == 200 and len(ok.content) > 1_000_000
