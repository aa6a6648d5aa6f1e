"""Corrections -> labels/final -> fine-tuning -> a new served version; active learning.

These tests change the server's state (labels, model versions), so they run on a private
server of their own, in file order: save a correction, train on it, then ask the strategy
(which then only sees the still-unlabelled X-ray).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.app.helpers import (put_label, reference_label, run_training, wait_for_training,
                               wait_until_listed_running)
from tests.server import private_citrusv_server

SPLEEN = 1  # labels.json: {"1": "spleen", ...}


@pytest.fixture(scope="module")
def citrusv_server(tmp_path_factory, tiny_model_dir, citrusv_sample_studies):
    """A private server (shadows the shared session one for this module)."""
    with private_citrusv_server(tmp_path_factory.mktemp("corrections_server"), tiny_model_dir,
                                citrusv_sample_studies) as server:
        yield server


@pytest.fixture(scope="module")
def spleen_label(citrusv_server, tmp_path_factory) -> Path:
    """The reference spleen as a correction a radiologist would send (CT's own geometry)."""
    return reference_label(tmp_path_factory.mktemp("corrections") / "chest_ct_spleen.nii.gz",
                           SPLEEN, citrusv_server.studies / "chest_ct.nii.gz")


def test_label_with_wrong_shape_is_refused_and_nothing_is_written(citrusv_server, tmp_path):
    path = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), dtype=np.uint8), np.eye(4)), path)
    r = put_label(citrusv_server, "chest_ct", path, {"label_info": [{"name": "spleen", "idx": 1}]})
    assert r.status_code == 400, r.text
    assert "geometry" in r.json()["detail"]
    assert not (citrusv_server.studies / "labels" / "final" / "chest_ct.nii.gz").exists()


def test_label_on_another_voxel_grid_is_refused(citrusv_server, spleen_label, tmp_path):
    # the right shape, but the slices in the other order (a valid scan geometry of its own):
    # trained on as it is, every slice would pair with the wrong CT slice
    label = nib.load(spleen_label)
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, label.shape[2] - 1
    path = tmp_path / "flipped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:, :, ::-1], label.affine @ flip), path)
    r = put_label(citrusv_server, "chest_ct", path, {"label_info": [{"name": "spleen", "idx": 1}]})
    assert r.status_code == 400, r.text
    assert "voxel grid of image 'chest_ct'" in r.json()["detail"]
    assert "-1.0" in r.json()["detail"]  # the slice axis points the other way
    assert not (citrusv_server.studies / "labels" / "final" / "chest_ct.nii.gz").exists()


def test_submitted_correction_lands_in_labels_final(citrusv_server, spleen_label):
    params = {"label_info": [{"name": "spleen", "idx": 1}], "prompt": "Segment the spleen."}
    r = put_label(citrusv_server, "chest_ct", spleen_label, params)
    assert r.status_code == 200, r.text
    saved = citrusv_server.studies / "labels" / "final" / "chest_ct.nii.gz"
    assert saved.exists()
    stored, sent = nib.load(saved), nib.load(spleen_label)
    np.testing.assert_allclose(stored.affine, sent.affine, atol=1e-4)
    assert np.array_equal(np.asarray(stored.dataobj), np.asarray(sent.dataobj))
    leftovers = [p.name for p in saved.parent.iterdir() if p.name.startswith(".")]
    # no temporary file; the kept submissions (below) and the label's info kept beside it
    assert sorted(leftovers) == [".history", ".info"]
    assert sorted(p.name for p in (saved.parent / ".info").iterdir()) == ["chest_ct.json"]
    # kept as sent, byte for byte, with what it said; the two refused labels above are not
    kept = _kept(citrusv_server)
    assert len(kept) == 1 and kept[0]["label_info"] == [{"name": "spleen", "idx": 1}]
    assert kept[0]["prompt"] == "Segment the spleen." and kept[0]["image"] == "chest_ct"
    assert kept[0]["path"].read_bytes() == spleen_label.read_bytes()
    assert sorted(p.name for p in kept[0]["path"].parent.iterdir()) == sorted([
        kept[0]["path"].name, kept[0]["path"].name.split(".")[0] + ".json"])
    ds = citrusv_server.get("/datastore/?output=all").json()
    info = ds["objects"]["chest_ct"]["labels"]["final"]["info"]
    (entry,) = info["label_info"]
    assert {k: entry[k] for k in ("name", "idx", "prompt")} == {
        "name": "spleen", "idx": 1, "prompt": "Segment the spleen."}
    assert "prompt" not in info  # it belongs to the spleen's entry


