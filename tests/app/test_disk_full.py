"""A full disk on the workstation: corrections, uploads and answers that cannot be written get
HTTP 507 with a sentence (MONAI Label 0.8.5 answered a bare 500), the stored label and the index
stay whole, nothing half-written is left, and the server goes on serving.

The disk is made "full" with the file size limit of the running server's processes
(RLIMIT_FSIZE, set from outside: `CitrusVServer.limit_writes`): a write past 100 kB fails as it would on a full
disk (EFBIG here instead of ENOSPC; both take the same path), while reads and small writes go on.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.app.helpers import put_label, reference_label
from tests.server import private_citrusv_server, REPO

sys.path.insert(0, str(REPO / "slicer_extension" / "CitrusV"))
from CitrusVLib import CitrusVClient, CitrusVError  # noqa: E402

SPLEEN, LIVER = 1, 5  # labels.json
LIMIT = 100_000  # bytes a server process may write into one file


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, citrusv_sample_studies):
    with private_citrusv_server(tmp_path_factory.mktemp("disk_full_server"), tiny_model_dir,
                                citrusv_sample_studies) as server:
        yield server


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _partial_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith((".part", ".tmp"))]


def test_correction_on_a_full_disk_gets_507_and_nothing_breaks(server, tmp_path):
    ct = server.studies / "chest_ct.nii.gz"
    spleen = reference_label(tmp_path / "spleen.nii.gz", SPLEEN, ct)
    assert put_label(server, "chest_ct", spleen,
                     {"label_info": [{"name": "spleen", "idx": 1}]}).status_code == 200
    final = server.studies / "labels" / "final" / "chest_ct.nii.gz"
    index = server.studies / "datastore_v2.json"
    before = (_sha(final), _sha(index))
    assert final.stat().st_size > LIMIT  # merging into it must write more than the limit

    # a small correction: the liver on three slices (passes the limit; the merged label does not)
    ref = nib.load(REPO / "sample_data" / "reference" / "chest_ct" / "mask.nii.gz")
    liver = np.zeros(ref.shape, np.uint8)
    liver[:, :, 60:63] = np.asarray(ref.dataobj)[:, :, 60:63] == LIVER
    liver_file = tmp_path / "liver.nii.gz"
    level = nib.openers.Opener.default_compresslevel
    nib.openers.Opener.default_compresslevel = 9  # as small as a CT-sized label gets
    try:
        nib.save(nib.Nifti1Image(liver, nib.load(ct).affine), liver_file)
    finally:
        nib.openers.Opener.default_compresslevel = level
    assert liver_file.stat().st_size < LIMIT and liver.sum() > 1000

    client = CitrusVClient(server.url, read_timeout=300)
    server.limit_writes(LIMIT)
    try:
        with pytest.raises(CitrusVError) as caught:
            client.put_label("chest_ct", liver_file, [{"name": "liver", "idx": 1}],
                             prompt="Segment the liver.")
        assert caught.value.status == 507
        assert str(caught.value) == (
            "The server hit the file size limit set for its process while storing the "
            "correction for 'chest_ct' (File too large); it may not be saved. Keep it and send "
            "it again once IT has freed space on the server.")
        assert (_sha(final), _sha(index)) == before  # the stored label and index are whole
        assert _partial_files(server.studies) == []
        # it was kept as sent, though: the history holds the spleen and this liver
        kept = sorted((server.studies / "labels" / "final" / ".history" / "chest_ct").glob("*.json"))
        assert [json.loads(p.read_text())["label_info"][0]["name"] for p in kept] == [
            "spleen", "liver"]

        # image uploads on the full disk. Under 1 MB the upload reaches the app: 507
        small = tmp_path / "small.nii"  # 256 kB, uncompressed
        nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 255, (512, 512, 1),
                                                                    dtype=np.uint8), np.eye(4)), small)
        with pytest.raises(CitrusVError) as caught:
            client.upload_image(small, "small_image")
        assert caught.value.status == 507
        assert str(caught.value) == (
            "The server hit the file size limit set for its process while storing the uploaded "
            "image 'small_image' (File too large): nothing was added. Ask IT to free space on the "
            "server, then send it again.")
        # a CT: over 1 MB, Starlette spools it to a temporary file while reading the request,
        # before the app sees it (FastAPI answered 400 "There was an error parsing the body")
        with pytest.raises(CitrusVError) as caught:
            client.upload_image(ct, "big_ct")
        assert caught.value.status == 507
        assert str(caught.value) == (
            "The server hit the file size limit set for its process while receiving the upload "
            "into its temporary folder (File too large): nothing was stored. Ask IT to free "
            "space on the server, then send it again.")
        # a correction over 1 MB (the liver label uncompressed) goes the same way
        liver_nii = tmp_path / "liver.nii"
        nib.save(nib.Nifti1Image(liver, nib.load(ct).affine), liver_nii)
        with pytest.raises(CitrusVError) as caught:
            client.put_label("chest_ct", liver_nii, [{"name": "liver", "idx": 1}])
        assert caught.value.status == 507 and "receiving the upload" in str(caught.value)
        assert (_sha(final), _sha(index)) == before
        # the server still answers
        assert server.get("/info/").status_code == 200
    finally:
        server.limit_writes(resource.RLIM_INFINITY)

    assert not {"big_ct", "small_image"} & set(server.get("/datastore/?output=all").json()["objects"])
    # space again: the same correction goes through and merges with the spleen
    client.put_label("chest_ct", liver_file, [{"name": "liver", "idx": 1}],
                     prompt="Segment the liver.")
    stored = np.asarray(nib.load(final).dataobj)
    names = {e["name"]: e["idx"] for e in server.get("/datastore/?output=all").json()[
        "objects"]["chest_ct"]["labels"]["final"]["info"]["label_info"]}
    assert set(names) == {"spleen", "liver"}
    assert np.array_equal(stored == names["liver"], liver.astype(bool))
    assert np.array_equal(stored == names["spleen"],
                          np.asarray(nib.load(spleen).dataobj).astype(bool))
