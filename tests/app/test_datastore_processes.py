"""Two processes write one datastore: the server (corrections) and its training run (PACS SEG
imports). Each keeps the index in memory; a write must start from the index on disk, or it puts
an older one back and a correction saved meanwhile loses its structure.

Two `CorrectionsDatastore` objects on one studies folder stand for the two processes (each reads
the index once when created, as each process does)."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np

from tests.app.helpers import reference_label
from tests.server import APP_DIR, copy_studies

sys.path.insert(0, str(APP_DIR))
from lib.datastore import EXTENSIONS, CorrectionsDatastore  # noqa: E402

LIVER, SPLEEN = 5, 1  # labels.json


def _history(studies, *args: str) -> subprocess.CompletedProcess:
    """The admin's history command on a studies folder."""
    return subprocess.run([sys.executable, str(APP_DIR / "history.py"), "--datastore",
                           str(studies), *args], capture_output=True, text=True, timeout=120)


def test_a_stale_process_merges_into_the_label_another_one_saved(citrusv_sample_studies, tmp_path):
    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    server, training = (CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
                        for _ in range(2))
    ct = studies / "chest_ct.nii.gz"
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, ct)
    spleen = reference_label(tmp_path / "spleen.nii.gz", SPLEEN, ct)

    server.save_label("chest_ct", str(liver), "final", {"label_info": [{"name": "liver", "idx": 1}]})
    # the other process has not seen that save; its write must still keep the liver
    training.save_label("chest_ct", str(spleen), "final",
                        {"label_info": [{"name": "spleen", "idx": 1}]})

    fresh = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    info = fresh.get_label_info("chest_ct", "final")
    assert [(e["name"], e["idx"]) for e in info["label_info"]] == [("liver", 1), ("spleen", 2)]
    stored = np.asarray(nib.load(studies / "labels" / "final" / "chest_ct.nii.gz").dataobj)
    assert np.array_equal(stored == 1, np.asarray(nib.load(liver).dataobj) > 0)
    assert np.array_equal(stored == 2, np.asarray(nib.load(spleen).dataobj) > 0)
    # and the first process, writing again, does not put its older index back either
    server.save_label("chest_ct", str(liver), "final", {"label_info": [{"name": "liver", "idx": 1}]})
    info = CorrectionsDatastore(str(studies), extensions=EXTENSIONS).get_label_info("chest_ct", "final")
    assert [e["name"] for e in info["label_info"]] == ["spleen", "liver"]


def test_training_skips_a_structure_stored_with_a_bad_window(citrusv_sample_studies, tmp_path):
    # a correction saved before the save-time checks, with a window the engine does not know,
    # used to fail every training run; now that structure is left out and the rest trains
    from lib.corrections import collect

    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    ct = studies / "chest_ct.nii.gz"
    for name, value in (("liver", LIVER), ("spleen", SPLEEN)):
        store.save_label("chest_ct", str(reference_label(tmp_path / f"{name}.nii.gz", value, ct)),
                         "final", {"label_info": [{"name": name, "idx": 1}], "window": "abdomen"})
    index = studies / "datastore_v2.json"
    text = index.read_text()
    assert text.count('"window": "abdomen"') == 2
    index.write_text(text.replace('"window": "abdomen"', '"window": "brainz"', 1))  # the liver's
    samples = collect(CorrectionsDatastore(str(studies), extensions=EXTENSIONS),
                      max_per_structure=4)
    assert {s.label for s in samples} == {"spleen"} and len(samples) >= 4


def test_a_correction_named_with_capitals_is_asked_for_in_the_models_words(
        citrusv_sample_studies, tmp_path):
    """A Slicer segment "Spleen" sent without a question trains on "Segment the spleen."
    (nano was taught lower-case names; as typed it answers capitals worse)."""
    from lib.corrections import collect

    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    ct = studies / "chest_ct.nii.gz"
    store.save_label("chest_ct", str(reference_label(tmp_path / "s.nii.gz", SPLEEN, ct)), "final",
                     {"label_info": [{"name": " Spleen", "idx": 1}]})
    samples = collect(CorrectionsDatastore(str(studies), extensions=EXTENSIONS),
                      max_per_structure=4)
    assert {(s.label, s.prompt) for s in samples} == {(" Spleen", "Segment the spleen.")}


