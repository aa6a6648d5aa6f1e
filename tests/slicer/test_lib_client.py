"""CitrusVLib.client over real HTTP: MONAI Label multipart, request shapes, errors, retry."""

from __future__ import annotations

import gzip
import io
import json
import socket
import time

import nibabel as nib
import numpy as np
import pytest
from CitrusVLib import CitrusVClient, CitrusVError, parse_infer_response, task_name
from CitrusVLib.multipart import parse_multipart
from requests_toolbelt import MultipartEncoder
from requests_toolbelt.multipart import decoder

from .conftest import oblique_lps_ijk_to_ras


def nifti_bytes(array_kji: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(np.ascontiguousarray(array_kji.transpose(2, 1, 0)), affine)
    return gzip.compress(img.to_bytes())


def monailabel_multipart(result: dict, label: bytes, name: str = "label.nii.gz"):
    """Exactly what monailabel/endpoints/infer.py send_response builds."""
    fields = {
        "params": (None, json.dumps(result), "application/json"),
        "image": (name, io.BytesIO(label), "application/gzip"),
    }
    enc = MultipartEncoder(fields=fields)
    return enc.to_string(), enc.content_type


def test_multipart_parsing_matches_monailabel_encoder(sample_result):
    # binary payload with CRLFs and dashes that must survive untouched
    payload = b"\r\n--\x00\xff" * 50 + bytes(range(256))
    body, ctype = monailabel_multipart(sample_result, payload)
    parts = parse_multipart(body, ctype)
    assert set(parts) == {"params", "image"}
    assert json.loads(parts["params"].text()) == sample_result
    assert parts["image"].data == payload
    assert parts["image"].filename == "label.nii.gz"
    # same answer as requests_toolbelt's own decoder
    ref = decoder.MultipartDecoder(body, ctype)
    assert [p.content for p in ref.parts] == [parts["params"].data, parts["image"].data]


def test_parse_infer_response_reads_label_geometry(sample_result):
    m = oblique_lps_ijk_to_ras()
    label = np.zeros((6, 40, 60), np.uint8)
    label[3, 10:20, 15:35] = 1
    body, ctype = monailabel_multipart(sample_result, nifti_bytes(label, m))
    response = parse_infer_response(body, ctype)
    assert response.result.masks[0].label == "liver"
    vol = response.label_volume()
    assert vol.array.shape == (6, 40, 60)
    assert np.array_equal(vol.array, label)
    assert np.allclose(vol.ijk_to_ras, m, atol=1e-4)
    json_only = parse_infer_response(json.dumps(sample_result).encode(), "application/json")
    assert json_only.label_bytes is None and json_only.label_volume() is None


def test_infer_sends_monailabel_request_and_parses_answer(http_server, sample_result):
    label = np.zeros((6, 40, 60), np.uint8)
    label[3, 10:20, 15:35] = 1
    body, ctype = monailabel_multipart(sample_result, nifti_bytes(label, np.eye(4)))
    http_server.routes[("POST", "/infer/citrusv_report")] = lambda h: (200, ctype, body)
    client = CitrusVClient(http_server.url, token="secret")
    answer = client.infer("report", "ct1", {"prompt": "describe", "slice": 3, "axis": "axial"})
    assert answer.result.task == "report"
    assert [b.id for b in answer.result.boxes] == ["b1", "b2"]
    assert answer.label_volume().array.sum() == 200
    seen = http_server.seen[-1]
    assert seen["path"] == "/infer/citrusv_report?image=ct1"
    assert seen["headers"]["Authorization"] == "Bearer secret"
    assert seen["headers"]["Content-Type"].startswith("multipart/form-data")
    sent = parse_multipart(seen["body"], seen["headers"]["Content-Type"])
    assert json.loads(sent["params"].text()) == {"prompt": "describe", "slice": 3, "axis": "axial"}


def test_infer_with_uploaded_file_and_json_output(http_server, sample_result, tmp_path):
    http_server.routes[("POST", "/infer/citrusv_detect")] = lambda h: (
        200,
        "application/json",
        json.dumps(sample_result),
    )
    image = tmp_path / "scan.nrrd"
    image.write_bytes(b"NRRD0004\nfake")
    answer = CitrusVClient(http_server.url).infer(
        "citrusv_detect", "", {"prompt": "where?"}, file=image, output="json"
    )
    assert answer.result.boxes[1].label == "spleen"
    seen = http_server.seen[-1]
    assert seen["path"] == "/infer/citrusv_detect?image=&output=json"
    sent = parse_multipart(seen["body"], seen["headers"]["Content-Type"])
    assert sent["file"].filename == "scan.nrrd" and sent["file"].data == b"NRRD0004\nfake"
    assert "Authorization" not in seen["headers"]


def test_datastore_training_and_active_learning_requests(http_server, tmp_path):
    r = http_server.routes
    r[("PUT", "/datastore/image")] = lambda h: (200, "application/json", '{"image": "ct7"}')
    r[("PUT", "/datastore/label")] = lambda h: (
        200,
        "application/json",
        '{"image": "ct7", "label": "ct7"}',
    )
    r[("HEAD", "/datastore/image")] = lambda h: (
        200 if "ct7" in h.path else 404,
        "application/json",
        "{}",
    )
    r[("POST", "/train/citrusv_finetune")] = lambda h: (200, "application/json", '{"id": "t1"}')
    r[("GET", "/train/")] = lambda h: (200, "application/json", '{"status": "RUNNING"}')
    r[("POST", "/activelearning/citrusv_uncertainty")] = lambda h: (
        200,
        "application/json",
        '{"id": "ct9", "slice": 12, "axis": "axial", "name": "ct9"}',
    )
    client = CitrusVClient(http_server.url)
    vol = tmp_path / "ct.nrrd"
    vol.write_bytes(b"volume")
    assert client.upload_image(vol, "ct7") == "ct7"
    assert client.image_exists("ct7") and not client.image_exists("nope")
    label = tmp_path / "liver.nrrd"
    label.write_bytes(b"label")
    assert client.put_label("ct7", label, [{"name": "liver", "idx": 1}], prompt="segment the liver")
    put = next(s for s in http_server.seen if s["path"].startswith("/datastore/label"))
    assert put["method"] == "PUT" and put["path"] == "/datastore/label?image=ct7&tag=final"
    sent = parse_multipart(put["body"], put["headers"]["Content-Type"])
    assert sent["label"].data == b"label" and sent["label"].filename == "liver.nrrd"
    assert json.loads(sent["params"].text()) == {
        "label_info": [{"name": "liver", "idx": 1}],
        "prompt": "segment the liver",
    }
    assert client.train() == {"id": "t1"}
    assert client.train_status() == {"status": "RUNNING"}
    sample = client.next_sample()
    assert (sample.image_id, sample.slice_index, sample.axis) == ("ct9", 12, "axial")
    r[("POST", "/activelearning/citrusv_uncertainty")] = lambda h: (200, "application/json", "{}")
    assert client.next_sample() is None
    r[("GET", "/train/")] = lambda h: (404, "application/json", '{"detail": "No training task"}')
    assert client.train_status() is None
    assert task_name("segment") == "citrusv_segment" == task_name("citrusv_segment")


@pytest.mark.parametrize(
    "status,body,task,expected",
    [
        (401, '{"detail": "Not authenticated"}', None, "not authorised"),
        (403, '{"detail": "Forbidden"}', None, "not authorised"),
        (
            404,
            '{"detail": "Not Found"}',
            "citrusv_segmnt",
            "does not know the task 'citrusv_segmnt'",
        ),
        (404, '{"detail": "Image \'ct9\' not found"}', "citrusv_segment", "Image 'ct9' not found."),
        (
            422,
            '{"detail": "slice 400 is out of range: the volume has 120 axial slices; use 0-119"}',
            "citrusv_segment",
            "slice 400 is out of range: the volume has 120 axial slices; use 0-119.",
        ),
        (
            422,
            '{"detail": [{"loc": ["body", "params"], "msg": "field required"}]}',
            "citrusv_segment",
            "params: field required.",
        ),
        (
            500,
            "Internal Server Error",
            "citrusv_segment",
            "failed while handling the request (HTTP 500)",
        ),
        (
            500,
            "MONAILabelException: There is no model 'citrusv_x' available",
            "citrusv_x",
            "does not know the task",
        ),
        (
            413,
            '{"detail": "The image has 90000000 voxels, over max_voxels 50000000: crop it."}',
            "citrusv_segment",
            "The image has 90000000 voxels, over max_voxels 50000000: crop it.",
        ),
        (413, '{"detail": ""}', "citrusv_segment", "The image is too large for the server"),
        (
            503,
            '{"detail": "model not installed yet"}',
            None,
            "The server is not ready yet (HTTP 503): model not installed yet.",
        ),
    ],
)
def test_http_errors_become_one_sentence(http_server, status, body, task, expected):
    ctype = "application/json" if body.startswith("{") else "text/plain"
    http_server.routes[("POST", f"/infer/{task or 'citrusv_segment'}")] = lambda h: (
        status,
        ctype,
        body,
    )
    client = CitrusVClient(http_server.url)
    with pytest.raises(CitrusVError) as err:
        client.infer(task or "segment", "ct1", {"prompt": "liver"})
    message = str(err.value)
    assert expected in message
    assert err.value.status == status
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message


def test_connection_refused_and_bad_url(closed_port_url):
    with pytest.raises(CitrusVError, match="Could not connect to the server at http://127.0.0.1"):
        CitrusVClient(closed_port_url, connect_timeout=2).info()
    with pytest.raises(CitrusVError, match="is not valid"):
        CitrusVClient("127.0.0.1:8000").info()
    with pytest.raises(CitrusVError, match="URL is empty"):
        CitrusVClient("  ")


def test_read_timeout_is_a_sentence(http_server):
    def slow(handler):
        time.sleep(1.0)
        return 200, "application/json", "{}"

    http_server.routes[("GET", "/info/")] = slow
    client = CitrusVClient(http_server.url, read_timeout=0.2)
    client.read_timeout = 0.2
    with pytest.raises(CitrusVError, match="took too long to answer"):
        client.request("GET", "/info/", read_timeout=0.2)


def test_connect_timeout_is_a_sentence():
    # a listener whose accept backlog is full: Linux drops further SYNs, so connect times out
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.1)
        client = CitrusVClient(f"http://127.0.0.1:{port}", connect_timeout=0.3, read_timeout=0.5)
        with pytest.raises(CitrusVError) as err:
            client.info()
        assert "did not answer in time" in str(err.value) or "took too long to answer" in str(
            err.value
        )
    finally:
        for c in fillers:
            c.close()
        server.close()