def _assert_serves_version(server, version: str) -> None:
    """The server still answers a segment request, with the given model version."""
    ok = server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                     data={"params": json.dumps({"prompt": "Segment the spleen.", "slice": 40})})
    assert ok.status_code == 200 and ok.json()["model"]["version"] == version




def test_training_publishes_a_new_version_that_infer_serves(citrusv_server, spleen_label):
    before = citrusv_server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                                 data={"params": json.dumps({"prompt": "Segment the spleen.",
                                                             "slice": 40})}).json()
    assert before["model"]["version"] == "base"
    task = run_training(citrusv_server, steps=6, batch_images=2, max_per_structure=8,
                        publish_if_worse=True)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))

    version = citrusv_server.model_dir / "versions" / "1"
    assert (version / "config.json").exists()
    assert not list((citrusv_server.model_dir / "versions").glob(".tmp-*"))
    # only what the fine-tune trained is written; the frozen MLLM is read from model_dir
    weight_map = json.loads((version / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k.split(".")[0] for k in weight_map} == {"grounding_encoder", "seg_projector"}
    assert json.loads((version / "citrusv_base.json").read_text())["path"] == "../.."
    info = citrusv_server.get("/info/").json()
    versions = info["citrusv"]["versions"]
    assert [v["version"] for v in versions] == ["1"]
    assert isinstance(versions[0]["train_loss"], float)
    assert "val_dice" in versions[0] and "val_dice_before" in versions[0]
    last = info["train_stats"]["citrusv_finetune"]["last_run"]
    assert last["status"] == "done" and last["version"] == "1"
    # the run computed its [SEG] states, then trained without its MLLM copy (CPU server here)
    assert last["states"]["device"] == "cpu" and last["states"]["why"] == "training runs on cpu"
    assert 0 < last["states"]["seconds"] <= last["train_seconds"]

    after = citrusv_server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                                data={"params": json.dumps({"prompt": "Segment the spleen.",
                                                            "slice": 40})})
    assert after.status_code == 200, after.text
    assert after.json()["model"]["version"] == "1"


def test_failed_training_leaves_the_serving_model(citrusv_server):
    # the disk fills up while the run writes its version: no new version, still serving; the
    # run_sync request is a 500 that says why (not a 200 with the failed run's record)
    citrusv_server.limit_writes(100_000)  # the run (a child of the server) inherits it
    try:
        r = citrusv_server.post("/train/citrusv_finetune", params={"run_sync": "true"}, json={
            "steps": 2, "batch_images": 2, "max_per_structure": 4, "publish_if_worse": True},
            timeout=900)
    finally:
        citrusv_server.limit_writes(resource.RLIM_INFINITY)
    assert r.status_code == 500, r.text
    task = citrusv_server.get("/train/").json()
    assert task["status"] == "ERROR"
    info = citrusv_server.get("/info/").json()
    assert [v["version"] for v in info["citrusv"]["versions"]] == ["1"]
    last = info["train_stats"]["citrusv_finetune"]["last_run"]
    assert last["status"] == "failed" and "File too large" in last["error"], last
    assert r.json()["detail"] == (
        f"The training run {task['id']} failed: {last['error'].rstrip('.')}. No version was "
        "published, and the server serves what it served before. GET /info/ has the run's "
        "record (train_stats).")
    assert not list((citrusv_server.model_dir / "versions").glob(".tmp-*"))
    _assert_serves_version(citrusv_server, "1")