def test_a_label_found_again_gets_its_names_back(citrusv_sample_studies, tmp_path, caplog):
    """The index holds what a correction named. A label MONAI Label finds again after its image
    left the index (the index file deleted, the image moved out and back) was listed with no
    names, its structure then trained as "label 1". The info is kept beside the label too, and
    taken back while the label file is the one saved and the id names the same image file."""
    import os
    import shutil

    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    ct = studies / "chest_ct.nii.gz"
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, ct)
    CorrectionsDatastore(str(studies), extensions=EXTENSIONS).save_label(
        "chest_ct", str(liver), "final",
        {"label_info": [{"name": "liver", "idx": 1}], "prompt": "Segment the liver."})

    def names() -> list[str] | None:
        info = CorrectionsDatastore(str(studies), extensions=EXTENSIONS).get_label_info(
            "chest_ct", "final")
        return [e["name"] for e in info["label_info"]] if "label_info" in info else None

    assert names() == ["liver"]
    os.unlink(studies / "datastore_v2.json")  # the index lost
    assert names() == ["liver"]
    shutil.move(ct, tmp_path / "away.nii.gz")  # the image moved out: it leaves the index
    with caplog.at_level("INFO"):
        store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
        assert "chest_ct" not in store.list_images()
        for _ in range(3):  # a refresh per file event: the label is said once, in /info/ too
            store.refresh()
    label = os.path.join("labels", "final", "chest_ct.nii.gz")  # relative to the studies folder
    gone = (f"The label {label} has no image: nothing in the studies folder has the id "
            "'chest_ct' now; it is kept on disk, and listed again when its image is back.")
    assert store.status()["notes"] == [gone]
    assert [r.getMessage() for r in caplog.records if "chest_ct" in r.getMessage()
            and r.levelname == "WARNING"] == [gone]
    shutil.move(tmp_path / "away.nii.gz", ct)  # and back
    assert names() == ["liver"]
    # another image file under the id: the label, saved for the other file, is not listed
    # with it (it stays on disk)
    shutil.move(ct, studies / "chest_ct.nii")
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert sorted(store.list_images()) == ["chest_ct", "chest_xray"]
    assert store.get_labels_by_image_id("chest_ct") == {}
    assert (studies / "labels" / "final" / "chest_ct.nii.gz").is_file()
    assert store.status()["notes"] == [
        f"The label {label} was saved for the image chest_ct.nii.gz, not chest_ct.nii, which its "
        "id names now; it is kept on disk and not listed with it."]
    shutil.move(studies / "chest_ct.nii", ct)
    os.unlink(studies / "datastore_v2.json")
    assert names() == ["liver"]
    # a label file replaced by another: the kept names are not given to it
    spleen = reference_label(tmp_path / "spleen.nii.gz", SPLEEN, ct)
    shutil.copy(spleen, studies / "labels" / "final" / "chest_ct.nii.gz")
    os.unlink(studies / "datastore_v2.json")
    assert names() is None