def test_one_retry_on_connection_reset(http_server):
    calls = {"n": 0}

    def flaky(handler):
        calls["n"] += 1
        if calls["n"] == 1:  # drop the connection without an answer (RST)
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            handler.close_connection = True
            handler.connection.close()
            return None
        return 200, "application/json", '{"name": "citrusv"}'

    http_server.routes[("GET", "/info/")] = flaky
    assert CitrusVClient(http_server.url).info() == {"name": "citrusv"}
    assert calls["n"] == 2


def test_no_retry_after_two_resets(http_server):
    def always_reset(handler):
        handler.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        handler.close_connection = True
        handler.connection.close()
        return None

    http_server.routes[("GET", "/info/")] = always_reset
    with pytest.raises(CitrusVError, match="Could not connect"):
        CitrusVClient(http_server.url).info()
    assert len([s for s in http_server.seen if s["path"] == "/info/"]) == 2


def test_infer_params_follow_the_api():
    from CitrusVLib.client import infer_params

    assert infer_params(" liver ", "axial", "slice", 57) == {
        "axis": "axial",
        "prompt": "liver",
        "slice": 57,
    }
    assert infer_params("liver", "coronal", "range", slice_range=(90, 80), window="lung") == {
        "axis": "coronal",
        "prompt": "liver",
        "slice": [80, 90],
        "window": "lung",
    }
    assert infer_params("liver", scope="volume", window=(40, 400))["slice"] == "all"
    closer = infer_params(None, "axial", "slice", 3, roi=(1, 2, 30, 40), label="liver")
    assert closer == {"axis": "axial", "slice": 3, "roi": [1.0, 2.0, 30.0, 40.0], "label": "liver"}
    parts = infer_params(None, "axial", "slice", 3, roi=[[1, 2, 30, 40], (50, 60, 70, 80)],
                         label="aorta")
    assert parts["roi"] == [[1.0, 2.0, 30.0, 40.0], [50.0, 60.0, 70.0, 80.0]]
    # 2D images: neither slice nor axis (docs/api.md, app details)
    assert infer_params("where is the heart?", "axial", "slice", 0, is_2d=True) == {
        "prompt": "where is the heart?"
    }
    with pytest.raises(CitrusVError, match="question is empty"):
        infer_params("  ", "axial", "slice", 3)
    with pytest.raises(CitrusVError, match="No slice is selected"):
        infer_params("liver", "axial", "slice", None)
