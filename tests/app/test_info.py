"""The server starts and answers /info/ over real HTTP, with and without the model installed."""

from __future__ import annotations

TASKS = {"citrusv_segment", "citrusv_detect", "citrusv_report", "citrusv_closer_look"}


def test_info_without_model_says_not_installed(citrusv_server_without_model):
    r = citrusv_server_without_model.get("/info/")
    assert r.status_code == 200
    info = r.json()
    assert TASKS <= set(info["models"])
    for task in TASKS:
        assert info["models"][task]["status"] == "model not installed yet"
    assert "citrusv_finetune" in info["trainers"]
    assert "citrusv_uncertainty" in info["strategies"]
    assert info["citrusv"]["status"] == "model not installed yet"
    assert info["datastore"]["total"] == 2  # chest_ct.nii.gz and chest_xray.dcm


def test_infer_without_model_is_503_and_server_keeps_serving(citrusv_server_without_model):
    s = citrusv_server_without_model
    r = s.post("/infer/citrusv_segment?image=chest_ct", data={"params": '{"prompt": "Segment the liver.", "slice": 60}'})
    assert r.status_code == 503
    assert "model not installed yet" in r.json()["detail"]
    assert s.get("/info/").status_code == 200


def test_strategy_without_model_falls_back_to_random(citrusv_server_without_model):
    r = citrusv_server_without_model.post("/activelearning/citrusv_uncertainty", json={})
    assert r.status_code == 200
    assert r.json()["id"] in {"chest_ct", "chest_xray"}
    assert "random" in r.json()["reason"]
