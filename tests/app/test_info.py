"""The server starts and answers /info/ over real HTTP, with and without the model installed."""

from __future__ import annotations

import json

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
    assert info["citrusv"]["box_source"] is None  # no config.json to say
    assert info["citrusv"]["structures"] is None
    assert info["citrusv"]["languages"] is None
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


def test_info_offers_the_models_example_questions_and_intended_use(tmp_path_factory, tiny_model_dir,
                                                  citrusv_sample_studies):
    """Each task's `examples` in /info/ are the questions the model dir names
    (example_prompts.json; models/nano ships one), read on each call; none when it names none
    or when the file is malformed (logged), and /info/ still answers."""
    from tests.server import private_citrusv_server

    with private_citrusv_server(tmp_path_factory.mktemp("examples_server"), tiny_model_dir,
                                citrusv_sample_studies) as server:
        def examples() -> dict:
            r = server.get("/info/")
            assert r.status_code == 200
            return {task: r.json()["models"][task]["examples"] for task in TASKS}

        assert examples() == {task: [] for task in TASKS}
        # the tiny checkpoint's config.json has box_source "text" (the engine's default)
        assert server.get("/info/").json()["citrusv"]["box_source"] == "text"
        # and lists no structures it was taught (the released layout: not limited)
        assert server.get("/info/").json()["citrusv"]["structures"] == []
        assert server.get("/info/").json()["citrusv"]["languages"] == []
        assert server.get("/info/").json()["citrusv"]["ask_again"] is True  # --conf default
        file = server.model_dir / "example_prompts.json"
        file.write_text(json.dumps({"segment": ["Segment the liver.", " Segment the spleen. "],
                                    "report": ["Write a report for this CT slice."]}))
        assert examples() == {"citrusv_segment": ["Segment the liver.", "Segment the spleen."],
                              "citrusv_detect": [], "citrusv_closer_look": [],
                              "citrusv_report": ["Write a report for this CT slice."]}
        file.write_text(json.dumps({"segment": "Segment the liver."}))  # not a list
        assert examples() == {task: [] for task in TASKS}
        assert "must map each task to a list of questions" in server.log()

        # what the model may be used for (intended_use.txt): in /info/ and with each answer
        def intended_use() -> tuple:
            info = server.get("/info/").json()["citrusv"]
            r = server.post("/infer/citrusv_detect?image=chest_ct&output=json",
                            data={"params": json.dumps({"prompt": "Find the liver.", "slice": 60})})
            assert r.status_code == 200, r.text
            return info["intended_use"], r.json()["model"].get("intended_use")

        assert intended_use() == (None, None)
        use = server.model_dir / "intended_use.txt"
        use.write_text("Research use only;\n not for diagnosis.\n")
        assert intended_use() == ("Research use only; not for diagnosis.",) * 2
        use.write_text("x" * 301)  # not one sentence: logged, nothing shown, still answers
        assert intended_use() == (None, None)
        assert "must hold one sentence of 1 to 300 characters" in server.log()
