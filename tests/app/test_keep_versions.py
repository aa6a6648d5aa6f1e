"""`--conf keep_versions N`: a published training run prunes the weights of the versions
beyond the N newest that are not withdrawn, keeping their records (disk on the workstation:
about 1 GB per Citrus-V-8B version). A private server with keep_versions 1."""

from __future__ import annotations

import json

import pytest

from tests.app.helpers import put_label, reference_label, run_training
from tests.server import private_citrusv_server

SPLEEN = 1  # labels.json


@pytest.fixture(scope="module")
def keep_one_server(tmp_path_factory, tiny_model_dir, citrusv_sample_studies):
    with private_citrusv_server(tmp_path_factory.mktemp("keep_versions_server"), tiny_model_dir,
                                citrusv_sample_studies, keep_versions="1") as server:
        yield server


def _last_run(server) -> dict:
    return server.get("/info/").json()["train_stats"]["citrusv_finetune"]["last_run"]


def test_published_run_prunes_the_older_versions(keep_one_server, tmp_path):
    server = keep_one_server
    spleen = reference_label(tmp_path / "spleen.nii.gz", SPLEEN, server.studies / "chest_ct.nii.gz")
    r = put_label(server, "chest_ct", spleen, {"label_info": [{"name": "spleen", "idx": 1}]})
    assert r.status_code == 200, r.text
    versions = server.model_dir / "versions"
    for number in ("1", "2"):
        task = run_training(server, steps=2, batch_images=2, max_per_structure=4,
                            publish_if_worse=True)
        assert task["status"] == "DONE", "\n".join(task.get("details", []))
        assert _last_run(server)["version"] == number
    last = _last_run(server)
    assert [g["version"] for g in last["pruned"]] == ["1"] and last["pruned"][0]["freed_bytes"] > 0
    assert sorted(p.name for p in (versions / "1").iterdir()) == ["pruned.json", "train_stats.json"]
    assert json.loads((versions / "1" / "pruned.json").read_text())["by"] == "--conf keep_versions 1"
    assert (versions / "2" / "config.json").is_file()
    ask = server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                      data={"params": json.dumps({"prompt": "Segment the spleen.", "slice": 40})})
    assert ask.status_code == 200 and ask.json()["model"]["version"] == "2"
    info = server.get("/info/").json()["citrusv"]
    assert [(v["version"], v["pruned"] is not None) for v in info["versions"]] == [
        ("1", True), ("2", False)]