BAD_OPTIONS = {
    "learning_rate": (-1.0, "learning_rate must be a number above 0 and at most 1, not -1.0."),
    "steps": ("abc", "steps must be a whole number, not 'abc'."),
    "batch_images": (0, "batch_images must be a whole number from 1 to 64, not 0."),
    "val_every": (1, "val_every 1 would hold out every corrected slice"),
    "publish_if_worse": ("maybe", "publish_if_worse must be true or false, not 'maybe'."),
    "step": (5, "Unknown training option 'step'; the options are steps, learning_rate,"),
}


@pytest.mark.parametrize("option", list(BAD_OPTIONS))
def test_bad_training_option_is_400_and_starts_no_run(citrusv_server, option):
    value, words = BAD_OPTIONS[option]
    before = citrusv_server.get("/info/").json()["train_stats"]["citrusv_finetune"]["last_run"]
    r = citrusv_server.post("/train/citrusv_finetune", json={"steps": 2, option: value})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(words), r.json()["detail"]
    after = citrusv_server.get("/info/").json()["train_stats"]["citrusv_finetune"]["last_run"]
    assert after == before  # no run was started


def test_killed_training_leaves_the_serving_model(citrusv_server):
    # a run_sync run: the waiting request is a 409 that says it was stopped
    last_run = citrusv_server.model_dir / "versions" / "last_run.json"
    answered = {}
    sending = threading.Thread(target=lambda: answered.update(r=citrusv_server.post(
        "/train/citrusv_finetune", params={"run_sync": "true"},
        json={"steps": 100000, "batch_images": 1}, timeout=900)))
    sending.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the run is really training
            if last_run.exists() and json.loads(last_run.read_text()).get("status") == "running":
                break
            time.sleep(0.5)
        time.sleep(3)
        stopped = citrusv_server.delete("/train/")
    finally:
        sending.join(timeout=900)
    assert stopped.status_code == 200, stopped.text
    task = wait_for_training(citrusv_server)
    assert task["status"] == "STOPPED"
    r = answered["r"]
    assert (r.status_code, r.json()["detail"]) == (409, (
        f"The training run {task['id']} was stopped (DELETE /train/) before it ended; no "
        "version was published, and the server serves what it served before.")), r.text
    deadline = time.monotonic() + 15  # the kill lands within moments of STOPPED
    while True:
        info = citrusv_server.get("/info/").json()
        status = info["train_stats"]["citrusv_finetune"]["last_run"]["status"]
        if status == "killed" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == "killed"
    assert [v["version"] for v in info["citrusv"]["versions"]] == ["1"]
    _assert_serves_version(citrusv_server, "1")


def test_unloadable_version_is_skipped_and_serving_goes_on(citrusv_server):
    broken = citrusv_server.model_dir / "versions" / "2"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    try:
        r = citrusv_server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                                data={"params": json.dumps({"prompt": "Segment the spleen.",
                                                            "slice": 40})})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == "1"
        info = citrusv_server.get("/info/").json()["citrusv"]
        assert info["skipped_versions"] == ["2"] and info["serving_version"] == "1"
    finally:
        shutil.rmtree(broken)


VERSIONS_CLI = Path(__file__).resolve().parents[2] / "monailabel_app" / "versions.py"


def _versions(server, *args: str) -> subprocess.CompletedProcess:
    """The admin's command line, on the running server's model_dir."""
    return subprocess.run([sys.executable, str(VERSIONS_CLI), "--model-dir", str(server.model_dir),
                           *args], capture_output=True, text=True, timeout=120)