def test_a_label_saved_for_an_image_since_replaced_is_kept_apart(citrusv_sample_studies,
                                                                  tmp_path, monkeypatch):
    """An image replaced on disk by another under the same file name kept the first one's
    correction: listed with it, shown on it, trained with it. The content it was saved for is
    kept beside the label; a label whose image holds other content now is taken out of the
    index (its file stays), and a new correction for the image sets the old file aside instead
    of merging into it. A copy of the same image (new times, same bytes) keeps its label."""
    import os
    import shutil

    from lib.corrections import collect

    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    ct = studies / "chest_ct.nii.gz"
    final = studies / "labels" / "final"
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, ct)
    server = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    server.save_label("chest_ct", str(liver), "final",
                      {"label_info": [{"name": "liver", "idx": 1}], "prompt": "Segment the liver."})
    saved = (final / "chest_ct.nii.gz").read_bytes()

    def names(store) -> list[str]:
        info = store.get_labels_by_image_id("chest_ct")
        return [e["name"] for e in store.get_label_info("chest_ct", "final")["label_info"]] \
            if info else []

    shutil.copy(ct, tmp_path / "same.nii.gz")  # the same image copied over itself: new times
    shutil.copy(tmp_path / "same.nii.gz", ct)
    os.utime(ct, ns=(1, 1))
    server.refresh()
    assert names(server) == ["liver"]
    assert names(CorrectionsDatastore(str(studies), extensions=EXTENSIONS)) == ["liver"]
    # a refresh looks at a labelled image's files once (twice before: MONAI Label asks twice
    # per refresh what is gone)
    import lib.datastore
    import lib.files

    looked = []
    read_file, stat_image = lib.files._read_sha256, lib.datastore.image_stat
    monkeypatch.setattr(lib.datastore, "image_stat", lambda p: looked.append(p) or stat_image(p))
    server.refresh()
    assert [os.path.normpath(p) for p in looked] == [str(ct)] and names(server) == ["liver"]
    monkeypatch.undo()

    # another scan of the same size under the same name
    image = nib.load(ct)
    other = np.flip(np.asarray(image.dataobj), axis=0).copy()
    nib.save(nib.Nifti1Image(other, image.affine, image.header), ct)
    server.refresh()  # the running server (its watcher refreshes on the change)
    assert names(server) == []
    # nothing changed since: a refresh reads no file (the label kept apart was read at each)
    hashed = []
    monkeypatch.setattr(lib.files, "_read_sha256", lambda p: hashed.append(p) or read_file(p))
    server.refresh()
    assert hashed == [] and names(server) == []
    monkeypatch.undo()
    fresh = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)  # and a restart
    assert names(fresh) == [] and fresh.get_labeled_images() == []
    assert collect(fresh, max_per_structure=4) == []
    assert (final / "chest_ct.nii.gz").read_bytes() == saved  # kept on disk
    label = os.path.join("labels", "final", "chest_ct.nii.gz")
    assert fresh.status()["notes"] == [
        f"The label {label} was saved for another image than the chest_ct.nii.gz there now (it "
        "was replaced); it is kept on disk and not listed with it."]
    # the correction as it was sent is kept too; the admin's history command marks it and does
    # not send it to the scan there now
    (kept,) = (studies / "labels" / "final" / ".history" / "chest_ct").glob("*.json")
    stamp = kept.name[:-len(".json")]
    r = _history(studies, "restore", "chest_ct", stamp, "--server", "http://127.0.0.1:9")
    assert (r.returncode, r.stderr) == (2, (
        f"error: entry {stamp} was sent for the image that 'chest_ct' named then, which was "
        "replaced on disk by another since; it is not sent to the one there now.\n"))

    # a correction for the new scan: the old label is set aside, not merged into
    spleen = reference_label(tmp_path / "spleen.nii.gz", SPLEEN, ct)
    server.save_label("chest_ct", str(spleen), "final",
                      {"label_info": [{"name": "spleen", "idx": 1}]})
    fresh = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert names(fresh) == ["spleen"] and fresh.status().get("notes", []) == []
    stored = np.asarray(nib.load(final / "chest_ct.nii.gz").dataobj)
    assert np.array_equal(stored > 0, np.asarray(nib.load(spleen).dataobj) > 0)
    aside = sorted(p.name for p in (final / ".set_aside").iterdir())
    assert len(aside) == 2 and aside[0].endswith("-chest_ct.json"), aside
    assert aside[1].endswith("-chest_ct.nii.gz")
    assert (final / ".set_aside" / aside[1]).read_bytes() == saved
    listing = _history(studies, "list", "chest_ct").stdout.splitlines()
    rows = [line.split() for line in listing[1:-1]]  # oldest first: the liver, the spleen
    assert [(row[1] == stamp, row[2] == "*") for row in rows] == [(True, True), (False, False)]
    assert listing[-1].startswith("* sent for an image since replaced on disk"), listing


def test_a_correction_for_a_replaced_image_is_not_merged_before_any_refresh(
        citrusv_sample_studies, tmp_path):
    """The image replaced on disk and no refresh since (a watcher sees no change made on a
    network folder by another machine): a correction for it set the first image's label's
    structures onto it in the merge."""
    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    ct = studies / "chest_ct.nii.gz"
    final = studies / "labels" / "final"
    server = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    server.save_label("chest_ct", str(reference_label(tmp_path / "liver.nii.gz", LIVER, ct)),
                      "final", {"label_info": [{"name": "liver", "idx": 1}]})
    saved = (final / "chest_ct.nii.gz").read_bytes()
    image = nib.load(ct)
    nib.save(nib.Nifti1Image(np.flip(np.asarray(image.dataobj), axis=1).copy(), image.affine,
                             image.header), ct)
    spleen = reference_label(tmp_path / "spleen.nii.gz", SPLEEN, ct)
    server.save_label("chest_ct", str(spleen), "final", {"label_info": [{"name": "spleen", "idx": 1}]})
    info = server.get_label_info("chest_ct", "final")
    assert [e["name"] for e in info["label_info"]] == ["spleen"]
    stored = np.asarray(nib.load(final / "chest_ct.nii.gz").dataobj)
    assert np.array_equal(stored > 0, np.asarray(nib.load(spleen).dataobj) > 0)
    (aside,) = (final / ".set_aside").glob("*.nii.gz")
    assert aside.read_bytes() == saved


