"""The server in bf16, the engine's default on a GPU, checked on the CPU: every mask step used
to fail there (SAM2's own code feeds fp32 tensors to its layers; see models/citrusv/README.md,
Limits). Asks, a closer look and a training run, on a private server with `--conf dtype bf16`."""

from __future__ import annotations

import json

import pytest

from tests.app.helpers import put_label, reference_label, run_training
from tests.server import private_citrusv_server

SPLEEN = 1  # labels.json


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory, tiny_model_dir, citrusv_sample_studies):
    with private_citrusv_server(tmp_path_factory.mktemp("bf16_server"), tiny_model_dir,
                                citrusv_sample_studies, dtype="bf16") as server:
        yield server


def _ask(server, task: str, **params) -> dict:
    r = server.post(f"/infer/citrusv_{task}?image=chest_ct&output=json",
                    data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text
    return r.json()


def test_asks_closer_look_and_training_work_in_bf16(bf16_server, tmp_path):
    assert bf16_server.get("/info/").json()["citrusv"]["dtype"] == "bf16"
    seg = _ask(bf16_server, "segment", prompt="Segment the liver.", slice=25)
    assert seg["masks"] and seg["masks"][0]["area_px"] > 0
    closer = _ask(bf16_server, "closer_look", prompt="Segment the liver.", slice=25,
                  roi=[200, 150, 400, 350])
    assert closer["masks"] and closer["masks"][0]["area_px"] > 0
    spleen = reference_label(tmp_path / "spleen.nii.gz", SPLEEN,
                             bf16_server.studies / "chest_ct.nii.gz")
    r = put_label(bf16_server, "chest_ct", spleen, {"label_info": [{"name": "spleen", "idx": 1}]})
    assert r.status_code == 200, r.text
    task = run_training(bf16_server, steps=2, batch_images=2, max_per_structure=4,
                        publish_if_worse=True)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    last = bf16_server.get("/info/").json()["train_stats"]["citrusv_finetune"]["last_run"]
    assert last["status"] == "done" and last["version"] == "1", last
    after = _ask(bf16_server, "segment", prompt="Segment the spleen.", slice=40)
    assert after["model"]["version"] == "1" and after["masks"]