def test_admin_withdraws_a_version_and_the_server_goes_back(citrusv_server):
    r = _versions(citrusv_server, "withdraw", "1", "--reason", "misses the spleen tip")
    assert r.returncode == 0, r.stderr
    assert "Version 1 withdrawn; the server now serves base." in r.stdout
    _assert_serves_version(citrusv_server, "base")  # next request, no restart
    info = citrusv_server.get("/info/").json()["citrusv"]
    assert info["serving_version"] == "base"
    assert info["versions"][0]["withdrawn"]["reason"] == "misses the spleen tip"
    assert (citrusv_server.model_dir / "versions" / "1" / "config.json").exists()  # kept

    # the next run starts from what is served; its version is 2, the number of the broken
    # folder the previous test made this process skip: a new folder 2 must be served
    task = run_training(citrusv_server, steps=4, batch_images=2, max_per_structure=8,
                        publish_if_worse=True)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    info = citrusv_server.get("/info/").json()
    last = info["train_stats"]["citrusv_finetune"]["last_run"]
    assert last["base_version"] == "base" and last["version"] == "2"
    _assert_serves_version(citrusv_server, "2")
    assert info["citrusv"]["skipped_versions"] == []
    assert [(v["version"], v["base_version"]) for v in info["citrusv"]["versions"]] == [
        ("1", "base"), ("2", "base")]

    r = _versions(citrusv_server, "restore", "1")
    assert r.returncode == 0 and "the server now serves 2." in r.stdout, r.stderr
    r = _versions(citrusv_server, "withdraw", "2")
    assert r.returncode == 0 and "the server now serves 1." in r.stdout, r.stderr
    _assert_serves_version(citrusv_server, "1")
    listing = _versions(citrusv_server).stdout.splitlines()
    assert listing[0].endswith("serving 1")
    assert listing[3].startswith("1 ") and listing[3].endswith("serving")
    assert listing[4].startswith("2 ") and "withdrawn" in listing[4] and "no reason given" in listing[4]


def test_versions_command_refuses_what_is_not_there(citrusv_server):
    r = _versions(citrusv_server, "withdraw", "7")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: There is no fine-tuned version '7' in "
                                f"{citrusv_server.model_dir.resolve() / 'versions'} "
                                "(versions there: 1, 2).")
    r = _versions(citrusv_server, "withdraw", "base")
    assert r.returncode == 2 and "cannot be withdrawn" in r.stderr and "Traceback" not in r.stderr
    _assert_serves_version(citrusv_server, "1")


def test_run_from_a_version_withdrawn_meanwhile_is_not_published(citrusv_server):
    def runs_from_1() -> int:  # the trainer's log line once it has loaded version 1
        return citrusv_server.log_path.read_text(errors="replace").count(
            "Fine-tuning from version 1 ")

    earlier = runs_from_1()
    r = citrusv_server.post("/train/citrusv_finetune", json={  # ~12 s of training steps
        "steps": 200, "batch_images": 1, "max_per_structure": 8, "publish_if_worse": True})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while runs_from_1() == earlier:
        assert time.monotonic() < deadline, citrusv_server.log()
        time.sleep(0.2)
    assert _versions(citrusv_server, "withdraw", "1").returncode == 0
    assert wait_for_training(citrusv_server)["status"] == "DONE"
    info = citrusv_server.get("/info/").json()
    last = info["train_stats"]["citrusv_finetune"]["last_run"]
    assert last["status"] == "rejected" and last["base_version"] == "1", last
    assert last["reason"].startswith("version 1, which this run started from, was withdrawn")
    assert [v["version"] for v in info["citrusv"]["versions"]] == ["1", "2"]
    _assert_serves_version(citrusv_server, "base")