def test_the_history_listing_reads_the_index_once(tmp_path, monkeypatch):
    """`history.py list` over many images' corrections reads the server's index once and hashes
    each image once, and marks the corrections sent for an image replaced since."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("citrusv_history", APP_DIR / "history.py")
    history = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(history)
    objects = {}
    for i in range(5):
        (tmp_path / f"ct{i}.nii.gz").write_bytes(b"image %d" % i)
        objects[f"ct{i}"] = {"image": {"info": {"name": f"ct{i}.nii.gz"}}, "labels": {}}
        folder = tmp_path / "labels" / "final" / ".history" / f"ct{i}"
        folder.mkdir(parents=True)
        digest = history.image_sha256(str(tmp_path / f"ct{i}.nii.gz"))
        for j, sent_for in enumerate((digest, digest if i else "another image")):
            stamp = f"2026120{j + 1}T000000-00000{j}"
            (folder / f"{stamp}.nii.gz").write_bytes(b"label")
            (folder / f"{stamp}.json").write_text(json.dumps(
                {"image": f"ct{i}", "file": f"{stamp}.nii.gz", "image_sha256": sent_for,
                 "received": "then", "label_info": [{"idx": 1, "name": "liver"}]}))
    (tmp_path / "datastore_v2.json").write_text(json.dumps({"objects": objects}))
    reads, hashed = [], []
    read_text, image_sha256 = Path.read_text, history.image_sha256
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: reads.append(p.name)
                        or read_text(p, *a, **k))
    monkeypatch.setattr(history, "image_sha256", lambda p: hashed.append(p) or image_sha256(p))
    listing = history.list_entries(tmp_path, None).splitlines()
    assert reads == ["datastore_v2.json"] and len(hashed) == 5 == len(set(hashed))
    rows = [line.split() for line in listing[1:-1]]  # a header, then the footnote
    assert len(rows) == 10 and [r[0] for r in rows if r[2] == "*"] == ["ct0"], listing


def test_a_label_kept_before_image_digests_gets_one_where_its_image_was_not_written_since(
        citrusv_sample_studies, tmp_path, caplog):
    """A label kept by a server older than 2026-12-06 has no digest of its image, so its image
    being replaced went unseen. Where the image was not written since the label's record was,
    the label was saved for what it holds now: the record gets that digest at the next refresh,
    and a later replacement is seen. Where it was written since, nothing tells: the log says
    so once and the label stays listed."""
    import logging
    import os
    import time

    from lib.files import image_sha256

    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    ct = studies / "chest_ct.nii.gz"
    record = studies / "labels" / "final" / ".info" / "chest_ct.json"
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, ct)
    CorrectionsDatastore(str(studies), extensions=EXTENSIONS).save_label(
        "chest_ct", str(liver), "final", {"label_info": [{"name": "liver", "idx": 1}]})

    def as_kept_before_digests() -> None:
        kept = json.loads(record.read_text())
        assert kept.pop("image_sha256") == image_sha256(str(ct)) and kept.pop("image_stat")
        record.write_text(json.dumps(kept))

    def names(store) -> list[str]:
        info = store.get_labels_by_image_id("chest_ct")
        return [e["name"] for e in store.get_label_info("chest_ct", "final")["label_info"]] \
            if info else []

    # written since (touched here; a copy over it alike): nothing tells, said once
    as_kept_before_digests()
    time.sleep(0.05)
    os.utime(ct)
    with caplog.at_level(logging.INFO, logger="lib.datastore"):
        server = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
        server.refresh()
    assert names(server) == ["liver"] and "image_sha256" not in json.loads(record.read_text())
    told = [r.getMessage() for r in caplog.records if "older than 2026-12-06" in r.getMessage()]
    assert told == [
        "The final label of chest_ct was saved by a server older than 2026-12-06, which recorded "
        "no digest of its image, and chest_ct.nii.gz was written since: whether it is the image "
        "the label was drawn on cannot be told; the label stays listed with it."]

    # not written since the record was: the record gets the image's digest
    caplog.clear()
    time.sleep(0.05)
    record.write_text(record.read_text())  # as kept by an older server after the image came
    with caplog.at_level(logging.INFO, logger="lib.datastore"):
        server = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    assert names(server) == ["liver"]
    assert json.loads(record.read_text())["image_sha256"] == image_sha256(str(ct))
    assert [r.getMessage() for r in caplog.records if "digest" in r.getMessage()] == [
        "The final label of chest_ct was kept by a server that recorded no digest of its image; "
        "chest_ct.nii.gz was not written since, so its digest is recorded now."]
    # so another scan put in its place later is seen
    image = nib.load(ct)
    other = np.flip(np.asarray(image.dataobj), axis=0).copy()
    nib.save(nib.Nifti1Image(other, image.affine, image.header), ct)
    server.refresh()
    assert names(server) == []
    assert names(CorrectionsDatastore(str(studies), extensions=EXTENSIONS)) == []


def test_an_image_digest_is_adopted_where_the_record_cannot_be_written(tmp_path, monkeypatch):
    """`adopt_image_content` on a read-only (or full) disk: the image's digest still stands for
    this run (the record is written at a later refresh); an image written after the record was
    gets none."""
    import os
    import time

    import lib.files as files

    image = tmp_path / "ct.nii.gz"
    image.write_bytes(b"the scan")
    time.sleep(0.05)
    record = tmp_path / "labels" / "final" / ".info" / "ct.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"image": "ct.nii.gz", "info": {}}))

    def refuse(*_args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files, "write_json_atomic", refuse)
    kept = files.adopt_image_content(str(record.parents[1]), "ct", {"image": "ct.nii.gz",
                                                                     "info": {}}, str(image))
    assert kept["image_sha256"] == files.image_sha256(str(image))
    assert "image_sha256" not in json.loads(record.read_text())
    time.sleep(0.05)
    os.utime(image)  # written after the record: nothing tells
    assert files.adopt_image_content(str(record.parents[1]), "ct", {"image": "ct.nii.gz",
                                                                    "info": {}}, str(image)) is None


def test_one_refresh_at_a_time(citrusv_sample_studies, tmp_path, monkeypatch):
    """The folder watcher's thread, the timer after an image's writes and request threads each
    refresh the index; two at once ended the watcher's thread ("dictionary changed size during
    iteration", seen in a test run), and nothing copied in after was listed."""
    import threading
    import time

    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS)
    walk, inside, peak = store._add_non_existing_images, [0], [0]

    def slow() -> int:
        inside[0] += 1
        peak[0] = max(peak[0], inside[0])
        time.sleep(0.2)  # a refresh walking the index while another starts
        try:
            return walk()
        finally:
            inside[0] -= 1

    monkeypatch.setattr(store, "_add_non_existing_images", slow)
    threads = [threading.Thread(target=store.refresh) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert peak[0] == 1 and sorted(store.list_images()) == ["chest_ct", "chest_xray"]


def test_a_failed_refresh_does_not_end_the_folder_watcher(citrusv_sample_studies, sample_root,
                                                          tmp_path, monkeypatch):
    """A refresh the watcher starts that fails is logged; the watcher goes on, and a series
    folder copied in after is listed (raised in its thread, the error ended it)."""
    import shutil
    import time

    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    store = CorrectionsDatastore(str(studies), extensions=EXTENSIONS, auto_reload=True)
    try:
        look, failures = store._look_below, []

        def fails_once() -> None:
            if not failures:
                failures.append(1)
                raise RuntimeError("dictionary changed size during iteration")
            look()

        monkeypatch.setattr(store, "_look_below", fails_once)
        slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))[:2]
        for name in ("first", "second"):
            (tmp_path / name).mkdir()
            for f in slices:
                shutil.copy(f, tmp_path / name / f.name)
            (tmp_path / name).rename(studies / name)  # renamed into place whole
            deadline = time.monotonic() + 30
            while not failures and time.monotonic() < deadline:
                time.sleep(0.2)
        deadline = time.monotonic() + 30
        while "second" not in store.list_images() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert failures and "second" in store.list_images()
    finally:
        store._observer.stop()
        store._observer.join(timeout=10)