def test_a_run_sync_training_runs_in_its_own_process_while_the_server_answers(citrusv_server):
    """MONAI Label 0.8.5 ran a `run_sync` training in the server's own process: a second copy
    of the model there, a run outside the task table (another could start beside it, and
    `DELETE /train/` could not stop it), and every other request waited for the whole run.
    Here (1 and 2 withdrawn, base served) it publishes 3 from base."""
    commands = citrusv_server.log(tail=10**8).count("-m train -r")  # MONAI Label's run command
    options = {"steps": 2, "batch_images": 2, "max_per_structure": 4, "publish_if_worse": True}
    answered = {}
    sending = threading.Thread(target=lambda: answered.update(r=citrusv_server.post(
        "/train/citrusv_finetune", params={"run_sync": "true"}, json=options, timeout=900)))
    sending.start()
    try:
        running = wait_until_listed_running(citrusv_server, "/train/", sending)
        info = citrusv_server.get("/info/")
        second = citrusv_server.post("/train/citrusv_finetune", json=options)
        still_training = sending.is_alive()
    finally:
        sending.join(timeout=900)
    assert running.status_code == 200 and running.json()["status"] == "RUNNING", running.text
    assert info.status_code == 200 and still_training  # answered during the run
    assert second.status_code == 429, second.text  # one run at a time, run_sync or not
    r = answered["r"]
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["status"], out["version"], out["base_version"]) == ("done", "3", "base"), out
    assert out["task"] == {"id": running.json()["id"], "status": "DONE"}
    assert citrusv_server.log(tail=10**8).count("-m train -r") == commands + 1
    last = citrusv_server.get("/info/").json()["train_stats"]["citrusv_finetune"]["last_run"]
    assert last["version"] == "3" and last["pid"] == out["pid"]
    _assert_serves_version(citrusv_server, "3")


def test_admin_prunes_old_versions_and_keeps_their_records(citrusv_server):
    # here: 1 and 2 withdrawn, 3 (from base) served; one more run publishes 4 (from 3)
    task = run_training(citrusv_server, steps=2, batch_images=2, max_per_structure=4,
                        publish_if_worse=True)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    last = citrusv_server.get("/info/").json()["train_stats"]["citrusv_finetune"]["last_run"]
    assert (last["version"], last["base_version"]) == ("4", "3"), last
    assert "pruned" not in last  # no keep_versions on this server: nothing is pruned
    versions = citrusv_server.model_dir / "versions"
    size_3 = sum(f.stat().st_size for f in (versions / "3").iterdir())

    r = _versions(citrusv_server, "prune", "--keep", "1")
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[0]
    assert head.startswith("Pruned versions 1, 2, 3 (") and head.endswith(" MB freed)."), head
    assert sorted(p.name for p in (versions / "3").iterdir()) == ["pruned.json", "train_stats.json"]
    assert sorted(p.name for p in (versions / "1").iterdir()) == [
        "pruned.json", "train_stats.json", "withdrawn.json"]
    assert (versions / "4" / "config.json").is_file() and not (versions / "4" / "pruned.json").exists()
    mark = json.loads((versions / "3" / "pruned.json").read_text())
    assert mark["by"] == "versions.py prune --keep 1" and 0 < mark["freed_bytes"] < size_3
    _assert_serves_version(citrusv_server, "4")
    info = citrusv_server.get("/info/").json()["citrusv"]
    assert [(v["version"], v["pruned"] is not None, v["created"] is not None)
            for v in info["versions"]] == [("1", True, True), ("2", True, True), ("3", True, True),
                                           ("4", False, True)]  # records kept
    listing = _versions(citrusv_server).stdout.splitlines()
    assert "pruned" in listing[5] and listing[5].startswith("3 ")
    assert listing[6].startswith("4 ") and listing[6].endswith("serving")

    r = _versions(citrusv_server, "restore", "3")
    assert r.returncode == 2 and r.stderr.startswith(
        "error: Version 3 cannot be served again: its weights were pruned"), r.stderr
    r = _versions(citrusv_server, "prune", "--keep", "0")
    assert r.returncode == 2 and "keep must be at least 1" in r.stderr and "Traceback" not in r.stderr
    assert _versions(citrusv_server, "prune", "--keep", "1").stdout.startswith("Nothing to prune.")
    # withdrawing the one left goes back to base, never to a pruned version
    assert "now serves base." in _versions(citrusv_server, "withdraw", "4").stdout
    _assert_serves_version(citrusv_server, "base")
    assert "now serves 4." in _versions(citrusv_server, "restore", "4").stdout
    _assert_serves_version(citrusv_server, "4")


def test_strategy_returns_least_sure_unlabelled_image(citrusv_server):
    r = citrusv_server.post("/activelearning/citrusv_uncertainty", json={})
    assert r.status_code == 200, r.text
    pick = r.json()
    assert pick["id"] == "chest_xray"  # chest_ct has a final label now
    assert "slice" in pick and pick["slice"] is None  # 2D image
    assert pick["score"] is not None and 0.0 <= pick["uncertainty"] <= 1.0


def test_unknown_strategy_is_404(citrusv_server):
    r = citrusv_server.post("/activelearning/citrusv_certainty", json={})
    assert r.status_code == 404
    assert "unknown" in r.json()["detail"]


LIVER = 5  # labels.json


def _stored_final(server) -> tuple[np.ndarray, dict[str, int]]:
    """The stored final label of chest_ct (NIfTI data order) and its name -> value map."""
    data = np.asarray(nib.load(server.studies / "labels" / "final" / "chest_ct.nii.gz").dataobj)
    info = server.get("/datastore/?output=all").json()["objects"]["chest_ct"]["labels"]["final"]
    return data, {e["name"]: e["idx"] for e in info["info"]["label_info"]}


def test_correcting_another_structure_keeps_the_earlier_corrections(citrusv_server, tmp_path):
    ct = citrusv_server.studies / "chest_ct.nii.gz"
    spleen = np.asarray(nib.load(reference_label(tmp_path / "s.nii.gz", SPLEEN, ct)).dataobj) > 0
    liver_file = reference_label(tmp_path / "liver.nii.gz", LIVER, ct)
    liver = np.asarray(nib.load(liver_file).dataobj) > 0
    before, names = _stored_final(citrusv_server)
    assert list(names) == ["spleen"] and np.array_equal(before == names["spleen"], spleen)

    # a second radiologist sends the liver (one segment, value 1, as the Slicer module does)
    r = put_label(citrusv_server, "chest_ct", liver_file, {
        "label_info": [{"name": "liver", "idx": 1}], "prompt": "Please segment the liver."})
    assert r.status_code == 200, r.text
    data, names = _stored_final(citrusv_server)
    assert names == {"spleen": 1, "liver": 2}
    assert np.array_equal(data == 1, spleen) and np.array_equal(data == 2, liver)

    # the spleen corrected again on its upper half only: replaced; the liver stays as it was
    half = spleen.copy()
    half[:, :, : int(np.flatnonzero(spleen.any(axis=(0, 1))).mean())] = False
    path = tmp_path / "spleen_half.nii.gz"
    nib.save(nib.Nifti1Image(half.astype(np.uint8), nib.load(ct).affine), path)
    r = put_label(citrusv_server, "chest_ct", path, {"label_info": [{"name": "Spleen", "idx": 1}]})
    assert r.status_code == 200, r.text
    data, names = _stored_final(citrusv_server)
    assert names == {"liver": 1, "Spleen": 2}
    assert np.array_equal(data == 1, liver) and np.array_equal(data == 2, half)
    info = citrusv_server.get("/datastore/?output=all").json()["objects"]["chest_ct"]
    entries = {e["name"]: e for e in info["labels"]["final"]["info"]["label_info"]}
    assert entries["liver"]["prompt"] == "Please segment the liver."  # each keeps its own
    assert "prompt" not in entries["Spleen"]

    # a named structure with no voxels removes it; its question is not the spleen's
    path = tmp_path / "no_liver.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(half.shape, np.uint8), nib.load(ct).affine), path)
    r = put_label(citrusv_server, "chest_ct", path, {
        "label_info": [{"name": "liver", "idx": 1}], "prompt": "Segment the liver."})
    assert r.status_code == 200, r.text
    data, names = _stored_final(citrusv_server)
    assert names == {"Spleen": 1} and np.array_equal(data == 1, half) and data.max() == 1
    info = citrusv_server.get("/datastore/?output=all").json()["objects"]["chest_ct"]
    (entry,) = info["labels"]["final"]["info"]["label_info"]
    assert "prompt" not in entry and "prompt" not in info["labels"]["final"]["info"]


def _kept(server, image: str = "chest_ct") -> list[dict]:
    """The corrections of `image` kept as sent (their records + `path`), oldest first."""
    folder = server.studies / "labels" / "final" / ".history" / image
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [{**r, "path": folder / r["file"]} for r in records]


def _history(server, *args: str) -> subprocess.CompletedProcess:
    """The admin's command line, on the running server's studies folder."""
    return subprocess.run([sys.executable, str(VERSIONS_CLI.parent / "history.py"), "--datastore",
                           str(server.studies), *args], capture_output=True, text=True, timeout=120)


def test_a_removed_structure_is_put_back_from_the_kept_corrections(citrusv_server, tmp_path):
    # after the test above, the stored label holds only the re-drawn Spleen; the liver
    # correction it removed is kept as it was sent, and the history command sends it again
    kept = _kept(citrusv_server)
    assert [[e["name"] for e in k["label_info"]] for k in kept][-3:] == [
        ["liver"], ["Spleen"], ["liver"]]
    liver_entry = kept[-3]
    assert liver_entry["prompt"] == "Please segment the liver."
    listing = _history(citrusv_server, "list", "chest_ct")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[1]: line for line in listing.stdout.splitlines()[1:]}
    stamp = liver_entry["file"].split(".")[0]
    liver_voxels = int((np.asarray(nib.load(liver_entry["path"]).dataobj) > 0).sum())
    assert f"liver {liver_voxels} voxels" in rows[stamp]
    assert rows[kept[-1]["file"].split(".")[0]].endswith("liver 0 voxels (removes it)")

    before, names = _stored_final(citrusv_server)
    spleen = before == names["Spleen"]
    r = _history(citrusv_server, "restore", "chest_ct", stamp, "--server", citrusv_server.url)
    assert r.returncode == 0, r.stderr
    assert "structures are back: liver" in r.stdout
    data, names = _stored_final(citrusv_server)
    assert names == {"Spleen": 1, "liver": 2}
    assert np.array_equal(data == 1, spleen)
    assert np.array_equal(data == 2, np.asarray(nib.load(liver_entry["path"]).dataobj) > 0)
    info = citrusv_server.get("/datastore/?output=all").json()["objects"]["chest_ct"]
    entry = info["labels"]["final"]["info"]["label_info"][1]
    assert entry["prompt"] == "Please segment the liver."
    assert len(_kept(citrusv_server)) == len(kept) + 1  # the restore is a correction too

    r = _history(citrusv_server, "restore", "chest_ct", "20000101T000000-000000",
                 "--server", citrusv_server.url)
    assert r.returncode == 2 and r.stderr.startswith("error: image 'chest_ct' has no kept"), r.stderr
    r = _history(citrusv_server, "restore", "chest_ct", stamp, "--server", "http://127.0.0.1:9")
    assert r.returncode == 2 and "could not send the correction" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_correction_replaces_a_stored_label_it_cannot_merge_into(citrusv_server, tmp_path):
    # a file an admin put into labels/final by hand, not on the X-ray's grid: a correction
    # must still be stored (replacing it), not fail on the merge
    final = citrusv_server.studies / "labels" / "final"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 1), np.uint8), np.eye(4)), final / "chest_xray.nii.gz")
    deadline = time.monotonic() + 30
    while True:  # MONAI Label's watcher lists the hand-placed label
        objects = citrusv_server.get("/datastore/?output=all").json()["objects"]
        if "final" in objects["chest_xray"].get("labels", {}):
            break
        assert time.monotonic() < deadline, "the datastore did not pick up the label file"
        time.sleep(0.5)
    shape = citrusv_server.post("/infer/citrusv_segment?image=chest_xray&output=json", data={
        "params": json.dumps({"prompt": "Segment the right lung."})}).json()["image"]["shape"]
    mask = np.zeros(shape[::-1], np.uint8)  # NIfTI order [x, y, z]
    mask[100:200, 150:300] = 1
    path = tmp_path / "xray_lung.nii.gz"
    nib.save(nib.Nifti1Image(mask, np.eye(4)), path)
    r = put_label(citrusv_server, "chest_xray", path, {"label_info": [{"name": "right lung", "idx": 1}]})
    assert r.status_code == 200, r.text
    stored = np.asarray(nib.load(final / "chest_xray.nii.gz").dataobj)
    assert stored.shape == mask.shape and np.array_equal(stored, mask)
    info = citrusv_server.get("/datastore/?output=all").json()["objects"]["chest_xray"]
    assert [e["name"] for e in info["labels"]["final"]["info"]["label_info"]] == ["right lung"]


def test_label_params_must_be_json_and_cannot_name_the_sender(citrusv_server, spleen_label):
    with open(spleen_label, "rb") as f:
        r = citrusv_server.put("/datastore/label?image=chest_ct&tag=final",
                               files={"label": (spleen_label.name, f, "application/gzip")},
                               data={"params": "{not json"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("params must be a JSON object")
    r = put_label(citrusv_server, "chest_ct", spleen_label, {
        "label_info": [{"name": "spleen", "idx": 1, "user": "mallory"}], "user": "mallory",
        "SeriesInstanceUID": "1.2.3", "pacs_segs_written": ["1.2.4"], "source": "me"})
    assert r.status_code == 200, r.text
    info = citrusv_server.get("/datastore/?output=all").json()["objects"]["chest_ct"]
    final = info["labels"]["final"]["info"]
    assert "user" not in final and all("user" not in e for e in final["label_info"])
    # nor which PACS SEGs a label came from or went to (what the SEG import trusts)
    assert not {"SeriesInstanceUID", "pacs_segs_written", "source"} & set(final)


def test_without_sign_in_the_sender_is_kept_as_claimed(citrusv_server, spleen_label):
    # this server has no sign-in: the name the client gives is kept as `claimed_by`, never as
    # `user`, and the admin's listing marks it as claimed
    before = len(_kept(citrusv_server))
    for claim in (5, "", "   ", "x" * 129, "Dr.\nLee", ["Dr. Lee"]):
        r = put_label(citrusv_server, "chest_ct", spleen_label,
                      {"label_info": [{"name": "spleen", "idx": 1}], "claimed_by": claim})
        assert r.status_code == 400, (claim, r.text)
        assert r.json()["detail"].startswith("params.claimed_by must be the sender's name")
    assert len(_kept(citrusv_server)) == before  # nothing kept or merged
    r = put_label(citrusv_server, "chest_ct", spleen_label, {
        "label_info": [{"name": "spleen", "idx": 1, "claimed_by": "mallory"}],
        "claimed_by": "  Dr. Kim ", "prompt": "Segment the spleen."})
    assert r.status_code == 200, r.text
    info = citrusv_server.get("/datastore/?output=all").json()["objects"]["chest_ct"]
    final = info["labels"]["final"]["info"]
    spleen = next(e for e in final["label_info"] if e["name"] == "spleen")
    assert spleen["claimed_by"] == "Dr. Kim" and "user" not in spleen
    assert "claimed_by" not in final  # on the structures it set, not the whole label
    kept = _kept(citrusv_server)
    assert len(kept) == before + 1 and kept[-1]["claimed_by"] == "Dr. Kim"
    stamp = kept[-1]["file"].split(".")[0]
    assert "mallory" not in (kept[-1]["path"].parent / f"{stamp}.json").read_text()
    listing = _history(citrusv_server, "list", "chest_ct")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if stamp in line)
    assert "Dr. Kim (claimed, no sign-in)" in row
    # sent again by the admin, the entry keeps its sender's name
    r = _history(citrusv_server, "restore", "chest_ct", stamp, "--server", citrusv_server.url)
    assert r.returncode == 0, r.stderr
    assert _kept(citrusv_server)[-1]["claimed_by"] == "Dr. Kim"
